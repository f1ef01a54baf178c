"""``learnable-memory train``: fine-tune one memory adapter on a frozen base and save it with its
``training.json`` (data, base model spec, settings, validation split, history), from which ``eval`` and
``predict`` rebuild the base and the data, and ``training_state.pt`` (the optimizer state, the schedule
and data position, the random states), from which ``--resume`` continues exactly, with the recorded
settings. ``--save-every`` writes the same folder periodically; Ctrl-C or SIGTERM (or kill -9) then keeps
the last one.

This module is the parser, which imports no torch (so ``train --help`` starts fast); the run is
:mod:`.train_run`, what it trains (plan, output folder, data) :mod:`.train_plan`."""

from __future__ import annotations

import argparse

from ..config import MODES
from .base import add_model_options
from .options import (
    add_adapter_options,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    task_name,
)
from .sweep_axes import SWEEPABLE, sweep_axis
from .train_settings import EPOCHS, FIT_DEFAULTS, N_MEM, RECORDED


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="fine-tune one memory adapter",
        description="Fine-tune a memory adapter (memory, class token and head) on a frozen base. "
        "Runs unchanged under `accelerate launch` (--batch-size is per process).")
    p.add_argument("--data", help="fashion-mnist, digits or an ImageFolder directory")
    p.add_argument("--class-subset", help="classes to train on: indices, ranges or names, e.g. 5-9 or Sandal,Bag")
    p.add_argument("--task", type=task_name, help="task name (default: from the data)")
    add_model_options(p)
    p.add_argument("--save-base", metavar="DIR", help="write the base model to DIR (timm's local-dir format) and "
                   "record DIR as the adapter's base; needed for a --model with random weights")
    p.add_argument("--n-mem", type=non_negative_int, help=f"memory tokens per block (default {N_MEM}; "
                   "0 = head + class token)")
    p.add_argument("--mode", choices=MODES, help="attention regime (default non_destructive)")
    p.add_argument("--extend", nargs="+", metavar="ADAPTER", help="earlier adapters loaded frozen first "
                   "(what --mode extension attends to)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="optimizer steps")
    length.add_argument("--epochs", type=positive_int, help=f"passes over the training data (default {EPOCHS})")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {FIT_DEFAULTS['lr']})")
    p.add_argument("--memory-lr-scale", type=positive_float,
                   help="the memory tokens' learning rate is --lr times this "
                   f"(default {FIT_DEFAULTS['memory_lr_scale']})")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), help=f"default {FIT_DEFAULTS['optimizer']} (momentum 0.9)")
    p.add_argument("--weight-decay", type=non_negative_float, help=f"default {FIT_DEFAULTS['weight_decay']}")
    p.add_argument("--warmup", type=non_negative_float,
                   help=f"warm-up steps, or fraction of the steps if < 1 (default {FIT_DEFAULTS['warmup']})")
    p.add_argument("--clip", type=positive_float, help=f"max gradient norm (default {FIT_DEFAULTS['clip']})")
    p.add_argument("--batch-size", type=positive_int, help=f"per process (default {RECORDED['batch_size']})")
    p.add_argument("--seed", type=non_negative_int, help="default 0; also the seed of --max-train and the "
                   "validation split")
    p.add_argument("--init-seed", type=non_negative_int, help="the seed of the new task's initialisation (default: "
                   "--seed): the task starts as a --sweep configuration of seed=S does, the data order keeps --seed")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    p.add_argument("--max-train", type=positive_int, help="use at most this many training images")
    p.add_argument("--val-fraction", type=fraction, help="validate on this fraction of the training images "
                   "(default: the test split); recorded, so eval can rebuild the split")
    p.add_argument("--no-val", action="store_true", default=None, help="skip per-epoch validation")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data loader worker processes")
    p.add_argument("--out", help="adapter folder to write (default adapters/TASK; resuming: a new folder "
                   "ADAPTER-resumed beside the adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --save-base)")
    p.add_argument("--resume", metavar="ADAPTER", help="continue training a saved adapter with its recorded "
                   "settings (options given here override them), optimizer state, schedule and data position")
    p.add_argument("--init-std", type=positive_float, help="the new memory's initial standard deviation "
                   "(default 0.02)")
    p.add_argument("--sweep", action="append", type=sweep_axis, metavar="KEY=V1,V2",
                   help="train the grid of every --sweep in one pass per batch, one adapter per configuration under "
                   f"--out, with sweep.json/.csv/.png and the best copied to OUT/best; KEY: {', '.join(SWEEPABLE)} "
                   "(seed, or init-seed: --init-seed, the seed of the initialisation; the data order keeps --seed)")
    p.add_argument("--labels", metavar="FILE.csv", help="train an adapter per label column of FILE.csv (a 'path' "
                   "column, relative to the file, then a column per task; an empty cell is no label) in one pass "
                   "per batch, each under --out/COLUMN")
    p.add_argument("--tasks", nargs="+", metavar="COLUMN", help="with --labels: the columns to train (default all)")
    p.add_argument("--save-every", type=positive_int, metavar="STEPS", help="write the adapter (and what --resume "
                   "needs) to --out every STEPS steps; Ctrl-C or SIGTERM then keeps the last one")
    add_adapter_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Train as :func:`.train_run.run` does (imported here: it imports torch)."""
    from . import train_run

    return train_run.run(args)
