"""``learnable-memory demo``: the paper's story in miniature on the shipped base (see :mod:`learnable_memory.demo`)."""

from __future__ import annotations

import argparse

from .options import non_negative_int, positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="the whole story in one command (offline, a few minutes)",
        description="Fine-tune memory adapters for two new tasks on the shipped base, compare with head-only, "
        "serve all tasks in one pass, print a table and write a figure.")
    p.add_argument("--out", default="demo_output", help="output directory (default %(default)s)")
    p.add_argument("--steps", type=positive_int, help="fine-tuning steps per run (default 300)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) to check the set-up")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run :func:`learnable_memory.demo.run_demo`."""
    from ..demo import run_demo

    run_demo(out=args.out, quick=args.quick, steps=args.steps, seed=args.seed)
    return 0
