"""Learnable memory for frozen timm Vision Transformers (Sandler et al., CVPR 2022).

Wrap a frozen timm ViT, add per-task memory tokens, class tokens and heads, and serve the
base model and every task in one forward pass.
"""

from .adapters import AdapterError, inspect_adapter, save_adapter, save_pretrained
from .batch import predict_dataset
from .config import MODES, TaskConfig
from .export import export_model
from .mask import build_attention_mask
from .memory import TaskMemory
from .model import MemoryViT, load_adapters, wrap_model
from .plotting import plot_attention_mask
from .registry import UnsupportedModelError
from .version import __version__ as __version__

__all__ = [
    "MODES",
    "AdapterError",
    "MemoryViT",
    "TaskConfig",
    "TaskMemory",
    "UnsupportedModelError",
    "build_attention_mask",
    "export_model",
    "inspect_adapter",
    "load_adapters",
    "plot_attention_mask",
    "predict_dataset",
    "save_adapter",
    "save_pretrained",
    "wrap_model",
]
