"""Small random-weight timm ViTs covering the VisionTransformer variants the core supports."""

from __future__ import annotations

import pytest
import timm
import torch

# The tests run tiny models, for which one thread is fastest and least sensitive to a busy machine.
torch.set_num_threads(1)

IMG = 32

# name -> kwargs for timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
VIT_VARIANTS = {
    "cls": {},
    "cls_reg": {"reg_tokens": 4},
    "no_embed_class_layerscale": {"no_embed_class": True, "init_values": 0.5},
    "gap": {"class_token": False, "global_pool": "avg"},
    "map": {"class_token": False, "global_pool": "map"},
    "qk_norm_pre_norm": {"qk_norm": True, "pre_norm": True},
    "dynamic": {"dynamic_img_size": True},
}


def make_vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    """A depth-2 ViT-Tiny on 32x32 images (16 patches), random weights."""
    torch.manual_seed(seed)
    args = dict(pretrained=False, depth=2, img_size=IMG, patch_size=8, num_classes=7)
    args.update(kwargs)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def randomize(model, seed: int = 1, scale: float = 0.5) -> None:
    """Give every task large random parameters, so a wrong mask or path shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tasks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(123))
