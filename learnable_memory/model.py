"""``MemoryViT``: a frozen timm ViT plus any number of memory tasks, served in one pass."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .adapters import prepare_tasks, save_adapter, save_pretrained
from .adapters.fingerprint import dependency_record
from .adapters.loading import Rename, check_trained_on, trainable_tasks
from .config import BASE_KEY, TaskConfig, UnknownTaskError
from .context import PassContext, PassExtras
from .kinds import AttentionKind, BlockKind, unpacked_reason
from .kv_cache import MemoryKVCache
from .mask import check_task_order, has_full_task
from .memory import TaskMemory, TaskStore
from .packing import pack, unpack
from .pass_groups import warn_mixed_preprocessing
from .registry import attention_kind, backbone_kind, block_kind
from .token_index import NewTokenIndex, new_token_index
from .typing import KV

logger = logging.getLogger(__name__)


def _unpacked_reason(kind: BlockKind, blk: nn.Module, attention_kinds: Mapping[nn.Module, AttentionKind]) -> str | None:
    """Why block ``blk`` can not serve a packed pass (see ``PassContext.packed``), or None when it can:
    :func:`learnable_memory.kinds.unpacked_reason` on its kind and attention kinds."""
    return unpacked_reason(kind, blk, [attention_kinds[a] for a in kind.attentions(blk)])


class MemoryViT(nn.Module):
    """A frozen timm ViT with learnable-memory tasks (Sandler et al., CVPR 2022).

    Attributes:
        base: The timm model, untouched but frozen (``requires_grad=False``, always in eval mode).
        tasks: ``name -> TaskMemory`` in the order the tasks were added (a :class:`TaskStore`).
        active_task: The task :meth:`forward` serves.
        kv_cache: The memory's keys and values kept across passes (:class:`MemoryKVCache`: turn it
            off with ``kv_cache.enabled = False``, cap it with ``kv_cache.max_bytes``).
    """

    def __init__(self, base: nn.Module, *, kv_cache: MemoryKVCache | None = None):
        super().__init__()
        self.backbone = backbone_kind(base)
        self.backbone.check_model(base)
        blocks = self.backbone.blocks(base)
        self._block_kinds = [block_kind(b) for b in blocks]
        #: Every attention module's kind, resolved once here (``PassContext.attention_kinds``).
        self._attention_kinds = {a: attention_kind(a) for k, b in zip(self._block_kinds, blocks, strict=True)
                                for a in k.attentions(b)}
        reasons = [(i, r) for i, (k, b) in enumerate(zip(self._block_kinds, blocks, strict=True))
                   if (r := _unpacked_reason(k, b, self._attention_kinds)) is not None]
        self._packable = not reasons
        #: Why inference passes run split (None when they pack): the first block that can not pack.
        self.unpacked_reason = None if not reasons else (
            f"block {reasons[0][0]} ({type(blocks[reasons[0][0]]).__name__}): {reasons[0][1]}")
        if reasons:
            logger.debug("%s: inference passes run unpacked: %s", type(base).__name__, self.unpacked_reason)
        self._width = self.backbone.width(base)
        base.requires_grad_(False)
        base.eval()
        self.base = base
        self.tasks = TaskStore()
        self.active_task: str | None = None
        self._indices: dict[tuple[tuple[str, ...], torch.device], NewTokenIndex] = {}
        self.kv_cache = kv_cache if kv_cache is not None else MemoryKVCache()

    # ----- structure -----
    @property
    def embed_dim(self) -> int:
        """D, the backbone's width (its kind's :meth:`~learnable_memory.kinds.BackboneKind.width`)."""
        return self._width

    @property
    def depth(self) -> int:
        return len(self._block_kinds)

    @property
    def num_prefix_tokens(self) -> int:
        return self.backbone.num_prefix_tokens(self.base)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks.keys())

    @property
    def task_configs(self) -> list[TaskConfig]:
        return [t.config for t in self.tasks.values()]

    def add_task(self, task: TaskConfig | TaskMemory) -> TaskMemory:
        """Add a task in place, freeze the earlier ones and make it the active task.

        Args:
            task: A ``TaskConfig`` (fresh parameters: memory ~ N(0, init_std), class token
                copied from the backbone, new head) or an existing ``TaskMemory`` made for the
                same backbone, which is shared, not copied (this is how tasks trained
                separately are concatenated).

        An extension task with no ``depends_on`` extends every task already present (set on the new
        task's own copy of the config; the caller's ``TaskConfig`` is left as it is), and records their
        fingerprints (``TaskMemory.trained_on``). An extension ``TaskMemory`` is refused on top of
        predecessors with other weights than the ones it recorded (``AdapterError``, as ``load_adapters``
        does); one that records none (built by hand) can not be checked, and is added with a warning.
        Raises ``ValueError`` for a reserved or duplicate name, a full-mode conflict or a dependency out
        of order (``mask.check_task_order``) or a ``TaskMemory`` of the wrong shape, before anything changes.
        """
        config = task.config if isinstance(task, TaskMemory) else dataclasses.replace(task)
        config.validate()
        if config.mode == "extension" and not config.depends_on and not isinstance(task, TaskMemory):
            config.depends_on = self.task_names
        check_task_order(self.task_configs + [config])
        if isinstance(task, TaskMemory):
            expected = (self.depth, config.n_mem, self.embed_dim)
            if tuple(task.memory.shape) != expected:
                raise ValueError(
                    f"task {config.name!r} has memory of shape {tuple(task.memory.shape)} but this backbone "
                    f"needs {expected} [depth, n_mem, embed_dim]: it was made for another backbone"
                )
            check_trained_on(task, self.tasks)
        else:
            init = self.backbone.class_token_init(self.base)
            task = TaskMemory(config, self.depth, self.embed_dim, init).to(init.device, init.dtype)
            if config.depends_on:
                task.trained_on = [dependency_record(d, self.tasks[d].named_tensors()) for d in config.depends_on]
        for t in self.tasks.values():
            t.requires_grad_(False)
        self.tasks.add(task)
        self.active_task = config.name
        self._indices.clear()
        return task

    def remove_task(self, name: str) -> TaskMemory:
        """Remove task ``name`` in place and return it. Refused (``ValueError``) while another task
        extends it. The active task becomes the last task left (None when none is left)."""
        if name not in self.tasks:
            raise ValueError(f"unknown task {name!r}; this model has {self.task_names}")
        users = [t.name for t in self.tasks.values() if name in t.config.depends_on]
        if users:
            raise ValueError(f"task {name!r} can not be removed: extension task(s) {users} attend to it; "
                             f"remove {users} first")
        task = self.tasks.remove(name)
        if self.active_task == name:
            self.active_task = self.task_names[-1] if len(self.tasks) else None
        self._indices.clear()
        return task

    def set_task(self, name: str) -> MemoryViT:
        """Choose the task :meth:`forward` serves."""
        if name not in self.tasks:
            raise ValueError(f"unknown task {name!r}; this model has {self.task_names}")
        self.active_task = name
        return self

    def train(self, mode: bool = True) -> MemoryViT:
        """Set the tasks' training mode; the frozen backbone always stays in eval mode. Empties the
        memory key/value cache."""
        super().train(mode)
        self.base.eval()
        self.kv_cache.clear()  # a safety net: training may change weights in ways the cache can not see
        return self

    def data_config(self) -> dict:
        """The base model's preprocessing for its current input size and channels (input size,
        mean, std, interpolation, crop), from ``timm.data.resolve_input_data_config``."""
        from timm.data import resolve_input_data_config

        return resolve_input_data_config(self.base)

    # ----- forward -----
    def _closure(self, names: Sequence[str]) -> tuple[str, ...]:
        """``names`` plus the tasks they extend, in model order."""
        need = set(names)
        for name in reversed(self.task_names):
            if name in need:
                need.update(self.tasks[name].config.depends_on)
        return tuple(n for n in self.task_names if n in need)

    def _new_token_index(self, names: tuple[str, ...], device: torch.device) -> NewTokenIndex:
        """What the new class tokens of ``names`` see (Table 1 in gather form), on ``device``; kept per
        task set (built afresh under ``torch.compile``, where it becomes a constant of the graph)."""
        if torch.compiler.is_compiling():
            return new_token_index([self.tasks[n].config for n in names]).to(device)
        index = self._indices.get((names, device))
        if index is None:
            with torch.inference_mode(False):  # plain tensors: a later pass may need them for backward
                index = new_token_index([self.tasks[n].config for n in names]).to(device)
            self._indices[names, device] = index
        return index

    def _original_grad(self, images: torch.Tensor, full: bool) -> bool:
        """Whether this pass keeps an autograd graph for the original tokens (``PassContext.orig_grad``):
        autograd is on and something trainable touches them (a full-mode task's memory, the images or
        a backbone parameter)."""
        return torch.is_grad_enabled() and (
            full
            or any(t.requires_grad for t in tree_leaves(images) if isinstance(t, torch.Tensor))
            or any(p.requires_grad for p in self.base.parameters())
        )

    def _new_class_tokens(self, tasks: list[TaskMemory], x: torch.Tensor) -> torch.Tensor:
        """The class tokens of ``tasks`` as they enter the first block, ``[B, K, D]`` (B from ``x``)."""
        tokens = torch.stack([t.class_token for t in tasks]) if tasks else x.new_zeros(0, x.shape[-1])  # [K, D]
        return self.backbone.embed_new(self.base, tokens).unsqueeze(0).expand(x.shape[0], -1, -1)

    def _memory_kv(self, tasks: list[TaskMemory], like: torch.Tensor) -> Callable[[int], tuple[KV, ...]]:
        """Block index -> that block's keys and values of the memory of ``tasks`` (``[H, M, hd]`` per attention).

        From the cache when it serves. Computed in the pass instead, one block at a time, when autograd
        is on and anything they depend on requires grad (a task's memory or any backbone parameter:
        cached values carry no graph), under ``torch.compile`` / ``torch.export``, or when the cache is
        off, full or can not track a tensor (see :mod:`learnable_memory.kv_cache`). ``like``: the
        original tokens ``[B, N, D]``, for the device and dtype of an empty memory."""
        blocks = self.backbone.blocks(self.base)

        def compute(i: int, mem: torch.Tensor) -> tuple[KV, ...]:
            return self._block_kinds[i].memory_kv(blocks[i], mem, self._attention_kinds)

        needs_grad = torch.is_grad_enabled() and (
            any(t.memory.requires_grad for t in tasks) or any(p.requires_grad for p in self.base.parameters()))
        if tasks and not needs_grad and not torch.compiler.is_compiling():
            cached = self.kv_cache.lookup(self.tasks.values(), tasks, self.base, compute)
            if cached is not None:
                return cached.__getitem__
        memory = (torch.cat([t.memory for t in tasks], dim=1) if tasks
                  else like.new_zeros(self.depth, 0, like.shape[-1]))  # [depth, M, D]
        return lambda i: compute(i, memory[i])

    def clear_kv_cache(self) -> None:
        """Drop the cached memory keys and values. Needed only after a weight edit the cache can not
        see, such as an in-place write through ``.data`` (see :mod:`learnable_memory.kv_cache`)."""
        self.kv_cache.clear()

    def forward_tokens(self, images: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the blocks once for the original tokens and the class tokens of ``names``.

        Args:
            images: ``[B, C, H, W]`` (or what else the backbone takes, e.g. a NaFlex patch dict).
            names: Tasks to compute, closed under ``depends_on``, in model order.

        Returns:
            Original tokens ``[B, N, D]`` and new class tokens ``[B, K, D]`` after the last block.
        """
        x, c, _ = self._run_blocks(images, names)
        return x, c

    def _run_blocks(
        self, images: torch.Tensor, names: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, PassExtras]:
        """:meth:`forward_tokens`, plus the backbone's per-pass extras (which ``base_logits`` may need).

        Steps: check the input; the gradient policy (:meth:`_original_grad`); the original tokens and
        the new class tokens as they enter the blocks; the memory's keys and values (:meth:`_memory_kv`);
        pack (:func:`_pack`); the blocks; unpack."""
        self.backbone.check_input(self.base, images)
        names = tuple(names)
        tasks = [self.tasks[n] for n in names]
        full = has_full_task(tasks)
        orig_grad = self._original_grad(images, full)
        with torch.set_grad_enabled(orig_grad):
            x, extras = self.backbone.embed(self.base, images)  # [B, N, D]
        index = self._new_token_index(names, x.device)
        c = self._new_class_tokens(tasks, x)  # [B, K, D]
        memory_kv = self._memory_kv(tasks, x)
        # Inference packs the new class tokens behind the original tokens (see PassContext.packed) where every
        # block's kinds allow it. Training keeps them apart: non-destructive training must keep no graph
        # through the backbone, and full-mode steps measured slower packed.
        packed = len(tasks) if tasks and self._packable and not torch.is_grad_enabled() else 0
        n = x.shape[1]
        if packed:
            x, c, extras = pack(x, c, extras)
        ctx = PassContext(index=index, full=full, orig_grad=orig_grad, packed=packed, extras=extras,
                          attention_kinds=self._attention_kinds)
        for i, (kind, blk) in enumerate(zip(self._block_kinds, self.backbone.blocks(self.base), strict=True)):
            x, c = kind.forward(blk, x, c, memory_kv(i), ctx)
        if packed:
            x, c = unpack(x, n)
        return x, c, extras

    def resolve_outputs(self, tasks: str | Iterable[str] | None = None) -> tuple[list[str], tuple[str, ...]]:
        """Which outputs a pass returns and which tasks it computes: the one rule of :meth:`forward_all`,
        :func:`~learnable_memory.export_model` and the server.

        Args:
            tasks: The outputs wanted, task names and/or ``"base"`` (one name may be given as a string);
                repeats are dropped, the first kept. ``None``: ``"base"`` and every task, in model order,
                ``"base"`` left out while a full-mode task is loaded (its memory changes the original
                tokens, so there is no base output). An empty list is an error, not "no outputs": a pass
                that returns nothing is a caller's mistake (ask for None to get everything).

        Returns:
            The outputs in the order asked for, and their closure: the tasks to compute, those wanted
            plus the tasks they extend, in model order.

        Raises:
            ValueError: ``tasks`` is empty or holds something other than a name (a list, a number ...).
            UnknownTaskError: (a ``ValueError``) a name the model has no output for: an unknown task, or
                ``"base"`` while a full-mode task is loaded.
        """
        full = has_full_task(self.tasks.values())
        if tasks is None:
            wanted = ([] if full else [BASE_KEY]) + self.task_names
            return wanted, tuple(self.task_names)
        if not isinstance(tasks, str | Iterable):
            raise ValueError(f"tasks must be a list of output names (task names and/or {BASE_KEY!r}) or None, got "
                             f"{tasks!r} ({type(tasks).__name__})")
        entries = [tasks] if isinstance(tasks, str) else list(tasks)
        odd = [e for e in entries if not isinstance(e, str)]
        if odd:
            raise ValueError(f"tasks must list output names (strings: task names and/or {BASE_KEY!r}), got "
                             f"{odd[0]!r} ({type(odd[0]).__name__}) among {entries!r}")
        wanted = list(dict.fromkeys(entries))
        if not wanted:
            raise ValueError(f"tasks is empty: name the outputs wanted (task names and/or {BASE_KEY!r}), or pass "
                             "tasks=None for all of them")
        unknown = [n for n in wanted if n != BASE_KEY and n not in self.tasks]
        if unknown:
            raise UnknownTaskError(f"unknown task(s) {unknown}; this model has {self.task_names}"
                                   + ("" if full else f" and {BASE_KEY!r}"), unknown)
        if full and BASE_KEY in wanted:
            raise UnknownTaskError(f"full-mode task {self.task_names[0]!r} changes the original tokens, so this model "
                                   f"has no {BASE_KEY!r} output; get the base model's output from a MemoryViT "
                                   "without that task", [BASE_KEY])
        return wanted, self._closure([n for n in wanted if n != BASE_KEY])

    def forward_features(self, images: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Pre-head features of ``tasks`` (default: all), ``name -> [B, D]``, in one pass (``tasks`` as
        :meth:`resolve_outputs` takes them, ``"base"`` excepted: it has no feature of its own)."""
        if tasks is None:
            wanted, names = self.task_names, tuple(self.task_names)
        else:
            wanted, names = self.resolve_outputs(tasks)
        if BASE_KEY in wanted:
            raise ValueError(f"forward_features gives the tasks' features; {BASE_KEY!r} has none: leave it out "
                             "(forward_all gives the base model's output)")
        _, c = self.forward_tokens(images, names)
        feats = self.backbone.task_features(self.base, c)  # [B, K, D]
        return {n: feats[:, names.index(n)] for n in wanted}

    def forward_all(self, images: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Outputs of ONE pass: ``"base"`` (the base model's own, unchanged output) and each task's
        logits ``[B, num_classes]``.

        Args:
            images: ``[B, C, H, W]`` (or what else the backbone takes).
            tasks: The outputs wanted, task names and/or ``"base"``, in the order of the returned dict.
                Only these tasks, and the tasks they extend, are computed. Default: ``"base"`` and every
                task, in model order; ``"base"`` is left out when a full-mode task is present, since
                its memory changes the original tokens. See :meth:`resolve_outputs` for the rule and
                its errors (an empty list, an unknown name, ``"base"`` with a full-mode task).

        A server whose requests ask for different tasks runs the union of what they ask for in one
        pass and hands each request its own entries.
        """
        wanted, names = self.resolve_outputs(tasks)
        x, c, extras = self._run_blocks(images, names)
        feats = self.backbone.task_features(self.base, c) if names else None
        out: dict[str, torch.Tensor] = {}
        for n in wanted:
            if n == BASE_KEY:
                out[n] = self.backbone.base_logits(self.base, x, extras)
            else:
                out[n] = self.tasks[n].head(feats[:, names.index(n)])
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of the active task; other tasks are not computed."""
        if self.active_task is None:
            raise RuntimeError("this MemoryViT has no task; add one with add_task() or wrap_model()")
        names = self._closure([self.active_task])
        _, c = self.forward_tokens(images, names)
        feat = self.backbone.task_features(self.base, c[:, names.index(self.active_task)])
        return self.tasks[self.active_task].head(feat)

    # ----- adapters on disk -----
    def save_adapter(self, path: str | Path, task: str | None = None) -> Path:
        """Write one task (default: the active one) as an adapter folder; see :mod:`learnable_memory.adapters`."""
        return save_adapter(self, path, task=task)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write every task, one adapter folder each, under ``path``; see :mod:`learnable_memory.adapters`."""
        return save_pretrained(self, path)

    @classmethod
    def from_pretrained(
        cls, base: nn.Module, path: str | Path | Sequence[str | Path], **kwargs
    ) -> MemoryViT:
        """A ``MemoryViT`` on the timm model ``base`` (frozen in place) with the tasks saved at ``path``:
        adapter folders, ``save_pretrained`` folders or ``hf-hub:`` specs. Keyword arguments as
        :func:`load_adapters`, which this is."""
        if isinstance(base, MemoryViT):
            raise TypeError("from_pretrained takes the timm backbone; to add tasks to a MemoryViT use load_adapters")
        return load_adapters(base, path, **kwargs)


def load_adapters(
    model: nn.Module,
    paths: str | Path | Sequence[str | Path],
    *,
    trainable: bool | Sequence[str] = False,
    rename: Rename = None,
    check_fingerprint: bool = True,
    cache_dir: str | Path | None = None,
) -> MemoryViT:
    """Load adapter folders, in order, onto a backbone; one ``forward_all`` then serves them all.

    Everything is read and checked before the model is touched, so a refused load changes nothing.
    Checks, each an :class:`~learnable_memory.AdapterError` naming the file: the backbone (same width,
    depth and prefix tokens, and unless ``check_fingerprint=False`` the same weights); names (no two
    tasks with one name; ``rename`` resolves clashes); modes (a full-mode task stands alone); extension
    tasks (the tasks they were trained on are present before them, in order, with the same weights).

    Args:
        model: A timm ViT (frozen in place, as by ``wrap_model``) or a ``MemoryViT``, in which case
            a new ``MemoryViT`` sharing its backbone and tasks is returned (as ``wrap_model`` does).
        paths: Adapter folders (from ``save_adapter``), ``save_pretrained`` folders (all their
            tasks, in order) or ``"hf-hub:owner/repo[/subfolder][@revision]"``.
        trainable: Which loaded tasks stay trainable, to resume training them (the others are frozen):
            ``True`` for every task loaded here that no other loaded task extends, or the names (after
            ``rename``) of exactly those to train. A task that another task extends can not train: its
            extension would no longer match it. Default: all frozen.
        rename: ``{saved_name: new_name}``, or a list with one new name (or None) per adapter.
        check_fingerprint: Refuse adapters whose backbone, or whose extended tasks, have other
            weights than the ones here. Set False only when you know the weights are equivalent.
        cache_dir: Hugging Face cache for ``hf-hub:`` paths (default: huggingface_hub's).

    Returns:
        A ``MemoryViT`` whose active task is the last one loaded.
    """
    base = model.base if isinstance(model, MemoryViT) else model
    existing = dict(model.tasks.items()) if isinstance(model, MemoryViT) else {}
    tasks = prepare_tasks(base, existing, paths, rename=rename, check_fingerprint=check_fingerprint,
                          cache_dir=cache_dir)
    train = trainable_tasks(trainable, tasks, existing.values())
    out = MemoryViT(base)
    for t in [*existing.values(), *tasks]:
        out.add_task(t)
    for t in tasks:
        t.requires_grad_(t.name in train)
    warn_mixed_preprocessing(out, stacklevel=3)
    return out
