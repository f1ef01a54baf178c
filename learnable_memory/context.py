"""What one forward pass tells every block: the Table 1 rows of the new class tokens, the mode, the
gradient policy, whether the pass is split or packed, and the per-pass values of the backbone.

Shapes: B batch, H heads, N original tokens (prefix + patches), K new class tokens, M memory
tokens of all tasks in the pass, hd head dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .layout import NewTokenIndex
from .typing import Biases, Tensor


@dataclass(frozen=True)
class PassExtras:
    """Per-pass values a backbone computes once (:meth:`~learnable_memory.kinds.BackboneKind.embed`)
    and hands to every block. All optional; a plain ViT has none. The core reads the first three;
    :attr:`family` is the family's own.

    Attributes:
        rope: Rotary table of the original tokens after their prefix tokens, ``[N - prefix, 2 hd]``
            or with a leading head dim. Rotates the original tokens' queries and keys; new class
            tokens and memory are never rotated.
        block_rope: One rotary table per block, ``{block: table}`` (RoPE-Mixed). Each block runner
            takes its own with :meth:`PassContext.for_block`.
        score_bias: Additive biases on the scores against the original tokens (e.g. key padding):
            ``[.., N, N]`` for the original tokens' queries and ``[.., 1, N]`` for the new class
            tokens', either None. An attention kind adds its own with
            :meth:`~learnable_memory.kinds.AttentionKind.position_bias`.
        family: Anything else the family computes once per pass for its own kinds (a tensor, a
            dataclass of its own), e.g. a bias shared by all blocks or what the base head pools over.
            The core never reads it.
    """

    rope: Tensor | None = None
    block_rope: Mapping[nn.Module, Tensor] | None = None
    score_bias: Biases = (None, None)
    family: Any = None

    def for_packed(self, k: int) -> PassExtras:
        """These extras for a packed pass with ``k`` new class tokens behind the original ones: the
        rotary tables gain ``k`` identity rows (sin 0, cos 1), so the new class tokens stay unrotated
        (as prefix tokens are) while every original token is rotated exactly as before."""
        if self.rope is None and self.block_rope is None:
            return self
        return replace(self, rope=_identity_rows(self.rope, k),
                       block_rope=None if self.block_rope is None else
                       {blk: _identity_rows(t, k) for blk, t in self.block_rope.items()})


def _identity_rows(rope: Tensor | None, k: int) -> Tensor | None:
    """A rotary table ``[..., P, 2 hd]`` (sin, then cos) with ``k`` rows appended that rotate by 0."""
    if rope is None:
        return None
    half = rope.shape[-1] // 2
    shape = (*rope.shape[:-2], k, half)
    return torch.cat([rope, torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)], dim=-2)


@dataclass(frozen=True)
class PassContext:
    """What every block needs to know about the current pass.

    Attributes:
        layout: What each new class token sees besides the original tokens (Table 1 in gather form,
            a :class:`~learnable_memory.layout.NewTokenIndex`).
        full: Original tokens attend to the memory too (paper Sec. 2.1).
        orig_grad: Keep an autograd graph for the original tokens. False when nothing trainable
            touches them (non-destructive training), which saves the backbone's backward.
        packed: The pass runs packed: the last ``packed`` rows of the original-token tensor are the
            new class tokens, which share every row-wise op (norms, projections, MLP) with the
            original tokens, and the class-token tensor is empty ``[B, 0, D]``. Only the attention
            tells them apart. 0: the two are separate tensors (a split pass).
        extras: The backbone's per-pass values.
        attention_kinds: ``{attention module: its kind}``, resolved once when the model was wrapped
            (``MemoryViT._attention_kinds``); :func:`learnable_memory.blocks.run_attention` reads it
            and looks a module up in the registry only when it is missing.
    """

    layout: NewTokenIndex
    full: bool
    orig_grad: bool
    packed: int = 0
    extras: PassExtras = field(default_factory=PassExtras)
    attention_kinds: Mapping[nn.Module, Any] = field(default_factory=dict)  # values: kinds.AttentionKind

    def for_block(self, blk: nn.Module) -> PassContext:
        """This context with ``blk``'s own rotary table as ``extras.rope`` (RoPE-Mixed), else itself."""
        tables = self.extras.block_rope
        if tables is None:
            return self
        return replace(self, extras=replace(self.extras, rope=tables[blk]))
