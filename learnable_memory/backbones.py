"""One adapter per timm model family: how tokens enter the blocks and leave them.

An adapter calls the model's own modules (``patch_embed``, ``_pos_embed``, ``norm_pre``,
``norm``, ``fc_norm``, ``forward_head``); it never changes the model.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class VitBackbone:
    """timm ``VisionTransformer``: class/register tokens, ``no_embed_class``, gap/map pooling,
    ``dynamic_img_size`` and ``set_input_size``."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def check_input(self, model: nn.Module, images: torch.Tensor) -> None:
        """Raise ``ValueError`` for images the model can not take, saying how to fix them."""
        if images.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        in_chans = getattr(model, "in_chans", images.shape[1])
        if images.shape[1] != in_chans:
            raise ValueError(f"images have {images.shape[1]} channels but the model takes {in_chans}")
        pe = model.patch_embed
        if getattr(pe, "strict_img_size", False) and pe.img_size is not None:
            size = tuple(images.shape[-2:])
            if size != tuple(pe.img_size):
                raise ValueError(
                    f"images are {size[0]}x{size[1]} but this model takes {pe.img_size[0]}x{pe.img_size[1]}: "
                    "resize them (timm.data.resolve_data_config(model=model.base) gives the model's "
                    "preprocessing), or build the backbone with dynamic_img_size=True, or call "
                    "base.set_input_size(img_size=...) before wrapping"
                )

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``images`` ``[B, C, H, W]`` -> original tokens ``[B, N, D]`` as they enter the blocks."""
        x = model._pos_embed(model.patch_embed(images))
        return model.norm_pre(model.patch_drop(x)), {}

    def embed_new(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """New class tokens ``[K, D]`` enter where the original tokens enter ``norm_pre``."""
        return model.norm_pre(tokens)

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
            return torch.zeros(d, device=model.patch_embed.proj.weight.device)
        start = 0 if model.no_embed_class else model.num_prefix_tokens
        return pos[0, start:].mean(0).detach().clone()

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return model.num_prefix_tokens

    def base_logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Original tokens after the blocks ``[B, N, D]`` -> the base model's own output."""
        return model.forward_head(model.norm(x))

    def task_features(self, model: nn.Module, c: torch.Tensor) -> torch.Tensor:
        """New class tokens after the blocks ``[B, K, D]`` -> features ``[B, K, D]`` (norm, fc_norm)."""
        return model.fc_norm(model.norm(c))


BACKBONES: dict[type, VitBackbone] = {VisionTransformer: VitBackbone()}


def backbone_for(model: nn.Module) -> VitBackbone:
    """The adapter for ``model``'s exact type, or ``TypeError`` naming the supported families."""
    adapter = BACKBONES.get(type(model))
    if adapter is None:
        supported = ", ".join(sorted(t.__name__ for t in BACKBONES))
        raise TypeError(
            f"unsupported model type {type(model).__name__}: learnable_memory wraps timm Vision Transformers "
            f"({supported}). Build one with timm.create_model('vit_...')."
        )
    return adapter
