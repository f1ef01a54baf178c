"""``MemoryViT``: a frozen timm ViT plus any number of memory tasks, served in one pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .adapters import prepare_tasks, save_adapter, save_pretrained, warn_preprocessing
from .config import BASE_KEY, TaskConfig
from .context import PassContext, PassExtras
from .kinds import BlockKind
from .mask import check_layout, new_token_mask
from .memory import TaskMemory
from .registry import attention_kind, backbone_kind, block_kind

Rename = Mapping[str, str] | Sequence[str | None] | None


def _packable(kind: BlockKind, blk: nn.Module) -> bool:
    """Whether block ``blk`` can serve a packed pass (see ``PassContext.packed`` and ``kinds``)."""
    return kind.packable and all(attention_kind(a).packable for a in kind.attentions(blk))


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
        tasks: ``name -> TaskMemory`` in the order the tasks were added.
        active_task: The task :meth:`forward` serves.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.backbone = backbone_kind(base)
        blocks = self.backbone.blocks(base)
        self._block_kinds = [block_kind(b) for b in blocks]
        self._packable = all(_packable(k, b) for k, b in zip(self._block_kinds, blocks, strict=True))
        base.requires_grad_(False)
        base.eval()
        self.base = base
        self.tasks = nn.ModuleDict()
        self.active_task: str | None = None
        self._masks: dict[tuple[str, ...], torch.Tensor] = {}

    # ----- structure -----
    @property
    def embed_dim(self) -> int:
        return self.base.embed_dim

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

        An extension task with no ``depends_on`` extends every task already present.
        Raises ``ValueError`` for a reserved or duplicate name, a full-mode conflict or a
        ``TaskMemory`` of the wrong shape.
        """
        config = task.config if isinstance(task, TaskMemory) else task
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
        self.tasks[config.name] = task
        self.active_task = config.name
        self._masks.clear()
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

    def _mask(self, names: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """The Table 1 rows of the new class tokens of ``names``, ``[K, K + M]``, on ``device``."""
        mask = self._masks.get(names)
        if mask is None or mask.device != device:
            mask = self._masks[names] = new_token_mask([self.tasks[n].config for n in names]).to(device)
        return mask

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
        new_mask = self._mask(names, x.device)
        if tasks:
            tokens = torch.stack([t.class_token for t in tasks])  # [K, D]
            memory = torch.cat([t.memory for t in tasks], dim=1)  # [depth, M, D]
        else:  # the base model alone
            tokens, memory = x.new_zeros(0, x.shape[-1]), x.new_zeros(self.depth, 0, x.shape[-1])
        c = self.backbone.embed_new(self.base, tokens).unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, K, D]
        # Inference packs the new class tokens behind the original tokens (see PassContext.packed), unless
        # per-token extras (rotary, score bias) need them apart. Training keeps them apart: non-destructive
        # training must keep no graph through the backbone, and full-mode steps measured slower packed.
        n = x.shape[1]
        pack = bool(tasks) and self._packable and not torch.is_grad_enabled() and not extras.per_token
        if pack:  # [B, N + K, D], [B, 0, D]
            x, c = _cat_with_layout(x, [x, c]), c[:, :0]
        ctx = PassContext(new_mask=new_mask, full=full, orig_grad=orig_grad, packed=len(tasks) if pack else 0,
                          extras=extras)
        for kind, blk, mem in zip(self._block_kinds, self.backbone.blocks(self.base), memory, strict=True):
            x, c = kind.forward(blk, x, c, mem, ctx)
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

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output from ONE pass: ``"base"`` (the base model's own, unchanged output) and
        each task's logits ``[B, num_classes]``. ``"base"`` is left out when a full-mode task is
        present, since its memory changes the original tokens."""
        names = tuple(self.task_names)
        x, c, extras = self._run_blocks(images, names)
        out: dict[str, torch.Tensor] = {}
        if not any(t.mode == "full" for t in self.tasks.values()):
            out[BASE_KEY] = self.backbone.base_logits(self.base, x, extras)
        feats = self.backbone.task_features(self.base, c)
        for i, (name, task) in enumerate(self.tasks.items()):
            out[name] = task.head(feats[:, i])
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
    trainable: bool = False,
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
        trainable: Leave the loaded tasks trainable (to resume training); default frozen.
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
    out = MemoryViT(base)
    for t in [*existing.values(), *tasks]:
        out.add_task(t)
    for t in tasks:
        t.requires_grad_(trainable)
    warn_preprocessing(list(out.tasks.values()), base, stacklevel=3)
    return out
