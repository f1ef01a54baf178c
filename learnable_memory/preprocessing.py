"""Preprocessing for a model's input: timm's data config and evaluation transform, the PIL mode for the
model's channels, and reading an image file in that mode.

The datasets (:mod:`learnable_memory.data`), the server and ``predict`` all turn images into model input
through these functions, so a pretrained model gets its own resizing and normalisation everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image
from timm.data import create_transform, resolve_input_data_config
from torch import nn


def data_config(model: nn.Module) -> dict:
    """timm's preprocessing config for ``model`` (a timm model or a ``MemoryViT``).

    Uses :func:`timm.data.resolve_input_data_config`, which follows the model's current input size
    and channels as well as its pretrained mean/std/interpolation.
    """
    base = getattr(model, "base", model)
    return resolve_input_data_config(base)


def model_transform(config: dict) -> Callable:
    """timm's evaluation transform (resize, centre crop, to tensor, normalise) for ``config``."""
    return create_transform(**config, is_training=False)


def pil_mode(config: dict) -> str:
    """PIL mode for a model input with ``config["input_size"][0]`` channels."""
    return "L" if config["input_size"][0] == 1 else "RGB"


def open_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Read an image file in PIL ``mode`` ("L" or "RGB")."""
    with Image.open(path) as img:
        return img.convert(mode)


