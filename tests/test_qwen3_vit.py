"""timm ``qwen3_vit`` (``learnable_memory/families/qwen3_vit.py``): no class token, rotary blocks, the
classifier's mean pooling and the encoder's 2x2 projector. The guarantees and the per-block dense
references run in ``tests/test_families.py``; here: what the family decides, and ``torch.compile``."""

from __future__ import annotations

import pytest
import torch

import learnable_memory as lm
from learnable_memory.testing import randomize
from tests.helpers import assert_compiles_as_eager, grid_backbone, images_for

NARROW = {"depth": 2, "embed_dim": 64, "num_heads": 4}


def test_a_new_class_token_starts_as_the_mean_position_embedding_and_ends_through_the_final_norm():
    base, size = grid_backbone("qwen3_vit_88m", 4, **NARROW)
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    torch.testing.assert_close(model.tasks["default"].class_token.detach(), base.encoder.pos_embed[0].mean(0),
                               rtol=0, atol=0)
    c = torch.randn(2, 1, 64)
    assert torch.equal(model.backbone.task_features(base, c), base.norm(c))


def test_the_encoder_projects_a_new_class_token_through_the_projector_norm_only():
    base, size = grid_backbone("qwen3_vit_88m_enc", 4, **NARROW)
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    c = torch.randn(2, 1, 64)
    assert torch.equal(model.backbone.task_features(base, c), base.merger.norm(c))
    with torch.no_grad():
        assert torch.equal(model.forward_all(images_for(size, 2))["base"], base(images_for(size, 2)))


def test_a_grid_the_projector_can_not_merge_is_refused_before_the_pass():
    base, size = grid_backbone("qwen3_vit_88m_enc", 3, **NARROW)
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    with pytest.raises(ValueError, match=r"3x3 patches, but the projector merges 2x2 patches: use a multiple of 32x32"):
        model(images_for(size, 2))
    with pytest.raises(ValueError, match="not a multiple of the patch size 16x16"):
        model(images_for(size + 1, 2))


def test_forward_all_compiles_without_a_graph_break():
    base, size = grid_backbone("qwen3_vit_88m", 4, **NARROW)
    model = base
    for name, mode in (("a", "non_destructive"), ("b", "extension")):
        model = lm.wrap_model(model, n_mem=2, num_classes=3, task=name, mode=mode)
    randomize(model)
    assert_compiles_as_eager(model, images_for(size, 2))
