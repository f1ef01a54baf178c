"""timm ``gemma4_vit``: the Gemma 4 vision encoder (``Gemma4VitEncoder``) and its classifier
(``Gemma4VitClassifier``: the encoder, then mean pooling, a final norm and a linear head).

What these models are, and how memory and new class tokens meet them:

- ``Gemma4Block`` is a sandwich-norm block: ``x + norm2(attn(norm1(x)))``, then
  ``x + norm4(mlp(norm3(x)))`` (RMSNorms). Memory goes through ``norm1`` and the attention's key and
  value projections with their norms; a new class token goes through everything.
- ``Gemma4Attention``: separate q/k/v projections (optionally clamped), RMSNorm on q, k and v, 2D
  rotary embeddings per patch from its (x, y) position, grouped-query heads, and a score scale of 1
  (q and k are normalised). New class tokens and memory are not rotated. The module has no
  ``scale`` attribute and its fused path passes ``scale=1.0`` to SDPA, so its kind gives the scale
  and the original tokens' attention (``scale``, ``attend_original``). The rotary tables reach
  the kind in ``PassExtras.rope`` as ``(sin ; cos)`` per patch, ``[B, N, 2 hd]``.
- No class token: a new task's class token starts as zeros (the position embedding is a per-axis
  lookup table of 10,240 positions, most of which no image uses, so its mean is no "average patch").
  It is read out through the classifier's final norm; the encoder's native soft-token pooling
  (3x3 cells, scaled by the square root of the width, optionally standardised) and mean pooling are
  over the original tokens, so the encoder gives a new class token as it leaves the blocks.
- Input: images ``[B, C, H, W]`` with values in [0, 1], as timm takes them. Patch dicts and
  pre-patchified input (timm's NaFlex paths) are refused with a ``ValueError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.gemma4_vit import (
    Gemma4Attention,
    Gemma4Block,
    Gemma4VitClassifier,
    Gemma4VitEncoder,
    apply_multidimensional_rope,
)
from torch import nn

from ..blocks import PreNormBlock
from ..context import PassExtras
from ..kinds import AttentionKind, BackboneKind
from ..registry import register_attention, register_backbone, register_block
from ..typing import Bias


@register_attention(Gemma4Attention)
class Gemma4AttentionKind(AttentionKind):
    """``Gemma4Attention``: q/k/v projections and norms, 2D rotary embeddings, score scale 1."""

    def qkv(self, attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``h`` ``[B, T, D]`` -> q, k, v ``[B, H, T, hd]`` (key/value heads repeated for grouped-query
        attention); with ``rope`` ``[B, T, 2 hd]`` (sin ; cos), q and k rotated as timm rotates them."""
        b, t, _ = h.shape
        q = attn.q_norm(attn.q_proj(h).view(b, t, attn.num_heads, attn.head_dim))
        k = attn.k_norm(attn.k_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim))
        v = attn.v_norm(attn.v_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim))
        if rope is not None:
            sin, cos = rope.chunk(2, dim=-1)
            q = apply_multidimensional_rope(q, cos, sin, ndim=2, unsqueeze_dim=2)
            k = apply_multidimensional_rope(k, cos, sin, ndim=2, unsqueeze_dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if attn.num_kv_groups > 1:
            k, v = k.repeat_interleave(attn.num_kv_groups, dim=1), v.repeat_interleave(attn.num_kv_groups, dim=1)
        return q, k, v

    def out(self, attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Heads ``o`` ``[B, H, T, hd]`` -> ``[B, T, D]``."""
        b, _, t, _ = o.shape
        return attn.proj_drop(attn.o_proj(o.transpose(1, 2).reshape(b, t, -1)))

    def scale(self, attn: nn.Module) -> float:
        """1: q and k are normalised, and timm's module scores at scale 1."""
        return 1.0

    def attend_original(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        bias: Bias) -> torch.Tensor:
        """The original tokens as timm computes them: SDPA with ``scale=1.0``, or the explicit softmax."""
        if attn.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        scores = q @ k.transpose(-2, -1)
        return (scores if bias is None else scores + bias).softmax(dim=-1) @ v


@register_block(Gemma4Block)
class SandwichNormBlock(PreNormBlock):
    """``x + norm2(attn(norm1(x)))``, then ``x + norm4(mlp(norm3(x)))``."""

    @staticmethod
    def after_attention(blk: nn.Module, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual and MLP after attention, ``t`` and ``a`` ``[B, T, D]``."""
        t = t + blk.drop_path(blk.norm2(a))
        return t + blk.drop_path(blk.norm4(blk.mlp(blk.norm3(t))))


def encoder_of(model: nn.Module) -> nn.Module:
    """The ``Gemma4VitEncoder`` of ``model`` (itself, or the classifier's ``encoder``)."""
    return model.encoder if isinstance(model, Gemma4VitClassifier) else model


@register_backbone(Gemma4VitClassifier, Gemma4VitEncoder)
class Gemma4Backbone(BackboneKind):
    """``Gemma4VitClassifier`` and ``Gemma4VitEncoder`` on images: linear patch embedding with a 2D
    position table, rotary sandwich-norm blocks, soft-token, mean or no pooling."""

    def width(self, model: nn.Module) -> int:
        return encoder_of(model).embed_dim

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(encoder_of(model).blocks)

    def check_input(self, model: nn.Module, images: object) -> None:
        """Raise ``ValueError`` for input the model can not take here, saying how to fix it."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            what = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images [B, C, H, W] with values in [0, 1], got {what}: patch dicts and "
                             "pre-patchified input are not supported for Gemma 4 models")
        enc = encoder_of(model)
        if images.shape[1] != enc.in_chans:
            raise ValueError(f"images have {images.shape[1]} channels but the model takes {enc.in_chans}")
        (ph, pw), (h, w) = enc.patch_size, images.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(f"images are {h}x{w}, not a multiple of the patch size {ph}x{pw}: resize or crop them")
        enc._assert_raw_img_conformant(images)  # the soft-token pool's cells

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, PassExtras]:
        """``images`` -> patch tokens ``[B, N, D]`` with their position embeddings, the rotary tables as
        ``(sin ; cos)`` ``[B, N, 2 hd]``, and (family) the patch positions and padding for the pooling."""
        enc = encoder_of(model)
        x, position_ids, padding = enc.patch_embed(images, None, None)
        cos, sin = enc.rotary_emb(x, position_ids)
        return x, PassExtras(rope=torch.cat([sin, cos], dim=-1), family=(position_ids, padding))

    def class_token_init(self, model: nn.Module) -> torch.Tensor:
        """``[D]``: zeros (the model has no class token)."""
        enc = encoder_of(model)
        return torch.zeros(enc.embed_dim, device=enc.patch_embed.input_proj.weight.device)

    def base_logits(self, model: nn.Module, x: torch.Tensor, extras: PassExtras) -> torch.Tensor:
        """Patch tokens after the blocks ``[B, N, D]`` -> the model's own output."""
        enc = encoder_of(model)
        if enc.global_pool == "soft":
            x, _ = enc.pooler(x, *extras.family)
            if enc.std_bias is not None:
                x = (x - enc.std_bias) * enc.std_scale
        elif enc.global_pool == "avg":
            x = x.mean(dim=1)
        return model.forward_head(x) if isinstance(model, Gemma4VitClassifier) else x

    def task_features(self, model: nn.Module, c: torch.Tensor) -> torch.Tensor:
        """New class tokens after the blocks ``[B, K, D]`` -> the classifier's final norm (the encoder: as
        they are)."""
        return model.norm(c) if isinstance(model, Gemma4VitClassifier) else c
