"""``learnable-memory inspect``: what a saved adapter holds, and how it was trained."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inspect", help="describe a saved adapter",
                              description="Print what an adapter holds: task, shapes, sizes, base fingerprint, "
                              "and how it was trained (its training.json).")
    p.add_argument("adapter", help="adapter folder or hf-hub:owner/repo[/subfolder]")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)
    return p


def _print_tree(value: dict, indent: int = 1) -> None:
    """Print a nested dict as indented ``key: value`` lines; short lists stay on one line."""
    pad = "  " * indent
    for k, v in value.items():
        if isinstance(v, dict) and v:
            print(f"{pad}{k}:")
            _print_tree(v, indent + 1)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            print(f"{pad}{k}:")
            for x in v:
                print(f"{pad}  - " + ", ".join(f"{a}={_short(b)}" for a, b in x.items()))
        else:
            print(f"{pad}{k}: {_short(v)}")


def _short(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        items = [_short(x) for x in v[:12]] + ([f"... ({len(v)} items)"] if len(v) > 12 else [])
        return "[" + ", ".join(items) + "]"
    if isinstance(v, dict):
        return "{}" if not v else ", ".join(f"{a}={_short(b)}" for a, b in v.items())
    return str(v)


def run(args: argparse.Namespace) -> int:
    """Print the adapter's summary and its ``training.json``."""
    from ..adapters.folder import inspect_adapter
    from .records import TRAINING_FILE, read_training_info, resolve_adapters

    folders = resolve_adapters([args.adapter])
    if len(folders) != 1:
        raise ValueError(f"{args.adapter} is a save_pretrained folder; inspect one of its adapters: "
                         f"{', '.join(str(f) for f in folders)}")
    info = inspect_adapter(folders[0])
    training = read_training_info(folders[0])
    if args.json:
        print(json.dumps(dict(info, training=training) if training else info, indent=2, default=str))
        return 0
    size = info.get("file_size")
    print(f"adapter {args.adapter}: task {info.get('task')!r}, {info.get('mode')}, {info.get('n_mem')} memory "
          f"tokens per block, {info.get('num_classes')} classes, {info.get('num_params', 0):,} parameters"
          + (f", {size / 1024:.1f} KiB on disk" if isinstance(size, int) else ""))
    _print_tree(info)
    if training:
        print(f"  training ({TRAINING_FILE}):")
        keep = {k: training[k] for k in ("data", "class_subset", "base", "extends", "settings", "total_steps",
                                          "val_accuracy", "resumed_from") if training.get(k) not in (None, [])}
        _print_tree(keep, 2)
    return 0
