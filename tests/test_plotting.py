"""The mask picture shows build_attention_mask, labelled in token order."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from learnable_memory import TaskConfig, build_attention_mask  # noqa: E402
from learnable_memory.plotting import mask_labels, plot_attention_mask  # noqa: E402


def test_picture_is_the_mask():
    tasks = [TaskConfig("a", 2, 3), TaskConfig("b", 1, 3, mode="extension", depends_on=["a"])]
    ax = plot_attention_mask(tasks, num_patches=3)
    shown = np.asarray(ax.images[0].get_array())
    assert np.array_equal(shown, build_attention_mask(tasks, num_patches=3).float().numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["CLS", "INP", "C:a", "C:b", "M:a", "M:b"]
    assert mask_labels(tasks, 3) == ["CLS", "INP", "INP", "INP", "C:a", "C:b", "M:a", "M:a", "M:b"]
