"""The naive dense formulation of the paper, written independently of the package's forward.

All tokens and all memory run as ONE sequence through timm's own blocks, with the Table 1
mask from ``build_attention_mask`` as ``attn_mask``. Memory also makes queries and goes
through the MLP, and those outputs are discarded: each block gets fresh memory. The tests
hold every mode of ``MemoryViT`` to this; the inference benchmark times it.
"""

from __future__ import annotations

import torch

from learnable_memory import MemoryViT, build_attention_mask


def dense_forward_all(model: MemoryViT, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Same contract as ``MemoryViT.forward_all`` for timm ``VisionTransformer`` backbones."""
    base = model.base
    tasks = list(model.tasks.values())
    x = base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(images))))  # [B, N, D]
    b, n, _ = x.shape
    k = len(tasks)
    c = base.norm_pre(torch.stack([t.class_token for t in tasks])).expand(b, -1, -1)  # [B, K, D]
    prefix = base.num_prefix_tokens
    mask = build_attention_mask([t.config for t in tasks], num_patches=n - prefix, num_prefix_tokens=prefix)
    mask[n + k :, :] = True  # memory rows: computed and thrown away; avoid empty softmax rows
    mask = mask.to(images.device)
    for layer, blk in enumerate(base.blocks):
        mem = torch.cat([t.memory[layer] for t in tasks]).expand(b, -1, -1)  # [B, M, D]
        seq = blk(torch.cat([x, c, mem], dim=1), attn_mask=mask)
        x, c = seq[:, :n], seq[:, n : n + k]
    out = {}
    if not any(t.mode == "full" for t in tasks):
        out["base"] = base.forward_head(base.norm(x))
    feats = base.fc_norm(base.norm(c))
    for i, t in enumerate(tasks):
        out[t.name] = t.head(feats[:, i])
    return out
