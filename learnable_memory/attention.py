"""The attention arithmetic that is ours: original tokens, new class tokens and memory.

Shapes: B batch, H heads, N original tokens (prefix + patches), K new class tokens,
M memory tokens of all tasks in the pass, hd head dim, D width.

Memory makes no queries: its keys/values ``[H, M, hd]`` are computed per block from the memory
alone (cached across passes, see :mod:`learnable_memory.kv_cache`) and broadcast over the batch.
Original tokens run exactly the base model's attention unless a full-mode task lets them see the
memory. Each new class token attends only to what Table 1 lets it see, gathered per task
(:mod:`learnable_memory.token_index`), so nothing of another task enters its arithmetic.

Each timm attention type gets an attention kind (:class:`~learnable_memory.kinds.AttentionKind`)
that only knows how to call that module's own projections; :func:`memory_attention` does the rest.
The split of the attention itself (original tokens as the base model, new class tokens as Table 1
says) is written once, in :func:`attend_split`; kinds that project their own heads (fused blocks)
call it too, and :func:`~learnable_memory.differential.attend_split_differential` is its
two-softmax form.

Two forms of a pass. Split (training): original tokens ``[B, N, D]`` and new class tokens
``[B, K, D]`` are separate tensors, so that non-destructive training keeps no autograd graph
through the backbone. Packed (inference): the new class tokens ride behind the original tokens as
``[B, N + K, D]`` and share one call of every norm, projection and MLP (a kernel on K rows costs
nearly as much as on N); only :func:`packed_attention` tells them apart.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .context import PassContext
from .token_index import NewTokenIndex
from .typing import KV, Bias, Biases, Pair, Tensor


class Projections(Protocol):
    """What the arithmetic here needs of an attention kind (see :class:`~learnable_memory.kinds.AttentionKind`)."""

    def qkv(self, attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]: ...

    def out(self, attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor: ...

    def position_bias(self, attn: nn.Module, ctx: PassContext, n_tokens: int) -> Biases: ...

    def scale(self, attn: nn.Module) -> float: ...

    def attend_original(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Bias
                        ) -> torch.Tensor: ...


#: The base model's own attention of its original tokens: ``(q, k, v, bias)`` ``[B, H, N, hd]`` (and a bias
#: broadcastable to ``[B, H, N, N]``, or None) -> ``[B, H, N, hd]``.
OriginalAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Bias], torch.Tensor]


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


def _gather(t: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[K, S]`` of ``t`` ``[..., T, hd]`` -> ``[..., K, S, hd]``, zero where not ``valid``:
    padding never carries another task's values (0 * NaN would be NaN)."""
    return t[..., index, :].masked_fill(~valid[..., None], 0.0)


#: PyTorch's CPU flash-attention kernel, which returns the log-sum-exp of the scores beside the output
#: (``F.scaled_dot_product_attention`` calls it on CPU but drops the log-sum-exp). A private ATen op: used
#: only where it exists, in eager CPU passes without autograd (its log-sum-exp has no gradient), and
#: checked against the explicit formula by the tests.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and the log-sum-exp of its scores: ``q`` ``[B, H, K, hd]``, ``k`` ``[B, H, N, hd]``,
    ``v`` ``[B, H, N, hd_v]``, optional additive ``bias`` broadcastable to ``[B, H, K, N]`` ->
    ``[B, H, K, hd_v]`` and ``[B, H, K]`` (float32)."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    fast = (_FLASH_CPU is not None and q.device.type == "cpu" and v.shape[-1] == q.shape[-1] and not grad
            and q.dtype in (torch.float32, torch.bfloat16) and q.numel() > 0 and k.shape[-2] > 0
            and not torch.compiler.is_compiling())
    if fast:
        mask = None if bias is None else bias.to(q.dtype).expand(*q.shape[:-1], k.shape[-2])
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse.float()
    scores = (q * scale) @ k.transpose(-2, -1)  # [B, H, K, N]
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    lse = torch.logsumexp(scores.float(), dim=-1)
    return torch.exp(scores - lse[..., None].to(scores.dtype)) @ v, lse


