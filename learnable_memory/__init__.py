"""Learnable memory for frozen timm Vision Transformers (Sandler et al., CVPR 2022).

Wrap a frozen timm ViT, add per-task memory tokens, class tokens and heads, and serve the
base model and every task in one forward pass.
"""

from .config import MODES, TaskConfig
from .mask import build_attention_mask
from .memory import TaskMemory
from .model import MemoryViT, wrap_model

__all__ = [
    "MODES",
    "MemoryViT",
    "TaskConfig",
    "TaskMemory",
    "build_attention_mask",
    "wrap_model",
]
__version__ = "0.1.0"
