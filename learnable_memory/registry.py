"""Which timm module types learnable_memory knows, and the kind that runs each.

Three tables, keyed by exact type (a subclass may change what its parent does, so it is
registered on its own): attention kinds, block kinds and backbone kinds (the contract of each is
in :mod:`learnable_memory.kinds`). Family modules fill them with the class decorators
:func:`register_attention`, :func:`register_block` and :func:`register_backbone`.

Every module in ``learnable_memory/families/`` is imported the first time a kind is looked up, so a
new family file needs no import anywhere else. A type gets one kind: registering a second one raises
``ValueError`` unless ``override=True``. A timm type with no kind, or one refused on purpose with
:func:`refuse`, raises :class:`UnsupportedModelError` naming its module and why.
:func:`supported_types` lists what is registered.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from .kinds import AttentionKind, BackboneKind, BlockKind

K = TypeVar("K")

ATTENTION_KINDS: dict[type, AttentionKind] = {}
BLOCK_KINDS: dict[type, BlockKind] = {}
BACKBONE_KINDS: dict[type, BackboneKind] = {}

#: Types refused on purpose: class name -> why the guarantees can not hold and what would lift it.
#: ``tests/test_families.py`` holds the library to it: an architecture may fail to wrap only with
#: the error of an entry that matches one of its classes.
UNSUPPORTED: dict[str, str] = {}
_REFUSED: dict[type, str] = {}
_REFUSED_MODULES: dict[str, str] = {}
_FAMILIES_LOADED = False


class UnsupportedModelError(TypeError):
    """A timm model, block or attention type that learnable_memory has no kind for, or refuses."""


def load_families() -> None:
    """Import every module of :mod:`learnable_memory.families` once (each registers its kinds)."""
    global _FAMILIES_LOADED
    if _FAMILIES_LOADED:
        return
    _FAMILIES_LOADED = True
    from . import families

    for info in sorted(pkgutil.iter_modules(families.__path__), key=lambda i: i.name):
        importlib.import_module(f"{families.__name__}.{info.name}")


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def _register(table: dict[type, K], base: type, types: tuple[type, ...], override: bool) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{cls!r} must subclass {base.__name__} to be registered")
        taken = [t for t in types if t in table and not override]
        if taken:
            raise ValueError(
                f"{', '.join(_qualname(t) for t in taken)} already run(s) with "
                f"{', '.join(sorted({type(table[t]).__name__ for t in taken}))}: registering {cls.__name__} too "
                "would replace it; pass override=True to mean that"
            )
        instance = cls()
        for t in types:
            table[t] = instance
        return cls

    return deco


def register_attention(*types: type, override: bool = False) -> Callable[[type], type]:
    """Class decorator: one instance of this :class:`AttentionKind` runs every type in ``types``
    (``ValueError`` for a type that already has a kind, unless ``override``)."""
    return _register(ATTENTION_KINDS, AttentionKind, types, override)


def register_block(*types: type, override: bool = False) -> Callable[[type], type]:
    """Class decorator: one instance of this :class:`BlockKind` runs every type in ``types``
    (``ValueError`` for a type that already has a kind, unless ``override``)."""
    return _register(BLOCK_KINDS, BlockKind, types, override)


def register_backbone(*types: type, override: bool = False) -> Callable[[type], type]:
    """Class decorator: one instance of this :class:`BackboneKind` runs every type in ``types``
    (``ValueError`` for a type that already has a kind, unless ``override``)."""
    return _register(BACKBONE_KINDS, BackboneKind, types, override)


def supported_types() -> dict[str, list[type]]:
    """The types learnable_memory runs: ``{"backbone": [...], "block": [...], "attention": [...]}``,
    each list sorted by module and name (refused types are in :data:`UNSUPPORTED`)."""
    load_families()
    tables = {"backbone": BACKBONE_KINDS, "block": BLOCK_KINDS, "attention": ATTENTION_KINDS}
    return {what: sorted(table, key=_qualname) for what, table in tables.items()}


def refuse(cls: type, reason: str) -> None:
    """Refuse ``cls`` (a backbone, block or attention type) on purpose. ``reason`` says why the
    guarantees can not hold and what would lift the restriction; wrapping raises it."""
    UNSUPPORTED[cls.__name__] = reason
    _REFUSED[cls] = reason


def refuse_module(prefix: str, reason: str) -> None:
    """Refuse every type whose ``__module__`` is ``prefix`` or under it (``"transformers"``), without
    importing it. ``reason`` as for :func:`refuse`; listed in :data:`UNSUPPORTED` as ``"prefix.*"``."""
    UNSUPPORTED[f"{prefix}.*"] = reason
    _REFUSED_MODULES[prefix] = reason


def _refusal(t: type) -> str | None:
    """Why ``t`` is refused on purpose, or None."""
    if t in _REFUSED:
        return _REFUSED[t]
    module = t.__module__ or ""
    return next((r for p, r in _REFUSED_MODULES.items() if module == p or module.startswith(f"{p}.")), None)


def _lookup(table: dict[type, K], obj: object, what: str) -> K:
    load_families()
    t = type(obj)
    reason = _refusal(t)
    if reason is not None:
        raise UnsupportedModelError(f"{t.__name__} is not supported by learnable_memory: {reason}")
    kind = table.get(t)
    if kind is None:
        names = ", ".join(sorted({k.__name__ for k in table}))
        raise UnsupportedModelError(
            f"unsupported {what} type {t.__name__} (module {t.__module__}): learnable_memory has no {what} kind "
            f"for it, and types are matched exactly; supported {what} types: {names}. CONTRIBUTING.md says how "
            "to add a kind"
        )
    return kind


def attention_kind(attn: nn.Module) -> AttentionKind:
    """The kind for ``attn``'s exact type, or :class:`UnsupportedModelError`."""
    return _lookup(ATTENTION_KINDS, attn, "attention")


def block_kind(blk: nn.Module) -> BlockKind:
    """The kind for ``blk``'s exact type (its attention modules checked too), or :class:`UnsupportedModelError`."""
    kind = _lookup(BLOCK_KINDS, blk, "block")
    for attn in kind.attentions(blk):
        attention_kind(attn)
    return kind


def backbone_kind(model: nn.Module) -> BackboneKind:
    """The kind for ``model``'s exact type, or :class:`UnsupportedModelError` naming its module."""
    return _lookup(BACKBONE_KINDS, model, "model")
