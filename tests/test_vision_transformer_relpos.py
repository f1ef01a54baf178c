"""timm ``VisionTransformerRelPos`` (``learnable_memory/families/vision_transformer_relpos.py``): the
relative position bias a new class token gets, the learned-table variant (``RelPosBias``, which no
registered architecture uses) under every guarantee, a wrong bias row caught, and packing."""

from __future__ import annotations

import pytest
import torch

import learnable_memory as lm
from learnable_memory import testing as lmt
from learnable_memory.context import PassContext
from learnable_memory.families.vision_transformer_relpos import RelPosAttentionKind
from learnable_memory.testing import randomize
from tests.helpers import assert_compiles_as_eager, grid_backbone, images_for

NARROW = {"depth": 2, "embed_dim": 64, "num_heads": 4}


def noisy(arch: str, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    """``arch`` narrow at depth 2 with noise on every weight (the bias tables start at zero) and
    LayerScale at 1, and images for it."""
    base, size = grid_backbone(arch, 3, **NARROW, **kwargs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in base.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("gamma") else p + 0.3 * torch.randn(p.shape, generator=g))
    return base, images_for(size, 2)


@pytest.mark.parametrize("rel_pos_type", ["bias", "mlp"])
def test_a_new_class_token_gets_the_class_tokens_bias_row(rel_pos_type):
    base, x = noisy("vit_relpos_medium_patch16_cls_224", rel_pos_type=rel_pos_type)
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    attn = base.blocks[0].attn
    _, extras = model.backbone.embed(base, x)
    ctx = PassContext(index=None, full=False, orig_grad=False, extras=extras)
    bias_x, bias_c = RelPosAttentionKind().position_bias(attn, ctx, x.shape[1])
    want = attn.rel_pos.get_bias()
    assert torch.equal(bias_x, want) and torch.equal(bias_c, want[..., :1, :])
    if rel_pos_type == "bias":
        assert bias_c.abs().sum() > 0, "the learned table gives the class token a row of its own"


def test_without_a_class_token_a_new_class_token_gets_no_bias():
    base, x = noisy("vit_srelpos_small_patch16_224")
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    _, extras = model.backbone.embed(base, x)
    ctx = PassContext(index=None, full=False, orig_grad=False, extras=extras)
    bias_x, bias_c = RelPosAttentionKind().position_bias(base.blocks[0].attn, ctx, x.shape[1])
    assert torch.equal(bias_x, base.shared_rel_pos.get_bias()) and bias_c is None
    assert torch.equal(model.tasks["default"].class_token, torch.zeros(64))


def test_the_learned_table_keeps_every_guarantee(tmp_path):
    base, x = noisy("vit_relpos_medium_patch16_cls_224", rel_pos_type="bias")
    lmt.check_all(base, x, tmp_path, tol=lmt.Tolerance(scaled=True))


def test_a_wrong_bias_row_for_new_class_tokens_is_caught(monkeypatch):
    base, x = noisy("vit_relpos_medium_patch16_cls_224", rel_pos_type="bias")

    def last_row(self, attn, ctx, n_tokens):
        bias = attn.rel_pos.get_bias()
        return bias, bias[..., -1:, :]

    monkeypatch.setattr(RelPosAttentionKind, "position_bias", last_row)
    with pytest.raises(AssertionError, match="dense reference"):
        lmt.check_new_tokens(base, x)


def test_the_relative_position_mlp_does_not_keep_the_pass_from_packing():
    base, x = noisy("vit_relpos_medium_patch16_cls_224")  # its MLP runs 2 -> 256 -> 4 on coordinates
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    assert model.unpacked_reason is None
    randomize(model)
    with torch.no_grad():
        packed = model.forward_all(x)
    with torch.enable_grad():
        split = {k: v.detach() for k, v in model.forward_all(x).items()}
    lmt.assert_outputs_close(packed, split)


def test_forward_all_compiles_without_a_graph_break():
    base, x = noisy("vit_relpos_medium_patch16_cls_224")
    model = lm.wrap_model(lm.wrap_model(base, n_mem=2, num_classes=3, task="a"), n_mem=1, num_classes=2, task="b",
                          mode="extension")
    randomize(model)
    assert_compiles_as_eager(model, x)
