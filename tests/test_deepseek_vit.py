"""timm ``deepseek_vit`` (``learnable_memory/families/deepseek_vit.py``): what the family decides for a
new class token (its start and its read-out), and ``torch.compile``. The guarantees and the per-block
dense references run in ``tests/test_families.py``."""

from __future__ import annotations

import torch

import learnable_memory as lm
from learnable_memory.testing import randomize
from tests.helpers import assert_compiles_as_eager, grid_backbone, images_for

NARROW = {"depth": 2, "embed_dim": 64, "num_heads": 4}


def test_a_new_class_token_starts_empty_and_is_read_through_both_norms():
    base, _ = grid_backbone("deepseek_vit_412m", 3, **NARROW)
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    assert torch.equal(model.tasks["default"].class_token.detach(), torch.zeros(64))
    c = torch.randn(2, 1, 64)
    assert torch.equal(model.backbone.task_features(base, c), base.norm(base.encoder.norm(c)))


def test_the_projecting_encoder_reads_a_new_class_token_through_its_norm_only():
    base, size = grid_backbone("deepseek_vit_412m_enc", 4, **NARROW)  # 4x4 patches: the aligner pads to 6x6
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    c = torch.randn(2, 1, 64)
    assert torch.equal(model.backbone.task_features(base, c), base.norm(c))
    x = images_for(size, 2)
    with torch.no_grad():
        assert torch.equal(model.forward_all(x)["base"], base(x))


def test_forward_all_compiles_without_a_graph_break():
    base, size = grid_backbone("deepseek_vit_412m", 3, **NARROW)
    model = lm.wrap_model(lm.wrap_model(base, n_mem=2, num_classes=3, task="a"), n_mem=1, num_classes=2, task="b",
                          mode="extension")
    randomize(model)
    assert_compiles_as_eager(model, images_for(size, 2))
