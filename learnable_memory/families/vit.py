"""timm ``VisionTransformer`` (also DeiT's ``VisionTransformerDistilled`` and the hybrid ViTs,
whose ``HybridEmbed`` is just another patch embedding): how tokens enter and leave the blocks,
the ``Attention`` and ``DiffAttention`` kinds, and the ``Block``, ``ResPostBlock`` and
``ParallelThingsBlock`` kinds. The fused parallel blocks are in ``vit_parallel.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.layers import Attention, DiffAttention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, ParallelThingsBlock, ResPostBlock, VisionTransformer
from torch import nn

from ..attention import add_bias, score_biases
from ..blocks import PostNormBlock, PreNormBlock, kind_of, run_attention
from ..context import PassContext, PassExtras
from ..differential import attend_split_differential, dense_differential
from ..kinds import AttentionKind, BackboneKind, BlockKind
from ..registry import register_attention, register_backbone, register_block
from ..typing import Pair

register_block(Block)(PreNormBlock)
register_block(ResPostBlock)(PostNormBlock)


@register_attention(Attention)
class QKVAttention(AttentionKind):
    """timm's ``Attention``: one ``qkv`` linear, optional q/k norm, scale norm and gate."""

    def qkv(self, attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``h`` ``[B, T, D]`` -> q, k, v ``[B, H, T, hd]`` after q/k norm."""
        b, t, _ = h.shape
        q, k, v = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def out(self, attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Heads ``o`` ``[B, H, T, hd]`` (and the attention input ``h``) -> ``[B, T, D]``."""
        b, _, t, _ = o.shape
        o = attn.norm(o.transpose(1, 2).reshape(b, t, attn.attn_dim))
        if attn.gate is not None:
            o = o * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(o))


