"""Adapters for timm model families; importing this package registers them all."""

from . import vit  # noqa: F401
