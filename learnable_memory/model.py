"""``MemoryViT``: a frozen timm ViT plus any number of memory tasks, served in one pass."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .adapters import prepare_tasks, save_adapter, save_pretrained, warn_preprocessing
from .config import BASE_KEY, TaskConfig
from .context import PassContext, PassExtras
from .kinds import AttentionKind, BlockKind, unpacked_reason
from .kv_cache import MemoryKVCache
from .layout import NewTokenLayout, new_token_layout
from .mask import check_layout
from .memory import TaskMemory, TaskStore
from .registry import attention_kind, backbone_kind, block_kind

Rename = Mapping[str, str] | Sequence[str | None] | None
KV = tuple[torch.Tensor, torch.Tensor]
logger = logging.getLogger(__name__)


def _packable(kind: BlockKind, blk: nn.Module, attention_kinds: Mapping[nn.Module, AttentionKind]) -> str | None:
    """Why block ``blk`` can not serve a packed pass (see ``PassContext.packed``), or None when it can:
    :func:`learnable_memory.kinds.unpacked_reason` on its kind and attention kinds."""
    return unpacked_reason(kind, blk, [attention_kinds[a] for a in kind.attentions(blk)])


def _cat_with_layout(like: torch.Tensor, parts: Sequence[torch.Tensor]) -> torch.Tensor:
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
                   if (r := _packable(k, b, self._attention_kinds)) is not None]
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
        self._layouts: dict[tuple[tuple[str, ...], torch.device], NewTokenLayout] = {}
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
        task's own copy of the config; the caller's ``TaskConfig`` is left as it is). Raises
        ``ValueError`` for a reserved or duplicate name, a full-mode conflict or a ``TaskMemory`` of
        the wrong shape, before anything changes.
        """
        config = task.config if isinstance(task, TaskMemory) else dataclasses.replace(task)
        config.validate()
        if config.name == BASE_KEY:
            raise ValueError(f"task name {BASE_KEY!r} is reserved for the base model's output; pick another")
        if config.name in self.tasks:
            raise ValueError(
                f"a task named {config.name!r} already exists (tasks: {self.task_names}); pick another name"
            )
        if config.mode == "extension" and not config.depends_on and not isinstance(task, TaskMemory):
            config.depends_on = self.task_names
        check_layout(self.task_configs + [config])
        if isinstance(task, TaskMemory):
            expected = (self.depth, config.n_mem, self.embed_dim)
            if tuple(task.memory.shape) != expected:
                raise ValueError(
                    f"task {config.name!r} has memory of shape {tuple(task.memory.shape)} but this backbone "
                    f"needs {expected} [depth, n_mem, embed_dim]: it was made for another backbone"
                )
        else:
            init = self.backbone.class_token_init(self.base)
            task = TaskMemory(config, self.depth, self.embed_dim, init).to(init.device, init.dtype)
        for t in self.tasks.values():
            t.requires_grad_(False)
        self.tasks.add(task)
        self.active_task = config.name
        self._layouts.clear()
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
        self._layouts.clear()
        return task

    def set_task(self, name: str) -> MemoryViT:
        """Choose the task :meth:`forward` serves."""
        if name not in self.tasks:
            raise ValueError(f"unknown task {name!r}; this model has {self.task_names}")
        self.active_task = name
        return self

    def train(self, mode: bool = True) -> MemoryViT:
        """Set the tasks' training mode; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.base.eval()
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

    def _layout(self, names: tuple[str, ...], device: torch.device) -> NewTokenLayout:
        """What the new class tokens of ``names`` see (Table 1 in gather form), on ``device``; kept per
        task set (built afresh under ``torch.compile``, where it becomes a constant of the graph)."""
        if torch.compiler.is_compiling():
            return new_token_layout([self.tasks[n].config for n in names]).to(device)
        layout = self._layouts.get((names, device))
        if layout is None:
            with torch.inference_mode(False):  # plain tensors: a later pass may need them for backward
                layout = new_token_layout([self.tasks[n].config for n in names]).to(device)
            self._layouts[names, device] = layout
        return layout

    def _memory_kv(self, tasks: list[TaskMemory]) -> list[tuple[KV, ...]] | None:
        """Per block, the keys and values of the memory of ``tasks`` from the cache, or None when this
        pass computes them itself: it trains a task's memory, runs under ``torch.compile``, or the cache
        is off or full."""
        if not tasks or torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled() and any(t.memory.requires_grad for t in tasks):
            return None
        blocks = self.backbone.blocks(self.base)

        def compute(i: int, mem: torch.Tensor) -> tuple[KV, ...]:
            return self._block_kinds[i].memory_kv(blocks[i], mem)

        return self.kv_cache.lookup(list(self.tasks.values()), tasks, self.base, compute)

    def clear_kv_cache(self) -> None:
        """Drop the cached memory keys and values. Needed only after editing weights through ``.data``,
        which PyTorch does not track (see :mod:`learnable_memory.kv_cache`)."""
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
        """:meth:`forward_tokens`, plus the backbone's per-pass extras (which ``base_logits`` may need)."""
        self.backbone.check_input(self.base, images)
        names = tuple(names)
        tasks = [self.tasks[n] for n in names]
        full = any(t.mode == "full" for t in tasks)
        orig_grad = torch.is_grad_enabled() and (
            full
            or any(t.requires_grad for t in tree_leaves(images) if isinstance(t, torch.Tensor))
            or any(p.requires_grad for p in self.base.parameters())
        )
        with torch.set_grad_enabled(orig_grad):
            x, extras = self.backbone.embed(self.base, images)  # [B, N, D]
        layout = self._layout(names, x.device)
        tokens = torch.stack([t.class_token for t in tasks]) if tasks else x.new_zeros(0, x.shape[-1])  # [K, D]
        cached = self._memory_kv(tasks)
        if cached is None:  # this pass computes the memory's keys and values itself
            memory = (torch.cat([t.memory for t in tasks], dim=1) if tasks
                      else x.new_zeros(self.depth, 0, x.shape[-1]))  # [depth, M, D]
        c = self.backbone.embed_new(self.base, tokens).unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, K, D]
        # Inference packs the new class tokens behind the original tokens (see PassContext.packed) where every
        # block's kinds allow it. Training keeps them apart: non-destructive training must keep no graph
        # through the backbone, and full-mode steps measured slower packed.
        n = x.shape[1]
        pack = bool(tasks) and self._packable and not torch.is_grad_enabled()
        if pack:  # [B, N + K, D], [B, 0, D]
            x, c = _cat_with_layout(x, [x, c]), c[:, :0]
            extras = extras.for_packed(len(tasks))
        ctx = PassContext(layout=layout, full=full, orig_grad=orig_grad, packed=len(tasks) if pack else 0,
                          extras=extras)
        for i, (kind, blk) in enumerate(zip(self._block_kinds, self.backbone.blocks(self.base), strict=True)):
            kv = cached[i] if cached is not None else kind.memory_kv(blk, memory[i])
            x, c = kind.forward(blk, x, c, kv, ctx)
        if pack:
            x, c = _cat_with_layout(x, [x[:, :n]]), x[:, n:]
        return x, c, extras

    def forward_features(self, images: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Pre-head features of ``tasks`` (default: all), ``name -> [B, D]``, in one pass."""
        wanted = self.task_names if tasks is None else list(tasks)
        for n in wanted:
            if n not in self.tasks:
                raise ValueError(f"unknown task {n!r}; this model has {self.task_names}")
        names = self._closure(wanted)
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
                its memory changes the original tokens (asking for it then is a ``ValueError``).

        A server whose requests ask for different tasks runs the union of what they ask for in one
        pass and hands each request its own entries.
        """
        full = any(t.mode == "full" for t in self.tasks.values())
        if tasks is None:
            wanted = ([] if full else [BASE_KEY]) + self.task_names
        else:
            wanted = list(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
            unknown = [n for n in wanted if n != BASE_KEY and n not in self.tasks]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; this model has {self.task_names} and {BASE_KEY!r}")
            if full and BASE_KEY in wanted:
                raise ValueError(f"no {BASE_KEY!r} output while a full-mode task is loaded: its memory changes the "
                                 "original tokens; serve the base model from a MemoryViT without that task")
        names = self._closure([n for n in wanted if n != BASE_KEY])
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


def wrap_model(
    model: nn.Module,
    n_mem: int = 10,
    num_classes: int | None = None,
    *,
    task: str = "default",
    mode: str = "non_destructive",
    init_std: float = 0.02,
    class_names: Sequence[str] | None = None,
) -> MemoryViT:
    """Add a learnable-memory task to a frozen timm ViT.

    Args:
        model: A timm ViT (frozen in place and put in eval mode), or a ``MemoryViT``, in which
            case a new ``MemoryViT`` is returned that shares its backbone and (now frozen) tasks.
        n_mem: Memory tokens per block (0 gives "head + class token").
        num_classes: Classes of the new task's head (default: ``len(class_names)``).
        task: Name of the new task, the key of ``forward_all``.
        mode: ``"non_destructive"``, ``"extension"`` or ``"full"`` (see ``config.MODES``).
        init_std: Std of the memory's normal init.
        class_names: Optional label names saved with the adapter.

    Returns:
        A ``MemoryViT`` whose :meth:`~MemoryViT.forward` serves the new task. Only the new
        task's memory ``[depth, n_mem, D]``, class token ``[D]`` and head train.
    """
    if num_classes is None:
        if class_names is None:
            raise ValueError("give num_classes (or class_names) for the new task's head")
        num_classes = len(class_names)
    config = TaskConfig(
        name=task, n_mem=n_mem, num_classes=num_classes, mode=mode, init_std=init_std,
        class_names=list(class_names) if class_names is not None else None,
    )
    if isinstance(model, MemoryViT):
        wrapped = MemoryViT(model.base)
        for t in model.tasks.values():
            wrapped.add_task(t)
    else:
        wrapped = MemoryViT(model)
    wrapped.add_task(config)
    return wrapped


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
    extended = {d for t in [*existing.values(), *tasks] for d in t.config.depends_on}
    if trainable is True:
        train = {t.name for t in tasks if t.name not in extended}
    elif trainable is False:
        train = set()
    else:
        train = {trainable} if isinstance(trainable, str) else set(trainable)
        loaded = [t.name for t in tasks]
        if not train <= set(loaded):
            raise ValueError(f"trainable names {sorted(train - set(loaded))}, which are not among the tasks loaded "
                             f"here ({loaded})")
        if train & extended:
            raise ValueError(f"task(s) {sorted(train & extended)} can not be trained: other loaded tasks extend "
                             "them and would no longer match; train the extension task instead")
    out = MemoryViT(base)
    for t in [*existing.values(), *tasks]:
        out.add_task(t)
    for t in tasks:
        t.requires_grad_(t.name in train)
    warn_preprocessing(list(out.tasks.values()), base, stacklevel=3)
    return out