@register_attention(DiffAttention)
class DiffAttentionKind(AttentionKind):
    """timm's ``DiffAttention`` (Differential Transformer): ``2H`` query/key heads of size
    ``hd``, ``H`` value heads of size ``2hd``, ``softmax(q1 k1) v - lambda * softmax(q2 k2) v``,
    then ``sub_norm``, ``(1 - lambda_init)``, scale norm and ``proj``. The new class tokens get
    the Table 1 mask on both softmaxes."""

    def qkv(self, attn: nn.Module, h: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``h`` ``[B, T, D]`` -> q, k ``[B, 2H, T, hd]`` (after q/k norm), v ``[B, H, T, 2hd]``."""
        b, t, _ = h.shape
        q, k, v = attn.qkv(h).chunk(3, dim=2)
        q = q.reshape(b, t, 2 * attn.num_heads, attn.head_dim).transpose(1, 2)
        k = k.reshape(b, t, 2 * attn.num_heads, attn.head_dim).transpose(1, 2)
        v = v.reshape(b, t, attn.num_heads, 2 * attn.head_dim).transpose(1, 2)
        return attn.q_norm(q), attn.k_norm(k), v

    def out(self, attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Heads ``o`` ``[B, H, T, 2hd]`` -> ``[B, T, D]``."""
        b, _, t, _ = o.shape
        o = (attn.sub_norm(o) * (1 - attn.lambda_init)).transpose(1, 2).reshape(b, t, -1)
        return attn.proj_drop(attn.proj(attn.norm(o)))

    def attend(self, attn: nn.Module, h_x: torch.Tensor, h_c: torch.Tensor, kv: Pair, ctx: PassContext) -> Pair:
        """Both softmaxes of every head with the Table 1 rows
        (:func:`~learnable_memory.differential.attend_split_differential`)."""
        biases = score_biases(ctx, self.position_bias(attn, ctx, h_x.shape[1]))
        with torch.set_grad_enabled(ctx.orig_grad):
            q_x, k_x, v_x = self.qkv(attn, h_x)
            lam = attn._compute_lambda().type_as(q_x)
        q_c, k_c, v_c = self.qkv(attn, h_c)
        o_x, o_c = attend_split_differential(q_x, k_x, v_x, q_c, k_c, v_c, kv, lam, ctx, attn.scale, attn.fused_attn,
                                             biases)
        with torch.set_grad_enabled(ctx.orig_grad):
            a_x = self.out(attn, o_x, h_x)
        return a_x, self.out(attn, o_c, h_c)

    def reference(self, attn: nn.Module, h_x: torch.Tensor, h_c: torch.Tensor, h_m: torch.Tensor,
                  ctx: PassContext) -> torch.Tensor:
        """One new class token, both softmaxes unfused (:func:`~learnable_memory.differential.dense_differential`)."""
        q, keys, values = self.reference_heads(attn, h_x, h_c, h_m, ctx)
        bias = add_bias(ctx.extras.score_bias[1], self.reference_bias(attn, ctx, h_x.shape[1]))
        lam = attn._compute_lambda().type_as(q)
        return self.out(attn, dense_differential(q, keys, values, lam, attn.scale, bias), h_c)


@register_block(ParallelThingsBlock)
class ParallelBranchesBlock(BlockKind):
    """timm ``ParallelThingsBlock``: ``x + sum_i branch_i(x)`` over parallel attention branches
    (each ``norm``, ``attn``, ``ls``, ``drop_path``), then the same over parallel MLP branches.
    The block's memory goes through every branch's own norm and key/value projection."""

    packable = True

    def attentions(self, blk: nn.Module) -> list[nn.Module]:
        return [branch.attn for branch in blk.attns]

    def memory_kv(self, blk: nn.Module, mem: torch.Tensor, kinds: Mapping[nn.Module, AttentionKind]
                  ) -> tuple[Pair, ...]:
        """``mem`` ``[M, D]`` through every branch's own norm and key/value projections."""
        return tuple(kinds[b.attn].memory_kv(b.attn, b.norm(mem)) for b in blk.attns)

    def forward(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor, kv: tuple[Pair, ...],
                ctx: PassContext) -> Pair:
        """As :meth:`~learnable_memory.blocks.PreNormBlock.forward`."""
        outs_x, outs_c = [], []
        for branch, branch_kv in zip(blk.attns, kv, strict=True):
            with torch.set_grad_enabled(ctx.orig_grad):
                h_x = branch.norm(x)
            a_x, a_c = run_attention(branch.attn, h_x, branch.norm(c), branch_kv, ctx)
            with torch.set_grad_enabled(ctx.orig_grad):
                outs_x.append(branch.drop_path(branch.ls(a_x)))
            outs_c.append(branch.drop_path(branch.ls(a_c)))
        with torch.set_grad_enabled(ctx.orig_grad):
            x = self._mlps(blk, x + torch.stack(outs_x).sum(dim=0))
        return x, self._mlps(blk, c + torch.stack(outs_c).sum(dim=0))

    def reference(self, blk: nn.Module, x: torch.Tensor, c: torch.Tensor, mem: torch.Tensor,
                  ctx: PassContext) -> torch.Tensor:
        """One new class token: every branch's norm and its attention kind's dense reference, summed,
        then the MLP branches."""
        outs = [b.drop_path(b.ls(kind_of(b.attn, ctx).reference(b.attn, b.norm(x), b.norm(c), b.norm(mem), ctx)))
                for b in blk.attns]
        return self._mlps(blk, c + torch.stack(outs).sum(dim=0))

    @staticmethod
    def _mlps(blk: nn.Module, t: torch.Tensor) -> torch.Tensor:
        return t + torch.stack([ffn(t) for ffn in blk.ffns]).sum(dim=0)


@register_backbone(VisionTransformer, VisionTransformerDistilled)
class VitBackbone(BackboneKind):
    """timm ``VisionTransformer``: class/register tokens, ``no_embed_class``, token/avg/map
    pooling, ``dynamic_img_size``, ``set_input_size``, ``PatchEmbed`` or ``HybridEmbed``.
    DeiT's ``VisionTransformerDistilled`` adds a distillation token (a second prefix token) and
    head; its base output is its own ``forward_head`` (the mean of both heads). New class tokens
    enter through ``norm_pre``, as the original tokens do, and leave through ``norm`` and ``fc_norm``."""

    def width(self, model: nn.Module) -> int:
        return model.embed_dim

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return model.num_prefix_tokens

    def embed_new(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """New class tokens ``[K, D]`` -> through ``norm_pre``, where the original tokens enter it."""
        return model.norm_pre(tokens)

    def base_logits(self, model: nn.Module, x: torch.Tensor, extras: PassExtras) -> torch.Tensor:
        """Original tokens after the blocks ``[B, N, D]`` -> the base model's own output."""
        return model.forward_head(model.norm(x))

    def task_features(self, model: nn.Module, c: torch.Tensor) -> torch.Tensor:
        """New class tokens after the blocks ``[B, K, D]`` -> ``fc_norm(norm(c))``, what the model applies
        to its class token (attention pooling and averaging are over the original tokens)."""
        return model.fc_norm(model.norm(c))

    def check_input(self, model: nn.Module, images: torch.Tensor) -> None:
        """Raise ``ValueError`` for images the model can not take, saying how to fix them."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images [B, C, H, W], got {shape}")
        in_chans = getattr(model, "in_chans", images.shape[1])
        if images.shape[1] != in_chans:
            raise ValueError(f"images have {images.shape[1]} channels but the model takes {in_chans}")
        pe = model.patch_embed
        size = tuple(images.shape[-2:])
        if getattr(pe, "strict_img_size", False) and pe.img_size is not None:
            if size != tuple(pe.img_size):
                raise ValueError(
                    f"images are {size[0]}x{size[1]} but this model takes {pe.img_size[0]}x{pe.img_size[1]}: "
                    "resize them (timm.data.resolve_data_config(model=model.base) gives the model's "
                    "preprocessing), or build the backbone with dynamic_img_size=True, or call "
                    "base.set_input_size(img_size=...) before wrapping"
                )
        elif not hasattr(pe, "backbone") and not getattr(pe, "dynamic_img_pad", False):  # a PatchEmbed
            ph, pw = pe.patch_size
            if size[0] % ph or size[1] % pw:
                raise ValueError(
                    f"images are {size[0]}x{size[1]}, not a multiple of the patch size {ph}x{pw}: resize or "
                    "crop them, or build the backbone with dynamic_img_pad=True"
                )

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, PassExtras]:
        """``images`` ``[B, C, H, W]`` -> original tokens ``[B, N, D]`` as they enter the blocks."""
        x = model._pos_embed(model.patch_embed(images))
        return model.norm_pre(model.patch_drop(x)), PassExtras()

    def class_token_init(self, model: nn.Module) -> torch.Tensor:
        """``[D]``: the original class token with its position embedding (none under
        ``no_embed_class``). Without a class token: the mean patch position embedding
        (zero without position embeddings), i.e. an average "empty" token."""
        d = model.embed_dim
        pos = model.pos_embed
        if model.cls_token is not None:
            tok = model.cls_token.reshape(d)
            if pos is not None and not model.no_embed_class:
                tok = tok + pos[0, 0]
            return tok.detach().clone()
        if pos is None:
            return torch.zeros(d, device=next(model.parameters()).device)
        start = 0 if model.no_embed_class else model.num_prefix_tokens
        return pos[0, start:].mean(0).detach().clone()
