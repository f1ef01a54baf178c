"""The contract between the core and a timm family: backbone, block and attention kinds.

A *kind* is a small, stateless runner for one timm module type. It knows how to call that module's
own submodules (``attn.qkv``, ``blk.norm1``, ``model.patch_embed`` ...) and nothing else; the
arithmetic of learnable memory (Table 1) lives in the core (:mod:`learnable_memory.attention`,
:mod:`learnable_memory.heads`). A family module in ``learnable_memory/families/`` subclasses these
ABCs and registers its kinds with the decorators of :mod:`learnable_memory.registry`.

Three kinds, from the outside in:

- :class:`BackboneKind`: how tokens enter the blocks and leave them (embedding, new class tokens,
  base head, task features), and which blocks there are.
- :class:`BlockKind`: how one block runs the original tokens ``x`` ``[B, N, D]``, the new class
  tokens ``c`` ``[B, K, D]`` and this block's memory ``mem`` ``[M, D]``. Generic pre-norm and
  post-norm runners are in :mod:`learnable_memory.blocks`.
- :class:`AttentionKind`: how one attention module projects tokens to heads and back. The core
  does the attention itself unless a kind overrides :meth:`AttentionKind.attend`.

Packing (see :class:`~learnable_memory.context.PassContext`) is decided here, from what a kind
does: a block packs when its runner's code outside attention is row-wise (:attr:`BlockKind.packable`,
true of the generic runners) and every attention kind it calls keeps the core's arithmetic (does not
override :meth:`AttentionKind.attend`). Score biases and rotary tables need no flag: the packed path
applies them exactly as the split path does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from .attention import memory_attention, packed_attention
from .context import PassContext, PassExtras

Tensor = torch.Tensor
Pair = tuple[Tensor, Tensor]
KV = tuple[Tensor, Tensor]
Bias = Tensor | None


class AttentionKind(ABC):
    """How to drive one timm attention type. Subclasses implement :meth:`qkv` and :meth:`out`.

    The core calls :meth:`qkv` on the original tokens (with the rotary table, if any), on the new
    class tokens and on the memory (never rotated), then attends as Table 1 says, then calls
    :meth:`out` on the heads. Attributes read off the module by the core: ``attn.scale`` and
    ``attn.fused_attn``.
    """

    @abstractmethod
    def qkv(self, attn: nn.Module, h: Tensor, rope: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens ``h`` ``[B, T, D]`` (after the block's pre-attention norm) -> q, k, v ``[B, H, T, hd]``.

        ``rope``: the rotary table of the original tokens; when given, rotate the rows after the
        module's prefix tokens exactly as the timm module does.
        """

    @abstractmethod
    def out(self, attn: nn.Module, o: Tensor, h: Tensor) -> Tensor:
        """Heads ``o`` ``[B, H, T, hd]`` (and the attention input ``h`` ``[B, T, D]``, for output
        gates) -> the module's output ``[B, T, D]``."""

    def position_bias(self, attn: nn.Module, ctx: PassContext, n_tokens: int) -> tuple[Bias, Bias]:
        """Additive biases on the scores against the original tokens: ``[.., N, N]`` for the
        original tokens' queries and ``[.., 1, N]`` for the new class tokens'. Default: none."""
        return None, None

    def memory_kv(self, attn: nn.Module, h_m: Tensor) -> KV:
        """Memory ``h_m`` ``[M, D]`` (after the block's pre-attention norm) -> its keys and values
        ``[H, M, hd]``, as the module projects them (never rotated). They depend on the memory and
        frozen weights only, so the model caches them across passes."""
        _, k, v = self.qkv(attn, h_m.unsqueeze(0))
        return k[0], v[0]

    def attend(self, attn: nn.Module, h_x: Tensor, h_c: Tensor, kv: KV, ctx: PassContext) -> Pair:
        """Split layout: original tokens ``h_x`` ``[B, N, D]``, new class tokens ``h_c`` ``[B, K, D]``
        and the memory's keys and values ``kv`` -> outputs ``[B, N, D]``, ``[B, K, D]``. Override only
        for arithmetic of the module's own (e.g. two softmaxes); such a kind never packs."""
        return memory_attention(attn, h_x, h_c, kv, ctx, self)

    def attend_packed(self, attn: nn.Module, h: Tensor, kv: KV, ctx: PassContext) -> Tensor:
        """Packed layout: ``h`` ``[B, N + K, D]`` (original tokens, then new class tokens) and the
        memory's keys and values ``kv`` -> outputs ``[B, N + K, D]``."""
        return packed_attention(attn, h, kv, ctx, self)

    @property
    def packable(self) -> bool:
        """Whether this kind can serve a packed pass: it keeps the core's arithmetic (the packed path
        applies the same biases and rotary tables as the split one)."""
        return type(self).attend is AttentionKind.attend


class BlockKind(ABC):
    """How to drive one timm block type."""

    #: The block's code outside its attention modules is row-wise (norms, MLP, residuals), and its
    #: attention goes through :func:`learnable_memory.blocks.run_attention`: it can serve a packed
    #: pass, where new class tokens ride behind the original tokens in one tensor.
    packable: ClassVar[bool] = False

    @abstractmethod
    def attentions(self, blk: nn.Module) -> list[nn.Module]:
        """The attention modules the block calls (checked against the registry when wrapping);
        empty when the attention is part of the block itself."""

    @abstractmethod
    def memory_kv(self, blk: nn.Module, mem: Tensor) -> tuple[KV, ...]:
        """This block's memory ``mem`` ``[M, D]`` -> its keys and values, one pair per attention
        (``[H, M, hd]`` each, in the order of :meth:`attentions`; one pair when the attention is part
        of the block). The memory goes only through what the block applies before attention and the
        key/value projections."""

    @abstractmethod
    def forward(self, blk: nn.Module, x: Tensor, c: Tensor, kv: tuple[KV, ...], ctx: PassContext) -> Pair:
        """Original tokens ``x`` ``[B, N, D]``, new class tokens ``c`` ``[B, K, D]`` and the memory's
        keys and values (from :meth:`memory_kv`) -> the new ``x`` and ``c``. The original tokens go
        through exactly the base block's arithmetic (under ``ctx.orig_grad``)."""


class BackboneKind(ABC):
    """How tokens enter and leave the blocks of one timm model type."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks, in order."""
        return list(model.blocks)

    @abstractmethod
    def check_input(self, model: nn.Module, images: object) -> None:
        """Raise ``ValueError`` for input the model can not take, saying how to fix it."""

    @abstractmethod
    def embed(self, model: nn.Module, images: object) -> tuple[Tensor, PassExtras]:
        """Input -> original tokens ``[B, N, D]`` as they enter the first block, and the pass's extras."""

    def embed_new(self, model: nn.Module, tokens: Tensor) -> Tensor:
        """New class tokens ``[K, D]`` -> as they enter the first block (where the original tokens
        enter ``norm_pre``)."""
        return model.norm_pre(tokens)

    @abstractmethod
    def class_token_init(self, model: nn.Module) -> Tensor:
        """``[D]``: a new task's class token before training."""

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Class, register and distillation tokens before the patches."""
        return model.num_prefix_tokens

    def base_logits(self, model: nn.Module, x: Tensor, extras: PassExtras) -> Tensor:
        """Original tokens after the blocks ``[B, N, D]`` -> the base model's own output."""
        return model.forward_head(model.norm(x))

    def task_features(self, model: nn.Module, c: Tensor) -> Tensor:
        """New class tokens after the blocks ``[B, K, D]`` -> the features their heads take ``[B, K, D]``."""
        return model.fc_norm(model.norm(c))