def attend_new(
    q_c: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    k_c: torch.Tensor,
    v_c: torch.Tensor,
    k_m: torch.Tensor,
    v_m: torch.Tensor,
    index: NewTokenIndex,
    scale: float,
    bias_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """New class tokens attend to the original tokens and to what Table 1 lets each see.

    One exact softmax per new class token over its scores against the N original tokens, its own
    class token (and those of the tasks it extends) and its own memory (and theirs): the original
    tokens in one attention call for all K (with its log-sum-exp), the rest gathered per task, and
    the two parts merged by their log-sum-exps. ``K * (N + Sc + Sm)`` scores in all. A task's output
    depends on the original tokens and its own (and its predecessors') parameters only; padding is
    masked and zeroed, so even NaN or Inf in one task can not reach another.

    Args:
        q_c, k_c, v_c: ``[B, H, K, hd]`` new class tokens (``v_c`` may have another head dim, as all values).
        k_x, v_x: ``[B, H, N, hd]`` original tokens.
        k_m, v_m: ``[H, M, hd]`` memory of the pass, shared by the batch.
        index: What each new class token sees (:func:`learnable_memory.token_index.new_token_index`).
        scale: Softmax temperature (``head_dim ** -0.5``).
        bias_x: Optional additive bias on the scores against the original tokens, broadcastable to
            ``[B, H, K, N]`` (relative position bias, key padding).

    Returns:
        ``[B, H, K, hd_v]``.
    """
    k = q_c.shape[2]
    o_x, lse_x = attend_with_lse(q_c, k_x, v_x, scale, bias_x)  # [B, H, K, hd_v], [B, H, K]
    # The per-task part runs in [H, K, B, .] layout: one small matmul per (head, task) against that
    # task's own memory, which is shared by the batch.
    if index.tok_index is None:  # each sees only itself
        s_c = torch.linalg.vecdot(q_c, k_c).permute(1, 2, 0).unsqueeze(-1)  # [H, K, B, 1]
    else:
        keys_c = _gather(k_c, index.tok_index, index.tok_valid)  # [B, H, K, Sc, hd]
        s_c = torch.linalg.vecdot(q_c.unsqueeze(-2), keys_c).permute(1, 2, 0, 3)  # [H, K, B, Sc]
        s_c = s_c.masked_fill(~index.tok_valid[:, None], float("-inf"))
    if index.mem_block is not None:  # task i: memory rows [i m, (i + 1) m)
        m = index.mem_block
        keys_m = k_m[:, : k * m].unflatten(1, (k, m))  # [H, K, m, hd]
        vals_m = v_m[:, : k * m].unflatten(1, (k, m))
    else:
        keys_m = _gather(k_m, index.mem_index, index.mem_valid)  # [H, K, Sm, hd]
        vals_m = _gather(v_m, index.mem_index, index.mem_valid)
    s_m = q_c.permute(1, 2, 0, 3) @ keys_m.transpose(-2, -1)  # [H, K, B, Sm]
    if index.mem_valid is not None:
        s_m = s_m.masked_fill(~index.mem_valid[:, None], float("-inf"))
    s_e = torch.cat([s_c, s_m], dim=-1).float() * scale  # [H, K, B, Sc + Sm]: never empty (itself)
    lse_x = lse_x.permute(1, 2, 0)  # [H, K, B]
    lse = torch.logaddexp(lse_x, torch.logsumexp(s_e, dim=-1))  # of the whole softmax
    w_c, w_m = torch.exp(s_e - lse[..., None]).to(v_x.dtype).split([s_c.shape[-1], s_m.shape[-1]], dim=-1)
    w_c = w_c.permute(2, 0, 1, 3)  # [B, H, K, Sc]
    if index.tok_index is None:
        out = v_c * w_c
    else:
        out = (w_c.unsqueeze(-1) * _gather(v_c, index.tok_index, index.tok_valid)).sum(-2)
    if w_m.shape[-1]:
        out += (w_m @ vals_m).permute(2, 0, 1, 3)  # [B, H, K, hd_v]
    share_x = torch.exp(lse_x - lse).permute(2, 0, 1).unsqueeze(-1).to(out.dtype)  # the original tokens' share
    return out.addcmul_(o_x, share_x)


def dense_attention(q: Tensor, keys: Tensor, values: Tensor, scale: float, bias: Bias = None) -> Tensor:
    """The unfused softmax of a dense reference: ``q`` ``[B, H, 1, hd]`` against ``keys`` / ``values``
    ``[B, H, T, hd]``, with an optional additive ``bias`` on the first columns (``[.., 1, N]``,
    N <= T; zero on the rest) -> ``[B, H, 1, hd_v]``."""
    scores = (q * scale) @ keys.transpose(-2, -1)  # [B, H, 1, T]
    if bias is not None:
        scores = scores + F.pad(bias, (0, scores.shape[-1] - bias.shape[-1]))
    return scores.softmax(dim=-1) @ values


def add_bias(a: Bias, b: Bias) -> Bias:
    """Sum of two optional additive biases."""
    return b if a is None else a if b is None else a + b


def score_biases(ctx: PassContext, own: Biases = (None, None)) -> Biases:
    """The additive biases on the scores against the N original tokens: the backbone's
    (``ctx.extras.score_bias``, e.g. key padding) plus the module's ``own`` (e.g. an attention kind's
    :meth:`~learnable_memory.kinds.AttentionKind.position_bias`); ``[.., N, N]`` for the original
    tokens' queries, ``[.., 1, N]`` for the new class tokens'."""
    bias_x, bias_c = ctx.extras.score_bias
    return add_bias(bias_x, own[0]), add_bias(bias_c, own[1])


def timm_attention(fused: bool, scale: float) -> OriginalAttention:
    """The original tokens' attention of timm's ``Attention`` (:func:`attend_original`), ``fused`` as the
    module is."""
    return lambda q, k, v, bias: attend_original(q, k, v, fused, scale, bias)


def attend_split(q_x: torch.Tensor, k_x: torch.Tensor, v_x: torch.Tensor, q_c: torch.Tensor, k_c: torch.Tensor,
                 v_c: torch.Tensor, kv: KV, ctx: PassContext, scale: float, original: OriginalAttention,
                 biases: Biases) -> Pair:
    """Softmax attention of the original tokens and of the new class tokens, as Table 1 says.

    Args:
        q_x, k_x, v_x: ``[B, H, N, hd]`` original tokens (under ``ctx.orig_grad``, as the base model).
        q_c, k_c, v_c: ``[B, H, K, hd]`` new class tokens.
        kv: The memory's keys and values ``[H, M, hd]``.
        ctx: The pass's context (what each new class token sees, mode, gradient policy).
        scale: Softmax temperature of the module.
        original: The module's own attention of the original tokens (e.g. :func:`timm_attention`); in full
            mode they attend to ``[tokens ; memory]`` instead, at ``scale``.
        biases: Score biases against the original tokens (:func:`score_biases`).

    Returns:
        ``[B, H, N, hd]`` and ``[B, H, K, hd]``.
    """
    bias_x, bias_c = biases
    with torch.set_grad_enabled(ctx.orig_grad):
        if ctx.full:
            o_x = attend_original_with_memory(q_x, k_x, v_x, *kv, scale, bias_x)
        else:
            o_x = original(q_x, k_x, v_x, bias_x)
    return o_x, attend_new(q_c, k_x, v_x, k_c, v_c, *kv, ctx.index, scale, bias_c)


def memory_attention(
    attn: nn.Module,
    h_x: torch.Tensor,
    h_c: torch.Tensor,
    kv: KV,
    ctx: PassContext,
    kind: Projections,
) -> Pair:
    """One attention layer over original tokens, new class tokens and memory.

    Args:
        attn: The frozen timm attention module.
        h_x: ``[B, N, D]`` original tokens after the block's pre-attention norm.
        h_c: ``[B, K, D]`` new class tokens, likewise.
        kv: This block's memory keys and values ``[H, M, hd]`` (see ``AttentionKind.memory_kv``).
        ctx: The pass's :class:`~learnable_memory.context.PassContext`.
        kind: The attention kind of ``attn``.

    Returns:
        Attention outputs (after the output projection) ``[B, N, D]`` and ``[B, K, D]``.
    """
    biases = score_biases(ctx, kind.position_bias(attn, ctx, h_x.shape[1]))
    with torch.set_grad_enabled(ctx.orig_grad):
        q_x, k_x, v_x = kind.qkv(attn, h_x, ctx.extras.rope)
    q_c, k_c, v_c = kind.qkv(attn, h_c)
    o_x, o_c = attend_split(q_x, k_x, v_x, q_c, k_c, v_c, kv, ctx, kind.scale(attn),
                            partial(kind.attend_original, attn), biases)
    with torch.set_grad_enabled(ctx.orig_grad):
        a_x = kind.out(attn, o_x, h_x)
    return a_x, kind.out(attn, o_c, h_c)


def packed_attention(attn: nn.Module, h: torch.Tensor, kv: KV, ctx: PassContext, kind: Projections) -> torch.Tensor:
    """:func:`memory_attention` for a packed pass (``ctx.packed`` = K new class tokens).

    One ``qkv`` and one output projection serve the original tokens and the new class tokens
    together; the attention itself is :func:`attend_split`'s, with the same biases as in a split
    pass. A rotary table (``ctx.extras.rope``) covers the new class tokens with identity rows
    (see ``PassExtras.for_packed``), so they stay unrotated, as in a split pass.

    Args:
        h: ``[B, N + K, D]``, original tokens then new class tokens, after the pre-attention norm.
        kv: This block's memory keys and values ``[H, M, hd]``.

    Returns:
        ``[B, N + K, D]`` attention outputs after the output projection.
    """
    n = h.shape[1] - ctx.packed
    biases = score_biases(ctx, kind.position_bias(attn, ctx, n))
    q, k, v = kind.qkv(attn, h, ctx.extras.rope)  # [B, H, N + K, hd]
    o_x, o_c = attend_split(q[:, :, :n], k[:, :, :n], v[:, :, :n], q[:, :, n:], k[:, :, n:], v[:, :, n:], kv, ctx,
                            kind.scale(attn), partial(kind.attend_original, attn), biases)
    # laid out [B, N + K, H, hd], so that the output projection's head merge is a view (one copy, as in timm)
    o = torch.cat([o_x.transpose(1, 2), o_c.transpose(1, 2)], dim=1).transpose(1, 2)  # [B, H, N + K, hd]
    return kind.out(attn, o, h)  # [B, N + K, D]
