"""A new task on a frozen timm ViT: :func:`wrap_model`, the paper's entry point. (Saved adapters load with
:func:`learnable_memory.model.load_adapters`.) It leaves the timm model as it was, apart from freezing it,
and returns a new ``MemoryViT`` when given one (sharing its backbone and tasks)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .config import TaskConfig
from .model import MemoryViT


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
