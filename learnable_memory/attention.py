"""The attention arithmetic that is ours: original tokens, new class tokens and memory.

Shapes: B batch, H heads, N original tokens (prefix + patches), K new class tokens,
M memory tokens of all tasks in the pass, hd head dim, D width.

Memory keys/values are computed once per forward and block, ``[H, M, hd]``, and broadcast
over the batch. Memory makes no queries. Original tokens run exactly the base model's
attention unless a full-mode task lets them see the memory.

Each timm attention type gets an attention kind (:class:`~learnable_memory.kinds.AttentionKind`)
that only knows how to call that module's own projections; :func:`memory_attention` does the rest.

Two layouts of a pass. Split (training): original tokens ``[B, N, D]`` and new class tokens
``[B, K, D]`` are separate tensors, so that non-destructive training keeps no autograd graph
through the backbone. Packed (inference): the new class tokens ride behind the original tokens as
``[B, N + K, D]`` and share one call of every norm, projection and MLP (a kernel on K rows costs
nearly as much as on N); only :func:`packed_attention` tells them apart.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .context import PassContext

Bias = torch.Tensor | None


class Projections(Protocol):
    """What the arithmetic here needs of an attention kind (see :class:`~learnable_memory.kinds.AttentionKind`)."""

    def qkv(self, attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]: ...

    def out(self, attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor: ...

    def position_bias(self, attn: nn.Module, ctx: PassContext, n_tokens: int) -> tuple[Bias, Bias]: ...


def attend_original(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain self-attention of the original tokens, as timm computes it.

    ``q, k, v`` ``[B, H, N, hd]``, optional additive ``bias`` broadcastable to ``[B, H, N, N]``
    -> ``[B, H, N, hd]``.
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v


def attend_original_with_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_m: torch.Tensor,
    v_m: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full mode: original tokens attend to ``[tokens ; memory]`` with no mask.

    ``q, k, v`` ``[B, H, N, hd]``, ``k_m, v_m`` ``[H, M, hd]``, optional ``bias`` on the
    token-token scores ``[..., N, N]`` (memory gets none) -> ``[B, H, N, hd]``.
    """
    b = q.shape[0]
    k = torch.cat([k, k_m.unsqueeze(0).expand(b, -1, -1, -1)], dim=2)  # [B, H, N + M, hd]
    v = torch.cat([v, v_m.unsqueeze(0).expand(b, -1, -1, -1)], dim=2)
    if bias is not None:
        bias = F.pad(bias, (0, k_m.shape[1]))  # zero bias on the memory columns
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def attend_new(
    q_c: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    k_m: torch.Tensor,
    v_m: torch.Tensor,
    new_mask: torch.Tensor,
    scale: float,
    bias_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """New class tokens attend to the original tokens and to what Table 1 lets them see.

    Args:
        q_c, k_c, v_c: ``[B, H, K, hd]`` new class tokens.
        k_x, v_x: ``[B, H, N, hd]`` original tokens (always visible).
        k_m, v_m: ``[H, M, hd]`` memory, shared by the batch.
        new_mask: ``[K, K + M]`` bool, True where a class token sees a class token or memory.
        scale: Softmax temperature (``head_dim ** -0.5``).
        bias_x: Optional additive bias on the scores against the original tokens,
            broadcastable to ``[B, H, K, N]`` (relative position bias).

    Returns:
        ``[B, H, K, hd]``.
    """
    b, k = q_c.shape[0], q_c.shape[2]
    keys = torch.cat([k_x, k_c, k_m.unsqueeze(0).expand(b, -1, -1, -1)], dim=2)  # [B, H, N + K + M, hd]
    values = torch.cat([v_x, v_c, v_m.unsqueeze(0).expand(b, -1, -1, -1)], dim=2)
    sees_orig = new_mask.new_ones(k, k_x.shape[2])  # every new class token sees every original token
    mask = torch.cat([sees_orig, new_mask], dim=1)  # [K, N + K + M], a row of Table 1 per class token
    if bias_x is not None:  # additive: the bias on the original columns, -inf where Table 1 masks
        bias_x = bias_x.to(q_c.dtype).expand(*bias_x.shape[:-2], k, k_x.shape[2])
        rest = torch.zeros(new_mask.shape, dtype=q_c.dtype, device=q_c.device).masked_fill_(~new_mask, float("-inf"))
        mask = torch.cat([bias_x, rest.expand(*bias_x.shape[:-2], *rest.shape)], dim=-1)
    return F.scaled_dot_product_attention(q_c, keys, values, attn_mask=mask, scale=scale)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of two optional additive biases."""
    return b if a is None else a if b is None else a + b


def memory_attention(
    attn: nn.Module,
    h_x: torch.Tensor,
    h_c: torch.Tensor,
    h_m: torch.Tensor,
    ctx: PassContext,
    kind: Projections,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention layer over original tokens, new class tokens and memory.

    Args:
        attn: The frozen timm attention module.
        h_x: ``[B, N, D]`` original tokens after the block's pre-attention norm.
        h_c: ``[B, K, D]`` new class tokens, likewise.
        h_m: ``[M, D]`` this block's memory, likewise.
        ctx: The pass's :class:`~learnable_memory.context.PassContext`.
        kind: The attention kind of ``attn``.

    Returns:
        Attention outputs (after the output projection) ``[B, N, D]`` and ``[B, K, D]``.
    """
    rope = ctx.extras.rope
    bias_x, bias_c = ctx.extras.attn_bias or (None, None)  # e.g. key padding: [.., N, N], [.., 1, N]
    pos_x, pos_c = kind.position_bias(attn, ctx, h_x.shape[1])  # e.g. relative position bias, likewise
    bias_x, bias_c = _add(bias_x, pos_x), _add(bias_c, pos_c)
    n, b = h_x.shape[1], h_x.shape[0]
    # Full mode without rotary embeddings: the memory rows ride along with the original tokens through
    # the projection, so their keys/values already end in the memory's and need no concatenation.
    memory_in_sequence = ctx.full and rope is None
    with torch.set_grad_enabled(ctx.orig_grad):
        if memory_in_sequence:
            q, k, v = kind.qkv(attn, torch.cat([h_x, h_m.unsqueeze(0).expand(b, -1, -1)], dim=1))  # N + M
            bias = None if bias_x is None else F.pad(bias_x, (0, h_m.shape[0]))  # no bias on memory
            o_x = F.scaled_dot_product_attention(q[:, :, :n], k, v, attn_mask=bias, scale=attn.scale)
            k_x, v_x, k_m, v_m = k[:, :, :n], v[:, :, :n], k[0, :, n:], v[0, :, n:]
        else:
            q_x, k_x, v_x = kind.qkv(attn, h_x, rope)
    if not memory_in_sequence:
        _, k_m, v_m = (t[0] for t in kind.qkv(attn, h_m.unsqueeze(0)))  # [H, M, hd], once per pass
        with torch.set_grad_enabled(ctx.orig_grad):
            if ctx.full:
                o_x = attend_original_with_memory(q_x, k_x, v_x, k_m, v_m, attn.scale, bias_x)
            else:
                o_x = attend_original(q_x, k_x, v_x, attn.fused_attn, attn.scale, bias_x)
    with torch.set_grad_enabled(ctx.orig_grad):
        a_x = kind.out(attn, o_x, h_x)
    q_c, k_c, v_c = kind.qkv(attn, h_c)
    o_c = attend_new(q_c, k_x, v_x, k_c, v_c, k_m, v_m, ctx.new_mask, attn.scale, bias_c)
    return a_x, kind.out(attn, o_c, h_c)


def packed_attention(
    attn: nn.Module, h: torch.Tensor, h_m: torch.Tensor, ctx: PassContext, kind: Projections
) -> torch.Tensor:
    """:func:`memory_attention` for a packed pass (``ctx.packed`` = K new class tokens).

    One ``qkv`` and one output projection serve the original tokens and the new class tokens
    together; the attention itself is split as in Table 1. For attention kinds with no rotary
    embedding or score bias.

    Args:
        h: ``[B, N + K, D]``, original tokens then new class tokens, after the pre-attention norm.
        h_m: ``[M, D]`` this block's memory, likewise.

    Returns:
        ``[B, N + K, D]`` attention outputs after the output projection.
    """
    n, b, k_new = h.shape[1] - ctx.packed, h.shape[0], ctx.packed
    q, k, v = kind.qkv(attn, h)  # [B, H, N + K, hd]
    _, k_m, v_m = (t[0] for t in kind.qkv(attn, h_m.unsqueeze(0)))  # [H, M, hd], once per pass
    q_x, q_c = q[:, :, :n], q[:, :, n:]
    if ctx.full:  # one [originals ; memory ; new] key/value tensor: the originals see its first N + M rows
        m = k_m.shape[1]
        keys, values = (torch.cat([t[:, :, :n], t_m.expand(b, -1, -1, -1), t[:, :, n:]], dim=2)
                        for t, t_m in ((k, k_m), (v, v_m)))  # [B, H, N + M + K, hd]
        o_x = F.scaled_dot_product_attention(q_x, keys[:, :, : n + m], values[:, :, : n + m], scale=attn.scale)
        sees = ctx.new_mask  # [K, K + M]: columns new class tokens, then memory
        mask = torch.cat([sees.new_ones(k_new, n), sees[:, k_new:], sees[:, :k_new]], dim=1)  # [K, N + M + K]
        o_c = F.scaled_dot_product_attention(q_c, keys, values, attn_mask=mask, scale=attn.scale)
    else:
        o_x = attend_original(q_x, k[:, :, :n], v[:, :, :n], attn.fused_attn, attn.scale)
        o_c = attend_new(q_c, k[:, :, :n], v[:, :, :n], k[:, :, n:], v[:, :, n:], k_m, v_m, ctx.new_mask, attn.scale)
    # laid out [B, N + K, H, hd], so that the output projection's head merge is a view (one copy, as in timm)
    o = torch.cat([o_x.transpose(1, 2), o_c.transpose(1, 2)], dim=1).transpose(1, 2)  # [B, H, N + K, hd]
    return kind.out(attn, o, h)  # [B, N + K, D]
