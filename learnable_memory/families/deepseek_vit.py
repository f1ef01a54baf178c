"""timm ``deepseek_vit``: the DeepSeek VLM vision encoder (``DeepseekVitEncoder``) and its classifier
(``DeepseekVitClassifier``: the encoder, then mean pooling, a final norm and a linear head).

What these models are, and how memory and new class tokens meet them:

- ``DeepseekVitBlock``: pre-norm (RMSNorm) without LayerScale, ``AttentionRope`` (see ``eva.py``)
  with 2D rotary embeddings on every patch token (there are no prefix tokens) and a bias-free SwiGLU
  MLP. Memory goes through ``norm1`` and the attention's key/value projection; new class tokens and
  memory are never rotated.
- No class token and no learned position embedding (the positions are all in the rotary table): a
  new task's class token starts as zeros, an empty token.
- After the blocks the encoder applies its ``norm`` to every token; the base output is then pooled
  from the patch grid (mean, or the projector, the "aligner", which unshuffles 3x3 patches). A
  task's feature is what the model applies to one token: the encoder's ``norm``, then the
  classifier's final norm when it pools the patches (the aligner's unshuffle needs a grid, so a
  projecting model gives the encoder's ``norm`` alone).
"""

from __future__ import annotations

import torch
from timm.models.deepseek_vit import DeepseekVitBlock, DeepseekVitClassifier, DeepseekVitEncoder
from torch import nn

from ..blocks import PreNormBlock
from ..registry import register_backbone, register_block
from .qwen3_vit import VisionTowerBackbone


@register_block(DeepseekVitBlock)
class PreNormNoScaleBlock(PreNormBlock):
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``: timm's ``Block`` shape without LayerScale."""

    @staticmethod
    def after_attention(blk: nn.Module, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual and MLP after attention, ``t`` and ``a`` ``[B, T, D]``."""
        t = t + blk.drop_path1(a)
        return t + blk.drop_path2(blk.mlp(blk.norm2(t)))


@register_backbone(DeepseekVitClassifier, DeepseekVitEncoder)
class DeepseekVitBackbone(VisionTowerBackbone):
    """``DeepseekVitClassifier`` and ``DeepseekVitEncoder``: rotary blocks, the encoder's ``norm`` after
    them, the projector (``aligner``) unshuffling 3x3 patches (zero-padding the grid)."""

    classifier = DeepseekVitClassifier

    def projector(self, enc: nn.Module) -> nn.Module | None:
        return enc.aligner

    def after_blocks(self, enc: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """The encoder's ``norm`` (RMSNorm) on every token."""
        return enc.norm(t)

    def class_token_init(self, model: nn.Module) -> torch.Tensor:
        """``[D]``: zeros (the model has neither a class token nor a learned position embedding)."""
        enc = self.encoder(model)
        return torch.zeros(enc.embed_dim, device=enc.patch_embed.proj.weight.device)
