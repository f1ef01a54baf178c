"""Attention over heads for kinds that compute their own queries, keys and values.

Some timm blocks fuse the attention into the block (``ParallelScalingBlock``) or take two
softmaxes per head (differential attention), so they can not go through
:func:`learnable_memory.attention.memory_attention`. They project their tokens themselves and
hand the heads to these functions, which keep the rules of the core:

- the original tokens run exactly the base model's arithmetic (no mask, fused SDPA where the
  model uses it), and only full mode lets them see the memory;
- the new class tokens see the original tokens and what Table 1 allows (``ctx.new_mask``);
- memory makes no queries; its keys/values ``[H, M, hd]`` are shared by the batch.

Shapes: B batch, H heads, N original tokens, K new class tokens, M memory tokens, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attend_new, attend_original, attend_original_with_memory
from .context import PassContext

Bias = torch.Tensor | None


def context_bias(ctx: PassContext) -> tuple[Bias, Bias]:
    """Additive biases a backbone puts on the scores against the original tokens (e.g. key
    padding): ``[.., N, N]`` for the original tokens, ``[.., 1, N]`` for new class tokens."""
    return ctx.extras.attn_bias or (None, None)


def attend_heads(
    q_x: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    k_m: torch.Tensor,
    v_m: torch.Tensor,
    ctx: PassContext,
    scale: float,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of original tokens and new class tokens.

    Args:
        q_x, k_x, v_x: ``[B, H, N, hd]`` original tokens.
        q_c, k_c, v_c: ``[B, H, K, hd]`` new class tokens.
        k_m, v_m: ``[H, M, hd]`` memory.
        ctx: The pass's context (mask, mode, gradient policy, biases).
        scale: Softmax temperature of the module.
        fused: The module's ``fused_attn`` (the original tokens use the same path).

    Returns:
        ``[B, H, N, hd]`` and ``[B, H, K, hd]``.
    """
    bias_x, bias_c = context_bias(ctx)
    with torch.set_grad_enabled(ctx.orig_grad):
        if ctx.full:
            o_x = attend_original_with_memory(q_x, k_x, v_x, k_m, v_m, scale, bias_x)
        else:
            o_x = attend_original(q_x, k_x, v_x, fused, scale, bias_x)
    o_c = attend_new(q_c, k_x, v_x, k_c, v_c, k_m, v_m, ctx.layout, scale, bias_c)
    return o_x, o_c


def _pairs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def diff_attend_heads(
    q_x: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    q_c: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    k_m: torch.Tensor,
    v_m: torch.Tensor,
    lam: torch.Tensor,
    ctx: PassContext,
    scale: float,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differential attention, ``softmax(q1 k1) v - lam * softmax(q2 k2) v``, with the same
    Table 1 mask on both softmaxes.

    Args:
        q_x, k_x: ``[B, 2H, N, hd]``, heads ``2h`` and ``2h + 1`` are the two maps of head ``h``;
            ``v_x`` ``[B, H, N, 2hd]``. Original tokens.
        q_c, k_c, v_c: New class tokens, likewise with K tokens.
        k_m: ``[2H, M, hd]``, ``v_m`` ``[H, M, 2hd]``: memory.
        lam: The module's lambda (scalar tensor).
        ctx, scale, fused: As in :func:`attend_heads`.

    Returns:
        ``[B, H, N, 2hd]`` and ``[B, H, K, 2hd]``, before the module's ``sub_norm``.
    """
    bias_x, bias_c = context_bias(ctx)
    (q1_c, q2_c), (k1_c, k2_c), (k1_m, k2_m) = _pairs(q_c), _pairs(k_c), _pairs(k_m)
    with torch.set_grad_enabled(ctx.orig_grad):
        if ctx.full:
            (q1, q2), (k1, k2) = _pairs(q_x), _pairs(k_x)
            o_x = attend_original_with_memory(q1, k1, v_x, k1_m, v_m, scale, bias_x) - lam * (
                attend_original_with_memory(q2, k2, v_x, k2_m, v_m, scale, bias_x)
            )
        else:
            o_x = _diff_original(q_x, k_x, v_x, lam, fused, scale, bias_x)
    k1_x, k2_x = _pairs(k_x)
    o1 = attend_new(q1_c, k1_x, v_x, k1_c, v_c, k1_m, v_m, ctx.layout, scale, bias_c)
    o2 = attend_new(q2_c, k2_x, v_x, k2_c, v_c, k2_m, v_m, ctx.layout, scale, bias_c)
    return o_x, o1 - lam * o2
