"""timm ``VisionTransformerRelPos``: a ViT with a relative position bias on the attention scores
(a learned table, ``RelPosBias``, or an MLP over log-spaced relative coordinates, ``RelPosMlp``),
per block or shared by all blocks, no absolute position embedding, and an optional class token.

The bias is a table over the original tokens ``[prefix ; patches]``; new class tokens and memory
have no position in the grid, so the table has no place for them. The choice made here:

- A new class token's scores against the original tokens get the bias row of the original class
  token (``bias[..., 0, :]``) where the model has one, and none where it has no class token (the
  default of this module). Why: a new class token is, like the class token, a token without a
  position; the class token's row is what the model learned (``RelPosBias``: its own entries for
  class token -> patch and class token -> class token) or set (``RelPosMlp``: zeros) for such a
  token looking at the grid, so a new class token looks at the patches as the class token does.
  Without a class token there is no such row, and a bias of any patch's row would give the new
  token that patch's position: it gets none (zero), which is also what ``RelPosMlp`` gives its
  class token.
- Scores against new class tokens and memory get no bias, for every query; in full mode the
  original tokens' scores against the memory get none either.

The attention kind gives these through ``position_bias`` (and states the row again in
``reference_bias`` for its dense reference). The shared bias (``shared_rel_pos``) is computed once
per pass by the backbone and handed over in the family's slot, ``PassExtras.family``, with the
number of prefix tokens. The relative-position MLP never sees token rows, so its widths do not
decide packing (``token_linears``). Blocks are timm's pre-norm (``RelPosBlock``) and post-norm
(``ResPostRelPosBlock``) shapes. Without a class token a new task's class token starts as zeros
(the model has no class token and no absolute position embedding to start it from).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer_relpos import (
    RelPosAttention,
    RelPosBlock,
    ResPostRelPosBlock,
    VisionTransformerRelPos,
)
from torch import nn

from ..blocks import PostNormBlock, PreNormBlock
from ..context import PassContext, PassExtras
from ..registry import register_attention, register_backbone, register_block
from ..typing import Bias, Biases
from .vit import QKVAttention, VitBackbone


@dataclass(frozen=True)
class RelPosPass:
    """The family's per-pass values: the shared relative position bias ``[1, H, N, N]`` (None when
    each block has its own) and the number of prefix tokens (0 or the class token)."""

    shared: torch.Tensor | None
    prefix: int


def original_bias(attn: nn.Module, ctx: PassContext) -> Bias:
    """The bias timm adds to the original tokens' scores, ``[1, H, N, N]``: the block's own, else the
    shared one (timm uses one or the other), else None."""
    if attn.rel_pos is not None:
        return attn.rel_pos.get_bias()
    return ctx.extras.family.shared


@register_attention(RelPosAttention)
class RelPosAttentionKind(QKVAttention):
    """``RelPosAttention``: one ``qkv`` linear and optional q/k norm (as timm's ``Attention``, whose
    kind's ``qkv`` this reuses), a plain output projection, relative position bias."""

    def out(self, attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Heads ``o`` ``[B, H, T, hd]`` -> ``[B, T, D]``."""
        b, heads, t, hd = o.shape
        return attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(b, t, heads * hd)))

    def position_bias(self, attn: nn.Module, ctx: PassContext, n_tokens: int) -> Biases:
        """The original tokens' bias ``[1, H, N, N]``, and for the new class tokens the class token's
        row ``[1, H, 1, N]`` (none without a class token)."""
        bias = original_bias(attn, ctx)
        if bias is None:
            return None, None
        return bias, bias[..., :1, :] if ctx.extras.family.prefix else None

    def reference_bias(self, attn: nn.Module, ctx: PassContext, n_tokens: int) -> Bias:
        """A new class token is biased as the class token is (row 0 of the original tokens' bias), and
        not at all without a class token."""
        bias = original_bias(attn, ctx)
        return bias[..., 0:1, :] if bias is not None and ctx.extras.family.prefix == 1 else None


def _token_linears(blk: nn.Module) -> list[nn.Linear]:
    """The block's linears but those of its relative-position MLP (which runs on coordinates)."""
    return [m for name, m in blk.named_modules() if isinstance(m, nn.Linear) and not name.startswith("attn.rel_pos")]


@register_block(RelPosBlock)
class RelPosPreNormBlock(PreNormBlock):
    """``RelPosBlock``: timm's pre-norm ``Block`` shape."""

    def token_linears(self, blk: nn.Module) -> list[nn.Linear]:
        return _token_linears(blk)


@register_block(ResPostRelPosBlock)
class RelPosPostNormBlock(PostNormBlock):
    """``ResPostRelPosBlock``: timm's post-norm ``ResPostBlock`` shape."""

    def token_linears(self, blk: nn.Module) -> list[nn.Linear]:
        return _token_linears(blk)


@register_backbone(VisionTransformerRelPos)
class RelPosBackbone(VitBackbone):
    """``VisionTransformerRelPos``: patch embedding, an optional class token, no absolute position
    embedding and no ``norm_pre``; ``norm`` / ``fc_norm`` and token or average pooling as a ViT."""

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, PassExtras]:
        """``images`` ``[B, C, H, W]`` -> original tokens ``[B, N, D]`` (as ``forward_features`` builds
        them) and the family's :class:`RelPosPass`."""
        x = model.patch_embed(images)
        if model.cls_token is not None:
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        shared = model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None
        return x, PassExtras(family=RelPosPass(shared, model.num_prefix_tokens))

    def embed_new(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """New class tokens ``[K, D]`` enter the blocks as they are (there is no ``norm_pre``)."""
        return tokens

    def class_token_init(self, model: nn.Module) -> torch.Tensor:
        """``[D]``: the class token, or zeros without one (there is no position embedding)."""
        if model.cls_token is not None:
            return model.cls_token.reshape(model.embed_dim).detach().clone()
        return torch.zeros(model.embed_dim, device=model.patch_embed.proj.weight.device)
