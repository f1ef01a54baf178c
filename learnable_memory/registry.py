"""Which timm modules learnable_memory knows, and the small adapter that runs each.

Three tables, keyed by exact type (a subclass may change what its parent does, so it must
be registered on its own):

- attention kinds: how to call an attention module's own projections
  (``qkv(attn, h, rope) -> q, k, v``, ``out(attn, o, h)``, optionally
  ``position_bias(attn, ctx, n_tokens)``);
- block kinds: how a block runs original tokens, new class tokens and memory
  (``__call__(blk, x, c, mem, ctx) -> x, c`` and ``attentions(blk)``);
- backbones: how tokens enter and leave the blocks (see ``families/vit.py``).

Family modules in ``learnable_memory/families/`` fill the tables with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

ATTENTION_KINDS: dict[type, Any] = {}
BLOCK_KINDS: dict[type, Any] = {}
BACKBONES: dict[type, Any] = {}


def register(table: dict[type, Any], *types: type) -> Callable[[type], type]:
    """Class decorator: one instance of the adapter serves every type in ``types``."""

    def deco(cls: type) -> type:
        instance = cls()
        for t in types:
            table[t] = instance
        return cls

    return deco


def _names(table: dict[type, Any]) -> str:
    return ", ".join(sorted({t.__name__ for t in table}))


def attention_kind(attn: nn.Module) -> Any:
    """The adapter for ``attn``'s exact type, or ``TypeError``."""
    kind = ATTENTION_KINDS.get(type(attn))
    if kind is None:
        raise TypeError(
            f"unsupported attention type {type(attn).__name__}; supported attention types: {_names(ATTENTION_KINDS)}"
        )
    return kind


def block_kind(blk: nn.Module) -> Any:
    """The adapter for ``blk``'s exact type (its attention modules checked too), or ``TypeError``."""
    kind = BLOCK_KINDS.get(type(blk))
    if kind is None:
        raise TypeError(f"unsupported block type {type(blk).__name__}; supported block types: {_names(BLOCK_KINDS)}")
    for attn in kind.attentions(blk):
        attention_kind(attn)
    return kind


def backbone_for(model: nn.Module) -> Any:
    """The adapter for ``model``'s exact type, or ``TypeError`` naming the supported families."""
    adapter = BACKBONES.get(type(model))
    if adapter is None:
        raise TypeError(
            f"unsupported model type {type(model).__name__}: learnable_memory wraps timm Vision Transformers "
            f"({_names(BACKBONES)}). Build one with timm.create_model('vit_...')."
        )
    return adapter
