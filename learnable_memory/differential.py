"""Differential attention (Differential Transformer): two softmaxes per head, the same Table 1 rows on both.

``softmax(q1 k1) v - lam * softmax(q2 k2) v``, as timm's ``DiffAttention`` and
``DiffParallelScalingBlock`` compute it. It is :func:`learnable_memory.attention.attend_split` with
two maps per head, and keeps its rules:

- the original tokens run exactly the base model's arithmetic (no mask, fused SDPA where the
  model uses it), and only full mode lets them see the memory;
- the new class tokens see the original tokens and what Table 1 allows (``ctx.layout``);
- memory makes no queries; its keys/values are shared by the batch;
- both softmaxes get the same score biases (:func:`~learnable_memory.attention.score_biases`).

Shapes: B batch, H heads, N original tokens, K new class tokens, M memory tokens, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attend_new, attend_original_with_memory, dense_attention
from .context import PassContext
from .typing import KV, Bias, Biases, Pair


def head_pairs(t: torch.Tensor) -> Pair:
    """``[..., 2H, T, hd]`` -> the two halves of each head pair, ``[..., H, T, hd]`` each."""
    return t.unflatten(-3, (-1, 2)).unbind(-3)


def _diff_original(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, fused: bool, scale: float, bias: Bias
) -> torch.Tensor:
    """Differential attention of the original tokens, in timm's order of operations (so the
    result is bit-identical to the base model's): ``q, k`` ``[B, 2H, N, hd]``, ``v`` ``[B, H, N, 2hd]``."""
    b, h2, n, hd = q.shape
    if fused:
        q1, q2 = q.reshape(b, h2 // 2, 2, n, hd).unbind(2)
        k1, k2 = k.reshape(b, h2 // 2, 2, n, hd).unbind(2)
        return F.scaled_dot_product_attention(q1, k1, v, attn_mask=bias) - lam * F.scaled_dot_product_attention(
            q2, k2, v, attn_mask=bias
        )
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1).view(b, h2 // 2, 2, n, n)
    return (attn[:, :, 0] - lam * attn[:, :, 1]) @ v


def attend_split_differential(
    q_x: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    kv: KV,
    lam: torch.Tensor,
    ctx: PassContext,
    scale: float,
    fused: bool,
    biases: Biases,
) -> Pair:
    """Differential attention, ``softmax(q1 k1) v - lam * softmax(q2 k2) v``, with the same
    Table 1 rows on both softmaxes.

    Args:
        q_x, k_x: ``[B, 2H, N, hd]``, heads ``2h`` and ``2h + 1`` are the two maps of head ``h``;
            ``v_x`` ``[B, H, N, 2hd]``. Original tokens.
        q_c, k_c, v_c: New class tokens, likewise with K tokens.
        kv: The memory's keys ``[2H, M, hd]`` and values ``[H, M, 2hd]``.
        lam: The module's lambda (scalar tensor).
        ctx, scale, fused, biases: As in :func:`~learnable_memory.attention.attend_split`.

    Returns:
        ``[B, H, N, 2hd]`` and ``[B, H, K, 2hd]``, before the module's ``sub_norm``.
    """
    bias_x, bias_c = biases
    k_m, v_m = kv
    (q1_c, q2_c), (k1_c, k2_c), (k1_m, k2_m) = head_pairs(q_c), head_pairs(k_c), head_pairs(k_m)
    with torch.set_grad_enabled(ctx.orig_grad):
        if ctx.full:
            (q1, q2), (k1, k2) = head_pairs(q_x), head_pairs(k_x)
            o_x = attend_original_with_memory(q1, k1, v_x, k1_m, v_m, scale, bias_x) - lam * (
                attend_original_with_memory(q2, k2, v_x, k2_m, v_m, scale, bias_x)
            )
        else:
            o_x = _diff_original(q_x, k_x, v_x, lam, fused, scale, bias_x)
    k1_x, k2_x = head_pairs(k_x)
    o1 = attend_new(q1_c, k1_x, v_x, k1_c, v_c, k1_m, v_m, ctx.layout, scale, bias_c)
    o2 = attend_new(q2_c, k2_x, v_x, k2_c, v_c, k2_m, v_m, ctx.layout, scale, bias_c)
    return o_x, o1 - lam * o2


def dense_differential(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lam: torch.Tensor, scale: float,
                       bias: Bias) -> torch.Tensor:
    """The dense references' differential attention of one query: ``q`` ``[B, 2H, 1, hd]`` against
    ``keys`` ``[B, 2H, T, hd]`` and ``values`` ``[B, H, T, 2hd]`` -> ``[B, H, 1, 2hd]``
    (:func:`~learnable_memory.attention.dense_attention` on each map of a head pair)."""
    (q1, q2), (k1, k2) = head_pairs(q), head_pairs(keys)
    return dense_attention(q1, k1, values, scale, bias) - lam * dense_attention(q2, k2, values, scale, bias)
