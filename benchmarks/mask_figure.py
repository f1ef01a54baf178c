"""Draw the README's picture of Table 1 with learnable_memory.plot_attention_mask.

    .venv/bin/python benchmarks/mask_figure.py   # writes benchmarks/figures/attention_mask.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from learnable_memory import TaskConfig  # noqa: E402
from learnable_memory.plotting import plot_attention_mask  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "figures" / "attention_mask.png")
    args = parser.parse_args(argv)
    a, b = TaskConfig("A", 2, 10), TaskConfig("B", 2, 10)
    c_concat = TaskConfig("C", 1, 10)
    c_ext = TaskConfig("C", 1, 10, mode="extension", depends_on=["A", "B"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    plot_attention_mask([a, b, c_concat], num_patches=4, ax=axes[0])
    axes[0].set_title("concatenation (non_destructive)")
    plot_attention_mask([a, b, c_ext], num_patches=4, ax=axes[1])
    axes[1].set_title("extension (C extends A and B)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
