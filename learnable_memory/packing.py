"""The packed layout of an inference pass (``PassContext.packed``): the K new class tokens ride behind the N
original tokens in one ``[B, N + K, D]`` tensor, laid out in memory as the base model lays out its tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .context import PassExtras


def cat_with_layout(like: torch.Tensor, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``parts`` ``[B, T_i, D]`` joined along the tokens, in one copy, into the memory layout (order of
    dims in memory) of ``like``.

    A packed pass keeps the original tokens laid out as the base model lays them out (timm's patch
    embedding can leave them ``[B, D, N]`` in memory), so that every op, down to the pooling's
    reduction, sums in the same order and the base output stays bit-identical."""
    shape = [parts[0].shape[0], sum(p.shape[1] for p in parts), parts[0].shape[2]]
    order = sorted(range(like.dim()), key=lambda i: -like.stride(i))  # outermost dim first
    out = like.new_empty([shape[i] for i in order]).permute([order.index(i) for i in range(like.dim())])
    start = 0
    for p in parts:
        out[:, start : start + p.shape[1]] = p
        start += p.shape[1]
    return out


def pack(x: torch.Tensor, c: torch.Tensor, extras: PassExtras) -> tuple[torch.Tensor, torch.Tensor, PassExtras]:
    """The packed layout of a pass: original tokens ``x`` ``[B, N, D]`` with the new class tokens ``c``
    ``[B, K, D]`` behind them, ``[B, N + K, D]``, an empty ``[B, 0, D]``, and the extras for it."""
    return cat_with_layout(x, [x, c]), c[:, :0], extras.for_packed(c.shape[1])


def unpack(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed ``[B, N + K, D]`` -> the ``n`` original tokens ``[B, N, D]`` (in their layout) and the
    new class tokens ``[B, K, D]``."""
    return cat_with_layout(x, [x[:, :n]]), x[:, n:]
