"""Generic block runners: timm's pre-norm ``Block`` and post-norm ``ResPostBlock`` shapes.

A family whose blocks have one of these shapes subclasses the runner and overrides only what
differs (``after_attention``, for LayerScale or MLP variants). Every runner keeps the rules of
:class:`~learnable_memory.kinds.BlockKind`: the original tokens run exactly the base block's
arithmetic under ``ctx.orig_grad``, the memory goes only through what the block applies before
attention and the key/value projections, and the new class tokens go through everything. Each
also gives the kind's dense reference (``reference``), which reuses ``after_attention`` (row-wise)
and the attention kind's own reference.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .context import PassContext
from .kinds import AttentionKind, BlockKind
from .registry import attention_kind
from .typing import KV, Pair, Tensor


def kind_of(attn: nn.Module, ctx: PassContext) -> AttentionKind:
    """``attn``'s kind as resolved when wrapping (``ctx.attention_kinds``), else from the registry."""
    kind = ctx.attention_kinds.get(attn)
    return attention_kind(attn) if kind is None else kind


def run_attention(attn: nn.Module, h_x: Tensor, h_c: Tensor, kv: KV, ctx: PassContext) -> Pair:
    """One attention module over original tokens ``h_x`` ``[B, N, D]`` and new class tokens ``h_c``
    ``[B, K, D]`` (after the block's pre-attention norm), with the memory's keys and values ``kv``
    -> outputs ``[B, N, D]``, ``[B, K, D]``. In a packed pass the new class tokens are the last rows
    of ``h_x`` and ``h_c`` is empty."""
    kind = kind_of(attn, ctx)
    if ctx.packed:
        return kind.attend_packed(attn, h_x, kv, ctx), h_c
    return kind.attend(attn, h_x, h_c, kv, ctx)


class PreNormBlock(BlockKind):
    """``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))`` (timm's ``Block``)."""

    packable = True

    def attentions(self, blk: nn.Module) -> list[nn.Module]:
        return [blk.attn]

    def memory_kv(self, blk: nn.Module, mem: Tensor, kinds: Mapping[nn.Module, AttentionKind]) -> tuple[KV, ...]:
        """``mem`` ``[M, D]`` through ``norm1`` and the attention's key/value projections."""
        return (kinds[blk.attn].memory_kv(blk.attn, blk.norm1(mem)),)

    def forward(self, blk: nn.Module, x: Tensor, c: Tensor, kv: tuple[KV, ...], ctx: PassContext) -> Pair:
        """``x`` ``[B, N, D]``, ``c`` ``[B, K, D]`` and the memory's ``kv`` -> new ``x``, ``c``."""
        ctx = ctx.for_block(blk)
        with torch.set_grad_enabled(ctx.orig_grad):
            h_x = blk.norm1(x)
        a_x, a_c = run_attention(blk.attn, h_x, blk.norm1(c), kv[0], ctx)
        with torch.set_grad_enabled(ctx.orig_grad):
            x = self.after_attention(blk, x, a_x)
        return x, self.after_attention(blk, c, a_c)

    def reference(self, blk: nn.Module, x: Tensor, c: Tensor, mem: Tensor, ctx: PassContext) -> Tensor:
        """One new class token: ``norm1`` on everything (memory included), the attention kind's dense
        reference, then :meth:`after_attention`."""
        ctx = ctx.for_block(blk)
        a = kind_of(blk.attn, ctx).reference(blk.attn, blk.norm1(x), blk.norm1(c), blk.norm1(mem), ctx)
        return self.after_attention(blk, c, a)

    @staticmethod
    def after_attention(blk: nn.Module, t: Tensor, a: Tensor) -> Tensor:
        """Residual and MLP after attention, ``t`` and ``a`` ``[B, T, D]``."""
        t = t + blk.drop_path1(blk.ls1(a))
        return t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))


class PostNormBlock(BlockKind):
    """``x + norm1(attn(x))``, then ``x + norm2(mlp(x))`` (timm's ``ResPostBlock``). Nothing is
    applied before attention, so the memory enters the key/value projections as it is."""

    packable = True

    def attentions(self, blk: nn.Module) -> list[nn.Module]:
        return [blk.attn]

    def memory_kv(self, blk: nn.Module, mem: Tensor, kinds: Mapping[nn.Module, AttentionKind]) -> tuple[KV, ...]:
        """``mem`` ``[M, D]`` straight into the attention's key/value projections."""
        return (kinds[blk.attn].memory_kv(blk.attn, mem),)

    def forward(self, blk: nn.Module, x: Tensor, c: Tensor, kv: tuple[KV, ...], ctx: PassContext) -> Pair:
        """As :meth:`PreNormBlock.forward`."""
        ctx = ctx.for_block(blk)
        a_x, a_c = run_attention(blk.attn, x, c, kv[0], ctx)
        with torch.set_grad_enabled(ctx.orig_grad):
            x = self.after_attention(blk, x, a_x)
        return x, self.after_attention(blk, c, a_c)

    def reference(self, blk: nn.Module, x: Tensor, c: Tensor, mem: Tensor, ctx: PassContext) -> Tensor:
        """One new class token: the attention kind's dense reference on the tokens and memory as they
        are, then :meth:`after_attention`."""
        ctx = ctx.for_block(blk)
        return self.after_attention(blk, c, kind_of(blk.attn, ctx).reference(blk.attn, x, c, mem, ctx))

    @staticmethod
    def after_attention(blk: nn.Module, t: Tensor, a: Tensor) -> Tensor:
        """Residual and MLP after attention, ``t`` and ``a`` ``[B, T, D]``."""
        t = t + blk.drop_path1(blk.norm1(a))
        return t + blk.drop_path2(blk.norm2(blk.mlp(t)))
