"""The baselines learnable memory is compared with, built on the same frozen timm backbone."""

from __future__ import annotations

import copy

import torch
from torch import nn


class HeadOnly(nn.Module):
    """"Head only": a new linear head on the frozen base model's own pre-logits features.

    The backbone runs under ``no_grad`` and stays in eval mode; only ``head`` trains.
    """

    def __init__(self, base: nn.Module, num_classes: int):
        super().__init__()
        self.base = base.requires_grad_(False).eval()
        self.head = nn.Linear(base.num_features, num_classes)

    def train(self, mode: bool = True) -> HeadOnly:
        super().train(mode)
        self.base.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> logits ``[B, num_classes]``."""
        with torch.no_grad():
            feats = self.base.forward_head(self.base.forward_features(x), pre_logits=True)  # [B, D]
        return self.head(feats)


def full_finetune(base: nn.Module, num_classes: int, copy_base: bool = True) -> nn.Module:
    """"Full fine-tuning": every weight of (a deep copy of) ``base`` trains, with a new head.

    ``copy_base=False`` changes ``base`` itself (saves memory where it is thrown away anyway).
    """
    model = copy.deepcopy(base) if copy_base else base
    model.reset_classifier(num_classes)
    return model.requires_grad_(True)


def lora(base: nn.Module, num_classes: int, r: int = 8, alpha: int | None = None, copy_base: bool = True) -> nn.Module:
    """peft LoRA of rank ``r`` (``lora_alpha`` default ``2 r``) on the attention ``qkv`` projections
    of (a deep copy of) ``base``, with a new trainable head (peft's ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base) if copy_base else base
    model.reset_classifier(num_classes)
    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=["qkv"], modules_to_save=["head"])
    return get_peft_model(model, config)
