"""timm ``Beit`` (BEiT, BEiT v2): relative position bias, per block or shared by all blocks.

The relative position bias is a table over the original tokens ``[prefix ; patches]``, with
entries for the class token: class token -> patch, patch -> class token, class token -> class
token. New class tokens and memory have no place in that table; the choice made here:

- A new class token takes the original class token's bias row: against the original tokens it
  gets exactly the bias the class token gets (``bias[..., 0, :]``, the class token -> class
  token entry included).
- Scores against new class tokens and memory get no bias (zero), for every query; in full mode
  the original tokens' scores against the memory get none either.

The attention kind gives these through the ``position_bias`` hook (and states the row again in
``reference_bias``, for its dense reference); the backbone computes the shared bias
(``Beit.rel_pos_bias``) once per pass and hands it over as the family's slot, ``PassExtras.family``
(``[H, N, N]``, or None). Blocks are pre-norm with optional LayerScale, like ``EvaBlock``.

The base output is bit-exact, except for a model with both per-block and shared relative position
bias run with timm's non-fused attention (``TIMM_FUSED_ATTN=0``): timm then adds the two biases to
the scores one after the other, here their sum is added (differences ~1e-7). No registered
architecture has both.
"""

from __future__ import annotations

import torch
from timm.models.beit import Attention, Beit, Block
from torch import nn

from ..context import PassContext, PassExtras
from ..kinds import AttentionKind
from ..registry import register_attention, register_backbone, register_block
from .eva import LayerScalePreNormBlock, fused_qkv_with_bias
from .vit import VitBackbone

register_block(Block)(LayerScalePreNormBlock)


@register_attention(Attention)
class RelPosBiasAttention(AttentionKind):
    """BEiT ``Attention``: fused ``qkv`` with ``q_bias``/``v_bias``, relative position bias."""

    def qkv(self, attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``h`` ``[B, T, D]`` -> q, k, v ``[B, H, T, hd]``."""
        b, t, _ = h.shape
        qkv = fused_qkv_with_bias(attn, h).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def out(self, attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Heads ``o`` ``[B, H, T, hd]`` -> ``[B, T, D]``."""
        b, heads, t, hd = o.shape
        return attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(b, t, heads * hd)))

    def position_bias(
        self, attn: nn.Module, ctx: PassContext, n_tokens: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The block's bias plus the shared one, ``[1, H, N, N]`` for the original tokens, and
        the class token's row ``[1, H, 1, N]`` for the new class tokens (None without any)."""
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
        shared = ctx.extras.family  # [H, N, N], the shared bias (see BeitBackbone.embed)
        if shared is not None:
            bias = shared if bias is None else bias + shared
        if bias is None:
            return None, None
        return bias, bias[..., :1, :]

    def reference_bias(self, attn: nn.Module, ctx: PassContext, n_tokens: int) -> torch.Tensor | None:
        """A new class token is biased as the class token is: the first row of the original tokens'
        bias (which the base output's bit-identity checks)."""
        bias_x, _ = self.position_bias(attn, ctx, n_tokens)
        return None if bias_x is None else bias_x[..., 0:1, :]


@register_backbone(Beit)
class BeitBackbone(VitBackbone):
    """timm ``Beit``: one class token, absolute position embedding (optional), token/avg pooling."""

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, PassExtras]:
        """``images`` ``[B, C, H, W]`` -> original tokens ``[B, 1 + P, D]`` (as ``Beit.forward_features``
        builds them) and the shared relative position bias ``[H, N, N]`` (or None)."""
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        x = model.pos_drop(x)
        return x, PassExtras(family=model.rel_pos_bias() if model.rel_pos_bias is not None else None)

    def embed_new(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """New class tokens ``[K, D]`` enter the blocks as they are (BEiT has no ``norm_pre``)."""
        return tokens

    def class_token_init(self, model: nn.Module) -> torch.Tensor:
        """``[D]``: the class token with its position embedding."""
        tok = model.cls_token.reshape(model.embed_dim)
        if model.pos_embed is not None:
            tok = tok + model.pos_embed[0, 0]
        return tok.detach().clone()
