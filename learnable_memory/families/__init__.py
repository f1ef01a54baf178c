"""Adapters for timm model families; importing this package registers them all."""

from . import beit, eva, naflexvit, vit, vit_parallel  # noqa: F401
from .unsupported import UNSUPPORTED  # noqa: F401
