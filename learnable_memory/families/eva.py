"""timm ``Eva``: EVA, EVA-02, ROPE-ViT, Perception Encoder, DINOv3, LingBot-Vision, Sapiens2.

What these models add to a plain ViT, and how memory and new class tokens meet it:

- Rotary position embeddings (``rope_type`` cat, mixed, dinov3, mrope) rotate the queries and
  keys of the patch tokens only; timm's attention leaves its ``num_prefix_tokens`` class and
  register tokens unrotated. New class tokens and memory count as prefix tokens: they are never
  rotated (they have no position in the image). The backbone hands the rotary table to the
  blocks in ``PassExtras.rope``; RoPE-Mixed learns one table per block, handed over as
  ``PassExtras.block_rope`` (``{block: table}``) and picked by each block.
- ``EvaAttention`` (fused ``qkv`` with ``q_bias``/``k_bias``/``v_bias``, or separate
  ``q_proj``/``k_proj``/``v_proj``) and ``AttentionRope`` (also grouped-query attention,
  ``num_kv_heads``): q/k norm, scale norm and the sigmoid output gate are their own modules.
- ``EvaBlock`` (pre-norm, LayerScale ``gamma_1``/``gamma_2``, also attention-only LayerScale;
  Mlp, GluMlp or SwiGLU) and ``EvaBlockPostNorm`` (``x + norm1(attn(x))``: memory enters the
  attention as it is, since the block applies nothing to its input before attention).
- Heads: the base output is ``Eva.forward_head(Eva.norm(x))`` (token, avg or map pooling). A
  task's feature is what the model applies to a class token after the last block: ``norm``, then
  ``fc_norm`` (attention pooling and averaging are over the original tokens and do not apply).

The five Sapiens2 models can not be built with ``depth=2`` as registered (their per-block
``num_kv_heads`` has one entry per block of the full depth); built with a matching ``num_kv_heads``
they run like the others.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from torch import nn

from ..blocks import PostNormBlock, PreNormBlock
from ..context import PassExtras
from ..kinds import AttentionKind
from ..registry import register_attention, register_backbone, register_block
from .vit import VitBackbone


def fused_qkv_with_bias(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``attn.qkv`` on ``h`` ``[B, T, D]`` with the ``q_bias``/``k_bias``/``v_bias`` layout of
    BEiT-style attention (``k_bias`` is a zero buffer) -> ``[B, T, 3 * H * hd]``."""
    if attn.q_bias is None:
        return attn.qkv(h)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:
        qkv = attn.qkv(h)
        qkv += bias
        return qkv
    return F.linear(h, weight=attn.qkv.weight, bias=bias)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, heads * hd]`` -> ``[B, heads, T, hd]``."""
    b, n, _ = t.shape
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


class _RotaryAttention(AttentionKind):
    """Shared by the rotary attention kinds: rotate patch tokens, project the heads out."""

    @abstractmethod
    def _projections(self, attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``h`` ``[B, T, D]`` -> q, k, v ``[B, heads, T, hd]`` before q/k norm and rotation."""

    def qkv(self, attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``h`` ``[B, T, D]`` -> q, k, v ``[B, H, T, hd]``; with ``rope`` (original tokens only)
        the tokens after the first ``attn.num_prefix_tokens`` are rotated."""
        q, k, v = self._projections(attn, h)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            n = attn.num_prefix_tokens
            half = attn.rotate_half
            q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=half)], dim=2).type_as(v)
        groups = getattr(attn, "num_kv_groups", 1)
        if groups > 1:  # grouped-query attention: head i uses key/value head i // groups
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return q, k, v

    def out(self, attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Heads ``o`` ``[B, H, T, hd]`` (and the attention input ``h``) -> ``[B, T, D]``."""
        b, heads, t, hd = o.shape
        o = attn.norm(o.transpose(1, 2).reshape(b, t, heads * hd))
        if attn.gate is not None:
            o = o * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(o))


@register_attention(EvaAttention)
class EvaAttentionKind(_RotaryAttention):
    """``EvaAttention``: fused ``qkv`` with BEiT-style biases, or separate q/k/v projections."""

    def _projections(self, attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if attn.qkv is not None:
            b, t, _ = h.shape
            qkv = fused_qkv_with_bias(attn, h).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)
            return qkv.unbind(0)
        return tuple(split_heads(p(h), attn.num_heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))


@register_attention(AttentionRope)
class AttentionRopeKind(_RotaryAttention):
    """``AttentionRope``: fused ``qkv`` linear, or separate projections with ``num_kv_heads``."""

    def _projections(self, attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if attn.qkv is not None:
            b, t, _ = h.shape
            qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            return qkv.unbind(0)
        return (
            split_heads(attn.q_proj(h), attn.num_heads),
            split_heads(attn.k_proj(h), attn.num_kv_heads),
            split_heads(attn.v_proj(h), attn.num_kv_heads),
        )


@register_block(EvaBlock)
class LayerScalePreNormBlock(PreNormBlock):
    """``x + gamma_1 * attn(norm1(x))``, then ``x + gamma_2 * mlp(norm2(x))`` (each gamma optional)."""

    @staticmethod
    def after_attention(blk: nn.Module, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual and MLP after attention, ``t`` and ``a`` ``[B, T, D]``."""
        if blk.gamma_1 is not None:
            a = blk.gamma_1 * a
        t = t + blk.drop_path1(a)
        m = blk.mlp(blk.norm2(t))
        if blk.gamma_2 is not None:
            m = blk.gamma_2 * m
        return t + blk.drop_path2(m)


# EvaBlockPostNorm: as timm's ResPostBlock (tokens and memory enter attention as they are).
register_block(EvaBlockPostNorm)(PostNormBlock)


@register_backbone(Eva)
class EvaBackbone(VitBackbone):
    """timm ``Eva``: as a ``VisionTransformer`` (class/register tokens, ``no_embed_class``,
    token/avg/map pooling, ``dynamic_img_size``), plus rotary embeddings for the blocks."""

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, PassExtras]:
        """``images`` ``[B, C, H, W]`` -> original tokens ``[B, N, D]`` and the rotary table
        (``[N - prefix, 2 * hd]``; RoPE-Mixed: one ``[H, N - prefix, 2 * hd]`` per block)."""
        x, rope = model._pos_embed(model.patch_embed(images))
        x = model.norm_pre(x)
        if rope is not None and getattr(model, "rope_mixed", False):
            return x, PassExtras(block_rope=dict(zip(model.blocks, rope, strict=False)))
        return x, PassExtras(rope=rope)
