"""The paper's accuracy table in miniature, on real images.

Base model: a small timm ViT shipped with the package (``learnable_memory.data.load_demo_base``), chosen
with ``--base``: ``fmnist`` (the default), pretrained on Fashion-MNIST classes 0-4, or ``glyphs``, the same
architecture pretrained on 1,188 rendered characters (``learnable_memory.glyphs``); or any timm ViT given with
``--model`` (``--pretrained`` for its hub weights, ``--checkpoint FILE`` for local ones; images are resized to
its input by its own timm preprocessing). Downstream tasks:

- ``fmnist_5_9``: Fashion-MNIST classes 5-9 (30,000 training images, 5,000 test);
- ``digits``: scikit-learn's 8x8 digits, upsampled to 28x28 (1,200 training, 597 test);
- ``fmnist_10``: all 10 Fashion-MNIST classes (60,000 training, 10,000 test);
- ``glyphs_near``: 60 Cyrillic letters, a script related to the glyph base's Latin and Greek (12,000
  training images, 6,000 test);
- ``glyphs_far``: the 27 Hebrew letters, a script family the glyph base has not seen (5,400 training,
  2,700 test).

Methods, all trained by ``learnable_memory.train.fit`` with the same step budget, batch 128, SGD with
momentum 0.9, gradient clipping at 1, 5% linear warm-up and cosine decay:

- ``full_ft``: a copy of the base, every parameter trainable, new head;
- ``head_only``: a linear probe on the frozen base's features;
- ``head_cls``: head + class token (a memory task with ``n_mem=0``);
- ``nd_m{1,5,10,20}`` / ``full_m{1,5,10,20}``: memory in non-destructive / full mode;
- ``lora_r4``: peft LoRA r=4 on ``qkv`` (plus a new head).

Learning rates are tuned: each method and task tries the 4 settings of its grid (``LR_GRID``; for the
memory methods, 2 learning rates x 2 scales of the memory tokens' own rate, ``fit(memory_lr_scale=)``),
and up to ``MAX_EXTRA`` more beyond an edge of the grid that came out best. Tuning uses seed 0, trains on
90% of the training set (a quarter at most, to keep at least ``VAL_MIN`` images for scoring on small
tasks) and scores on the rest; the best setting is then used for every seed, which trains on the same
images and is scored on the test set. The settings of a non-destructive method (``head_cls``, ``nd_m*``)
train in one pass: the grid's settings are tasks of one ``MemoryViT``, trained by one multi-task ``fit``
(one ``forward_all`` per batch, each task with its own learning rates), each built and seeded as its own
run would be, so each ends where that run would; the extra settings beyond an edge run alone. The run
reports the time this saved: the one-pass training time against as many separate runs, each as long as the
method's own seed-0 run (``tuning_time`` in the JSON). ``--sequential-tuning`` runs every setting alone.
``--fixed-lr`` skips tuning and uses ``DEFAULT_LR``: SGD 0.6 for
the memory, class-token and head methods (``learnable_memory.train.DEFAULTS``), 0.01 for full
fine-tuning and 0.1 for LoRA.

After training, every non-destructive adapter of a seed (all tasks, all m) is added to ONE
``MemoryViT``; its single ``forward_all`` pass must give each task the same test accuracy (and logits)
as the task's own model, and the base model's own output unchanged.

Resuming: every training run (a tuning setting or a seed of a task and method) is one grid cell, written to
its own JSON file under ``--cells`` (default ``<out>/accuracy_cells``), in a folder named after the base, the
steps, the batch and the image limit; the non-destructive adapters are saved beside their cell. A cell whose
file is there is read, not run again, so an interrupted grid continues where it stopped, a larger grid reuses
a smaller one's cells, and re-running a finished command rebuilds its table and plot in seconds. ``--fresh``
runs every cell again.

Settings:

    python benchmarks/accuracy.py                 # default setting (DEFAULT): 6 methods x 2 tasks, 1 seed,
                                                  # 200 steps, tuned: 10.5 min on 2 CPU cores
    python benchmarks/accuracy.py --full --steps 300  # whole grid: 12 methods x 3 tasks x 3 seeds, tuned
                                                  # (74 min on 2 CPU cores; RESULTS.md)
    python benchmarks/accuracy.py --full          # the same with 1000 steps (for a GPU)
    python benchmarks/accuracy.py --quick         # smoke test: 3 steps on a few hundred images
    python benchmarks/accuracy.py --full --model vit_base_patch32_224.augreg_in21k --pretrained --workers 8
                                                  # the paper's backbone (GPU, weights in the HF cache)
    python benchmarks/accuracy.py --base glyphs --full --steps 300 --threads 1 --out benchmarks/out/glyphs \
        --methods head_only head_cls nd_m5 nd_m20 full_m5 full_m20 lora_r4 full_ft
                                                  # the broad base: 8 methods x 4 tasks x 3 seeds (RESULTS.md)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import common
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from learnable_memory import MemoryViT, load_adapters, wrap_model
from learnable_memory.baselines import HeadOnly, full_finetune, lora
from learnable_memory.cli.base import add_model_options, base_spec, create_base
from learnable_memory.data import DEMO_BASE_DIR, DEMO_BASES, data_config, load_dataset, subsample
from learnable_memory.train import count_trainable, evaluate, evaluate_tasks, fit

TASKS = {"fmnist_5_9": ("fashion-mnist", "5-9"), "digits": ("digits", None), "fmnist_10": ("fashion-mnist", None),
         "glyphs_near": ("glyphs-near", None), "glyphs_far": ("glyphs-far", None)}
#: The tasks of ``--full`` for each shipped base (the glyph base's own classes are not a task).
FULL_TASKS = {"fmnist": ["fmnist_5_9", "digits", "fmnist_10"],
              "glyphs": ["glyphs_near", "glyphs_far", "fmnist_10", "digits"]}
MEMORY_SIZES = (1, 5, 10, 20)
#: Validation images held out of a task's training set: 10%, but at least this many (up to a quarter), so
#: that tuning on a small task (digits: 1,200 training images) is not decided by a handful of images.
VAL_MIN = 300
#: Images with at most this many values are preprocessed once into tensors (else loaded lazily).
MATERIALIZE_MAX = 64 * 64 * 3
EVAL_BATCH = 512
METHODS = (["full_ft", "head_only", "head_cls"] + [f"nd_m{m}" for m in MEMORY_SIZES]
           + [f"full_m{m}" for m in MEMORY_SIZES] + ["lora_r4"])
#: Tuning grids: (learning rate, memory learning-rate scale) pairs per method; the scale only
#: matters for methods with memory tokens (``learnable_memory.train.parameter_groups``).
LR_GRID = {"full_ft": [(0.01, 1.0), (0.03, 1.0), (0.1, 1.0), (0.3, 1.0)],
           "lora_r4": [(0.03, 1.0), (0.1, 1.0), (0.3, 1.0), (1.0, 1.0)],
           "head_only": [(0.1, 1.0), (0.3, 1.0), (1.0, 1.0), (3.0, 1.0)],
           "head_cls": [(0.1, 1.0), (0.3, 1.0), (1.0, 1.0), (3.0, 1.0)]}
LR_GRID_MEMORY = [(0.2, 1.0), (0.6, 1.0), (0.2, 10.0), (0.6, 10.0)]
#: While the best learning rate is the largest or smallest tried (at its memory scale), tuning also tries
#: the next one beyond it (x3 or /3), at most this many times, so the optimum is not an edge of the grid.
MAX_EXTRA = 2
#: What every run's ``fit`` shares besides its learning rates.
FIT = dict(optimizer="sgd", momentum=0.9, warmup=0.05, clip=1.0, progress=False)
DEFAULT_LR = {"full_ft": (0.01, 1.0), "lora_r4": (0.1, 1.0)}
DEFAULT_LR_OTHER = (0.6, 1.0)
#: The default setting: what a run without --full runs.
DEFAULT = dict(steps=200, seeds=[0], tasks=["fmnist_5_9", "digits"],
             methods=["full_ft", "head_only", "head_cls", "nd_m5", "full_m5", "lora_r4"])
FULL = dict(steps=1000, seeds=[0, 1, 2], tasks=FULL_TASKS["fmnist"], methods=METHODS)


def lr_grid(method: str) -> list[tuple[float, float]]:
    return LR_GRID.get(method, LR_GRID_MEMORY)


def default_lr(method: str) -> tuple[float, float]:
    return DEFAULT_LR.get(method, DEFAULT_LR_OTHER)


def tune_lr(score: Callable[[tuple[float, float]], float], grid: list[tuple[float, float]],
            max_extra: int = MAX_EXTRA) -> tuple[tuple[float, float], dict[tuple[float, float], float]]:
    """The best ``(lr, memory scale)`` by ``score``: the grid, extended while its best rate is an edge.

    Returns the best setting (the first of equals, in the order tried) and every score.
    """
    scores = {lr: score(lr) for lr in grid}
    for _ in range(max_extra):
        best = max(scores, key=scores.get)
        rates = sorted(lr for lr, scale in scores if scale == best[1])
        if best[0] == rates[-1]:
            nxt = (round(best[0] * 3, 6), best[1])
        elif best[0] == rates[0]:
            nxt = (round(best[0] / 3, 6), best[1])
        else:
            break
        scores[nxt] = score(nxt)
    return max(scores, key=scores.get), scores


def lr_name(lr: tuple[float, float]) -> str:
    """``"lr 0.6"``, or ``"lr 0.6 x10"`` when the memory learning rate is scaled."""
    return f"lr {lr[0]:g}" + (f" x{lr[1]:g}" if lr[1] != 1.0 else "")


# ----- data -----
def materialize(ds, limit: int | None = None, seed: int = 0) -> TensorDataset:
    """Preprocess a dataset once into tensors ``[N, C, H, W]`` and labels ``[N]`` (optionally a fixed subset)."""
    idx = np.arange(len(ds))
    if limit is not None and limit < len(ds):
        idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:limit])
    xs, ys = zip(*(ds[int(i)] for i in idx), strict=True)
    return TensorDataset(torch.stack(xs), torch.tensor(ys, dtype=torch.long))


def split_tensors(source: str, split: str, classes: str | None, cfg: dict, limit: int | None,
                  cache: dict) -> TensorDataset:
    """Preprocessed tensors of a task's split. All of a source is preprocessed once; a class range
    ``"a-b"`` is then picked out of it and relabelled ``0..`` in order, as ``load_dataset`` would."""
    key = (source, split)
    if key not in cache:
        cache[key] = materialize(load_dataset(source, split, cfg), limit)
    x, y = cache[key].tensors
    if classes is None:
        return TensorDataset(x, y)
    lo, hi = (int(v) for v in classes.split("-"))
    keep = (y >= lo) & (y <= hi)
    return TensorDataset(x[keep], y[keep] - lo)


def load_task(task: str, cfg: dict, limit: int | None, cache: dict) -> dict[str, Dataset | int]:
    """Train (90%), validation (10%) and test data of ``task``, and its class count.

    Small inputs (up to ``MATERIALIZE_MAX`` values per image, e.g. the demo base's 28x28) are preprocessed
    once into tensors; larger ones (a 224 px model) are loaded and transformed lazily, image by image.
    """
    source, classes = TASKS[task]
    names = load_dataset(source, "test", cfg, classes=classes).classes
    if math.prod(cfg["input_size"]) <= MATERIALIZE_MAX:
        train = split_tensors(source, "train", classes, cfg, limit, cache)
        test = split_tensors(source, "test", classes, cfg, limit, cache)
    else:
        train, test = (subsample(load_dataset(source, split, cfg, classes=classes), limit)
                       for split in ("train", "test"))
    order = np.random.default_rng(0).permutation(len(train))
    n_val = max(1, len(train) // 10, min(VAL_MIN, len(train) // 4))
    return {"train": Subset(train, order[n_val:].tolist()), "val": Subset(train, order[:n_val].tolist()),
            "test": test, "num_classes": len(names)}


# ----- methods -----
def build(method: str, base: nn.Module, num_classes: int, name: str) -> nn.Module:
    """A trainable model of ``method`` on ``base`` (``base`` itself is only frozen, never changed)."""
    if method == "full_ft":
        return full_finetune(base, num_classes)
    if method == "head_only":
        return HeadOnly(base, num_classes)
    if method == "head_cls":
        return wrap_model(base, n_mem=0, num_classes=num_classes, task=name)
    if method.startswith(("nd_m", "full_m")):
        mode, m = method.split("_m")
        return wrap_model(base, n_mem=int(m), num_classes=num_classes, task=name,
                          mode="non_destructive" if mode == "nd" else "full")
    if method == "lora_r4":
        return lora(base, num_classes, r=4)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def train_loader(data: dict, batch: int, seed: int, workers: int = 0) -> DataLoader:
    """The training batches of a run of ``seed``: shuffled by ``seed``, full batches only."""
    return DataLoader(data["train"], batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      drop_last=True, num_workers=workers)


def train_one(method: str, base: nn.Module, data: dict, lr: tuple[float, float], seed: int, steps: int,
              batch: int, eval_on: str, name: str, workers: int = 0) -> tuple[nn.Module, dict]:
    """Train ``method`` with ``lr = (learning rate, memory learning-rate scale)``; score it on ``data[eval_on]``."""
    torch.manual_seed(seed)
    model = build(method, base, data["num_classes"], name)
    start = time.perf_counter()
    fit(model, train_loader(data, batch, seed, workers), steps=steps, lr=lr[0], memory_lr_scale=lr[1], **FIT, seed=seed)
    seconds = time.perf_counter() - start
    res = evaluate(model, DataLoader(data[eval_on], batch_size=EVAL_BATCH, num_workers=workers))
    return model, {"accuracy": res["accuracy"], "seconds": seconds, "trainable_params": count_trainable(model)}


# ----- grid cells: one file per training run, so a grid resumes -----
def cells_folder(root: Path, spec: dict, steps: int, batch: int, limit: int | None) -> Path:
    """The folder of one setting's cells, ``<base>_s<steps>_b<batch>[_n<limit>]_<hash>``: a base folder is
    known by its weights file's hash (so its cells survive a move of the repository), other bases by their
    spec."""
    model, folder = spec.get("model"), None
    if model is None and not spec.get("checkpoint"):
        folder = DEMO_BASE_DIR
    elif model is not None and Path(model).is_dir():
        folder = Path(model)
    if folder is not None:
        name, ident = folder.name, hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    else:
        name, ident = re.sub(r"[^\w.-]+", "_", str(model)), json.dumps(spec, sort_keys=True)
    key = hashlib.sha256(json.dumps([ident, steps, batch, limit, VAL_MIN]).encode()).hexdigest()[:10]
    return root / f"{name}_s{steps}_b{batch}{f'_n{limit}' if limit else ''}_{key}"


def cell_path(cells: Path, task: str, method: str, lr: tuple[float, float], seed: int, eval_on: str) -> Path:
    return cells / task / method / f"{eval_on}_seed{seed}_lr{lr[0]:g}_x{lr[1]:g}.json"


def run_cell(cells: Path, task: str, method: str, lr: tuple[float, float], seed: int, eval_on: str, *,
             base: nn.Module, data: dict, steps: int, batch: int, workers: int = 0, fresh: bool = False) -> dict:
    """Train ``method`` on ``task`` once and score it on ``eval_on`` ("val" or "test"), or read the cell's file
    when an earlier run wrote it. Non-destructive adapters scored on test are saved beside the file."""
    path = cell_path(cells, task, method, lr, seed, eval_on)
    if path.is_file() and not fresh:
        return json.loads(path.read_text()) | {"cached": True}
    model, r = train_one(method, base, data, lr, seed, steps, batch, eval_on, f"{task}_{method}", workers)
    r.update(task=task, method=method, seed=seed, lr=lr[0], memory_lr_scale=lr[1], eval_on=eval_on)
    if eval_on == "test" and isinstance(model, MemoryViT) and model.tasks[model.active_task].config.mode != "full":
        r["adapter"] = str(model.save_adapter(path.with_suffix("")).relative_to(cells))
    common.write_json(path, r)
    return r


# ----- one-pass tuning: the settings of a method trained as tasks of one model -----
def one_pass_method(method: str) -> bool:
    """Whether the settings of ``method`` can train in one pass: non-destructive tasks (memory, class token)."""
    return method == "head_cls" or method.startswith("nd_m")


def tune_in_one_pass(cells: Path, task: str, method: str, grid: list[tuple[float, float]], seed: int, *,
                     base: nn.Module, data: dict, steps: int, batch: int, workers: int = 0,
                     fresh: bool = False) -> list[tuple[float, float]]:
    """Train the settings of ``grid`` whose validation cell is missing as tasks of ONE ``MemoryViT``: one
    ``forward_all`` per batch, each task with its own learning rates (``fit(settings=)``), each built and
    seeded as :func:`train_one` builds it alone, so each ends where its own run would. Writes their cells
    (with the one pass's training time); returns the settings trained."""
    todo = [lr for lr in grid if fresh or not cell_path(cells, task, method, lr, seed, "val").is_file()]
    if len(todo) < 2:
        return []
    names = [f"{task}_{method}_{i}" for i in range(len(todo))]
    model = MemoryViT(base)
    for name in names:
        torch.manual_seed(seed)
        model.add_task(build(method, base, data["num_classes"], name).tasks[name])
    for t in model.tasks.values():
        t.requires_grad_(True)
    start = time.perf_counter()
    fit(model, train_loader(data, batch, seed, workers), steps=steps, **FIT, seed=seed,
        settings={n: {"lr": lr[0], "memory_lr_scale": lr[1]} for n, lr in zip(names, todo, strict=True)})
    seconds = time.perf_counter() - start
    val = evaluate_tasks(model, DataLoader(data["val"], batch_size=EVAL_BATCH, num_workers=workers), names)
    for name, lr in zip(names, todo, strict=True):
        r = {"accuracy": val[name]["accuracy"], "seconds": seconds, "one_pass": len(todo),
             "trainable_params": sum(p.numel() for p in model.tasks[name].parameters()), "task": task,
             "method": method, "seed": seed, "lr": lr[0], "memory_lr_scale": lr[1], "eval_on": "val"}
        common.write_json(cell_path(cells, task, method, lr, seed, "val"), r)
    return todo


def tuning_time(cells: Path, task: str, method: str, tried: list[tuple[float, float]], seed: int,
                alone_seconds: float) -> dict | None:
    """What tuning ``method`` in one pass saved: the one-pass training time of its settings (read from their
    cells) against that many separate runs, each as long as the method's own run of ``seed`` on the test
    split (the same steps on the same images); None when no setting was trained in one pass."""
    passes = {}
    for lr in tried:
        c = json.loads(cell_path(cells, task, method, lr, seed, "val").read_text())
        if c.get("one_pass"):
            passes[(c["seconds"], c["one_pass"])] = c["one_pass"]
    if not passes:
        return None
    one_pass_s, settings = sum(s for s, _ in passes), sum(passes.values())
    return {"settings": settings, "passes": len(passes), "one_pass_s": one_pass_s,
            "separate_s": settings * alone_seconds, "saved_s": settings * alone_seconds - one_pass_s}


# ----- concatenation -----
@torch.no_grad()
def check_concatenation(base: nn.Module, adapters: dict[str, tuple[nn.Module, str, float]],
                        datas: dict[str, dict], workers: int = 0) -> dict:
    """Merge every non-destructive adapter into one model; compare each task's accuracy and logits."""
    merged = MemoryViT(base)
    for model, _, _ in adapters.values():
        merged.add_task(model.tasks[model.active_task])
    merged.eval()
    stats = {name: {"correct": 0, "same": 0, "max_diff": 0.0} for name in adapters}
    base_diff = 0.0
    for task in dict.fromkeys(task for _, task, _ in adapters.values()):  # one merged pass per test batch
        mine = {name: model for name, (model, t, _) in adapters.items() if t == task}
        for xb, yb in DataLoader(datas[task]["test"], batch_size=EVAL_BATCH, num_workers=workers):
            out = merged.forward_all(xb)
            base_diff = max(base_diff, float((out["base"] - base(xb)).abs().max()))
            for name, model in mine.items():
                alone, st = model(xb), stats[name]
                st["correct"] += int((out[name].argmax(-1) == yb).sum())
                st["same"] += int((out[name].argmax(-1) == alone.argmax(-1)).sum())
                st["max_diff"] = max(st["max_diff"], float((out[name] - alone).abs().max()))
    rows = []
    for name, (_, task, acc_alone) in adapters.items():
        n, st = len(datas[task]["test"]), stats[name]
        acc = st["correct"] / n
        # unchanged: every test prediction is the same, so the accuracy is too (up to float32 rounding of
        # torchmetrics' value, hence the half-an-image tolerance)
        rows.append({"adapter": name, "task": task, "accuracy_alone": acc_alone, "accuracy_merged": acc,
                     "same_predictions": st["same"] / n, "max_logit_diff": st["max_diff"],
                     "unchanged": st["same"] == n and abs(acc - acc_alone) < 0.5 / n})
    return {"tasks_in_model": len(adapters), "adapters": rows, "base_max_logit_diff": base_diff,
            "all_unchanged": all(r["unchanged"] for r in rows)}


def plot(results: dict, tasks: list[str], methods: list[str], path: Path) -> None:
    """Per task: test accuracy against m for both memory modes (mean ± std), the other methods as lines."""
    fig, axes = common.new_figure(len(tasks), width=5.0, height=4.0)
    baselines = {"head_only": ("head only", "C7", ":"), "head_cls": ("head + class token", "C7", "--"),
                 "lora_r4": ("LoRA r=4", "C2", "-."), "full_ft": ("full fine-tuning", "C3", "-")}
    for ax, task in zip(axes, tasks, strict=True):
        r = results[task]
        for prefix, label, color in (("nd_m", "memory, non-destructive", "C0"), ("full_m", "memory, full", "C1")):
            ms = [m for m in MEMORY_SIZES if f"{prefix}{m}" in methods]
            if ms:
                ax.errorbar(ms, [r[f"{prefix}{m}"]["mean"] for m in ms], yerr=[r[f"{prefix}{m}"]["std"] for m in ms],
                            marker="o", capsize=3, color=color, label=label)
        for method, (label, color, style) in baselines.items():
            if method in methods:
                ax.axhline(r[method]["mean"], color=color, linestyle=style, label=label)
        ax.set_xscale("log")
        ax.set_xticks(list(MEMORY_SIZES), [str(m) for m in MEMORY_SIZES])
        ax.set_xlabel("memory tokens per block (m)")
        ax.set_ylabel("test accuracy")
        ax.set_title(task)
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


def markdown(results: dict, lrs: dict, tasks: list[str], methods: list[str]) -> str:
    """The results as RESULTS.md's two tables: accuracy mean ± std (learning rate), and share of the gap closed."""
    head = "| method | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks)
    acc = [f"| {m} | " + " | ".join(f"{results[t][m]['mean']:.3f} ± {results[t][m]['std']:.3f} "
                                    f"({lr_name(lrs[t][m]).removeprefix('lr ')})" for t in tasks) + " |"
           for m in methods]
    closed = {m: [results[t][m].get("gap_closed") for t in tasks] for m in methods if m not in ("head_only", "full_ft")}
    gap = [f"| {m} | " + " | ".join("-" if g is None else f"{g:.2f}" for g in gs) + " |" for m, gs in closed.items()]
    return "\n".join([head, *acc, "", head, *gap])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 3 steps, 2 methods, a few hundred images")
    p.add_argument("--full", action="store_true", help="the whole grid, 3 seeds, 1000 steps (for a GPU)")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--sequential-tuning", action="store_true", help="tune with one run per setting, not the "
                   "settings of a non-destructive method as tasks of one model in one pass")
    p.add_argument("--fixed-lr", action="store_true", help="skip tuning: use each method's default learning rate")
    p.add_argument("--limit", type=int, help="use at most this many training and test images per task")
    p.add_argument("--base", choices=list(DEMO_BASES), help="a shipped base by name (default: fmnist; --model for "
                   "any other)")
    add_model_options(p, "base model (default: the shipped Fashion-MNIST ViT)")
    p.add_argument("--cells", type=Path, help="where the grid's cells are kept (default: <out>/accuracy_cells)")
    p.add_argument("--fresh", action="store_true", help="run every cell again, even when its file is there")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (for lazily loaded images)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice); 1 is faster for this "
                   "small model on a busy CPU, where every small parallel op waits for a descheduled thread")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.base is not None:
        if args.model is not None or args.checkpoint is not None:
            p.error("give --base or --model, not both")
        args.model = str(DEMO_BASES[args.base])

    setting = dict(FULL if args.full else DEFAULT)
    if args.full and args.base is not None:
        setting["tasks"] = FULL_TASKS[args.base]
    if args.quick:
        setting.update(steps=3, seeds=[0], tasks=["fmnist_5_9", "digits"], methods=["head_only", "nd_m1", "full_ft"])
        args.limit = args.limit or 256
        args.batch = 32
    for key in ("steps", "seeds", "tasks", "methods"):
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key)
    tune = not args.fixed_lr
    steps, seeds, tasks, methods = setting["steps"], setting["seeds"], setting["tasks"], setting["methods"]

    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), load {machine['load_average']}", flush=True)
    print(f"setting: {steps} steps x batch {args.batch}, seeds {seeds}, tasks {tasks}, methods {methods}, "
          f"learning rates {'tuned' if tune else 'fixed'}", flush=True)
    start = time.perf_counter()
    spec = base_spec(args)
    base = create_base(**spec)
    cfg = data_config(base)
    cache: dict = {}
    datas = {t: load_task(t, cfg, args.limit, cache) for t in tasks}
    cells = cells_folder(args.cells or args.out / "accuracy_cells", spec, steps, args.batch, args.limit)
    cell = dict(base=base, steps=steps, batch=args.batch, workers=args.workers, fresh=args.fresh)
    print(f"data ready ({time.perf_counter() - start:.0f} s); cells in {cells}", flush=True)

    lrs: dict[str, dict[str, tuple[float, float]]] = {t: {} for t in tasks}
    tuning: dict[str, dict[str, dict[str, float]]] = {t: {} for t in tasks}
    tried: dict[str, dict[str, list[tuple[float, float]]]] = {t: {} for t in tasks}
    for task in tasks:
        for method in methods:
            if not tune:
                lrs[task][method] = default_lr(method)
                continue
            done = []
            if not args.sequential_tuning and one_pass_method(method):
                done = tune_in_one_pass(cells, task, method, lr_grid(method), seeds[0], data=datas[task], **cell)

            def score(lr, task=task, method=method, done=done):
                again = cell["fresh"] and lr not in done  # a setting just trained in one pass is read
                return run_cell(cells, task, method, lr, seeds[0], "val", data=datas[task],
                                **{**cell, "fresh": again})["accuracy"]

            best, scores = tune_lr(score, lr_grid(method))
            tried[task][method] = list(scores)
            lrs[task][method] = best
            tuning[task][method] = {lr_name(lr): acc for lr, acc in scores.items()}
            print(f"  tune {task} {method}: " + ", ".join(f"{lr_name(lr)}: {acc:.4f}" for lr, acc in scores.items())
                  + f" -> {lr_name(best)} (total {time.perf_counter() - start:.0f} s)", flush=True)

    results: dict[str, dict[str, dict]] = {t: {} for t in tasks}
    concat: dict[str, dict] = {}
    for seed in seeds:
        adapters: dict[str, tuple[nn.Module, str, float]] = {}
        for task in tasks:
            for method in methods:
                name = f"{task}_{method}"
                r = run_cell(cells, task, method, lrs[task][method], seed, "test", data=datas[task], **cell)
                lr, scale = lrs[task][method]
                entry = results[task].setdefault(method, {"lr": lr, "memory_lr_scale": scale, "accuracies": [],
                                                          "seconds": []})
                entry["accuracies"].append(r["accuracy"])
                entry["seconds"].append(r["seconds"])
                entry["trainable_params"] = r["trainable_params"]
                if r.get("adapter"):
                    adapters[name] = (load_adapters(base, [cells / r["adapter"]]), task, r["accuracy"])
                print(f"  seed {seed} {task:10s} {method:9s} {lr_name(lrs[task][method]):12s} acc {r['accuracy']:.4f} "
                      f"({r['seconds']:.0f} s{', read from its cell' if r.get('cached') else ''}; "
                      f"total {time.perf_counter() - start:.0f} s)", flush=True)
        if adapters:
            concat[str(seed)] = check_concatenation(base, adapters, datas, args.workers)
            print(f"  seed {seed}: {len(adapters)} non-destructive adapters in one model, accuracies unchanged: "
                  f"{concat[str(seed)]['all_unchanged']}", flush=True)

    for task in tasks:
        for entry in results[task].values():
            a = entry["accuracies"]
            entry["mean"] = statistics.fmean(a)
            entry["std"] = statistics.stdev(a) if len(a) > 1 else 0.0
        r = results[task]
        if "head_only" in r and "full_ft" in r:
            gap = r["full_ft"]["mean"] - r["head_only"]["mean"]
            for method, entry in r.items():
                if method not in ("head_only", "full_ft"):
                    entry["gap_closed"] = (entry["mean"] - r["head_only"]["mean"]) / gap if gap > 0 else None

    saved = {t: {m: v for m, lrs_tried in tried[t].items()
                 if (v := tuning_time(cells, t, m, lrs_tried, seeds[0], results[t][m]["seconds"][0])) is not None}
             for t in tasks}
    machine["load_average_end"] = common.load_average()
    result = {"benchmark": "accuracy", "command": common.command_line(), "machine": machine,
              "settings": {"steps": steps, "batch": args.batch, "seeds": seeds, "tasks": tasks, "methods": methods,
                           "tuned": tune, "one_pass_tuning": tune and not args.sequential_tuning,
                           "limit": args.limit, "cells": str(cells),
                           "optimizer": "SGD momentum 0.9, clip 1, 5% warm-up, cosine",
                           "base": {k: v for k, v in spec.items() if v} or "learnable_memory.data.load_demo_base()"},
              "learning_rates": lrs, "tuning": tuning, "tuning_time": saved, "results": results,
              "concatenation": concat,
              "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "accuracy.json", result)
    plot(results, tasks, methods, args.out / "accuracy.png")

    print()
    headers = ["method", "params"] + [f"{t} acc" for t in tasks] + [f"{t} gap closed" for t in tasks]
    rows = []
    for method in methods:
        row = [method, f"{results[tasks[0]][method]['trainable_params']:,}"]
        for t in tasks:
            e = results[t][method]
            row.append(f"{e['mean']:.4f} ± {e['std']:.4f}")
        for t in tasks:
            g = results[t][method].get("gap_closed")
            row.append(f"{g:.2f}" if g is not None else "-")
        rows.append(row)
    print(common.format_table(headers, rows))
    print(f"\nlearning rates ({'tuned on seed 0' if tune else 'fixed'}; xS: memory tokens at S times the rate)")
    print(common.format_table(["method"] + tasks, [[m] + [lr_name(lrs[t][m]) for t in tasks] for m in methods]))
    for seed, c in concat.items():
        worst = max(r["max_logit_diff"] for r in c["adapters"])
        print(f"concatenation (seed {seed}): {c['tasks_in_model']} adapters in one model, accuracy unchanged "
              f"for all: {'PASS' if c['all_unchanged'] else 'MISS'} (max logit diff {worst:.2e}, "
              f"base {c['base_max_logit_diff']:.2e})")
    times = [v for by in saved.values() for v in by.values()]
    if times:
        one, sep = sum(v["one_pass_s"] for v in times), sum(v["separate_s"] for v in times)
        print(f"one-pass tuning: {sum(v['settings'] for v in times)} settings of {len(times)} method-task pairs "
              f"trained in {sum(v['passes'] for v in times)} passes, {one:.0f} s, against {sep:.0f} s for as many "
              f"separate runs (each as long as the method's own seed-{seeds[0]} run): {sep - one:.0f} s saved, "
              f"{sep / one:.1f}x")
    print("\n" + markdown(results, lrs, tasks, methods))
    print(f"\nwrote {args.out / 'accuracy.json'} and {args.out / 'accuracy.png'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
