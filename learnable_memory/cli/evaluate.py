"""``learnable-memory eval`` (accuracy and confusion matrix per task) and ``predict`` (top-k labels of
every task in one forward pass)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import data as D
from ..model import load_adapters
from .base import base_for_adapters, make_accelerator, read_training_info


def _parse_data_map(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        task, sep, source = item.partition("=")
        if not sep or not task or not source:
            raise ValueError(f"--data takes TASK=SOURCE (e.g. digits=digits), got {item!r}")
        out[task] = source
    return out


def _task_data(task: str, mapping: dict, info: dict, class_names, num_classes: int, split: str,
               config: dict, limit: int | None = None):
    source = mapping.get(task) or info.get("data")
    if source is None:
        raise ValueError(f"no data for task {task!r}: pass --data {task}=SOURCE")
    classes = class_names or info.get("class_subset")
    ds = D.subsample(D.load_dataset(source, split, config, classes=classes), limit)
    if len(ds.classes) != num_classes:
        raise ValueError(f"data {source!r} has {len(ds.classes)} classes but task {task!r} predicts {num_classes}")
    return ds


def _format_confusion(conf: torch.Tensor, names: Sequence[str]) -> str:
    labels = [str(n)[:10] for n in names]
    width = max(6, *(len(lbl) for lbl in labels), len(str(int(conf.max()))) + 1)
    lines = [" " * (width + 2) + "".join(f"{lbl:>{width}}" for lbl in labels) + "   <- predicted"]
    for lbl, row in zip(labels, conf.tolist(), strict=True):
        lines.append(f"{lbl:>{width}}  " + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ..adapters.folder import CONFIG_NAME, adapter_folders
    from ..train import evaluate

    accelerator = make_accelerator()
    base = base_for_adapters(args, args.adapters)
    model = load_adapters(base, args.adapters)
    mapping = _parse_data_map(args.data)
    config = D.data_config(base)
    infos = {}
    for path in args.adapters:
        for folder in adapter_folders(path):
            info = read_training_info(folder)
            infos[info.get("task") or json.loads((folder / CONFIG_NAME).read_text())["task"]] = info
    unknown = sorted(set(mapping) - set(model.task_names) - {"base"})
    if unknown:
        raise ValueError(f"--data names unknown task(s) {unknown}; the tasks are {model.task_names} (and base)")
    jobs = [(t, model.tasks[t].config) for t in model.task_names]
    results = {}
    for task, cfg in jobs:
        ds = _task_data(task, mapping, infos.get(task, {}), cfg.class_names, cfg.num_classes, args.split, config,
                        args.limit)
        loader = accelerator.prepare(DataLoader(ds, batch_size=args.batch_size))
        results[task] = dict(evaluate(model.set_task(task), loader, accelerator=accelerator), classes=ds.classes)
    if "base" in mapping:
        names = D.label_names(base)
        ds = _task_data("base", mapping, {}, names, base.num_classes, args.split, config, args.limit)
        loader = accelerator.prepare(DataLoader(ds, batch_size=args.batch_size))
        results["base"] = dict(evaluate(base, loader, accelerator=accelerator), classes=ds.classes)
    accelerator.end_training()
    if not accelerator.is_main_process:
        return 0
    if args.json:
        print(json.dumps({t: dict(accuracy=r["accuracy"], n=r["n"], classes=r["classes"],
                                  confusion=r["confusion"].tolist()) for t, r in results.items()}, indent=2))
        return 0
    for task, r in results.items():
        print(f"\n== {task}: accuracy {r['accuracy']:.4f} on {r['n']} {args.split} images")
        print(_format_confusion(r["confusion"], r["classes"]))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    base = base_for_adapters(args, args.adapter)
    model = load_adapters(base, args.adapter)
    config = D.data_config(base)
    transform, mode = D.model_transform(config), D.pil_mode(config)
    images = []
    for p in args.images:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image {p} not found")
        images.append(transform(D.open_image(p, mode)))
    names = {"base": D.label_names(base)}
    names.update({t: model.tasks[t].config.class_names for t in model.task_names})
    predictions = [{"image": str(p), "tasks": {}} for p in args.images]
    with torch.inference_mode():
        for start in range(0, len(images), args.batch_size):
            outputs = model.forward_all(torch.stack(images[start:start + args.batch_size]))
            for task, logits in outputs.items():
                probs = logits.float().softmax(-1)
                top = probs.topk(min(args.top_k, probs.shape[-1]), dim=-1)
                for i, (p_row, i_row) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
                    labels = names.get(task)
                    predictions[start + i]["tasks"][task] = [
                        {"label": labels[j] if labels else str(j), "index": j, "prob": round(p, 6)}
                        for p, j in zip(p_row, i_row, strict=True)]
    print(json.dumps({"tasks": list(outputs), "predictions": predictions}, indent=2))
    return 0
