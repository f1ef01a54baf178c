"""timm ``Eva`` models (EVA-02, ROPE-ViT, PE, DINOv3, Sapiens2, post-norm EVA) under MemoryViT.

The dense reference (``learnable_memory.testing.dense_sequence``) runs every token and all memory as
one sequence through timm's own blocks with the Table 1 mask; new class tokens and memory go after the
patches, where identity rows appended to the rotary table (sin 0, cos 1) leave them unrotated, as
prefix tokens are.
"""

from __future__ import annotations

import pytest
import torch

from learnable_memory import testing as lmt
from tests.helpers import images_for, noisy_backbone, set_fused_attn

# name -> (architecture, kwargs for timm.create_model at depth 2, image size)
EVA_VARIANTS = {
    # EvaAttention fused qkv + q/v bias, RoPE (cat), GluMlp, avg pool + fc_norm
    "eva02_tiny": ("eva02_tiny_patch14_224", {"img_size": 42, "embed_dim": 64, "num_heads": 4}, 42),
    # separate q/k/v projections, SwiGLU with norm, scale norm in attention, token pool
    "eva02_separate_qkv": (
        "eva02_tiny_patch14_224",
        {"img_size": 42, "embed_dim": 64, "num_heads": 4, "qkv_fused": False, "scale_mlp": True,
         "scale_attn_inner": True, "global_pool": "token"},
        42,
    ),
    # AttentionRope, RoPE-Mixed (one table per block), no_embed_class
    "rope_mixed_ape": ("vit_small_patch16_rope_mixed_ape_224", {"img_size": 32, "embed_dim": 64, "num_heads": 4}, 32),
    # DINOv3 RoPE, class + 4 register tokens, LayerScale, dynamic_img_size
    "dinov3": ("vit_small_patch16_dinov3_qkvb", {"img_size": 32, "embed_dim": 64, "num_heads": 4}, 32),
    # Sapiens2: grouped-query attention, q/k RmsNorm, attention-only LayerScale, rotate-half RoPE, 8 registers
    "sapiens2_gqa": (
        "vit_base_patch16_sapiens2",
        {"img_size": 32, "embed_dim": 64, "num_heads": 4, "num_kv_heads": (4, 2)},
        32,
    ),
    # PE core: no class token, attention pooling (map)
    "pe_no_cls_map": (
        "vit_pe_core_tiny_patch16_384", {"img_size": 32, "embed_dim": 64, "num_heads": 4, "class_token": False}, 32
    ),
    # post-norm blocks, no RoPE
    "post_norm": ("eva02_enormous_patch14_clip_224", {"img_size": 28, "embed_dim": 64, "num_heads": 4}, 28),
}


def dense_eva(model, images, extend=lmt.unrotated_rows):
    """The dense reference for ``Eva`` backbones: ``images`` -> the ``forward_all`` dict."""
    base = model.base
    x, rope = base._pos_embed(base.patch_embed(images))
    x = base.norm_pre(x)
    ropes = list(rope) if rope is not None and base.rope_mixed else [rope] * len(base.blocks)
    return lmt.dense_sequence(model, x, lmt.new_class_tokens(model, x.shape[0]), ropes,
                          lambda t: base.forward_head(base.norm(t)), extend=extend)


# ----- Eva -----
def make(variant: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The variant's depth-2 backbone (random weights) and three images for it."""
    arch, kwargs, size = EVA_VARIANTS[variant]
    return noisy_backbone(arch, kwargs), images_for(size)


@pytest.mark.parametrize("variant", sorted(EVA_VARIANTS))
def test_eva_matches_dense_reference_in_every_mode(variant):
    lmt.check_dense_reference(*make(variant), dense_eva)


@pytest.mark.parametrize("variant", sorted(EVA_VARIANTS))
def test_eva_base_unchanged_and_concatenation(variant):
    base, x = make(variant)
    lmt.check_base_unchanged(base, x)
    lmt.check_concatenation(base, x)


@pytest.mark.parametrize("mode", ["non_destructive", "extension", "full"])
def test_eva_gradients_reach_task_parameters_only(mode):
    base, x = make("dinov3")
    lmt.check_training(base, x[:2], mode)


def test_eva_save_and_load(tmp_path):
    (base, x), (fresh, _) = make("rope_mixed_ape"), make("rope_mixed_ape")
    lmt.check_save_load(base, fresh, x, tmp_path / "adapters")


def test_eva_dynamic_img_size_other_resolution():
    base, _ = make("dinov3")
    x = torch.randn(2, 3, 48, 32)  # another grid: RoPE and position embedding resampled
    lmt.check_dense_reference(base, x, dense_eva, layouts=["concat"])


def test_rotating_new_tokens_would_show():
    """Rotating class tokens and memory like patches changes the task outputs, so the dense
    reference's identity rows (and the model's agreement with them) mean something."""
    base, x = make("eva02_tiny")
    model = lmt.build(base, "concat", seed=1)
    with torch.no_grad():
        got = model.forward_all(x)
        rotated = dense_eva(model, x, extend=lambda r, extra: torch.cat([r, r[..., :extra, :]], dim=-2))
    lmt.assert_outputs_close({"base": got["base"]}, {"base": rotated["base"]})  # patches: rotated alike
    for name in "ab":
        assert not torch.allclose(got[name], rotated[name], atol=1e-3), name


@pytest.mark.parametrize("variant", ["eva02_tiny", "sapiens2_gqa"])
def test_eva_unfused_attention(variant):
    base, x = make(variant)
    set_fused_attn(base, False)
    lmt.check_base_unchanged(base, x)
    lmt.check_dense_reference(base, x, dense_eva, layouts=["extension"])


def test_eva_qkv_bias_added_separately():
    """``qkv_bias_separate`` (bias added after the projection) is timm's other bias layout."""
    base, x = make("eva02_tiny")
    for blk in base.blocks:
        blk.attn.qkv_bias_separate = True
    lmt.check_base_unchanged(base, x)
    lmt.check_dense_reference(base, x, dense_eva, layouts=["concat"])
