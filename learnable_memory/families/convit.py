"""timm ``ConVit``: gated positional self-attention (GPSA) in the first ``local_up_to_layer`` blocks,
then the class token joins and plain multi-head self-attention (MHSA) blocks follow.

How memory and new class tokens meet it:

- The GPSA blocks mix each patch with its neighbours through a learned positional attention and see
  no class token; they run as part of the embedding (original tokens only, exactly as timm runs
  them). Memory and new class tokens start at the first MHSA block, where the class token joins:
  a task's memory is ``[depth - local_up_to_layer, n_mem, D]``, one row block per MHSA block.
- A new class token starts as the class token (which joins without a position embedding) and is
  read out through the final ``norm``, as the class token is by the token-pooling head.
- ``MHSA`` scales the scores after the product (``(q k^T) * scale``, timm's order of operations,
  which the original tokens keep so the base output stays bit-identical) and has no fused path:
  its kind gives the original tokens' attention (``attend_original``); new class tokens and memory
  attend as Table 1 says through the core's arithmetic.
- The sweep builds the models at ``depth=2`` with ``local_up_to_layer=1`` (one GPSA block and one
  MHSA block, as the full model has both).
"""

from __future__ import annotations

import torch
from timm.models.convit import MHSA, Block, ConVit
from torch import nn

from ..blocks import PreNormBlock
from ..context import PassExtras
from ..kinds import AttentionKind
from ..registry import register_attention, register_backbone, register_block
from ..typing import Bias
from .vit import VitBackbone


@register_attention(MHSA)
class MHSAKind(AttentionKind):
    """ConViT's ``MHSA``: one ``qkv`` linear, scores scaled after the product, no fused path."""

    def qkv(self, attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``h`` ``[B, T, D]`` -> q, k, v ``[B, H, T, hd]``."""
        b, t, d = h.shape
        return attn.qkv(h).reshape(b, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def out(self, attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Heads ``o`` ``[B, H, T, hd]`` -> ``[B, T, D]``."""
        b, heads, t, hd = o.shape
        return attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(b, t, heads * hd)))

    def attend_original(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        bias: Bias) -> torch.Tensor:
        """The original tokens as timm computes them: ``softmax((q k^T) * scale) v``."""
        scores = (q @ k.transpose(-2, -1)) * attn.scale
        return (scores if bias is None else scores + bias).softmax(dim=-1) @ v


@register_block(Block)
class ConVitBlock(PreNormBlock):
    """ConViT's ``Block`` with MHSA: ``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``
    (the GPSA blocks run inside the embedding and never reach a block kind)."""

    @staticmethod
    def after_attention(blk: nn.Module, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual and MLP after attention, ``t`` and ``a`` ``[B, T, D]``."""
        t = t + blk.drop_path(a)
        return t + blk.drop_path(blk.mlp(blk.norm2(t)))


@register_backbone(ConVit)
class ConVitBackbone(VitBackbone):
    """``ConVit``: patch embedding and position embedding, the GPSA blocks, then the class token; the
    MHSA blocks are the blocks memory meets."""

    def check_model(self, model: nn.Module) -> None:
        """Refuse a ConViT with no MHSA block (``depth <= local_up_to_layer``): its class token never joins.

        Also builds each GPSA block's relative-index buffer for the model's patch grid, as GPSA itself
        does at its first forward (same values): built there under ``torch.inference_mode`` it would be
        an inference tensor, which the memory key/value cache can not fingerprint."""
        if len(model.blocks) <= model.local_up_to_layer:
            raise ValueError(f"this ConViT has {len(model.blocks)} blocks, all GPSA (local_up_to_layer="
                             f"{model.local_up_to_layer}): its class token never joins and memory has no block "
                             "to go in; build it with local_up_to_layer < depth")
        n = model.patch_embed.num_patches
        with torch.inference_mode(False), torch.no_grad():
            for blk in model.blocks[: model.local_up_to_layer]:
                if blk.attn.rel_indices.shape[1] != n:
                    blk.attn.rel_indices = blk.attn.get_rel_indices(n)
        super().check_model(model)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The MHSA blocks (after ``local_up_to_layer``)."""
        return list(model.blocks[model.local_up_to_layer:])

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, PassExtras]:
        """``images`` ``[B, C, H, W]`` -> ``[class token ; patches]`` ``[B, 1 + P, D]`` after the GPSA
        blocks, as ``ConVit.forward_features`` builds them."""
        x = model.patch_embed(images)
        if model.use_pos_embed:
            x = x + model.pos_embed
        x = model.pos_drop(x)
        for blk in model.blocks[: model.local_up_to_layer]:
            x = blk(x)
        return torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1), PassExtras()

    def embed_new(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """New class tokens ``[K, D]`` join as they are, as the class token does."""
        return tokens

    def class_token_init(self, model: nn.Module) -> torch.Tensor:
        """``[D]``: the class token (it joins without a position embedding)."""
        return model.cls_token.reshape(model.embed_dim).detach().clone()

    def task_features(self, model: nn.Module, c: torch.Tensor) -> torch.Tensor:
        """New class tokens after the blocks ``[B, K, D]`` -> ``norm(c)``, as the class token."""
        return model.norm(c)
