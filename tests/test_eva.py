"""timm ``Eva`` models (EVA-02, ROPE-ViT, PE, DINOv3, Sapiens2, post-norm EVA) under MemoryViT.

The dense reference runs every token and all memory as one sequence through timm's own blocks
with the Table 1 mask; new class tokens and memory go after the patches, where identity rows
appended to the rotary table (sin 0, cos 1) leave them unrotated, as prefix tokens are.
The helpers here also serve ``test_beit.py`` and ``test_naflexvit.py``.
"""

from __future__ import annotations

import pytest
import timm
import torch

import learnable_memory as lm
from learnable_memory import build_attention_mask, load_adapters
from tests.conftest import randomize

LAYOUTS = {
    "concat": [("a", 3, "non_destructive"), ("b", 2, "non_destructive"), ("c", 0, "non_destructive")],
    "extension": [("a", 3, "non_destructive"), ("b", 2, "extension"), ("c", 1, "extension")],
    "full": [("a", 4, "full")],
}

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


def make(arch: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A depth-2 backbone with random weights. timm starts biases at zero and LayerScale near
    zero (1e-5 in some models), which would hide a wrong bias or attention path: every weight
    gets noise and every LayerScale is drawn around 1."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, depth=2, num_classes=7, **kwargs).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "gamma" in name:
                p.copy_(1 + 0.2 * noise)
            else:
                p.add_(0.05 * noise)
    return model


def images_for(size: int, batch: int = 3, seed: int = 123) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(base, layout, num_classes=5):
    model = base
    for name, n_mem, mode in layout:
        model = lm.wrap_model(model, n_mem=n_mem, num_classes=num_classes, task=name, mode=mode)
    return model


def assert_outputs_close(got: dict, want: dict, atol=1e-5):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=1e-5, msg=f"output {k!r} differs")


# ----- the dense reference -----
def unrotated_rows(rope: torch.Tensor | None, extra: int) -> torch.Tensor | None:
    """``rope`` ``[..., P, 2 * hd]`` (sin ; cos) with ``extra`` identity rows appended."""
    if rope is None:
        return None
    shape = list(rope.shape)
    shape[-2], half = extra, shape[-1] // 2
    ident = torch.cat([rope.new_zeros(*shape[:-1], half), rope.new_ones(*shape[:-1], half)], dim=-1)
    return torch.cat([rope, ident], dim=-2)


def dense_sequence(model, x, c, ropes, head, key_valid=None, extend=unrotated_rows) -> dict[str, torch.Tensor]:
    """``[x ; c ; memory]`` through the backbone's blocks with the Table 1 mask.

    Args:
        x: ``[B, N, D]`` original tokens as they enter the blocks; ``c`` ``[B, K, D]`` new class tokens.
        ropes: One rotary table (or None) per block.
        head: Original tokens after the blocks -> the base output.
        key_valid: Optional ``[B, N]`` bool, the original tokens any query may see (padding).
        extend: ``(rope, extra) -> rope`` for the ``extra`` tokens after the patches.
    """
    base, tasks = model.base, list(model.tasks.values())
    b, n, _ = x.shape
    k = len(tasks)
    prefix = base.num_prefix_tokens
    mask = build_attention_mask([t.config for t in tasks], num_patches=n - prefix, num_prefix_tokens=prefix)
    mask[n + k :, :] = True  # memory rows: computed and thrown away
    if key_valid is not None:
        keys = torch.cat([key_valid.bool(), key_valid.new_ones(b, mask.shape[0] - n, dtype=torch.bool)], dim=1)
        mask = mask & keys[:, None, None, :]  # [B, 1, T, T]
    extra = mask.shape[-1] - n
    for layer, blk in enumerate(base.blocks):
        mem = torch.cat([t.memory[layer] for t in tasks]).expand(b, -1, -1)
        seq = torch.cat([x, c, mem], dim=1)
        if ropes[layer] is None:
            seq = blk(seq, attn_mask=mask)
        else:
            seq = blk(seq, rope=extend(ropes[layer], extra), attn_mask=mask)
        x, c = seq[:, :n], seq[:, n : n + k]
    out = {}
    if not any(t.mode == "full" for t in tasks):
        out["base"] = head(x)
    feats = base.fc_norm(base.norm(c))
    for i, t in enumerate(tasks):
        out[t.name] = t.head(feats[:, i])
    return out


def dense_eva(model, images, extend=unrotated_rows):
    base = model.base
    x, rope = base._pos_embed(base.patch_embed(images))
    x = base.norm_pre(x)
    c = base.norm_pre(torch.stack([t.class_token for t in model.tasks.values()])).expand(x.shape[0], -1, -1)
    ropes = list(rope) if rope is not None and base.rope_mixed else [rope] * len(base.blocks)
    return dense_sequence(model, x, c, ropes, lambda t: base.forward_head(base.norm(t)), extend=extend)


# ----- the guarantees, for any backbone -----
def check_base_unchanged(base, images):
    with torch.no_grad():
        want = base(images)
        model = build(base, LAYOUTS["extension"])
        randomize(model)
        got = model.forward_all(images)["base"]
    assert torch.equal(got, want), (got - want).abs().max()


