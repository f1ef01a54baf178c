"""Learnable memory for frozen timm Vision Transformers (Sandler et al., CVPR 2022).

Wrap a frozen timm ViT, add per-task memory tokens, class tokens and heads, and serve the
base model and every task in one forward pass.

The public names below are imported on first use (PEP 562), so that importing the package, and
``learnable-memory --help``, do not import torch: ``from learnable_memory import MemoryViT`` works as
always.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__

if TYPE_CHECKING:
    from .adapters import AdapterError, inspect_adapter, save_adapter, save_pretrained
    from .batch import predict_dataset
    from .compiled import compile_model
    from .config import MODES, TaskConfig
    from .export import export_model
    from .mask import build_attention_mask
    from .memory import TaskMemory
    from .model import MemoryViT, load_adapters
    from .pass_groups import pass_groups
    from .plotting import plot_attention_mask
    from .registry import UnsupportedModelError
    from .wrapping import wrap_model

#: Each public name and the module that defines it.
_HOMES = {
    "MODES": "config", "TaskConfig": "config",
    "AdapterError": "adapters", "inspect_adapter": "adapters", "save_adapter": "adapters",
    "save_pretrained": "adapters",
    "predict_dataset": "batch", "compile_model": "compiled", "pass_groups": "pass_groups",
    "export_model": "export",
    "build_attention_mask": "mask",
    "TaskMemory": "memory",
    "MemoryViT": "model", "load_adapters": "model", "wrap_model": "wrapping",
    "plot_attention_mask": "plotting",
    "UnsupportedModelError": "registry",
}

__all__ = [
    "MODES",
    "AdapterError",
    "MemoryViT",
    "TaskConfig",
    "TaskMemory",
    "UnsupportedModelError",
    "build_attention_mask",
    "compile_model",
    "export_model",
    "inspect_adapter",
    "load_adapters",
    "pass_groups",
    "plot_attention_mask",
    "predict_dataset",
    "save_adapter",
    "save_pretrained",
    "wrap_model",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module the first time it is asked for."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
