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


class VisionTowerBackbone(BackboneKind):
    """A VLM vision tower as timm builds it: an encoder (NHWC patch embedding, ``_pos_embed`` giving the
    tokens and the rotary table, blocks, an optional projector over the patch grid) and a classifier
    wrapping it (mean pooling, a final norm, a head). No prefix tokens. Subclasses name the classifier
    type, the projector and what the encoder applies after its blocks."""

    #: The classifier type; other registered types are the encoder itself.
    classifier: type

    def encoder(self, model: nn.Module) -> nn.Module:
        """The encoder of ``model`` (itself, or the classifier's ``encoder``)."""
        return model.encoder if isinstance(model, self.classifier) else model

    def projector(self, enc: nn.Module) -> nn.Module | None:
        """The VLM projector over the patch grid, or None."""
        return None

    def after_blocks(self, enc: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """What the encoder applies to every token after its blocks ``[B, T, D]``. Default: nothing."""
        return t

    def projected_token(self, projector: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """What the projector applies to one token ``[B, K, D]`` before it merges the grid. Default: nothing."""
        return t

    def width(self, model: nn.Module) -> int:
        return self.encoder(model).embed_dim

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(self.encoder(model).blocks)

    def check_input(self, model: nn.Module, images: object) -> None:
        """Raise ``ValueError`` for images the model can not take, saying how to fix them."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images [B, C, H, W], got {shape}")
        enc = self.encoder(model)
        if images.shape[1] != enc.in_chans:
            raise ValueError(f"images have {images.shape[1]} channels but the model takes {enc.in_chans}")
        ph, pw = enc.patch_embed.patch_size
        h, w = images.shape[-2:]
        if (h % ph or w % pw) and not enc.patch_embed.dynamic_img_pad:
            raise ValueError(f"images are {h}x{w}, not a multiple of the patch size {ph}x{pw}: resize or crop them")

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, PassExtras]:
        """``images`` ``[B, C, H, W]`` -> patch tokens ``[B, N, D]`` as the encoder's ``_pos_embed`` gives
        them, and its rotary table ``[N, 2 hd]``; ``family`` is the patch grid ``(h, w)``."""
        enc = self.encoder(model)
        x = enc.patch_embed(images)  # [B, h, w, D]
        grid = tuple(x.shape[1:3])
        x, rope = enc._pos_embed(x)
        return x, PassExtras(rope=rope, family=grid)

    def base_logits(self, model: nn.Module, x: torch.Tensor, extras: PassExtras) -> torch.Tensor:
        """Patch tokens after the blocks ``[B, N, D]`` -> the model's own output, from the patch grid."""
        enc = self.encoder(model)
        t = self.after_blocks(enc, x)
        grid = t.reshape(t.shape[0], *extras.family, t.shape[-1])  # [B, h, w, D], as forward_features
        proj = self.projector(enc)
        if isinstance(model, self.classifier):
            return model.forward_head(proj(grid) if proj is not None else grid)
        if proj is not None:
            return proj(grid)
        return grid.mean(dim=(1, 2)) if enc.global_pool == "avg" else grid

    def task_features(self, model: nn.Module, c: torch.Tensor) -> torch.Tensor:
        """New class tokens after the blocks ``[B, K, D]`` -> what the model applies to one token: the
        encoder's own after its blocks, then the projector's per-token part where the model projects,
        else the classifier's final norm."""
        enc = self.encoder(model)
        t = self.after_blocks(enc, c)
        proj = self.projector(enc)
        if proj is not None:
            return self.projected_token(proj, t)
        return model.norm(t) if isinstance(model, self.classifier) else t


@register_backbone(Qwen3VitClassifier, Qwen3VitEncoder)
class Qwen3VitBackbone(VisionTowerBackbone):
    """``Qwen3VitClassifier`` and ``Qwen3VitEncoder``: a learned position grid resampled to the input,
    rotary ``EvaBlock``s, the projector (``merger``) merging 2x2 patches."""

    classifier = Qwen3VitClassifier

    def projector(self, enc: nn.Module) -> nn.Module | None:
        return enc.merger

    def projected_token(self, projector: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """The projector's per-token norm (``merger.norm``)."""
        return projector.norm(t)

    def check_input(self, model: nn.Module, images: object) -> None:
        """As :meth:`VisionTowerBackbone.check_input`; with the projector, a patch grid it can merge."""
        super().check_input(model, images)
        enc = self.encoder(model)
        (ph, pw), k, (h, w) = enc.patch_embed.patch_size, enc.merge_size, images.shape[-2:]
        if enc.merger is not None and (h // ph % k or w // pw % k):
            raise ValueError(f"images are {h}x{w}, {h // ph}x{w // pw} patches, but the projector merges {k}x{k} "
                             f"patches: use a multiple of {k * ph}x{k * pw} pixels")

    def class_token_init(self, model: nn.Module) -> torch.Tensor:
        """``[D]``: the mean of the learned position-embedding grid (the model has no class token)."""
        return self.encoder(model).pos_embed[0].mean(0).detach().clone()
