"""Adapters on disk: one task per folder (safetensors + JSON), saved atomically, loaded with checks.

- :mod:`.folder`: the folder format, atomic saves, reading and checking one folder, the Hub.
- :mod:`.fingerprint`: what an adapter records about its backbone and its own tensors.
- :mod:`.loading`: adapters -> tasks for a backbone (the model's layout rules, fingerprints).
- :mod:`.tensors`: the one check of a task's tensors read from a file (both loaders, ours and peft's).
- :mod:`.schema`: the JSON shape of adapter configs and ``adapters.json``.

Nothing here imports the model: :class:`~learnable_memory.MemoryViT` uses this package to save and
load, and this package sees a model only through the :class:`~.folder.TaskModel` protocol.
"""

from .folder import (
    AdapterError,
    TaskModel,
    adapter_folders,
    describe_task,
    inspect_adapter,
    read_adapter,
    save_adapter,
    save_pretrained,
)
from .loading import check_backbone, prepare_tasks

__all__ = [
    "AdapterError",
    "TaskModel",
    "adapter_folders",
    "check_backbone",
    "describe_task",
    "inspect_adapter",
    "prepare_tasks",
    "read_adapter",
    "save_adapter",
    "save_pretrained",
]
