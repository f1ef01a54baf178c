"""timm ``NaFlexVit`` under MemoryViT: plain images and variable-length NaFlex patch dicts.

The dense reference (``learnable_memory.testing.dense_sequence``) runs every token and all memory as one
sequence through timm's own blocks with the Table 1 mask; for patch dicts, padding patches are
also masked as keys for every query.
"""

from __future__ import annotations

import pytest
import torch
from timm.models.naflexvit import batch_patchify

import learnable_memory as lm
from learnable_memory import testing as lmt
from tests.helpers import count_packed_blocks, images_for, noisy_backbone

SMALL = {"embed_dim": 64, "num_heads": 4, "patch_size": 8}
NAFLEX_VARIANTS = {
    # 4 register tokens, LayerScale, avg pool + fc_norm, learned position embedding
    "gap_reg": ("naflexvit_base_patch16_gap", SMALL),
    # no prefix token, attention pooling (map)
    "siglip_map": ("naflexvit_base_patch16_siglip", SMALL),
    # class + 7 register tokens, token pool, no final norm, aspect-preserving position embedding
    "radio": ("naflexvit_base_patch16_radio_v3", {**SMALL, "pos_embed_grid_size": (8, 8)}),
    # factorized position embedding, conv patch embedding
    "parfac_conv": ("naflexvit_base_patch16_parfac_gap", {**SMALL, "embed_proj_type": "conv"}),
    # axial RoPE: EvaBlock with AttentionRope
    "rope_axial": ("naflexvit_base_patch16_gap", {**SMALL, "rope_type": "axial", "pos_embed": "none"}),
    # RoPE-Mixed (one table per block), gated attention, SwiGLU
    "rope_mixed_gated": (
        "naflexvit_base_patch16_map",
        {**SMALL, "rope_type": "mixed", "attn_gated": True, "swiglu_mlp": True, "class_token": True},
    ),
}


def patch_dict(sizes=((32, 32), (24, 40), (16, 24)), patch=8, seed=7) -> dict[str, torch.Tensor]:
    """A NaFlex batch: images of different sizes as patches, padded to the longest, as timm's
    NaFlex loader yields it: ``patches`` ``[B, N, P*P*3]``, ``patch_coord`` ``[B, N, 2]``, ``patch_valid``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for h, w in sizes:
        p, (gh, gw) = batch_patchify(torch.randn(1, 3, h, w, generator=g), (patch, patch))
        coord = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1).reshape(-1, 2)
        rows.append((p[0], coord))
    n = max(p.shape[0] for p, _ in rows)
    patches = torch.zeros(len(rows), n, rows[0][0].shape[1])
    coords = torch.zeros(len(rows), n, 2, dtype=torch.long)
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (p, coord) in enumerate(rows):
        patches[i, : len(p)], coords[i, : len(p)], valid[i, : len(p)] = p, coord, True
    return {"patches": patches, "patch_coord": coords, "patch_valid": valid}


def inputs_for(base, *images):
    """``images``, plus a patch dict when the backbone takes one (a linear patch embedding)."""
    return [*images, patch_dict()] if base.embeds.is_linear else list(images)


def dense_naflex(model, inputs):
    base = model.base
    if isinstance(inputs, dict):
        valid = inputs["patch_valid"]
        e = base._forward_embeds(inputs["patches"], inputs["patch_coord"], valid, None)
    else:
        valid = None
        e = base._forward_embeds(inputs, None, None, None)
    x, rope = e["patches"], e["rope_embeds"]
    b = x.shape[0]
    ropes = list(rope) if rope is not None and base.rope_is_mixed else [rope] * len(base.blocks)
    c = lmt.new_class_tokens(model, b)
    key_valid = None
    if valid is not None:
        key_valid = torch.cat([valid.new_ones(b, base.num_prefix_tokens), valid], dim=1)
    head = lambda t: base.forward_head(base.norm(t), patch_valid=valid)  # noqa: E731
    return lmt.dense_sequence(model, x, c, ropes, head, key_valid)


def make(variant: str) -> torch.nn.Module:
    """The variant's depth-2 backbone, random weights."""
    return noisy_backbone(*NAFLEX_VARIANTS[variant])