def check_concatenation(base, images):
    alone = {}
    for i, (name, n_mem) in enumerate([("a", 3), ("b", 2)]):
        m = lm.wrap_model(base, n_mem=n_mem, num_classes=4 + i, task=name)  # trained separately
        randomize(m, seed=10 + i)
        alone[name] = m
    with torch.no_grad():
        want = {name: m(images) for name, m in alone.items()}
        merged = lm.MemoryViT(base)
        for m in alone.values():
            merged.add_task(m.tasks[m.active_task])
        got = merged.forward_all(images)
        assert torch.equal(got["base"], base(images))
    for name in alone:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)


def check_training(base, images, mode):
    model = lm.wrap_model(base, n_mem=3, num_classes=5, task="t", mode=mode)
    model.train()
    model(images).logsumexp(-1).sum().backward()
    task = model.tasks["t"]
    for layer in range(model.depth):
        assert task.memory.grad[layer].abs().sum() > 0, f"no gradient reaches layer {layer}'s memory"
    assert task.class_token.grad.abs().sum() > 0
    assert task.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    assert not base.training


def check_save_load(base, fresh_base, images, folder):
    model = build(base, LAYOUTS["extension"])
    randomize(model)
    model.save_pretrained(folder)
    loaded = load_adapters(fresh_base, [folder])
    with torch.no_grad():
        want, got = model.forward_all(images), loaded.forward_all(images)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ----- Eva -----
@pytest.mark.parametrize("variant", sorted(EVA_VARIANTS))
def test_eva_matches_dense_reference_in_every_mode(variant):
    arch, kwargs, size = EVA_VARIANTS[variant]
    base = make(arch, kwargs)
    x = images_for(size)
    for layout in LAYOUTS.values():
        model = build(base, layout)
        randomize(model)
        with torch.no_grad():
            assert_outputs_close(model.forward_all(x), dense_eva(model, x))


@pytest.mark.parametrize("variant", sorted(EVA_VARIANTS))
def test_eva_base_unchanged_and_concatenation(variant):
    arch, kwargs, size = EVA_VARIANTS[variant]
    base = make(arch, kwargs)
    x = images_for(size)
    check_base_unchanged(base, x)
    check_concatenation(base, x)


@pytest.mark.parametrize("mode", ["non_destructive", "extension", "full"])
def test_eva_gradients_reach_task_parameters_only(mode):
    arch, kwargs, size = EVA_VARIANTS["dinov3"]
    check_training(make(arch, kwargs), images_for(size, batch=2), mode)


def test_eva_save_and_load(tmp_path):
    arch, kwargs, size = EVA_VARIANTS["rope_mixed_ape"]
    check_save_load(make(arch, kwargs), make(arch, kwargs), images_for(size), tmp_path / "adapters")


def test_eva_dynamic_img_size_other_resolution():
    arch, kwargs, _ = EVA_VARIANTS["dinov3"]
    base = make(arch, kwargs)
    x = torch.randn(2, 3, 48, 32)  # another grid: RoPE and position embedding resampled
    model = build(base, LAYOUTS["concat"])
    randomize(model)
    with torch.no_grad():
        assert torch.equal(model.forward_all(x)["base"], base(x))
        assert_outputs_close(model.forward_all(x), dense_eva(model, x))


def test_rotating_new_tokens_would_show():
    """Rotating class tokens and memory like patches changes the task outputs, so the dense
    reference's identity rows (and the model's agreement with them) mean something."""
    arch, kwargs, size = EVA_VARIANTS["eva02_tiny"]
    model = build(make(arch, kwargs), LAYOUTS["concat"])
    randomize(model)
    x = images_for(size)
    with torch.no_grad():
        got = model.forward_all(x)
        rotated = dense_eva(model, x, extend=lambda r, extra: torch.cat([r, r[..., :extra, :]], dim=-2))
    torch.testing.assert_close(got["base"], rotated["base"], atol=1e-5, rtol=1e-5)  # patches: rotated alike
    for name in "ab":
        assert not torch.allclose(got[name], rotated[name], atol=1e-3), name


def unfused(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every attention module to timm's explicit (non-SDPA) attention."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


@pytest.mark.parametrize("variant", ["eva02_tiny", "sapiens2_gqa"])
def test_eva_unfused_attention(variant):
    arch, kwargs, size = EVA_VARIANTS[variant]
    base = unfused(make(arch, kwargs))
    x = images_for(size)
    check_base_unchanged(base, x)
    model = build(base, LAYOUTS["extension"])
    randomize(model)
    with torch.no_grad():
        assert_outputs_close(model.forward_all(x), dense_eva(model, x))


def test_eva_qkv_bias_added_separately():
    """``qkv_bias_separate`` (bias added after the projection) is timm's other bias layout."""
    arch, kwargs, size = EVA_VARIANTS["eva02_tiny"]
    base = make(arch, kwargs)
    for blk in base.blocks:
        blk.attn.qkv_bias_separate = True
    x = images_for(size)
    check_base_unchanged(base, x)
    model = build(base, LAYOUTS["concat"])
    randomize(model)
    with torch.no_grad():
        assert_outputs_close(model.forward_all(x), dense_eva(model, x))
