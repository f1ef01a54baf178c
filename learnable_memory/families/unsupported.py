"""The timm modules learnable_memory refuses on purpose, and why.

``UNSUPPORTED`` maps a class name (a backbone or block type) or an architecture name to the
reason it can not keep the guarantees (base output unchanged, concatenated tasks equal to
each task alone, training, saving and loading). Wrapping such a model raises a ``TypeError``
whose message carries that reason and what would lift it. The family sweep
(``tests/test_families.py``) holds the library to this table: an architecture may fail to wrap
only with the ``TypeError`` of an entry that matches it, and every entry must really refuse.

A model whose types are simply not registered also raises a ``TypeError`` (naming the supported
types, see ``registry``), but the sweep fails on it: every architecture of the swept timm modules
is either supported or listed here.
"""

from __future__ import annotations

from typing import Any, NoReturn

UNSUPPORTED: dict[str, str] = {}


class Refused:
    """Adapter for a refused backbone or block type: every use raises the documented ``TypeError``."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{self.name} is not supported by learnable_memory: {self.reason}")

    blocks = attentions = check_input = __call__ = _refuse


def refuse(table: dict[type, Any], cls: type, reason: str) -> None:
    """Record ``cls`` in :data:`UNSUPPORTED` and register an adapter that refuses it.

    ``table`` is ``registry.BACKBONES`` or ``registry.BLOCK_KINDS`` (both are consulted when a
    model is wrapped, so the error comes at wrap time). ``reason`` should say why the
    guarantee can not hold and what would lift the restriction.
    """
    UNSUPPORTED[cls.__name__] = reason
    table[cls] = Refused(cls.__name__, reason)
