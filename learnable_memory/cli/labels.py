"""``train --labels FILE.csv``: one adapter per label column (a task per attribute of the same images),
trained in ONE pass per batch; an empty cell leaves that image out of that task."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from .. import data as D
from ..config import TaskConfig
from ..model import MemoryViT
from .sweep import init_seed, torch_rng_after


def check_labels_args(args: argparse.Namespace) -> None:
    """What a labels run can not be combined with, as one-line errors."""
    for option, given in (("--sweep", args.sweep), ("--resume", args.resume), ("--extend", args.extend),
                          ("--task", args.task), ("--class-subset", args.class_subset), ("--data", args.data)):
        if given:
            raise ValueError(f"--labels trains a task per column of {args.labels}: drop {option}")
    if args.mode == "full":
        raise ValueError("--labels trains its tasks in one pass; full-mode tasks can not share one")


def label_data(args: argparse.Namespace, config: dict) -> tuple[D.LabelTable, object, object | None, dict | None]:
    """The table, its training and validation images (``--val-fraction``, default 10%; none with
    ``--no-val``), and the validation record of ``training.json``."""
    table = D.LabelTable(args.labels, config, args.tasks)
    images = D.subsample(table, args.max_train, seed=args.seed)
    if args.no_val:
        return table, images, None, None
    fraction = args.val_fraction or 0.1
    train, val = D.holdout(images, fraction, seed=args.seed)
    return table, train, val, dict(split="held_out", fraction=fraction, seed=args.seed, max_train=args.max_train)


def labels_model(args: argparse.Namespace, base, table: D.LabelTable, make_base: Callable) -> MemoryViT:
    """A trainable task per column, each initialised as ``train --seed`` initialises its task."""
    seed_rng = torch_rng_after(make_base)
    model = MemoryViT(base)
    for task in table.tasks:
        seed_rng(init_seed(args))
        model.add_task(TaskConfig(task, args.n_mem, len(table.classes[task]), mode=args.mode or "non_destructive",
                                  init_std=args.init_std, class_names=table.classes[task]))
    for t in model.tasks.values():
        t.requires_grad_(True)
    return model


def save_labels_run(model: MemoryViT, out: Path, table: D.LabelTable, result, save: Callable,
                    record: Callable) -> None:
    """One adapter folder per task under ``out``, then a line per task."""
    for task in table.tasks:
        r = result.tasks[task]
        save(model, Path(out) / task, task, record(task, r), r.state.of_task(task))
        best = f"best validation accuracy {r.best_metric:.4f} (step {r.best_step})" if r.best_metric is not None else ""
        print(f"{task}: {len(table.classes[task])} classes; {best or 'no validation'}; saved {Path(out) / task}")
