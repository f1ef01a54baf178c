"""timm ``VisionTransformer``: its attention, its block kinds and how tokens enter and leave."""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..attention import MemoryContext, memory_attention
from ..registry import ATTENTION_KINDS, BACKBONES, BLOCK_KINDS, attention_kind, register


@register(ATTENTION_KINDS, Attention)
class QKVAttention:
    """timm's ``Attention``: one ``qkv`` linear, optional q/k norm, scale norm and gate."""

    def qkv(self, attn: nn.Module, h: torch.Tensor, rope: Any = None) -> tuple[torch.Tensor, ...]:
        """``h`` ``[B, T, D]`` -> q, k, v ``[B, H, T, hd]`` after q/k norm."""
        b, t, _ = h.shape
        q, k, v = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def out(self, attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Heads ``o`` ``[B, H, T, hd]`` (and the attention input ``h``) -> ``[B, T, D]``."""
        b, _, t, _ = o.shape
        o = attn.norm(o.transpose(1, 2).reshape(b, t, attn.attn_dim))
        if attn.gate is not None:
            o = o * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(o))


@register(BLOCK_KINDS, Block)
class PreNormBlock:
    """timm ``Block``: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def attentions(self, blk: nn.Module) -> list[nn.Module]:
        return [blk.attn]

    def __call__(
        self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor, mem: torch.Tensor, ctx: MemoryContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, N, D]``, ``c`` ``[B, K, D]``, ``mem`` ``[M, D]`` -> new ``x``, ``c``."""
        with torch.set_grad_enabled(ctx.orig_grad):
            h_x = blk.norm1(x)
        a_x, a_c = memory_attention(blk.attn, h_x, blk.norm1(c), blk.norm1(mem), ctx, attention_kind(blk.attn))
        with torch.set_grad_enabled(ctx.orig_grad):
            x = self._rest(blk, x, a_x)
        return x, self._rest(blk, c, a_c)

    @staticmethod
    def _rest(blk: nn.Module, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual and MLP after attention, ``t`` and ``a`` ``[B, T, D]``."""
        t = t + blk.drop_path1(blk.ls1(a))
        return t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))


@register(BACKBONES, VisionTransformer)
class VitBackbone:
    """timm ``VisionTransformer``: class/register tokens, ``no_embed_class``, gap/map pooling,
    ``dynamic_img_size`` and ``set_input_size``."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def check_input(self, model: nn.Module, images: torch.Tensor) -> None:
        """Raise ``ValueError`` for images the model can not take, saying how to fix them."""
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        in_chans = getattr(model, "in_chans", images.shape[1])
        if images.shape[1] != in_chans:
            raise ValueError(f"images have {images.shape[1]} channels but the model takes {in_chans}")
        pe = model.patch_embed
        if getattr(pe, "strict_img_size", False) and pe.img_size is not None:
            size = tuple(images.shape[-2:])
            if size != tuple(pe.img_size):
                raise ValueError(
                    f"images are {size[0]}x{size[1]} but this model takes {pe.img_size[0]}x{pe.img_size[1]}: "
                    "resize them (timm.data.resolve_data_config(model=model.base) gives the model's "
                    "preprocessing), or build the backbone with dynamic_img_size=True, or call "
                    "base.set_input_size(img_size=...) before wrapping"
                )

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``images`` ``[B, C, H, W]`` -> original tokens ``[B, N, D]`` as they enter the blocks."""
        x = model._pos_embed(model.patch_embed(images))
        return model.norm_pre(model.patch_drop(x)), {}

    def embed_new(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """New class tokens ``[K, D]`` enter where the original tokens enter ``norm_pre``."""
        return model.norm_pre(tokens)

    def class_token_init(self, model: nn.Module) -> torch.Tensor:
        """``[D]``: the original class token with its position embedding (none under
        ``no_embed_class``). Without a class token: the mean patch position embedding
        (zero without position embeddings), i.e. an average "empty" token."""
        d = model.embed_dim
        pos = model.pos_embed
        if model.cls_token is not None:
            tok = model.cls_token.reshape(d)
            if pos is not None and not model.no_embed_class:
                tok = tok + pos[0, 0]
            return tok.detach().clone()
        if pos is None:
            return torch.zeros(d, device=model.patch_embed.proj.weight.device)
        start = 0 if model.no_embed_class else model.num_prefix_tokens
        return pos[0, start:].mean(0).detach().clone()

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return model.num_prefix_tokens

    def base_logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Original tokens after the blocks ``[B, N, D]`` -> the base model's own output."""
        return model.forward_head(model.norm(x))

    def task_features(self, model: nn.Module, c: torch.Tensor) -> torch.Tensor:
        """New class tokens after the blocks ``[B, K, D]`` -> features ``[B, K, D]`` (norm, fc_norm)."""
        return model.fc_norm(model.norm(c))
