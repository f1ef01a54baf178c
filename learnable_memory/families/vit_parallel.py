"""timm's fused parallel ViT blocks: ``ParallelScalingBlock`` (ViT-22B style) and
``DiffParallelScalingBlock`` (the same with differential attention).

One ``in_norm`` and one ``in_proj`` give the MLP input and q, k, v together; attention and MLP
run side by side and meet in the output projection (one fused ``out_proj``, or
``attn_out_proj`` + ``mlp_out_proj``), then ``x + drop_path(ls(y))``.

Original tokens and new class tokens take the whole ``in_proj``. The memory needs only its keys
and values: it goes through ``in_norm`` and the k/v rows of ``in_proj`` (a slice of the frozen
weight, computed once per pass), and nothing else. The dense references project the memory with
the whole ``in_proj`` instead, so they check that slice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock
from torch import nn

from ..attention import attend_split, dense_attention, score_biases, timm_attention
from ..context import PassContext
from ..differential import attend_split_differential, dense_differential
from ..kinds import AttentionKind, BlockKind
from ..registry import register_block
from ..typing import Pair


def memory_rows_kv(blk: nn.Module, mem: torch.Tensor) -> Pair:
    """``mem`` ``[M, D]`` -> its keys and values ``[M, D]`` each: ``in_norm``, then only the
    k/v rows of ``in_proj`` (laid out as ``[mlp ; q ; k ; v]``)."""
    d = blk.in_split[1]
    start = blk.in_split[0] + d
    rows = slice(start, start + 2 * d)
    bias = blk.in_proj.bias[rows] if blk.in_proj.bias is not None else None
    return F.linear(blk.in_norm(mem), blk.in_proj.weight[rows], bias).chunk(2, dim=-1)


def mlp_and_qkv(blk: nn.Module, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``t`` ``[B, T, D]`` -> MLP hidden ``[B, T, F]`` (with ``mlp_bias``) and q, k, v ``[B, T, D]``."""
    x_mlp, q, k, v = torch.split(blk.in_proj(blk.in_norm(t)), blk.in_split, dim=-1)
    if blk.mlp_bias is not None:
        x_mlp = x_mlp + blk.mlp_bias
    return x_mlp, q, k, v


