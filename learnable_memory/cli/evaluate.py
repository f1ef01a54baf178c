"""``learnable-memory eval``: accuracy and confusion matrix of every task of one or more adapters, each on
its own data (from its ``training.json``, or ``--data TASK=SOURCE``) prepared with the preprocessing it was
trained with (:func:`~learnable_memory.pass_groups.output_preprocessing`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import add_model_options
from .options import add_adapter_options, positive_int

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="accuracy and confusion matrix per task",
        description="Accuracy and confusion matrix of every task of one or more adapters, on each task's own "
        "data (from its training.json, or --data TASK=SOURCE).")
    p.add_argument("adapters", nargs="+", help="adapter folders, save_pretrained folders or hf-hub:owner/repo")
    p.add_argument("--data", nargs="+", metavar="TASK=SOURCE", help="data per task; base=SOURCE evaluates the "
                   "base model too")
    p.add_argument("--split", choices=("train", "test", "val"), default="test",
                   help="val: the images each adapter was validated on while training (its held-out fraction of "
                   "the training images, rebuilt from training.json, or the test split); test falls back to it for "
                   "data without a test split (default %(default)s)")
    p.add_argument("--limit", type=positive_int,
                   help="evaluate on a fixed random subset of at most this many images per task")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_options(p)
    add_adapter_options(p)
    p.set_defaults(run=run)
    return p


def parse_data_map(items: Sequence[str] | None) -> dict[str, str]:
    """``["digits=digits", ...]`` -> ``{"digits": "digits", ...}``."""
    out = {}
    for item in items or []:
        task, sep, source = item.partition("=")
        if not sep or not task or not source:
            raise ValueError(f"--data takes TASK=SOURCE (e.g. digits=digits), got {item!r}")
        out[task] = source
    return out


def task_data(task: str, source: str | None, classes, num_classes: int, split: str, config: dict,
              limit: int | None, validation: dict | None = None) -> Dataset:
    """The ``split`` images of ``source`` for a task with ``num_classes`` outputs, prepared as ``config`` says
    (``validation``: how its training chose its validation images, from ``training.json``; see
    :func:`split_data`)."""
    from .. import data as D

    if source is None:
        raise ValueError(f"no data for task {task!r}: pass --data {task}=SOURCE")
    ds = D.subsample(split_data(task, source, split, config, classes, validation), limit)
    if len(ds.classes) != num_classes:
        raise ValueError(f"data {source!r} has {len(ds.classes)} classes but task {task!r} predicts {num_classes}")
    return ds


def _held_out(task: str, validation: dict | None) -> dict | None:
    """The recorded held-out split (fraction, seed, max_train), checked, or None."""
    if not isinstance(validation, dict) or validation.get("split") != "held_out":
        return None
    fraction, seed, limit = validation.get("fraction"), validation.get("seed"), validation.get("max_train")
    if not (isinstance(fraction, float) and 0 < fraction < 1 and isinstance(seed, int)
            and (limit is None or isinstance(limit, int))):
        raise ValueError(f"task {task!r}: the validation split in its training.json is malformed ({validation}); "
                         "fix it, or evaluate with --split test")
    return validation


def split_data(task: str, source: str, split: str, config: dict, classes, validation: dict | None) -> Dataset:
    """The images of ``split``: "val" rebuilds the held-out images a training run validated on (the same
    subsample and split of the training images, by its recorded fraction and seed), or is the test split
    it validated on; "test" of an image folder without a test split falls back to that held-out split."""
    from .. import data as D

    held = _held_out(task, validation)
    folder = split == "test" and held is not None and not D.is_builtin(source)
    if folder and D.image_folder_split(source, "test") is None:
        print(f"task {task!r}: {source} has no test split; evaluating on the validation images its training "
              "held out", file=sys.stderr)
        split = "val"
    if split == "val" and held is None:
        if not isinstance(validation, dict) or validation.get("split") != "test":
            raise ValueError(f"task {task!r} records no validation split (trained with --no-val, or by an older "
                             "version): evaluate it with --split test")
        split = "test"
    if split != "val":
        return D.load_dataset(source, split, config, classes=classes)
    train = D.load_dataset(source, "train", config, classes=classes)
    train = D.subsample(train, held["max_train"], seed=held["seed"])
    return D.holdout(train, held["fraction"], seed=held["seed"])[1]


def format_confusion(conf: torch.Tensor, names: Sequence[str]) -> str:
    """A confusion matrix (rows true, columns predicted) as aligned text."""
    labels = [str(n)[:10] for n in names]
    width = max(6, *(len(lbl) for lbl in labels), len(str(int(conf.max()))))
    cell = f"  {{:>{width}}}"  # two spaces before every column, so the longest labels never touch
    lines = [" " * width + "".join(cell.format(lbl) for lbl in labels) + "   <- predicted"]
    for lbl, row in zip(labels, conf.tolist(), strict=True):
        lines.append(f"{lbl:>{width}}" + "".join(cell.format(v) for v in row))
    return "\n".join(lines)


def print_results(results: dict, split: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({t: dict(accuracy=r["accuracy"], n=r["n"], classes=r["classes"],
                                  confusion=r["confusion"].tolist()) for t, r in results.items()}, indent=2))
        return
    for task, r in results.items():
        print(f"\n== {task}: accuracy {r['accuracy']:.4f} on {r['n']} {split} images")
        print(format_confusion(r["confusion"], r["classes"]))


def run(args: argparse.Namespace) -> int:
    """Load the adapters on their base, evaluate every task (and ``base=``) on its data, print."""
    from torch.utils.data import DataLoader

    from .. import data as D
    from ..pass_groups import output_preprocessing
    from ..train import evaluate
    from .base import make_accelerator
    from .records import base_for_adapters, load_named_adapters, read_training_info, resolve_adapters

    accelerator = make_accelerator()
    folders = resolve_adapters(args.adapters)
    base = base_for_adapters(args, folders)
    model = load_named_adapters(base, folders, check_fingerprint=not args.no_fingerprint_check)
    mapping = parse_data_map(args.data)
    unknown = sorted(set(mapping) - set(model.task_names) - {"base"})
    if unknown:
        raise ValueError(f"--data names unknown task(s) {unknown}; the tasks are {model.task_names} (and base)")
    infos = {name: read_training_info(folder) for name, folder in zip(model.task_names, folders, strict=True)}
    jobs = []  # (task, model to evaluate, dataset prepared with the task's own preprocessing)
    for task in model.task_names:
        cfg, info = model.tasks[task].config, infos[task]
        source = mapping.get(task) or info.get("data")
        ds = task_data(task, source, cfg.class_names or info.get("class_subset"), cfg.num_classes, args.split,
                       output_preprocessing(model, task), args.limit, info.get("validation"))
        jobs.append((task, model, ds))
    if "base" in mapping:
        ds = task_data("base", mapping["base"], D.label_names(base), base.num_classes, args.split,
                       output_preprocessing(model, "base"), args.limit)
        jobs.append(("base", base, ds))
    results = {}
    for task, net, ds in jobs:
        if net is model:
            model.set_task(task)
        loader = accelerator.prepare(DataLoader(ds, batch_size=args.batch_size))
        results[task] = dict(evaluate(net, loader, accelerator=accelerator), classes=ds.classes)
    accelerator.end_training()
    if accelerator.is_main_process:
        print_results(results, args.split, args.json)
    return 0
