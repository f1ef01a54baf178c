"""The contract between the core and a timm family: backbone, block and attention kinds.

A *kind* is a small, stateless runner for one timm module type. It knows how to call that module's
own submodules (``attn.qkv``, ``blk.norm1``, ``model.patch_embed`` ...) and nothing else; the
arithmetic of learnable memory (Table 1) lives in the core (:mod:`learnable_memory.attention`,
:mod:`learnable_memory.differential`). A family module in ``learnable_memory/families/`` subclasses
these ABCs and registers its kinds with the decorators of :mod:`learnable_memory.registry`.

Three kinds, from the outside in:

- :class:`BackboneKind`: how tokens enter the blocks and leave them (embedding, new class tokens,
  base head, task features), the width, and which blocks there are. Its defaults are neutral (no
  prefix tokens, no norm on the new class tokens); a family overrides what its model adds.
- :class:`BlockKind`: how one block runs the original tokens ``x`` ``[B, N, D]``, the new class
  tokens ``c`` ``[B, K, D]`` and this block's memory ``mem`` ``[M, D]``. Generic pre-norm and
  post-norm runners are in :mod:`learnable_memory.blocks`.
- :class:`AttentionKind`: how one attention module projects tokens to heads and back. The core
  does the attention itself unless a kind overrides :meth:`AttentionKind.attend`.

Every block and attention kind also gives a *dense reference* (``reference``): its own unfused
formula for one new class token against the original tokens and its memory, written without the
fast path. :func:`learnable_memory.testing.check_new_tokens` holds the fast path to it.

Packing (see :class:`~learnable_memory.context.PassContext`) is decided here (:func:`unpacked_reason`),
from what a kind does: a block packs when its runner's code outside attention is row-wise
(:attr:`BlockKind.packable`, true of the generic runners), every attention kind it calls keeps the
core's arithmetic (does not override :meth:`AttentionKind.attend`), and every linear on the token
path (:meth:`BlockKind.token_linears`) is :data:`SIMD_SAFE_WIDTH`-aligned. Score biases and rotary
tables need no flag: the packed path applies them exactly as the split path does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from .attention import add_bias, attend_original, dense_attention, memory_attention, packed_attention
from .context import PassContext, PassExtras
from .typing import KV, Bias, Biases, Pair, Tensor

#: Feature widths on a block's token path that a packed pass needs to be multiples of (see
#: :func:`unpacked_reason`).
SIMD_SAFE_WIDTH = 64


class AttentionKind(ABC):
    """How to drive one timm attention type. Subclasses implement :meth:`qkv` and :meth:`out`.

    The core calls :meth:`qkv` on the original tokens (with the rotary table, if any), on the new
    class tokens and on the memory (never rotated), then attends as Table 1 says, then calls
    :meth:`out` on the heads. The original tokens' own attention is :meth:`attend_original` (default:
    timm's ``Attention``, reading ``attn.fused_attn``) and the softmax temperature :meth:`scale`
    (default ``attn.scale``): a module whose arithmetic differs overrides these two, never the split.
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

    def scale(self, attn: nn.Module) -> float:
        """The module's softmax temperature (default ``attn.scale``)."""
        return attn.scale

    def attend_original(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Bias) -> Tensor:
        """The original tokens' attention as the module computes it, so that the base output stays
        bit-identical: q, k, v ``[B, H, N, hd]`` and a score bias (or None) -> ``[B, H, N, hd]``.
        Default: timm's ``Attention`` (SDPA when ``attn.fused_attn``, else ``softmax((q * scale) k^T) v``)."""
        return attend_original(q, k, v, attn.fused_attn, self.scale(attn), bias)

    def position_bias(self, attn: nn.Module, ctx: PassContext, n_tokens: int) -> Biases:
        """Additive biases on the scores against the original tokens: ``[.., N, N]`` for the
        original tokens' queries and ``[.., 1, N]`` for the new class tokens'. Default: none. A kind
        that overrides it overrides :meth:`reference_bias` too."""
        return None, None

    def reference_bias(self, attn: nn.Module, ctx: PassContext, n_tokens: int) -> Bias:
        """For :meth:`reference`: the bias a new class token's scores against the N original tokens
        get, ``[.., 1, N]``, stated on its own (not read off :meth:`position_bias`'s second part, which
        the reference checks). Default: none."""
        return None

    def memory_kv(self, attn: nn.Module, h_m: Tensor) -> KV:
        """Memory ``h_m`` ``[M, D]`` (after the block's pre-attention norm) -> its keys and values
        ``[H, M, hd]``, as the module projects them (never rotated). They depend on the memory and
        frozen weights only, so the model caches them across passes."""
        _, k, v = self.qkv(attn, h_m.unsqueeze(0))
        return k[0], v[0]

    def reference_heads(self, attn: nn.Module, h_x: Tensor, h_c: Tensor, h_m: Tensor, ctx: PassContext
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """For :meth:`reference`: the new class token's query ``[B, H, 1, hd]`` and the keys and values
        it sees, ``[B, H, N + 1 + M, hd]``: the original tokens (rotated as the base model rotates
        them), itself and its memory (neither rotated)."""
        q, k_c, v_c = self.qkv(attn, h_c)
        _, k_x, v_x = self.qkv(attn, h_x, ctx.extras.rope)
        _, k_m, v_m = self.qkv(attn, h_m.expand(h_x.shape[0], -1, -1))
        return q, torch.cat([k_x, k_c, k_m], dim=2), torch.cat([v_x, v_c, v_m], dim=2)

    def reference(self, attn: nn.Module, h_x: Tensor, h_c: Tensor, h_m: Tensor, ctx: PassContext) -> Tensor:
        """Dense reference for ONE new class token ``h_c`` ``[B, 1, D]`` with its own memory ``h_m``
        ``[M, D]`` against the original tokens ``h_x`` ``[B, N, D]`` (all after the block's
        pre-attention norm; a non-destructive task): one softmax over ``[original ; itself ; memory]``
        with the backbone's and :meth:`reference_bias`'s biases on the original columns -> its
        attention output ``[B, 1, D]``. Override for arithmetic of the module's own (two softmaxes)."""
        q, keys, values = self.reference_heads(attn, h_x, h_c, h_m, ctx)
        bias = add_bias(ctx.extras.score_bias[1], self.reference_bias(attn, ctx, h_x.shape[1]))
        return self.out(attn, dense_attention(q, keys, values, self.scale(attn), bias), h_c)

    def attend(self, attn: nn.Module, h_x: Tensor, h_c: Tensor, kv: KV, ctx: PassContext) -> Pair:
        """Split pass: original tokens ``h_x`` ``[B, N, D]``, new class tokens ``h_c`` ``[B, K, D]``
        and the memory's keys and values ``kv`` -> outputs ``[B, N, D]``, ``[B, K, D]``. Override only
        for arithmetic of the module's own (e.g. two softmaxes); such a kind never packs."""
        return memory_attention(attn, h_x, h_c, kv, ctx, self)

    def attend_packed(self, attn: nn.Module, h: Tensor, kv: KV, ctx: PassContext) -> Tensor:
        """Packed pass: ``h`` ``[B, N + K, D]`` (original tokens, then new class tokens) and the
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
    def memory_kv(self, blk: nn.Module, mem: Tensor, kinds: Mapping[nn.Module, AttentionKind]) -> tuple[KV, ...]:
        """This block's memory ``mem`` ``[M, D]`` -> its keys and values, one pair per attention
        (``[H, M, hd]`` each, in the order of :meth:`attentions`; one pair when the attention is part
        of the block). The memory goes only through what the block applies before attention and the
        key/value projections; ``kinds`` are the attention kinds of :meth:`attentions`' modules, as
        resolved when wrapping."""

    @abstractmethod
    def forward(self, blk: nn.Module, x: Tensor, c: Tensor, kv: tuple[KV, ...], ctx: PassContext) -> Pair:
        """Original tokens ``x`` ``[B, N, D]``, new class tokens ``c`` ``[B, K, D]`` and the memory's
        keys and values (from :meth:`memory_kv`) -> the new ``x`` and ``c``. The original tokens go
        through exactly the base block's arithmetic (under ``ctx.orig_grad``)."""

    @abstractmethod
    def reference(self, blk: nn.Module, x: Tensor, c: Tensor, mem: Tensor, ctx: PassContext) -> Tensor:
        """Dense reference: ONE new class token ``c`` ``[B, 1, D]`` of a non-destructive task with its
        memory ``mem`` ``[M, D]`` and the original tokens ``x`` ``[B, N, D]`` as they enter the block
        -> the new class token after the block ``[B, 1, D]``, by the block's unfused formula (the
        memory through what the block applies before attention, one softmax per attention over
        ``[original ; itself ; memory]``). Attention modules of their own reach it through their
        kind's :meth:`AttentionKind.reference`."""

    def token_linears(self, blk: nn.Module) -> list[nn.Linear]:
        """The linear layers that the tokens' rows go through (their widths decide packing, see
        :func:`unpacked_reason`). Default: every ``nn.Linear`` in the block; override to leave out
        layers that never see token rows (e.g. an MLP over relative positions)."""
        return [m for m in blk.modules() if isinstance(m, nn.Linear)]


def unpacked_reason(kind: BlockKind, blk: nn.Module, attention_kinds: Sequence[AttentionKind]) -> str | None:
    """Why block ``blk`` can not serve a packed pass and keep the base output bit-identical, or None.

    Besides what the kinds say (:attr:`BlockKind.packable`, :attr:`AttentionKind.packable`), every
    linear width on the token path must be a multiple of :data:`SIMD_SAFE_WIDTH`: an elementwise
    kernel handles a tensor in SIMD chunks and its last ``size mod chunk`` elements another way, which
    can round a function like SiLU or exp differently, and with new class tokens behind them the
    original tokens' last elements would move out of that tail (EVA-02-L's SwiGLU width 2730 does this).
    """
    if not kind.packable:
        return f"its block kind {type(kind).__name__} is not packable"
    own = [type(a).__name__ for a in attention_kinds if not a.packable]
    if own:
        return f"attention kind(s) {', '.join(own)} do arithmetic of their own"
    odd = sorted({w for m in kind.token_linears(blk) for w in (m.in_features, m.out_features)
                  if w % SIMD_SAFE_WIDTH})
    if odd:
        return f"linear widths {odd} on the token path are not multiples of {SIMD_SAFE_WIDTH}"
    return None


class BackboneKind(ABC):
    """How tokens enter and leave the blocks of one model type.

    Implement :meth:`width`, :meth:`blocks`, :meth:`check_input`, :meth:`embed`,
    :meth:`class_token_init` and :meth:`base_logits`. The rest has neutral defaults: no prefix
    tokens, new class tokens entering the blocks as they are, task features the new class tokens
    after the blocks as they are. :meth:`check_model` runs at wrap time.
    """

    @abstractmethod
    def width(self, model: nn.Module) -> int:
        """D: the width of the tokens in the blocks (and of the memory)."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks, in order."""

    @abstractmethod
    def check_input(self, model: nn.Module, images: object) -> None:
        """Raise ``ValueError`` for input the model can not take, saying how to fix it."""

    @abstractmethod
    def embed(self, model: nn.Module, images: object) -> tuple[Tensor, PassExtras]:
        """Input -> original tokens ``[B, N, D]`` as they enter the first block, and the pass's extras."""

    @abstractmethod
    def class_token_init(self, model: nn.Module) -> Tensor:
        """``[D]``: a new task's class token before training."""

    @abstractmethod
    def base_logits(self, model: nn.Module, x: Tensor, extras: PassExtras) -> Tensor:
        """Original tokens after the blocks ``[B, N, D]`` -> the base model's own output."""

    def embed_new(self, model: nn.Module, tokens: Tensor) -> Tensor:
        """New class tokens ``[K, D]`` -> as they enter the first block (what the model applies to
        its original tokens between embedding and the first block, e.g. a pre-norm). Default: as they are."""
        return tokens

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Class, register and distillation tokens before the patches. Default: none."""
        return 0

    def task_features(self, model: nn.Module, c: Tensor) -> Tensor:
        """New class tokens after the blocks ``[B, K, D]`` -> the features their heads take
        ``[B, K, D]`` (what the model applies to a class token after the last block, e.g. its final
        norm). Default: as they are."""
        return c

    def check_model(self, model: nn.Module) -> None:
        """Run when wrapping, so that a kind that does not fit its model fails there, not at the first
        forward: the width, the blocks and a class token through :meth:`embed_new` and
        :meth:`task_features`. Raises ``ValueError`` saying which method gave what."""
        name, d = type(self).__name__, self.width(model)
        if not (isinstance(d, int) and d > 0):
            raise ValueError(f"{name}.width gave {d!r}, not a positive int")
        if not self.blocks(model):
            raise ValueError(f"{name}.blocks gave no blocks for {type(model).__name__}")
        with torch.no_grad():
            tok = self.class_token_init(model)
            if tuple(tok.shape) != (d,):
                raise ValueError(f"{name}.class_token_init gave shape {tuple(tok.shape)}, expected ({d},)")
            feats = self.task_features(model, self.embed_new(model, tok[None])[None])
        if tuple(feats.shape) != (1, 1, d):
            raise ValueError(f"{name}.embed_new then task_features gave shape {tuple(feats.shape)} for one "
                             f"class token, expected (1, 1, {d})")
