"""timm ``ConVit`` (``learnable_memory/families/convit.py``): GPSA blocks run as the embedding, memory
and new class tokens in the MHSA blocks, the original tokens' attention in timm's order, a model with
no MHSA block refused, the key/value cache under ``torch.inference_mode``, and ``torch.compile``."""

from __future__ import annotations

import pytest
import timm
import torch

import learnable_memory as lm
from learnable_memory.testing import randomize
from tests.helpers import assert_compiles_as_eager, assert_packs_as_split, images_for

SMALL = {"pretrained": False, "depth": 3, "local_up_to_layer": 1, "embed_dim": 16, "num_heads": 4, "img_size": 48}


def convit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("convit_tiny", **SMALL).eval()


def test_memory_goes_in_the_mhsa_blocks_only():
    base = convit()
    model = lm.wrap_model(base, n_mem=3, num_classes=4)
    assert model.depth == 2 and tuple(model.tasks["default"].memory.shape) == (2, 3, 64)
    assert model.backbone.blocks(base) == list(base.blocks[1:])
    assert torch.equal(model.tasks["default"].class_token.detach(), base.cls_token.reshape(64))


def test_the_base_output_is_bit_identical_under_inference_mode_from_the_first_pass():
    """GPSA builds a buffer at its first forward; under inference_mode that would be an inference tensor."""
    base, x = convit(), images_for(48, 2)
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    randomize(model)
    with torch.inference_mode():
        got = model.forward_all(x)
        again = model.forward_all(x)  # from the key/value cache
        want = base(x)
    assert torch.equal(got["base"], want) and torch.equal(again["default"], got["default"])


def test_a_convit_without_an_mhsa_block_is_refused():
    base = timm.create_model("convit_tiny", **{**SMALL, "depth": 1})
    with pytest.raises(ValueError, match="all GPSA .* build it with local_up_to_layer < depth"):
        lm.wrap_model(base, n_mem=1, num_classes=2)


def test_forward_all_compiles_without_a_graph_break():
    model = lm.wrap_model(lm.wrap_model(convit(), n_mem=2, num_classes=3, task="a"), n_mem=1, num_classes=2,
                          task="b", mode="extension")
    randomize(model)
    assert_compiles_as_eager(model, images_for(48, 2))


def test_the_mhsa_kind_packs_and_the_packed_pass_equals_the_split_pass():
    """The kind gives only the original tokens' attention (timm's order): the split stays the core's."""
    assert_packs_as_split(convit(), images_for(48, 2))
