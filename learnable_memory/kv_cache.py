"""The memory's keys and values, kept across passes.

In every block, a task's memory goes only through the block's pre-attention norm and its key/value
projections (paper Sec. 2), so its keys and values depend on the memory and frozen weights alone:
they are the same in every pass until one of those changes. :class:`MemoryKVCache` keeps them for
every task of a model, ``K * m * depth * 2 * D`` values (one ``[.., M, hd]`` tensor per block,
attention and key/value, the tasks' rows in model order), and recomputes a task's rows only when
something they depend on has changed.

What counts as a change, checked on every pass: for the task's memory and for every parameter and
buffer of the backbone, its storage (``data_ptr``), its version counter, dtype and device; and the
autocast state of the pass. PyTorch bumps the version counter on every in-place change it tracks:
optimizer steps, ``load_state_dict``, in-place edits under ``no_grad``; ``.to()`` gives new
storage. Adding or removing a task re-lays the rows out. Not tracked: writes through ``.data``
(``p.data.copy_(...)``), which bypass the version counter; call
:meth:`~learnable_memory.MemoryViT.clear_kv_cache` after such an edit.

Entries are computed with autograd off and outside inference mode, so a value cached under
``torch.inference_mode`` can still be used by a later pass with autograd on. A pass that trains a
task (autograd on and its memory requiring grad) never reads the cache; neither does a pass under
``torch.compile``, so the compiled graph computes the keys and values itself and the cache never
becomes a guard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .memory import TaskMemory

KV = tuple[torch.Tensor, torch.Tensor]
BlockKV = tuple[KV, ...]
#: ``(block index, memory [M, D]) -> that block's keys and values``: ``BlockKind.memory_kv`` of the block.
ComputeKV = Callable[[int, torch.Tensor], BlockKV]


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


def autocast_key(device: torch.device) -> tuple:
    """The autocast state of ``device``'s type: whether on, and its dtype."""
    kind = device.type
    return (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) if kind in ("cpu", "cuda") else ()


@dataclass
class MemoryKVCache:
    """Keys and values of every task's memory in every block, kept while nothing they depend on changes.

    Attributes:
        enabled: Use the cache (default). Off: every pass computes the keys and values itself.
        max_bytes: Keep no more than this many bytes; a model whose memory needs more is served
            without the cache (None: no limit).
    """

    enabled: bool = True
    max_bytes: int | None = None
    _base_key: tuple | None = field(default=None, repr=False)
    _layout_key: tuple = field(default=(), repr=False)
    _rows: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)  # id(task) -> (start, stop)
    _keys: dict[int, tuple] = field(default_factory=dict, repr=False)  # id(task) -> key its rows were made with
    _blocks: list[BlockKV] = field(default_factory=list, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(t.numel() * t.element_size() for block in self._blocks for kv in block for t in kv)

    def clear(self) -> None:
        """Drop every entry (they are recomputed on the next pass that needs them)."""
        self._base_key, self._layout_key, self._rows, self._keys, self._blocks = None, (), {}, {}, []

    def lookup(self, tasks: Sequence[TaskMemory], wanted: Sequence[TaskMemory], base: nn.Module,
               compute: ComputeKV) -> list[BlockKV] | None:
        """Per block, the keys and values of the memory of ``wanted`` (their rows in that order).

        Args:
            tasks: Every task of the model, in model order (the rows kept).
            wanted: The tasks of the pass, a sub-sequence of ``tasks``.
            base: The backbone (its parameters and buffers are part of the key).
            compute: One block's keys and values from memory ``[M, D]`` (``BlockKind.memory_kv``).

        Returns:
            None when the cache does not serve: disabled, or over ``max_bytes``.
        """
        if not self.enabled or not tasks:
            return None
        device = tasks[0].memory.device
        base_key = (tuple(_tensor_key(t) for t in (*base.parameters(), *base.buffers())), autocast_key(device))
        if base_key != self._base_key:
            self.clear()
            self._base_key = base_key
        layout_key = tuple((id(t), t.n_mem, t.memory.dtype, t.memory.device) for t in tasks)
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable by any later pass
            if layout_key != self._layout_key:
                self._lay_out(tasks, compute)
                self._layout_key = layout_key
            if self.max_bytes is not None and self.nbytes > self.max_bytes:
                self.clear()
                return None
            for t in wanted:
                if self._keys.get(id(t)) != _tensor_key(t.memory):
                    self._refresh(t, compute)
        if len(wanted) == len(tasks):
            return self._blocks
        rows = torch.cat([torch.arange(*self._rows[id(t)], device=device) for t in wanted])
        return [tuple((k.index_select(-2, rows), v.index_select(-2, rows)) for k, v in block) for block in self._blocks]

    def _lay_out(self, tasks: Sequence[TaskMemory], compute: ComputeKV) -> None:
        """Rows for ``tasks`` in this order. A task kept from the last layout, unchanged, keeps its
        keys and values (copied over); the others are computed when a pass asks for them."""
        old_blocks, old_rows, old_keys = self._blocks, self._rows, self._keys
        self._rows, start = {}, 0
        for t in tasks:
            self._rows[id(t)] = (start, start + t.n_mem)
            start += t.n_mem
        probe = tasks[0].memory[:, :0]  # [depth, 0, D]: the shapes and dtypes of every block's keys/values
        self._blocks = [tuple((_with_rows(k, start), _with_rows(v, start)) for k, v in compute(i, probe[i]))
                        for i in range(probe.shape[0])]
        self._keys = {}
        for t in tasks:
            if id(t) not in old_rows or old_keys.get(id(t)) != _tensor_key(t.memory):
                continue
            (a, b), (a_old, b_old) = self._rows[id(t)], old_rows[id(t)]
            for block, old_block in zip(self._blocks, old_blocks, strict=True):
                for (k, v), (k_old, v_old) in zip(block, old_block, strict=True):
                    k[..., a:b, :] = k_old[..., a_old:b_old, :]
                    v[..., a:b, :] = v_old[..., a_old:b_old, :]
            self._keys[id(t)] = old_keys[id(t)]

    def _refresh(self, task: TaskMemory, compute: ComputeKV) -> None:
        """Recompute ``task``'s rows in every block."""
        a, b = self._rows[id(task)]
        for i, block in enumerate(self._blocks):
            for (k, v), (k_new, v_new) in zip(block, compute(i, task.memory[i]), strict=True):
                k[..., a:b, :] = k_new
                v[..., a:b, :] = v_new
        self._keys[id(task)] = _tensor_key(task.memory)


def _with_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised tensor like ``t`` ``[.., 0, hd]`` with ``rows`` rows."""
    shape = list(t.shape)
    shape[-2] = rows
    return t.new_empty(shape)
