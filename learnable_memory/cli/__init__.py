"""The ``learnable-memory`` command line: train, eval, predict, inspect and demo.

    learnable-memory train --data digits --n-mem 5 --steps 300 --out adapters/digits
    learnable-memory eval adapters/digits adapters/fmnist
    learnable-memory predict shoe.png --adapter adapters/digits adapters/fmnist
    learnable-memory inspect adapters/digits
    learnable-memory demo

``train`` runs unchanged under ``accelerate launch`` (several processes or GPUs). Expected failures
(a bad path, an unknown model, an adapter made for another backbone) print one line,
``learnable-memory: error: ...``, and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..config import MODES
from ..train import DEFAULTS
from .base import TRAINING_FILE, add_model_options, create_base, read_training_info
from .evaluate import cmd_eval, cmd_predict
from .inspect import cmd_inspect
from .train import cmd_train

__all__ = ["PROG", "TRAINING_FILE", "build_parser", "create_base", "main", "read_training_info"]

PROG = "learnable-memory"


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(out=args.out, quick=args.quick, steps=args.steps, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog=PROG, parents=[debug], description=(
        "Fine-tune frozen timm Vision Transformers with learnable memory (Sandler et al., CVPR 2022) "
        "and serve many tasks in one forward pass."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", parents=[debug], help="fine-tune one memory adapter",
                       description="Fine-tune a memory adapter (memory, class token and head) on a frozen base. "
                       "Runs unchanged under `accelerate launch` (--batch-size is per process).")
    p.add_argument("--data", help="fashion-mnist, digits or an ImageFolder directory")
    p.add_argument("--class-subset", help="classes to train on: indices, ranges or names, e.g. 5-9 or Sandal,Bag")
    p.add_argument("--task", help="task name (default: from the data)")
    add_model_options(p)
    p.add_argument("--n-mem", type=int, help="memory tokens per block (default 5; 0 = head + class token)")
    p.add_argument("--mode", choices=MODES, help="attention regime (default non_destructive)")
    p.add_argument("--extend", nargs="+", metavar="ADAPTER", help="earlier adapters loaded frozen first "
                   "(what --mode extension attends to)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=int, help="passes over the training data (default 3)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate (default %(default)s)")
    p.add_argument("--memory-lr-scale", type=float, default=DEFAULTS["memory_lr_scale"],
                   help="the memory tokens' learning rate is --lr times this (default %(default)s)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=DEFAULTS["optimizer"],
                   help="default %(default)s (momentum 0.9)")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--warmup", type=float, default=DEFAULTS["warmup"],
                   help="warm-up steps, or fraction of the steps if < 1 (default %(default)s)")
    p.add_argument("--clip", type=float, default=DEFAULTS["clip"], help="max gradient norm (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="per process (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--max-train", type=int, help="use at most this many training images")
    p.add_argument("--val-fraction", type=float, help="validate on this fraction of the training images "
                   "(default: the test split)")
    p.add_argument("--no-val", action="store_true", help="skip per-epoch validation")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--out", help="adapter folder to write (default adapters/TASK)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--resume", metavar="ADAPTER", help="continue training a saved adapter (written back in place "
                   "unless --out is given)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", parents=[debug], help="accuracy and confusion matrix per task",
                       description="Accuracy and confusion matrix of every task of one or more adapters, "
                       "on each task's own data (from its training.json, or --data TASK=SOURCE).")
    p.add_argument("adapters", nargs="+", help="adapter folders")
    p.add_argument("--data", nargs="+", metavar="TASK=SOURCE", help="data per task; base=SOURCE evaluates the "
                   "base model too")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--limit", type=int, help="evaluate on a fixed random subset of at most this many images per task")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", parents=[debug], help="top-k labels of every task in one forward pass (JSON)",
                       description="Classify image files with the base model and every adapter in ONE forward "
                       "pass; prints JSON.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--adapter", nargs="+", required=True, help="adapter folders")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    add_model_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("inspect", parents=[debug], help="describe a saved adapter",
                       description="Print what an adapter holds: task, shapes, sizes, base fingerprint.")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", parents=[debug], help="the whole story in one command (offline, a few minutes)",
                       description="Fine-tune memory adapters for two new tasks on the shipped base, compare with "
                       "head-only, serve all tasks in one pass, print a table and write a figure.")
    p.add_argument("--out", default="demo_output", help="output directory (default %(default)s)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per run (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) to check the set-up")
    p.set_defaults(func=cmd_demo)
    return parser


#: Errors that come from bad input: reported in one line.
EXPECTED_ERRORS = (OSError, ValueError, TypeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``learnable-memory``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EXPECTED_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
