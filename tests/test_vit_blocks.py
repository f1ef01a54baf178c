"""The block and attention kinds of ``families/vit.py`` and ``families/vit_parallel.py`` against the
dense reference (every token and all memory as one sequence through timm's own blocks, with the
Table 1 mask as ``attn_mask``), in every mode and on both of timm's attention paths (fused SDPA and
the explicit softmax). Narrow random-weight models; LayerScale at 0.5 so the blocks matter.
"""

from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock

import learnable_memory as lm
from learnable_memory import testing as lmt
from tests.helpers import grid_backbone, images_for, set_fused_attn

NARROW = {"embed_dim": 64, "num_heads": 4}

# name -> (architecture, kwargs for timm.create_model at depth 2); all at a 3x3 patch grid
VARIANTS = {
    "res_post_block": ("vit_base_patch16_rpn_224", {**NARROW, "init_values": 0.5}),
    # qk_norm (RmsNorm), mlp_bias, separate attention / MLP output projections
    "parallel_scaling": ("vit_base_patch16_xp_224", {**NARROW, "init_values": 0.5}),
    # qkv bias (no mlp_bias), one fused output projection
    "parallel_scaling_fused_out": (
        "vit_pwee_patch16_reg1_gap_256",
        {**NARROW, "init_values": 0.5, "block_fn": partial(ParallelScalingBlock, fuse_out_proj=True)},
    ),
    "diff_parallel_scaling": ("vit_dpwee_patch16_reg1_gap_256", {**NARROW, "init_values": 0.5, "qk_norm": True}),
    "diff_parallel_dual_lambda": (
        "vit_dpwee_patch16_reg1_gap_256",
        {**NARROW, "init_values": 0.5, "block_fn": partial(DiffParallelScalingBlock, dual_lambda=True)},
    ),
    # DiffAttention in a Block, with q/k norm and scale norm
    "diff_attention": (
        "vit_dwee_patch16_reg1_gap_256",
        {**NARROW, "init_values": 0.5, "qk_norm": True, "scale_attn_norm": True},
    ),
    "parallel_things": ("vit_small_patch16_18x2_224", {**NARROW, "init_values": 0.5}),
    "parallel_things_3": ("vit_small_patch16_18x2_224", {**NARROW, "block_fn": partial(
        timm.models.vision_transformer.ParallelThingsBlock, num_parallel=3)}),
    "attention_scale_norm": ("beit3_base_patch16_224", NARROW),
    "distilled": ("deit_tiny_distilled_patch16_224", NARROW),
    "hybrid": ("vit_tiny_r_s16_p8_224", {}),
}


def make(variant: str, fused: bool = True, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The variant's depth-2 model (eval) and three images for it."""
    arch, kwargs = VARIANTS[variant]
    model, size = grid_backbone(arch, seed=seed, depth=2, num_classes=7, **kwargs)
    return set_fused_attn(model, fused), images_for(size, seed=seed + 1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("layout", sorted(lmt.LAYOUTS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_dense_reference(variant, layout, fused):
    """In the non-full layouts the original tokens also run exactly the base model's computation."""
    base, x = make(variant, fused)
    lmt.check_dense_reference(base, x, lmt.dense_forward_all, layouts=[layout])


@pytest.mark.parametrize("mode", ["non_destructive", "extension", "full"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_reach_memory_class_token_and_head_only(variant, mode):
    base, x = make(variant)
    lmt.check_training(base, x, mode)


# Modules that only the original tokens and the new class tokens may reach: memory has no MLP,
# output projection, residual or LayerScale. (Through a fused ``qkv`` linear, the memory's query
# rows are computed once per pass and dropped; the fused blocks slice out the k/v rows instead.)
TOKEN_ONLY = ("mlp", "ffns", "mlp_act", "mlp_out_proj", "out_proj", "attn_out_proj", "proj", "ls", "ls1", "ls2",
              "sub_norm", "norm2", "in_proj")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_memory_goes_only_through_norm_and_key_value(variant):
    base, x = make(variant)
    model = lm.wrap_model(base, n_mem=5, num_classes=5)
    batches = []
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: batches.append((name, i[0].shape[0])))
        for name, m in base.blocks.named_modules()
        if name.split(".")[-1] in TOKEN_ONLY
    ]
    with torch.no_grad():
        model.forward_all(x)
    for h in hooks:
        h.remove()
    assert batches, "no hooks fired"
    wrong = sorted({name for name, b in batches if b != x.shape[0]})
    assert not wrong, f"memory reached {wrong}"


def test_distilled_keeps_both_heads_and_starts_from_the_class_token():
    base, x = make("distilled")
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    assert model.num_prefix_tokens == 2
    want = (base.cls_token + base.pos_embed[:, :1]).reshape(-1)
    assert torch.equal(model.tasks["default"].class_token, want)
    with torch.no_grad():
        feats = base.forward_features(x)  # after the final norm
        mean_of_heads = (base.head(feats[:, 0]) + base.head_dist(feats[:, 1])) / 2
        assert torch.equal(model.forward_all(x)["base"], mean_of_heads)


def test_hybrid_rejects_wrong_image_size():
    base, x = make("hybrid")
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    h = x.shape[-1]
    with pytest.raises(ValueError, match=f"images are {2 * h}x{2 * h} but this model takes {h}x{h}"):
        model(torch.randn(1, 3, 2 * h, 2 * h))


def test_dynamic_size_other_resolution_and_bad_size():
    base = timm.create_model("test_vit", pretrained=False, depth=2).eval()  # dynamic_img_size, patch 16
    lmt.check_dense_reference(base, torch.randn(2, 3, 48, 80), lmt.dense_forward_all, layouts=["concat"])
    model = lm.wrap_model(base, n_mem=2, num_classes=3)
    with pytest.raises(ValueError, match="images are 50x48, not a multiple of the patch size 16x16"):
        model(torch.randn(1, 3, 50, 48))
