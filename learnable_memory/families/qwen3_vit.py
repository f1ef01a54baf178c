"""timm ``qwen3_vit``: the Qwen3-VL vision encoder (``Qwen3VitEncoder``) and its classifier
(``Qwen3VitClassifier``, the encoder, then mean pooling, a final norm and a linear head).

What these models are, and how memory and new class tokens meet them:

- The blocks are timm's ``EvaBlock`` with ``AttentionRope`` (see ``eva.py``): 2D rotary embeddings
  on every patch token (there are no prefix tokens). New class tokens and memory are never rotated:
  they have no position in the image. The rotary table reaches the blocks in ``PassExtras.rope``.
- There is no class token: the base model pools its patch tokens (mean, or the VLM projector,
  which merges 2x2 patches). A new task's class token starts as the mean of the learned
  position-embedding grid, an average "empty" patch, as for ``VisionTransformer`` models without
  a class token.
- A task's feature is what the model applies to one token after the last block: the classifier's
  final norm (an affine-free LayerNorm) when it pools the patches; the projector's per-token norm
  (``merger.norm``) when the model projects (``encoder_pool='merge'``, or the encoder's default
  ``global_pool='merge'``), since the projector's 2x2 merge needs a grid; nothing for the encoder
  pooled by a mean or not at all.
- The base output is the model's own, pooled from the patch grid (``PassExtras.family`` carries its
  height and width).
"""

from __future__ import annotations

import torch
from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder
from torch import nn

from ..context import PassExtras
from ..kinds import BackboneKind
from ..registry import register_backbone


def encoder_of(model: nn.Module) -> nn.Module:
    """The ``Qwen3VitEncoder`` of ``model`` (itself, or the classifier's ``encoder``)."""
    return model.encoder if isinstance(model, Qwen3VitClassifier) else model


@register_backbone(Qwen3VitClassifier, Qwen3VitEncoder)
class Qwen3VitBackbone(BackboneKind):
    """``Qwen3VitClassifier`` and ``Qwen3VitEncoder``: NHWC patch embedding, a learned position grid
    resampled to the input, rotary blocks, no prefix tokens."""

    def width(self, model: nn.Module) -> int:
        return encoder_of(model).embed_dim

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(encoder_of(model).blocks)

    def check_input(self, model: nn.Module, images: object) -> None:
        """Raise ``ValueError`` for images the model can not take, saying how to fix them."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images [B, C, H, W], got {shape}")
        enc = encoder_of(model)
        if images.shape[1] != enc.in_chans:
            raise ValueError(f"images have {images.shape[1]} channels but the model takes {enc.in_chans}")
        ph, pw = enc.patch_embed.patch_size
        h, w = images.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(f"images are {h}x{w}, not a multiple of the patch size {ph}x{pw}: resize or crop them")
        k = enc.merge_size
        if enc.merger is not None and (h // ph % k or w // pw % k):
            raise ValueError(f"images are {h}x{w}, {h // ph}x{w // pw} patches, but the projector merges {k}x{k} "
                             f"patches: use a multiple of {k * ph}x{k * pw} pixels")

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, PassExtras]:
        """``images`` ``[B, C, H, W]`` -> patch tokens ``[B, N, D]`` with their position embedding, and
        the rotary table ``[N, 2 hd]``; ``family`` is the patch grid ``(h, w)``."""
        enc = encoder_of(model)
        x = enc.patch_embed(images)  # [B, h, w, D]
        grid = tuple(x.shape[1:3])
        x, rope = enc._pos_embed(x)
        return x, PassExtras(rope=rope, family=grid)

    def class_token_init(self, model: nn.Module) -> torch.Tensor:
        """``[D]``: the mean of the learned position-embedding grid (the model has no class token)."""
        return encoder_of(model).pos_embed[0].mean(0).detach().clone()

    def base_logits(self, model: nn.Module, x: torch.Tensor, extras: PassExtras) -> torch.Tensor:
        """Patch tokens after the blocks ``[B, N, D]`` -> the model's own output, from the patch grid."""
        enc = encoder_of(model)
        grid = x.reshape(x.shape[0], *extras.family, x.shape[-1])  # [B, h, w, D], as forward_features
        if isinstance(model, Qwen3VitClassifier):
            return model.forward_head(enc.merger(grid) if enc.merger is not None else grid)
        if enc.merger is not None:
            return enc.merger(grid)
        return grid.mean(dim=(1, 2)) if enc.global_pool == "avg" else grid

    def task_features(self, model: nn.Module, c: torch.Tensor) -> torch.Tensor:
        """New class tokens after the blocks ``[B, K, D]`` -> the projector's per-token norm where the
        model projects, else the classifier's final norm (the encoder: as they are)."""
        enc = encoder_of(model)
        if enc.merger is not None:
            return enc.merger.norm(c)
        return model.norm(c) if isinstance(model, Qwen3VitClassifier) else c