def reference_heads(blk: nn.Module, heads: Callable[..., tuple[torch.Tensor, ...]], x: torch.Tensor,
                    c: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For a dense reference: one new class token ``c`` ``[B, 1, D]`` -> its MLP hidden, its query and
    the keys and values it sees, ``[original ; itself ; memory]``, every part through the whole
    ``in_proj`` and ``heads`` (the kind's own head split)."""
    mlp_c, *qkv_c = mlp_and_qkv(blk, c)
    q_c, k_c, v_c = heads(blk, *qkv_c)
    _, k_x, v_x = heads(blk, *mlp_and_qkv(blk, x)[1:])
    _, k_m, v_m = heads(blk, *mlp_and_qkv(blk, mem.expand(x.shape[0], -1, -1))[1:])
    return mlp_c, q_c, torch.cat([k_x, k_c, k_m], dim=2), torch.cat([v_x, v_c, v_m], dim=2)


@register_block(ParallelScalingBlock)
class ParallelScaling(BlockKind):
    """``ParallelScalingBlock``: softmax attention with optional q/k norm, ``mlp_bias``, fused or
    separate output projection."""

    def attentions(self, blk: nn.Module) -> list[nn.Module]:
        return []  # the attention is part of the block

    @staticmethod
    def _heads(blk: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[B, T, D]`` each -> ``[B, H, T, hd]`` after q/k norm, in timm's order."""
        b, t, _ = q.shape
        q = blk.q_norm(q.view(b, t, blk.num_heads, blk.head_dim)).transpose(1, 2)
        k = blk.k_norm(k.view(b, t, blk.num_heads, blk.head_dim)).transpose(1, 2)
        return q, k, v.view(b, t, blk.num_heads, blk.head_dim).transpose(1, 2)

    @staticmethod
    def _out(blk: nn.Module, t: torch.Tensor, o: torch.Tensor, x_mlp: torch.Tensor) -> torch.Tensor:
        """Residual of ``t`` ``[B, T, D]`` with heads ``o`` ``[B, H, T, hd]`` and MLP hidden ``x_mlp``."""
        b, _, n, _ = o.shape
        x_attn = o.transpose(1, 2).reshape(b, n, -1)
        x_mlp = blk.mlp_drop(blk.mlp_act(x_mlp))
        if blk.out_proj is not None:
            y = blk.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = blk.attn_out_proj(x_attn) + blk.mlp_out_proj(x_mlp)
        return t + blk.drop_path(blk.ls(y))

    def memory_kv(self, blk: nn.Module, mem: torch.Tensor, kinds: Mapping[nn.Module, AttentionKind]) -> tuple[Pair]:
        """``mem`` ``[M, D]`` -> keys (after ``k_norm``) and values ``[H, M, hd]``."""
        k_m, v_m = memory_rows_kv(blk, mem)
        k_m = blk.k_norm(k_m.unflatten(-1, (blk.num_heads, blk.head_dim))).transpose(0, 1)  # [H, M, hd]
        return ((k_m, v_m.unflatten(-1, (blk.num_heads, blk.head_dim)).transpose(0, 1)),)

    def forward(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor, kv: tuple[Pair, ...],
                ctx: PassContext) -> Pair:
        """``x`` ``[B, N, D]``, ``c`` ``[B, K, D]`` and the memory's ``kv`` -> new ``x``, ``c``."""
        with torch.set_grad_enabled(ctx.orig_grad):
            mlp_x, *qkv_x = mlp_and_qkv(blk, x)
            q_x, k_x, v_x = self._heads(blk, *qkv_x)
        mlp_c, *qkv_c = mlp_and_qkv(blk, c)
        q_c, k_c, v_c = self._heads(blk, *qkv_c)
        o_x, o_c = attend_split(q_x, k_x, v_x, q_c, k_c, v_c, kv[0], ctx, blk.scale,
                                timm_attention(blk.fused_attn, blk.scale), score_biases(ctx))
        with torch.set_grad_enabled(ctx.orig_grad):
            x = self._out(blk, x, o_x, mlp_x)
        return x, self._out(blk, c, o_c, mlp_c)

    def reference(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor, mem: torch.Tensor,
                  ctx: PassContext) -> torch.Tensor:
        """One new class token: one softmax over ``[original ; itself ; memory]``."""
        mlp_c, q, keys, values = reference_heads(blk, self._heads, x, c, mem)
        return self._out(blk, c, dense_attention(q, keys, values, blk.scale, ctx.extras.score_bias[1]), mlp_c)


@register_block(DiffParallelScalingBlock)
class DiffParallelScaling(BlockKind):
    """``DiffParallelScalingBlock``: differential attention (``2H`` q/k heads of size ``hd``,
    ``H`` value heads of size ``2hd``, ``sub_norm``, ``(1 - lambda_init)``), fused ``out_proj``.
    New class tokens get the Table 1 mask on both softmaxes."""

    def attentions(self, blk: nn.Module) -> list[nn.Module]:
        return []

    @staticmethod
    def _heads(blk: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[B, T, D]`` each -> q, k ``[B, 2H, T, hd]`` (after q/k norm), v ``[B, H, T, 2hd]``."""
        b, t, _ = q.shape
        q = q.reshape(b, t, 2 * blk.num_heads, blk.head_dim).transpose(1, 2)
        k = k.reshape(b, t, 2 * blk.num_heads, blk.head_dim).transpose(1, 2)
        v = v.reshape(b, t, blk.num_heads, 2 * blk.head_dim).transpose(1, 2)
        return blk.q_norm(q), blk.k_norm(k), v

    @staticmethod
    def _out(blk: nn.Module, t: torch.Tensor, o: torch.Tensor, x_mlp: torch.Tensor) -> torch.Tensor:
        """Residual of ``t`` ``[B, T, D]`` with heads ``o`` ``[B, H, T, 2hd]`` and MLP hidden ``x_mlp``."""
        b, _, n, _ = o.shape
        x_attn = (blk.sub_norm(o) * (1 - blk.lambda_init)).transpose(1, 2).reshape(b, n, -1)
        y = blk.out_proj(torch.cat((x_attn, blk.mlp_drop(blk.mlp_act(x_mlp))), dim=-1))
        return t + blk.drop_path(blk.ls(y))

    def memory_kv(self, blk: nn.Module, mem: torch.Tensor, kinds: Mapping[nn.Module, AttentionKind]) -> tuple[Pair]:
        """``mem`` ``[M, D]`` -> keys ``[2H, M, hd]`` (after ``k_norm``) and values ``[H, M, 2hd]``."""
        k_m, v_m = memory_rows_kv(blk, mem)
        k_m = blk.k_norm(k_m.unflatten(-1, (2 * blk.num_heads, blk.head_dim)).transpose(0, 1))  # [2H, M, hd]
        return ((k_m, v_m.unflatten(-1, (blk.num_heads, 2 * blk.head_dim)).transpose(0, 1)),)

    def forward(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor, kv: tuple[Pair, ...],
                ctx: PassContext) -> Pair:
        """As :class:`ParallelScaling`."""
        with torch.set_grad_enabled(ctx.orig_grad):
            mlp_x, *qkv_x = mlp_and_qkv(blk, x)
            q_x, k_x, v_x = self._heads(blk, *qkv_x)
            lam = blk._compute_lambda().type_as(q_x)
        mlp_c, *qkv_c = mlp_and_qkv(blk, c)
        q_c, k_c, v_c = self._heads(blk, *qkv_c)
        o_x, o_c = attend_split_differential(q_x, k_x, v_x, q_c, k_c, v_c, kv[0], lam, ctx, blk.scale,
                                             blk.fused_attn, score_biases(ctx))
        with torch.set_grad_enabled(ctx.orig_grad):
            x = self._out(blk, x, o_x, mlp_x)
        return x, self._out(blk, c, o_c, mlp_c)

    def reference(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor, mem: torch.Tensor,
                  ctx: PassContext) -> torch.Tensor:
        """One new class token: both softmaxes over ``[original ; itself ; memory]``, unfused."""
        mlp_c, q, keys, values = reference_heads(blk, self._heads, x, c, mem)
        lam = blk._compute_lambda().type_as(q)
        o = dense_differential(q, keys, values, lam, blk.scale, ctx.extras.score_bias[1])
        return self._out(blk, c, o, mlp_c)
