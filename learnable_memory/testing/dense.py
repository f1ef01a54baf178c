"""The naive dense formulation of the paper, written independently of the package's forward.

Every token and all memory run as ONE sequence ``[original ; new class tokens ; memory]`` through
the backbone's own timm blocks, with Table 1 (:func:`~learnable_memory.build_attention_mask`) as the
attention mask. Memory also makes queries and goes through the MLP; those outputs are thrown away
and each block gets fresh memory. The model's forward must agree with it in every mode; the
inference benchmark times it against the one-pass forward.

Shapes: B batch, N original tokens (prefix + patches), K tasks, M memory tokens of all tasks,
T = N + K + M, D width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..mask import build_attention_mask
from ..model import MemoryViT
from ..typing import Tensor


def unrotated_rows(rope: Tensor | None, extra: int) -> Tensor | None:
    """A rotary table ``[..., P, 2 hd]`` (sin ; cos) with ``extra`` identity rows (sin 0, cos 1)
    appended: the tokens after the patches (new class tokens, memory) stay unrotated, as prefix
    tokens do."""
    if rope is None:
        return None
    shape = list(rope.shape)
    shape[-2], half = extra, shape[-1] // 2
    ident = torch.cat([rope.new_zeros(*shape[:-1], half), rope.new_ones(*shape[:-1], half)], dim=-1)
    return torch.cat([rope, ident], dim=-2)


def new_class_tokens(model: MemoryViT, batch: int) -> Tensor:
    """Every task's class token as it enters the first block (through ``norm_pre``), ``[B, K, D]``."""
    tokens = torch.stack([model.tasks[n].class_token for n in model.task_names])  # [K, D]
    return model.base.norm_pre(tokens).expand(batch, -1, -1)


def dense_sequence(
    model: MemoryViT,
    x: Tensor,
    c: Tensor,
    ropes: Sequence[Tensor | None],
    head: Callable[[Tensor], Tensor],
    key_valid: Tensor | None = None,
    extend: Callable[[Tensor, int], Tensor] = unrotated_rows,
) -> dict[str, Tensor]:
    """``[x ; c ; memory]`` through the backbone's blocks with the Table 1 mask.

    Args:
        model: The ``MemoryViT`` whose backbone and tasks to run.
        x: ``[B, N, D]`` original tokens as they enter the first block.
        c: ``[B, K, D]`` new class tokens, likewise (:func:`new_class_tokens`).
        ropes: One rotary table (or None) per block, for the blocks' ``rope`` argument.
        head: Original tokens after the blocks ``[B, N, D]`` -> the base model's output.
        key_valid: Optional ``[B, N]`` bool, the original tokens any query may see (padding).
        extend: ``(rope, extra) -> rope`` for the ``extra`` tokens after the patches.

    Returns:
        As ``MemoryViT.forward_all``: ``"base"`` (unless a task is in full mode) and each task's logits.
    """
    base = model.base
    tasks = [model.tasks[n] for n in model.task_names]
    b, n, _ = x.shape
    k = len(tasks)
    prefix = base.num_prefix_tokens
    mask = build_attention_mask([t.config for t in tasks], num_patches=n - prefix, num_prefix_tokens=prefix)
    mask[n + k :, :] = True  # memory rows: computed and thrown away; avoid empty softmax rows
    mask = mask.to(x.device)
    if key_valid is not None:
        keys = torch.cat([key_valid.bool(), key_valid.new_ones(b, mask.shape[0] - n, dtype=torch.bool)], dim=1)
        mask = mask & keys[:, None, None, :]  # [B, 1, T, T]
    extra = mask.shape[-1] - n
    for layer, blk in enumerate(base.blocks):
        mem = torch.cat([t.memory[layer] for t in tasks]).expand(b, -1, -1)  # [B, M, D]
        seq = torch.cat([x, c, mem], dim=1)
        if ropes[layer] is None:
            seq = blk(seq, attn_mask=mask)
        else:
            seq = blk(seq, rope=extend(ropes[layer], extra), attn_mask=mask)
        x, c = seq[:, :n], seq[:, n : n + k]
    return dense_outputs(model, x, c, head)


def dense_outputs(model: MemoryViT, x: Tensor, c: Tensor, head: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Original tokens ``x`` ``[B, N, D]`` and new class tokens ``c`` ``[B, K, D]`` after the last
    block -> the ``forward_all`` dict: ``head(x)`` as ``"base"`` (unless a task is in full mode), and
    each task's head on its class token after the final ``norm`` and ``fc_norm``."""
    base = model.base
    tasks = [model.tasks[n] for n in model.task_names]
    out = {}
    if not any(t.mode == "full" for t in tasks):
        out["base"] = head(x)
    feats = base.fc_norm(base.norm(c))
    for i, t in enumerate(tasks):
        out[t.name] = t.head(feats[:, i])
    return out


def dense_forward_all(model: MemoryViT, images: Tensor) -> dict[str, Tensor]:
    """The dense reference for timm ``VisionTransformer`` backbones (DeiT and hybrids included):
    ``images`` ``[B, C, H, W]`` -> the same dict as ``model.forward_all(images)``."""
    base = model.base
    x = base.norm_pre(base.patch_drop(base._pos_embed(base.patch_embed(images))))  # [B, N, D]
    return dense_sequence(model, x, new_class_tokens(model, x.shape[0]), [None] * len(base.blocks),
                          lambda t: base.forward_head(base.norm(t)))
