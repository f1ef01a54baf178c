"""One small adapter per timm block kind: how the block runs original tokens, new class
tokens and memory, calling only the block's own submodules.

Memory goes through what the block applies before attention, serves as keys/values, and
its outputs are dropped: no residual, no MLP. New class tokens follow the same path as the
original tokens.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from .attention import ATTENTION_KINDS, MemoryContext, memory_attention


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
        a_x, a_c = memory_attention(blk.attn, h_x, blk.norm1(c), blk.norm1(mem), ctx)
        with torch.set_grad_enabled(ctx.orig_grad):
            x = self._rest(blk, x, a_x)
        return x, self._rest(blk, c, a_c)

    @staticmethod
    def _rest(blk: nn.Module, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual and MLP after attention, ``t`` and ``a`` ``[B, T, D]``."""
        t = t + blk.drop_path1(blk.ls1(a))
        return t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))


BLOCK_KINDS: dict[type, PreNormBlock] = {Block: PreNormBlock()}


def block_kind(blk: nn.Module) -> PreNormBlock:
    """The adapter for ``blk``'s exact type; ``TypeError`` if its block or attention kind is unknown."""
    kind = BLOCK_KINDS.get(type(blk))
    if kind is None:
        supported = ", ".join(sorted(t.__name__ for t in BLOCK_KINDS))
        raise TypeError(f"unsupported block type {type(blk).__name__}; supported block types: {supported}")
    for attn in kind.attentions(blk):
        if type(attn) not in ATTENTION_KINDS:
            supported = ", ".join(sorted(t.__name__ for t in ATTENTION_KINDS))
            raise TypeError(
                f"unsupported attention type {type(attn).__name__} in {type(blk).__name__}; "
                f"supported attention types: {supported}"
            )
    return kind
