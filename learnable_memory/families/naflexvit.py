"""timm ``NaFlexVit``: its own embedding module, any image size, and variable-length patch batches.

Inputs, as ``NaFlexVit.forward`` takes them:

- Images ``[B, C, H, W]``: a ViT at any resolution (position embeddings are resampled to the
  patch grid). Blocks run without a mask, exactly as in the base model.
- A NaFlex patch dict (what timm's NaFlex loader yields): ``patches`` ``[B, N, P*P*C]`` (or
  ``[B, N, Ph, Pw, C]``), ``patch_coord`` ``[B, N, 2]`` (row, column), ``patch_valid`` ``[B, N]``
  and optionally ``attn_mask``. The base model's own padding mask (valid tokens only attend to
  valid tokens) is used, unchanged, for the original tokens; new class tokens attend only to the
  prefix tokens and the valid patches (an additive mask on the original-token columns, handed to
  the attention as ``PassExtras.score_bias``). The base output pools with ``patch_valid`` (the
  family's slot, ``PassExtras.family``) as the model does. A boolean ``attn_mask`` is turned
  into timm's additive form (0 where True, the dtype's lowest value where False) before use.
  Patch dicts need the linear patch embedding (timm's default); with ``embed_proj_type='conv'``
  they are refused, as in timm.

Blocks are timm's ``Block``/``Attention`` (see ``vit.py``) or, with rotary embeddings, gating,
SwiGLU or grouped-query attention, ``EvaBlock`` (see ``eva.py``); rotary tables (one per block for
RoPE-Mixed) reach them in the pass's extras and apply to the patch tokens only.

Prefix tokens carry no position embedding in NaFlexVit, so a new class token starts as the
class token; without one, as the mean patch position embedding of the model's reference grid.
The task feature is ``fc_norm(norm(c))`` as for ``VisionTransformer``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.models.naflexvit import NaFlexVit, create_attention_mask
from torch import nn

from ..context import PassExtras
from ..registry import register_backbone
from .vit import VitBackbone

NAFLEX_KEYS = ("patches", "patch_coord", "patch_valid")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as timm's NaFlex additive bias: a bool mask becomes 0 / lowest value."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


@register_backbone(NaFlexVit)
class NaFlexBackbone(VitBackbone):
    """timm ``NaFlexVit``: class/register tokens, learned/factorized/no position embeddings,
    rotary embeddings, token/avg/max/map pooling, images or NaFlex patch dicts. New class tokens
    enter, and task features leave, as in a ``VisionTransformer``."""

    def check_input(self, model: nn.Module, images: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` for input the model can not take, saying how to fix it."""
        if isinstance(images, Mapping):
            if not model.embeds.is_linear:
                raise ValueError(
                    "this NaFlexVit embeds patches with a convolution (embed_proj_type='conv'), which takes "
                    "images [B, C, H, W] only; NaFlex patch dicts need embed_proj_type='linear'"
                )
            missing = [k for k in NAFLEX_KEYS if images.get(k) is None]
            if missing:
                raise ValueError(
                    f"a NaFlex patch dict needs {', '.join(NAFLEX_KEYS)}; missing: {', '.join(missing)} "
                    "(timm's NaFlex data loader yields all three)"
                )
            b, n = images["patches"].shape[:2]
            if tuple(images["patch_coord"].shape) != (b, n, 2) or tuple(images["patch_valid"].shape) != (b, n):
                raise ValueError(
                    f"patches {tuple(images['patches'].shape)} need patch_coord [{b}, {n}, 2] and patch_valid "
                    f"[{b}, {n}], got {tuple(images['patch_coord'].shape)} and {tuple(images['patch_valid'].shape)}"
                )
            return
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(
                f"expected images [B, C, H, W] or a NaFlex patch dict ({', '.join(NAFLEX_KEYS)}), got {got}"
            )
        if images.shape[1] != model.in_chans:
            raise ValueError(f"images have {images.shape[1]} channels but the model takes {model.in_chans}")
        emb = model.embeds
        ph, pw = emb.patch_size
        h, w = images.shape[-2:]
        if emb.is_linear and not emb.dynamic_img_pad and (h % ph or w % pw):
            raise ValueError(
                f"images are {h}x{w}, not a multiple of the patch size {ph}x{pw}: resize or crop them, "
                "or build the backbone with dynamic_img_pad=True"
            )

    def embed(
        self, model: nn.Module, images: torch.Tensor | Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, PassExtras]:
        """Images or a patch dict -> original tokens ``[B, N, D]`` as they enter the blocks, and
        the rotary tables, padding masks and the head's ``patch_valid`` for the pass."""
        if isinstance(images, Mapping):
            patches, coord, valid = (images[k] for k in NAFLEX_KEYS)
            mask = images.get("attn_mask")
        else:
            patches, coord, valid, mask = images, None, None, None
        e = model._forward_embeds(patches, patch_coord=coord, patch_valid=valid, attn_mask=mask)
        x = e["patches"]
        rope, rope_mixed = e["rope_embeds"], e["rope_embeds"] is not None and model.rope_is_mixed
        score_bias = (None, None)
        if e["attn_mask"] is not None:
            keys = create_attention_mask(
                e["patch_valid"], num_prefix_tokens=model.num_prefix_tokens, symmetric=False, q_len=1, dtype=x.dtype
            )  # [B, 1, 1, N]: prefix tokens and valid patches
            score_bias = (_additive(e["attn_mask"], x.dtype), keys)
        return x, PassExtras(
            rope=None if rope_mixed else rope,
            block_rope=dict(zip(model.blocks, rope, strict=False)) if rope_mixed else None,  # a tensor or an iterator
            score_bias=score_bias,
            family=e["patch_valid"],  # [B, N - prefix] bool or None, for base_logits' pooling
        )

    def class_token_init(self, model: nn.Module) -> torch.Tensor:
        """``[D]``: the class token (NaFlexVit gives prefix tokens no position embedding), else the
        mean patch position embedding of the reference grid (zero without position embeddings)."""
        emb = model.embeds
        if emb.cls_token is not None:
            tok = emb.cls_token.reshape(model.embed_dim)
        elif emb.pos_embed is not None:  # [1, h, w, D]
            tok = emb.pos_embed.mean(dim=(0, 1, 2))
        elif emb.pos_embed_y is not None:  # factorized: [1, h, D] + [1, w, D]
            tok = emb.pos_embed_y.mean(dim=(0, 1)) + emb.pos_embed_x.mean(dim=(0, 1))
        else:
            tok = torch.zeros(model.embed_dim, device=emb.proj.weight.device)
        return tok.detach().clone()

    def base_logits(self, model: nn.Module, x: torch.Tensor, extras: PassExtras) -> torch.Tensor:
        """Original tokens after the blocks ``[B, N, D]`` -> the base model's own output (pooled over
        the valid patches of a patch dict)."""
        return model.forward_head(model.norm(x), patch_valid=extras.family)
