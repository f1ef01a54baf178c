"""The memory's keys and values, kept across passes.

In every block, a task's memory goes only through the block's pre-attention norm and its key/value
projections (paper Sec. 2), so its keys and values depend on the memory and frozen weights alone:
they are the same in every pass until one of those changes. :class:`MemoryKVCache` keeps them for
every task of a model, ``K * m * depth * 2 * D`` values (one ``[.., M, hd]`` tensor per block,
attention and key/value, the tasks' rows in model order), and recomputes a task's rows only when
something they depend on may have changed.

What the cache tracks, on every pass that reads it:

- **Which task a row belongs to**: the ``TaskMemory`` object itself, held by a weak reference and
  compared by identity (never by ``id()`` or an address, which CPython and the allocator reuse). A
  task removed and replaced by a new one of the same name is a different object: its rows are
  computed afresh. Adding or removing a task re-lays the rows out; rows of tasks kept are copied over.
- **Every tensor the values depend on**: the task's memory, and every parameter and buffer of the
  backbone, in order. For each, a :class:`TensorState`: its storage (a weak reference, compared by
  identity: ``.to()``, ``.half().float()``, ``p.data = ...``, ``load_state_dict(assign=True)``, a
  new ``nn.Parameter`` and ``torch.utils.swap_tensors`` give new storage), its version counter
  (bumped by every in-place change autograd tracks: for-loop and ``foreach`` optimizer steps,
  ``load_state_dict``, in-place edits under ``no_grad``), dtype, device, shape, strides and storage
  offset.
- **Every optimizer step**: a global post-step hook (``torch.optim.optimizer.
  register_optimizer_step_post_hook``) drops, after the step of any ``torch.optim.Optimizer``, the
  rows computed from a parameter the optimizer holds that requires grad or has a gradient (and every
  row, when that parameter is the backbone's). Fused steps (``fused=True``) change parameters
  without bumping their version counter; this is what catches them.
- **The pass's numerics**: the autocast state (on, and its dtype) of the memory's device type and
  ``torch.get_float32_matmul_precision()``.
- ``MemoryViT.train()`` and ``.eval()`` empty the cache; a copy of the model (``copy.deepcopy``,
  pickling) starts with an empty cache of its own.

Not tracked: in-place writes through ``.data`` (``p.data.mul_(2)``), which bypass the version
counter, in-place writes by code that is neither autograd-tracked nor an optimizer step, and
attributes of the backbone's modules that are not tensors (a norm's ``eps``). Call
:meth:`~learnable_memory.MemoryViT.clear_kv_cache` after such an edit. A backbone whose parameters
are inference tensors (made under ``torch.inference_mode``, where no version is kept) is served
without the cache.

Entries are computed with autograd off and outside inference mode, so a value cached under
``torch.inference_mode`` can still be used by a later pass with autograd on. The model bypasses the
cache (every pass computes the keys and values itself) whenever autograd is on and anything they
depend on requires grad: a task's memory or any backbone parameter, so gradients are exact; and
under ``torch.compile`` / ``torch.export``, so the graph computes them and the cache never becomes a
guard.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .memory import TaskMemory
from .typing import KV

BlockKV = tuple[KV, ...]
#: ``(block index, memory [M, D]) -> that block's keys and values``: ``BlockKind.memory_kv`` of the block.
ComputeKV = Callable[[int, torch.Tensor], BlockKV]


def _layout(t: torch.Tensor) -> tuple:
    return (t.dtype, t.device, tuple(t.shape), t.stride(), t.storage_offset())


@dataclass(frozen=True, eq=False)
class TensorState:
    """What one tensor was when values were computed from it: its storage (a weak reference, compared by
    identity), its version counter and its layout. The tensor itself is not referenced: a weak
    reference on a tensor would make ``torch.utils.swap_tensors`` refuse it."""

    storage: weakref.ref
    version: int
    layout: tuple

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorState | None:
        """The state of ``t`` now; None for an inference tensor, which keeps no version counter."""
        if t.is_inference():
            return None
        return cls(weakref.ref(t.untyped_storage()), t._version, _layout(t))

    def holds(self, t: torch.Tensor) -> bool:
        """``t`` is on the same storage, in the same layout, unchanged since (as far as PyTorch tracks)."""
        return self.storage() is t.untyped_storage() and self.version == t._version and self.layout == _layout(t)


def pass_state(device: torch.device) -> tuple:
    """What of the pass's numerics the keys and values depend on: ``device``'s autocast state (on, and
    its dtype) and the float32 matmul precision."""
    kind = device.type
    autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) if kind in ("cpu", "cuda") else ()
    return autocast, torch.get_float32_matmul_precision()


@dataclass(eq=False)
class _Rows:
    """One task's rows ``[start, stop)`` in every block's keys and values."""

    task: weakref.ref
    start: int
    stop: int
    dtype: torch.dtype
    device: torch.device
    made_from: TensorState | None = None  # the memory they were computed from; None: to compute

    def laid_out_for(self, task: TaskMemory) -> bool:
        m = task.memory
        return self.task() is task and self.stop - self.start == task.n_mem and (self.dtype, self.device) == (
            m.dtype, m.device)

    def valid_for(self, task: TaskMemory) -> bool:
        return self.made_from is not None and self.made_from.holds(task.memory)


#: Every cache alive, for the optimizer hook.
_CACHES: weakref.WeakSet[MemoryKVCache] = weakref.WeakSet()


@dataclass(eq=False)
class MemoryKVCache:
    """Keys and values of every task's memory in every block, kept while nothing they depend on changes
    (see the module docstring for exactly what is tracked).

    Attributes:
        enabled: Use the cache (default). Off: every pass computes the keys and values itself.
        max_bytes: Keep no more than this many bytes; a model whose memory needs more is served
            without the cache (None: no limit).
    """

    enabled: bool = True
    max_bytes: int | None = None
    _pass: tuple | None = field(default=None, repr=False)
    _base: tuple[TensorState, ...] = field(default=(), repr=False)
    _rows: list[_Rows] = field(default_factory=list, repr=False)  # per task, in model order
    _blocks: list[BlockKV] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        _CACHES.add(self)

    def __reduce__(self) -> tuple:
        """A copy, deep copy or unpickled cache starts empty, with the same settings (and is seen by the
        optimizer hook)."""
        return type(self), (self.enabled, self.max_bytes)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(t.numel() * t.element_size() for block in self._blocks for kv in block for t in kv)

    def clear(self) -> None:
        """Drop every entry (they are recomputed on the next pass that needs them)."""
        self._pass, self._base, self._rows, self._blocks = None, (), [], []

    def forget(self, changed: Callable[[torch.UntypedStorage], bool]) -> None:
        """Drop what was computed from a tensor whose storage ``changed``: everything when it is one of
        the backbone's, else the rows of the task whose memory it is."""
        if any(st is not None and changed(st) for st in (s.storage() for s in self._base)):
            self.clear()
            return
        for r in self._rows:
            st = r.made_from.storage() if r.made_from is not None else None
            if st is not None and changed(st):
                r.made_from = None

    def lookup(self, tasks: Sequence[TaskMemory], wanted: Sequence[TaskMemory], base: nn.Module,
               compute: ComputeKV) -> list[BlockKV] | None:
        """Per block, the keys and values of the memory of ``wanted`` (their rows in that order).

        Args:
            tasks: Every task of the model, in model order (the rows kept).
            wanted: The tasks of the pass, a sub-sequence of ``tasks``.
            base: The backbone (its parameters and buffers are tracked).
            compute: One block's keys and values from memory ``[M, D]`` (``BlockKind.memory_kv``).

        Returns:
            None when the cache does not serve: disabled, over ``max_bytes``, or a tensor it can not track.
        """
        if not self.enabled or not tasks:
            return None
        device = tasks[0].memory.device
        if not self._check_base(base, pass_state(device)):
            return None
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable by any later pass
            if len(self._rows) != len(tasks) or not all(
                    r.laid_out_for(t) for r, t in zip(self._rows, tasks, strict=True)):
                self._lay_out(tasks, compute)
            if self.max_bytes is not None and self.nbytes > self.max_bytes:
                self.clear()
                return None
            rows = self._rows_of(tasks, wanted)
            for t, r in zip(wanted, rows, strict=True):
                if not r.valid_for(t):
                    if not self._refresh(t, r, compute):
                        return None
        if len(wanted) == len(tasks):
            return self._blocks
        index = torch.cat([torch.arange(r.start, r.stop, device=device) for r in rows])
        return [tuple((k.index_select(-2, index), v.index_select(-2, index)) for k, v in block)
                for block in self._blocks]

    def _check_base(self, base: nn.Module, state: tuple) -> bool:
        """Empty the cache unless the backbone's tensors and the pass's numerics are as they were when
        it was filled. False when a tensor can not be tracked (the cache then does not serve)."""
        tensors = [*base.parameters(), *base.buffers()]
        if (state == self._pass and len(tensors) == len(self._base)
                and all(s.holds(t) for s, t in zip(self._base, tensors, strict=True))):
            return True
        self.clear()
        states = tuple(TensorState.of(t) for t in tensors)
        if any(s is None for s in states):
            return False
        self._pass, self._base = state, states
        return True

    def _rows_of(self, tasks: Sequence[TaskMemory], wanted: Sequence[TaskMemory]) -> list[_Rows]:
        """The rows of ``wanted``, a sub-sequence of ``tasks`` (the tasks laid out)."""
        out, i = [], 0
        for t in wanted:
            while i < len(tasks) and tasks[i] is not t:
                i += 1
            if i == len(tasks):
                raise ValueError(f"task {t.name!r} of the pass is not among the model's tasks, in their order")
            out.append(self._rows[i])
            i += 1
        return out

    def _lay_out(self, tasks: Sequence[TaskMemory], compute: ComputeKV) -> None:
        """Rows for ``tasks`` in this order. A task kept from the last layout (the same object), its
        rows still valid, keeps its keys and values (copied over); the others are computed when a pass
        asks for them."""
        old_rows, old_blocks = self._rows, self._blocks
        self._rows, start = [], 0
        for t in tasks:
            self._rows.append(_Rows(weakref.ref(t), start, start + t.n_mem, t.memory.dtype, t.memory.device))
            start += t.n_mem
        probe = tasks[0].memory[:, :0]  # [depth, 0, D]: the shapes and dtypes of every block's keys/values
        self._blocks = [tuple((_with_rows(k, start), _with_rows(v, start)) for k, v in compute(i, probe[i]))
                        for i in range(probe.shape[0])]
        for t, new in zip(tasks, self._rows, strict=True):
            old = next((r for r in old_rows if r.task() is t), None)
            if old is None or not old.laid_out_for(t) or not old.valid_for(t):
                continue
            for block, old_block in zip(self._blocks, old_blocks, strict=True):
                for (k, v), (k_old, v_old) in zip(block, old_block, strict=True):
                    k[..., new.start:new.stop, :] = k_old[..., old.start:old.stop, :]
                    v[..., new.start:new.stop, :] = v_old[..., old.start:old.stop, :]
            new.made_from = old.made_from

    def _refresh(self, task: TaskMemory, rows: _Rows, compute: ComputeKV) -> bool:
        """Recompute ``task``'s rows in every block. False (and the cache emptied) when its memory can
        not be tracked."""
        state = TensorState.of(task.memory)
        if state is None:
            self.clear()
            return False
        for i, block in enumerate(self._blocks):
            for (k, v), (k_new, v_new) in zip(block, compute(i, task.memory[i]), strict=True):
                k[..., rows.start:rows.stop, :] = k_new
                v[..., rows.start:rows.stop, :] = v_new
        rows.made_from = state
        return True


def _with_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """An uninitialised tensor like ``t`` ``[.., 0, hd]`` with ``rows`` rows."""
    shape = list(t.shape)
    shape[-2] = rows
    return t.new_empty(shape)


def _stepped(params: Sequence[torch.Tensor]) -> Callable[[torch.UntypedStorage], bool]:
    """Whether a storage is that of one of ``params`` that a step may have changed (requires grad or has
    a gradient). The caller keeps ``params`` alive while it asks, and the storage asked about is alive,
    so equal ``id``s mean the same storage."""
    storages = [p.untyped_storage() for p in params if p.requires_grad or p.grad is not None]
    ids = {id(st) for st in storages}
    return lambda storage: storages is not None and id(storage) in ids  # the closure keeps them alive


@torch.compiler.disable  # runs eagerly in a compiled optimizer step: the set of caches is not a constant
def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    """Global post-step hook of every ``torch.optim.Optimizer``: every cache forgets what it computed
    from the parameters the step may have changed (a fused step does not bump their version)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    changed = _stepped(params)
    for cache in list(_CACHES):
        cache.forget(changed)


register_optimizer_step_post_hook(_after_optimizer_step)