@pytest.mark.parametrize("variant", sorted(NAFLEX_VARIANTS))
def test_naflex_matches_dense_reference_in_every_mode(variant):
    base = make(variant)
    for inputs in inputs_for(base, images_for(32)):
        lmt.check_dense_reference(base, inputs, dense_naflex)


@pytest.mark.parametrize("variant", sorted(NAFLEX_VARIANTS))
def test_naflex_base_unchanged_and_concatenation(variant):
    base = make(variant)
    for inputs in inputs_for(base, images_for(32), torch.randn(2, 3, 40, 24)):
        lmt.check_base_unchanged(base, inputs)
        lmt.check_concatenation(base, inputs)


@pytest.mark.parametrize("mode", ["non_destructive", "extension", "full"])
def test_naflex_gradients_reach_task_parameters_only(mode):
    base = make("rope_mixed_gated")
    lmt.check_training(base, images_for(32, batch=2), mode)
    lmt.check_training(base, patch_dict(), mode)


def test_naflex_save_and_load(tmp_path):
    lmt.check_save_load(make("gap_reg"), make("gap_reg"), patch_dict(), tmp_path / "adapters")


@pytest.mark.parametrize("variant", ["gap_reg", "rope_mixed_gated"])
def test_padded_batches_pack_with_their_padding_bias(variant, monkeypatch):
    """A padded batch brings a key-padding bias (and rotary tables) for the original tokens; the packed
    pass applies them as the split pass does: the same outputs, and the base output of the model."""
    base = make(variant)
    model = lmt.build(base, "extension", seed=1)
    for t in model.tasks.values():
        t.requires_grad_(True)
    batch = patch_dict()
    calls = count_packed_blocks(monkeypatch)
    with torch.no_grad():
        packed, want_base = model.forward_all(batch), base(batch)
    assert len(calls) == model.depth
    split = {k: v.detach() for k, v in model.forward_all(batch).items()}
    assert torch.equal(packed["base"], want_base) and torch.equal(split["base"], want_base)
    lmt.assert_outputs_close(packed, split)


def test_new_class_tokens_ignore_padding():
    """What sits in the padding patches changes no output."""
    model = lmt.build(make("rope_axial"), "extension", seed=1)
    batch = patch_dict()
    noisy = dict(batch, patches=torch.where(batch["patch_valid"][..., None], batch["patches"], 100.0))
    with torch.no_grad():
        lmt.assert_outputs_close(model.forward_all(noisy), model.forward_all(batch))


def test_boolean_attn_mask_is_honoured():
    base = make("gap_reg")
    model = lmt.build(base, "concat", seed=1)
    batch = patch_dict()
    valid = torch.cat([batch["patch_valid"].new_ones(3, base.num_prefix_tokens), batch["patch_valid"]], 1)
    with torch.no_grad():
        want = model.forward_all(batch)
        got = model.forward_all(dict(batch, attn_mask=(valid[:, None, :, None] & valid[:, None, None, :])))
    lmt.assert_outputs_close(got, want)


def test_rejects_bad_input():
    model = lm.wrap_model(make("gap_reg"), n_mem=1, num_classes=3)
    batch = patch_dict()
    with pytest.raises(ValueError, match="missing: patch_valid"):
        model({k: v for k, v in batch.items() if k != "patch_valid"})
    with pytest.raises(ValueError, match=r"need patch_coord \[3, 16, 2\]"):
        model(dict(batch, patch_coord=batch["patch_coord"][:, :4]))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8x8.*dynamic_img_pad"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="1 channels but the model takes 3"):
        model(torch.randn(1, 1, 32, 32))
    conv = lm.wrap_model(make("parfac_conv"), n_mem=1, num_classes=3)
    with pytest.raises(ValueError, match="convolution.*images .* only"):
        conv(batch)
