"""The trainable part of tasks: per-block memory, a class token and a head (:class:`TaskMemory`),
and the tasks of a model by name (:class:`TaskStore`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import TaskConfig

#: The tensors of a task, by the names adapter files and ``TaskMemory.named_tensors`` give them.
TENSOR_NAMES = ("memory", "class_token", "head.weight", "head.bias")


class TaskMemory(nn.Module):
    """Parameters of one task.

    Attributes:
        config: The task's :class:`TaskConfig`.
        memory: ``[depth, n_mem, embed_dim]``, the memory tokens E_mem^l of every block l.
        class_token: ``[embed_dim]``, the task's class token as it enters the blocks
            (position embedding included).
        head: ``nn.Linear(embed_dim, num_classes)`` on the task's feature.
        trained_on: For an extension task, what it recorded of each task it extends (in
            ``config.depends_on`` order; ``{"name", "fingerprint", "dtype", "fingerprints_by_dtype"}``,
            see ``adapters.fingerprint.dependency_record``), so that ``add_task`` refuses it on top of
            other weights; set by ``add_task`` and ``load_adapters``. None where unknown (a TaskMemory
            built by hand): such a task can not be checked.
    """

    def __init__(self, config: TaskConfig, depth: int, embed_dim: int, class_token_init: torch.Tensor):
        super().__init__()
        self.config = config
        self.memory = nn.Parameter(torch.empty(depth, config.n_mem, embed_dim))
        nn.init.normal_(self.memory, std=config.init_std)
        self.class_token = nn.Parameter(class_token_init.detach().clone().reshape(embed_dim))
        self.head = nn.Linear(embed_dim, config.num_classes)  # PyTorch's default init, as timm's reset_classifier
        self.trained_on: list[dict[str, Any]] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def n_mem(self) -> int:
        return self.config.n_mem

    def named_tensors(self) -> dict[str, nn.Parameter]:
        """The task's tensors by their names in adapter files (:data:`TENSOR_NAMES`): ``memory``
        ``[depth, n_mem, D]``, ``class_token`` ``[D]``, ``head.weight`` ``[num_classes, D]``, ``head.bias``
        ``[num_classes]``; the parameters themselves, not copies."""
        return {n: self.get_parameter(n) for n in TENSOR_NAMES}

    @staticmethod
    def tensor_shapes(depth: int, n_mem: int, embed_dim: int, num_classes: int) -> dict[str, list[int]]:
        """The shape of each tensor of :meth:`named_tensors` for a task of this size."""
        return dict(zip(TENSOR_NAMES, ([depth, n_mem, embed_dim], [embed_dim], [num_classes, embed_dim],
                                       [num_classes]), strict=True))

    def extra_repr(self) -> str:
        c = self.config
        return f"name={c.name!r}, mode={c.mode}, n_mem={c.n_mem}, num_classes={c.num_classes}"


def task_key(name: str) -> str:
    """The submodule key of task ``name``: the name with ``%`` and ``.`` escaped (``%25``, ``%2E``),
    since a module path uses dots. Every other name is its own key, so ``state_dict`` keys read
    ``tasks.<name>.memory``."""
    return name.replace("%", "%25").replace(".", "%2E")


def task_name(key: str) -> str:
    """Inverse of :func:`task_key`."""
    return re.sub(r"%(25|2E)", lambda m: chr(int(m.group(1), 16)), key)


class TaskStore(nn.Module):
    """The tasks of a model by name, in model order: ``store[name]``, ``name in store``, iteration
    over the names, ``len``, ``keys()``, ``values()``, ``items()``.

    Any name works, ``"v1.0"``, ``"train"`` or ``"keys"`` included: tasks are registered directly in
    the module table under :func:`task_key`, never as attributes, so a name can not clash with an
    attribute of this module (unlike ``nn.ModuleDict``, which refuses those names).
    """

    def __setattr__(self, name: str, value: object) -> None:
        """Plain attributes (``training``, set by ``nn.Module.train``) live on the instance, never on a task
        of the same name: ``nn.Module`` would refuse to set them over a child module."""
        if isinstance(value, nn.Module | torch.Tensor):
            super().__setattr__(name, value)
        else:
            object.__setattr__(self, name, value)

    def __getitem__(self, name: str) -> TaskMemory:
        try:
            return self._modules[task_key(name)]
        except KeyError:
            raise KeyError(name) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and task_key(name) in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self) -> list[str]:
        """The task names in model order. Unescaping every key is kept from one call to the next until the
        keys change (a pass reads the names many times)."""
        keys = tuple(self._modules)
        cached_keys, names = self.__dict__.get("_names", ((), []))
        if keys != cached_keys:
            names = [task_name(k) for k in keys]
            self.__dict__["_names"] = (keys, names)
        return list(names)

    def values(self) -> list[TaskMemory]:
        return list(self._modules.values())

    def items(self) -> list[tuple[str, TaskMemory]]:
        return list(zip(self.keys(), self._modules.values(), strict=True))

    def add(self, task: TaskMemory) -> None:
        """Append ``task`` under its config's name (the caller checks that the name is free)."""
        self._modules[task_key(task.name)] = task

    def remove(self, name: str) -> TaskMemory:
        """Remove and return task ``name``."""
        return self._modules.pop(task_key(name))
