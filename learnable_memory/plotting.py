"""Pictures of what the package does: the Table 1 mask (matplotlib, imported lazily)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import TaskConfig
from .mask import build_attention_mask


def mask_labels(tasks: Sequence[TaskConfig], num_patches: int, num_prefix_tokens: int = 1) -> list[str]:
    """Axis labels in the token order of :func:`build_attention_mask`: CLS, INP, C_i, M_i."""
    labels = ["CLS"] * num_prefix_tokens + ["INP"] * num_patches
    labels += [f"C:{t.name}" for t in tasks]
    for t in tasks:
        labels += [f"M:{t.name}"] * t.n_mem
    return labels


def plot_attention_mask(
    tasks: Sequence[TaskConfig], num_patches: int = 4, num_prefix_tokens: int = 1, ax: Any = None
) -> Any:
    """Draw Table 1 for ``tasks`` (rows: queries, columns: keys; dark = attends).

    Returns the matplotlib ``Axes``. Each run of equal labels gets one tick.
    """
    import matplotlib.pyplot as plt

    mask = build_attention_mask(tasks, num_patches=num_patches, num_prefix_tokens=num_prefix_tokens)
    labels = mask_labels(tasks, num_patches, num_prefix_tokens)
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.imshow(mask.to(torch.float32).numpy(), cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")
    ticks, names = [], []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            ticks.append((start + i - 1) / 2)
            names.append(labels[start])
            start = i
    ax.set_xticks(ticks, names, rotation=90, fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    for edge in range(1, len(labels)):
        if labels[edge] != labels[edge - 1]:
            ax.axhline(edge - 0.5, color="0.7", lw=0.5)
            ax.axvline(edge - 0.5, color="0.7", lw=0.5)
    ax.set_xlabel("keys")
    ax.set_ylabel("queries")
    return ax
