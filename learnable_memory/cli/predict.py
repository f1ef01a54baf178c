"""``learnable-memory predict``: the top-k labels of the base model and every adapter's task for image
files, all tasks in ONE forward pass per batch; prints JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from .. import data as D
from .base import add_model_options
from .options import positive_int
from .records import add_adapter_options, base_for_adapters, load_named_adapters, resolve_adapters


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="top-k labels of every task in one forward pass (JSON)",
        description="Classify image files with the base model and every adapter in ONE forward pass; prints JSON.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--adapter", nargs="+", required=True,
                   help="adapter folders, save_pretrained folders or hf-hub:owner/repo")
    p.add_argument("--top-k", type=positive_int, default=3, help="labels per task and image (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default %(default)s)")
    add_model_options(p)
    add_adapter_options(p)
    p.set_defaults(run=run)
    return p


def check_image_paths(paths: Sequence[str]) -> None:
    """Every path is a file (checked before any model is built)."""
    for p in map(Path, paths):
        if p.is_dir():
            raise ValueError(f"image {p} is a directory: give the image files, e.g. {p / '*.png'}")
        if not p.is_file():
            raise FileNotFoundError(f"image {p} not found")


def read_image(path: str, transform: Callable, mode: str) -> torch.Tensor:
    """One image file, preprocessed for the model ``[C, H, W]``; a file PIL can not read is a one-line
    error naming it."""
    try:
        return transform(D.open_image(path, mode))
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large for PIL ({e}); shrink it first") from e
    except (OSError, SyntaxError, EOFError) as e:  # truncated, damaged or not an image
        raise ValueError(f"image {path} can not be read: {e}") from e


def top_k(logits: torch.Tensor, k: int, labels: Sequence[str] | None) -> list[list[dict]]:
    """Per image ``[B, C]`` -> its ``k`` most likely labels: ``{"label", "index", "prob"}``."""
    probs = logits.float().softmax(-1)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[{"label": labels[j] if labels else str(j), "index": j, "prob": round(p, 6)}
             for p, j in zip(p_row, i_row, strict=True)]
            for p_row, i_row in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def run(args: argparse.Namespace) -> int:
    """Check the paths, load the adapters on their base, classify batch by batch in one pass each, print."""
    check_image_paths(args.images)
    folders = resolve_adapters(args.adapter)
    base = base_for_adapters(args, folders)
    model = load_named_adapters(base, folders, check_fingerprint=not args.no_fingerprint_check)
    config = D.data_config(base)
    transform, mode = D.model_transform(config), D.pil_mode(config)
    names = {"base": D.label_names(base)}
    names.update({t: model.tasks[t].config.class_names for t in model.task_names})
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(args.images), args.batch_size):
            paths = args.images[start:start + args.batch_size]
            outputs = model.forward_all(torch.stack([read_image(p, transform, mode) for p in paths]))
            per_task = {task: top_k(logits, args.top_k, names.get(task)) for task, logits in outputs.items()}
            predictions += [{"image": str(p), "tasks": {t: rows[i] for t, rows in per_task.items()}}
                            for i, p in enumerate(paths)]
    print(json.dumps({"tasks": list(outputs), "predictions": predictions}, indent=2))
    return 0
