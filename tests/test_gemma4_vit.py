"""timm ``gemma4_vit`` (``learnable_memory/families/gemma4_vit.py``): what the family decides for a new
class token, the input it refuses, the original tokens' attention at scale 1 on both of timm's paths,
and ``torch.compile``. The guarantees and the per-block dense references run in ``tests/test_families.py``."""

from __future__ import annotations

import pytest
import torch

import learnable_memory as lm
from learnable_memory import testing as lmt
from learnable_memory.testing import randomize
from tests.helpers import assert_compiles_as_eager, assert_packs_as_split, grid_backbone, images_for, set_fused_attn

NARROW = {"depth": 2, "embed_dim": 64, "num_heads": 4, "head_dim": 16, "intermediate_size": 128}


def gemma4(arch: str = "gemma4_vit_167m", grid: int = 3) -> tuple[torch.nn.Module, torch.Tensor]:
    base, size = grid_backbone(arch, grid, **NARROW)
    return base, images_for(size, 2).sigmoid()  # pixel values in [0, 1], as timm takes them


def test_a_new_class_token_starts_as_zeros_and_is_read_through_the_final_norm():
    base, _ = gemma4()
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    assert torch.equal(model.tasks["default"].class_token.detach(), torch.zeros(64))
    c = torch.randn(2, 1, 64)
    assert torch.equal(model.backbone.task_features(base, c), base.norm(c))
    assert model.unpacked_reason is None  # its kind gives the scale and the original tokens' attention: it packs


@pytest.mark.parametrize("fused", [True, False])
def test_the_base_output_is_bit_identical_on_both_attention_paths(fused):
    base, x = gemma4()
    set_fused_attn(base, fused)
    lmt.check_base_unchanged(base, x)


def test_input_it_can_not_take_is_refused_saying_why():
    base, x = gemma4("gemma4_vit_167m_enc", grid=4)  # the soft-token pool needs a grid of 3x3 cells
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    with pytest.raises(ValueError, match="divisible by"):
        model(x)
    with pytest.raises(ValueError, match="patch dicts and pre-patchified input are not supported"):
        model({"patches": torch.zeros(2, 16, 768)})


def test_forward_all_compiles_without_a_graph_break():
    base, x = gemma4()
    model = lm.wrap_model(lm.wrap_model(base, n_mem=2, num_classes=3, task="a"), n_mem=1, num_classes=2, task="b",
                          mode="extension")
    randomize(model)
    assert_compiles_as_eager(model, x)


@pytest.mark.parametrize("fused", [True, False])
def test_the_packed_pass_equals_the_split_pass(fused):
    """The kind gives only the scale and the original tokens' attention: the split stays the core's."""
    base, x = gemma4()
    assert_packs_as_split(set_fused_attn(base, fused), x)
