"""Learnable memory for frozen timm Vision Transformers (Sandler et al., CVPR 2022).

Wrap a frozen timm ViT, add per-task memory tokens, class tokens and heads, and serve the
base model and every task in one forward pass.
"""

from .adapter_io import AdapterError, inspect_adapter, save_adapter, save_pretrained
from .config import MODES, TaskConfig
from .loading import load_adapters
from .mask import build_attention_mask
from .memory import TaskMemory
from .model import MemoryViT, wrap_model
from .plotting import plot_attention_mask

__all__ = [
    "MODES",
    "AdapterError",
    "MemoryViT",
    "TaskConfig",
    "TaskMemory",
    "build_attention_mask",
    "inspect_adapter",
    "load_adapters",
    "plot_attention_mask",
    "save_adapter",
    "save_pretrained",
    "wrap_model",
]
__version__ = "0.1.0"
