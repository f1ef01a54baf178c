"""Table 1's rows of the new class tokens in gather form: what each one sees, as indices
(:class:`NewTokenIndex`, which ``PassContext.layout`` holds).

Every new class token sees every original token; besides them, task i's class token sees itself,
its own memory and, for an extension task, the class tokens and memory of the tasks it extends.
:class:`NewTokenIndex` lists exactly those as indices, read off the cells that ``build_attention_mask``
draws (:func:`~learnable_memory.mask.table1_cells`; ``tests/test_layout.py`` checks the index against
:func:`~learnable_memory.mask.new_token_mask`), so that the attention of K new class
tokens costs ``K * (N + 1 + m)`` scores, not ``K * (N + K + M)``, and no arithmetic path leads from
one task's parameters to another task's output (see :func:`learnable_memory.attention.attend_new`).

Shapes: K new class tokens, M memory rows of the pass, Sc / Sm the most class tokens / memory
rows any one new class token sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import TaskConfig
from .mask import table1_cells
from .typing import Tensor


@dataclass(frozen=True)
class NewTokenIndex:
    """What each new class token sees besides the original tokens.

    Attributes:
        k: Number of new class tokens.
        tok_index: ``[K, Sc]`` long, the class tokens each sees (itself included); None when each
            sees only itself (no extension task in the pass).
        tok_valid: ``[K, Sc]`` bool, False on padding.
        mem_index: ``[K, Sm]`` long, rows of the pass's memory each sees; None when :attr:`mem_block`
            applies.
        mem_valid: ``[K, Sm]`` bool, False on padding.
        mem_block: ``m`` when task i sees exactly memory rows ``[i * m, (i + 1) * m)``: the memory is
            then read as a ``[K, m]`` view, with no gather (the common case: equal sizes, no extension).
    """

    k: int
    tok_index: Tensor | None
    tok_valid: Tensor | None
    mem_index: Tensor | None
    mem_valid: Tensor | None
    mem_block: int | None

    def to(self, device: torch.device) -> NewTokenIndex:
        """This index with its tensors on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return NewTokenIndex(self.k, move(self.tok_index), move(self.tok_valid), move(self.mem_index),
                              move(self.mem_valid), self.mem_block)


def _padded(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Ragged index lists -> ``[len(rows), longest]`` long indices (padded with 0) and a validity mask."""
    width = max((len(r) for r in rows), default=0)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        index[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, : len(r)] = True
    return index, valid


def new_token_index(tasks: Sequence[TaskConfig]) -> NewTokenIndex:
    """What the new class tokens of a pass over ``tasks`` (in model order) see, read off Table 1 (plain
    Python, so it can run inside ``torch.compile``, where the index tensors become constants of the graph)."""
    k = len(tasks)
    cells, _ = table1_cells(tasks, n_orig=1)  # one original token stands for all of them
    seen: list[set[int]] = [set() for _ in range(k)]  # token index after the original one
    for rows, cols in cells:
        for r in range(rows.start, rows.stop):
            if r >= 1:
                seen[r - 1].update(range(max(cols.start, 1) - 1, cols.stop - 1))
    toks = [sorted(c for c in cols if c < k) for cols in seen]  # class tokens
    mems = [sorted(c - k for c in cols if c >= k) for cols in seen]  # the pass's memory rows
    tok_index = tok_valid = None
    if any(t != [i] for i, t in enumerate(toks)):
        tok_index, tok_valid = _padded([[i] + [j for j in t if j != i] for i, t in enumerate(toks)])  # itself first
    m = len(mems[0]) if mems else 0
    if all(r == list(range(i * m, (i + 1) * m)) for i, r in enumerate(mems)):
        return NewTokenIndex(k, tok_index, tok_valid, None, None, m)
    mem_index, mem_valid = _padded(mems)
    return NewTokenIndex(k, tok_index, tok_valid, mem_index, mem_valid, None)


#: Earlier names, kept for ``model.py``'s callers.
NewTokenLayout = NewTokenIndex
new_token_layout = new_token_index
