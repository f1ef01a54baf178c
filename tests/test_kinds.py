"""The kinds' contract (``learnable_memory.kinds``): neutral backbone defaults, the wrap-time check of a
backbone kind, and the packing rule on the token path. The registered kinds' dense references are held
to their fast paths by ``tests/test_families.py``."""

from __future__ import annotations

import logging

import pytest
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import learnable_memory as lm
from learnable_memory import registry
from learnable_memory import testing as lmt
from learnable_memory.blocks import PreNormBlock
from learnable_memory.context import PassExtras
from learnable_memory.kinds import BackboneKind
from tests.helpers import make_vit


class TinyEncoder(nn.Module):
    """Not a timm ViT: no class token, no ``norm_pre``, no ``fc_norm``, no ``embed_dim``; patches plus a
    position embedding, timm ``Block``s in ``layers``, then a final norm, mean pooling and a head."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, classes: int = 5):
        super().__init__()
        self.patch = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=dim)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.5)
        self.layers = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images) + self.pos
        for blk in self.layers:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


class TinyEncoderKind(BackboneKind):
    """Only what differs from the neutral defaults: the six abstract methods, and the final norm."""

    def width(self, model):
        return model.pos.shape[-1]

    def blocks(self, model):
        return list(model.layers)

    def check_input(self, model, images):
        if tuple(images.shape[-2:]) != (32, 32):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, this model takes 32x32")

    def embed(self, model, images):
        return model.patch(images) + model.pos, PassExtras()

    def class_token_init(self, model):
        return model.pos[0].mean(0).detach().clone()

    def base_logits(self, model, x, extras):
        return model.head(model.norm(x).mean(1))

    def task_features(self, model, c):
        return model.norm(c)


class NoFcNorm(TinyEncoder):
    """A model type whose kind reads a submodule it does not have."""


class ReadsFcNorm(TinyEncoderKind):
    def task_features(self, model, c):
        return model.fc_norm(model.norm(c))


class SideMlpBlock(Block):
    """A block with a linear that never sees token rows (like a relative-position MLP), 2 -> 8 wide."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.side_mlp = nn.Linear(2, 8)


class SideMlpDefault(Block):
    """The same block, run by a kind that keeps the default token path (every linear)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.side_mlp = nn.Linear(2, 8)


class TokenPathOnly(PreNormBlock):
    def token_linears(self, blk):
        return [m for m in blk.modules() if isinstance(m, nn.Linear) and m is not blk.side_mlp]


@pytest.fixture(autouse=True)
def made_up_kinds():
    registry.register_backbone(TinyEncoder)(TinyEncoderKind)
    registry.register_backbone(NoFcNorm)(ReadsFcNorm)
    registry.register_block(SideMlpBlock)(TokenPathOnly)
    registry.register_block(SideMlpDefault)(PreNormBlock)
    yield
    for t in (TinyEncoder, NoFcNorm):
        registry.BACKBONE_KINDS.pop(t)
    for t in (SideMlpBlock, SideMlpDefault):
        registry.BLOCK_KINDS.pop(t)


def test_a_backbone_without_class_token_needs_only_what_differs(tmp_path, images):
    torch.manual_seed(0)
    lmt.check_all(TinyEncoder().eval(), images, tmp_path)
    model = lm.wrap_model(TinyEncoder().eval(), n_mem=2, num_classes=3)
    assert (model.embed_dim, model.num_prefix_tokens, model.depth) == (64, 0, 2)


def test_a_kind_that_does_not_fit_its_model_fails_at_wrap_time():
    with pytest.raises(AttributeError, match="fc_norm"):
        lm.MemoryViT(NoFcNorm().eval())


def test_backbone_kind_results_are_checked_at_wrap_time(monkeypatch):
    monkeypatch.setattr(TinyEncoderKind, "class_token_init", lambda self, model: torch.zeros(3))
    with pytest.raises(ValueError, match=r"TinyEncoderKind.class_token_init gave shape \(3,\), expected \(64,\)"):
        lm.MemoryViT(TinyEncoder().eval())
    monkeypatch.setattr(TinyEncoderKind, "width", lambda self, model: 0)
    with pytest.raises(ValueError, match="TinyEncoderKind.width gave 0, not a positive int"):
        lm.MemoryViT(TinyEncoder().eval())


def test_packing_checks_only_the_linears_on_the_token_path(caplog):
    assert lm.MemoryViT(make_vit(block_fn=SideMlpBlock))._packable
    with caplog.at_level(logging.DEBUG, logger="learnable_memory.model"):
        model = lm.MemoryViT(make_vit(block_fn=SideMlpDefault))
    assert not model._packable
    want = ("block 0 (SideMlpDefault): linear widths [2, 8] on the token path are not multiples of 64")
    assert model.unpacked_reason == want
    assert f"inference passes run unpacked: {want}" in caplog.text
    assert lm.MemoryViT(make_vit()).unpacked_reason is None
