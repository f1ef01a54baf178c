"""timm ``Beit`` (relative position bias, per block or shared) under MemoryViT.

The dense reference runs every token and all memory as one sequence through timm's own blocks:
each attention's relative position bias is widened to the whole sequence the documented way
(a new class token takes the class token's bias row against the original tokens; class-token
and memory columns get none), and the Table 1 mask rides along as an additive bias.
"""

from __future__ import annotations

import pytest
import torch

from learnable_memory import build_attention_mask
from learnable_memory import testing as lmt
from tests.helpers import images_for, noisy_backbone, set_fused_attn

SMALL = {"img_size": 32, "embed_dim": 64, "num_heads": 4}
BEIT_VARIANTS = {
    # per-block relative position bias, LayerScale, avg pool + fc_norm
    "per_block": ("beit_base_patch16_224", SMALL),
    # one bias shared by all blocks, no absolute position embedding, token pool
    "shared": (
        "beitv2_base_patch16_224",
        {**SMALL, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True, "use_abs_pos_emb": False,
         "global_pool": "token"},
    ),
    # both kinds of bias, no LayerScale
    "both": ("beit_base_patch16_224", {**SMALL, "use_shared_rel_pos_bias": True, "init_values": None}),
    # no relative position bias at all
    "absolute_only": ("beit_base_patch16_224", {**SMALL, "use_rel_pos_bias": False}),
}


def make_beit(arch: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A depth-2 BEiT whose relative position bias tables are random (timm starts them at zero)."""
    model = noisy_backbone(arch, kwargs, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def widen(bias: torch.Tensor | None, n: int, k: int, total: int) -> torch.Tensor | None:
    """``[.., N, N]`` bias over the original tokens -> ``[1, H, T, T]``: new class tokens (rows
    ``n : n + k``) take the class token's row on the original columns; everything else is 0."""
    if bias is None:
        return None
    bias = bias.reshape(1, -1, n, n)
    out = bias.new_zeros(1, bias.shape[1], total, total)
    out[..., :n, :n] = bias
    out[..., n : n + k, :n] = bias[..., :1, :]
    return out


def dense_beit(model, images, monkeypatch):
    base, tasks = model.base, list(model.tasks.values())
    x = base.patch_embed(images)
    x = torch.cat([base.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    if base.pos_embed is not None:
        x = x + base.pos_embed
    b, n, _ = x.shape
    k = len(tasks)
    c = torch.stack([t.class_token for t in tasks]).expand(b, -1, -1)
    mask = build_attention_mask([t.config for t in tasks], num_patches=n - 1, num_prefix_tokens=1)
    mask[n + k :, :] = True  # memory rows: computed and thrown away
    total = mask.shape[0]
    additive = torch.zeros(total, total).masked_fill(~mask, float("-inf"))
    shared = widen(base.rel_pos_bias() if base.rel_pos_bias is not None else None, n, k, total)
    shared = additive if shared is None else shared + additive
    for blk in base.blocks:
        if blk.attn.relative_position_bias_table is not None:
            own = widen(blk.attn._get_rel_pos_bias(), n, k, total)
            monkeypatch.setattr(blk.attn, "_get_rel_pos_bias", lambda own=own: own)
    for layer, blk in enumerate(base.blocks):
        mem = torch.cat([t.memory[layer] for t in tasks]).expand(b, -1, -1)
        seq = blk(torch.cat([x, c, mem], dim=1), shared_rel_pos_bias=shared)
        x, c = seq[:, :n], seq[:, n : n + k]
    monkeypatch.undo()
    return lmt.dense_outputs(model, x, c, lambda t: base.forward_head(base.norm(t)))


def reference(monkeypatch):
    """:func:`dense_beit` as a ``(model, images)`` reference."""
    return lambda model, images: dense_beit(model, images, monkeypatch)


@pytest.mark.parametrize("variant", sorted(BEIT_VARIANTS))
def test_beit_matches_dense_reference_in_every_mode(variant, monkeypatch):
    lmt.check_dense_reference(make_beit(*BEIT_VARIANTS[variant]), images_for(32), reference(monkeypatch))


@pytest.mark.parametrize("variant", sorted(BEIT_VARIANTS))
def test_beit_base_unchanged_and_concatenation(variant):
    base = make_beit(*BEIT_VARIANTS[variant])
    x = images_for(32)
    lmt.check_base_unchanged(base, x)
    lmt.check_concatenation(base, x)


@pytest.mark.parametrize("mode", ["non_destructive", "extension", "full"])
def test_beit_gradients_reach_task_parameters_only(mode):
    lmt.check_training(make_beit(*BEIT_VARIANTS["both"]), images_for(32, batch=2), mode)


def test_beit_save_and_load(tmp_path):
    arch, kwargs = BEIT_VARIANTS["per_block"]
    lmt.check_save_load(make_beit(arch, kwargs), make_beit(arch, kwargs), images_for(32), tmp_path / "adapters")


def test_new_class_token_takes_the_class_token_bias_row(monkeypatch):
    """Raising the class token -> patch entry of every bias table raises the new class tokens'
    scores against the patches too: their outputs move, and still match the reference."""
    base = make_beit(*BEIT_VARIANTS["per_block"])
    model = lmt.build(base, "concat", seed=1)
    x = images_for(32)
    with torch.no_grad():
        before = model.forward_all(x)
        for blk in base.blocks:  # table rows: ..., cls -> token, token -> cls, cls -> cls
            blk.attn.relative_position_bias_table[-3].add_(3.0)
    lmt.check_dense_reference(base, x, reference(monkeypatch), layouts=["concat"])
    with torch.no_grad():
        after = model.forward_all(x)
    for name in "ab":
        assert not torch.allclose(after[name], before[name], atol=1e-3), name


def test_rejects_other_image_size():
    model = lmt.build(make_beit(*BEIT_VARIANTS["per_block"]), "concat")
    with pytest.raises(ValueError, match="images are 48x48 but this model takes 32x32"):
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("variant", ["per_block", "shared", "both"])
def test_beit_unfused_attention(variant, monkeypatch):
    base = set_fused_attn(make_beit(*BEIT_VARIANTS[variant]), False)
    x = images_for(32)
    if variant != "both":
        lmt.check_base_unchanged(base, x)
    # both biases: timm adds them to the scores one after the other, the model adds their sum
    lmt.check_dense_reference(base, x, reference(monkeypatch), layouts=["extension"], exact_base=variant != "both")
    model = lmt.build(base, "extension", seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_all(x)["base"], base(x), atol=1e-6, rtol=0)
