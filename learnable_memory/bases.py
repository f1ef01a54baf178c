"""The small base models shipped with the package, and the label names of a timm model's own head."""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

#: The small base model shipped with the package (timm's ``local-dir`` export format:
#: ``config.json`` + ``model.safetensors``), produced by ``benchmarks/pretrain_base.py``.
DEMO_BASE_DIR = Path(__file__).parent / "assets" / "fmnist_vit_base"
#: The broad base: the same architecture pretrained on the 1,188 characters of ``glyphs-pretrain``.
GLYPH_BASE_DIR = Path(__file__).parent / "assets" / "glyph_vit_base"
#: The shipped bases by name, for :func:`load_demo_base`.
DEMO_BASES = {"fmnist": DEMO_BASE_DIR, "glyphs": GLYPH_BASE_DIR}


def load_demo_base(path: str | Path | None = None) -> nn.Module:
    """A small ViT shipped with the package, by name (``DEMO_BASES``), or another timm ``local-dir`` export.

    Both shipped bases are a timm ``VisionTransformer`` (28x28 grayscale, patch 7, width 128, depth 4,
    4 heads): ``"fmnist"`` (the default) pretrained on Fashion-MNIST classes 0-4, ``"glyphs"`` on the 1,188
    character classes of ``glyphs-pretrain``. Its ``pretrained_cfg`` carries the data mean/std, input
    size, interpolation and label names, so :func:`~learnable_memory.preprocessing.data_config` gives the
    right preprocessing.
    """
    if path is None or (isinstance(path, str) and path in DEMO_BASES):
        path = DEMO_BASES[path or "fmnist"]
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no base model at {path}: expected config.json and model.safetensors "
                                "(run benchmarks/pretrain_base.py to create it)")
    return timm.create_model(f"local-dir:{path}", pretrained=True)


def label_names(model: nn.Module) -> list[str] | None:
    """Label names of a timm model's own head, from its ``pretrained_cfg`` when it has them."""
    names = getattr(model, "pretrained_cfg", {}).get("label_names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    return list(names) if names else None

