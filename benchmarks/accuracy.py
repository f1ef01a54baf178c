"""The paper's accuracy table in miniature, on real images.

Base model: the small timm ViT shipped with the package (``learnable_memory.data.load_demo_base``),
pretrained on Fashion-MNIST classes 0-4, or any timm ViT given with ``--model`` (``--pretrained`` for
its hub weights, ``--checkpoint FILE`` for local ones; images are resized to its input by its own timm
preprocessing). Downstream tasks:

- ``fmnist_5_9``: Fashion-MNIST classes 5-9 (30,000 training images, 5,000 test);
- ``digits``: scikit-learn's 8x8 digits, upsampled to 28x28 (1,200 training, 597 test);
- ``fmnist_10``: all 10 Fashion-MNIST classes (60,000 training, 10,000 test).

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
images and is scored on the test set. ``--fixed-lr`` skips tuning and uses ``DEFAULT_LR``: SGD 0.6 for
the memory, class-token and head methods (``learnable_memory.train.DEFAULTS``), 0.01 for full
fine-tuning and 0.1 for LoRA.

After training, every non-destructive adapter of a seed (all tasks, all m) is added to ONE
``MemoryViT``; its single ``forward_all`` pass must give each task the same test accuracy (and logits)
as the task's own model, and the base model's own output unchanged.

Settings:

    python benchmarks/accuracy.py                 # default setting (DEFAULT): 6 methods x 2 tasks, 1 seed,
                                                  # 200 steps, tuned: 10.5 min on 2 CPU cores
    python benchmarks/accuracy.py --full --steps 300  # whole grid: 12 methods x 3 tasks x 3 seeds, tuned
                                                  # (74 min on 2 CPU cores; RESULTS.md)
    python benchmarks/accuracy.py --full          # the same with 1000 steps (for a GPU)
    python benchmarks/accuracy.py --quick         # smoke test: 3 steps on a few hundred images
    python benchmarks/accuracy.py --full --model vit_base_patch32_224.augreg_in21k --pretrained --workers 8
                                                  # the paper's backbone (GPU, weights in the HF cache)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from learnable_memory import MemoryViT, wrap_model  # noqa: E402
from learnable_memory.baselines import HeadOnly, full_finetune, lora  # noqa: E402
from learnable_memory.cli.base import add_model_options, base_spec, create_base  # noqa: E402
from learnable_memory.data import data_config, load_dataset, subsample  # noqa: E402
from learnable_memory.train import count_trainable, evaluate, fit  # noqa: E402

TASKS = {"fmnist_5_9": ("fashion-mnist", "5-9"), "digits": ("digits", None), "fmnist_10": ("fashion-mnist", None)}
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
DEFAULT_LR = {"full_ft": (0.01, 1.0), "lora_r4": (0.1, 1.0)}
DEFAULT_LR_OTHER = (0.6, 1.0)
#: The default setting: what a run without --full runs.
DEFAULT = dict(steps=200, seeds=[0], tasks=["fmnist_5_9", "digits"],
             methods=["full_ft", "head_only", "head_cls", "nd_m5", "full_m5", "lora_r4"])
FULL = dict(steps=1000, seeds=[0, 1, 2], tasks=list(TASKS), methods=METHODS)


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
    if math.prod(cfg["input_size"]) <= MATERIALIZE_MAX:
        train = split_tensors(source, "train", classes, cfg, limit, cache)
        test = split_tensors(source, "test", classes, cfg, limit, cache)
    else:
        train, test = (subsample(load_dataset(source, split, cfg, classes=classes), limit)
                       for split in ("train", "test"))
    order = np.random.default_rng(0).permutation(len(train))
    n_val = max(1, len(train) // 10, min(VAL_MIN, len(train) // 4))
    num_classes = 10 if classes is None else int(classes.split("-")[1]) - int(classes.split("-")[0]) + 1
    return {"train": Subset(train, order[n_val:].tolist()), "val": Subset(train, order[:n_val].tolist()),
            "test": test, "num_classes": num_classes}


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


def train_one(method: str, base: nn.Module, data: dict, lr: tuple[float, float], seed: int, steps: int,
              batch: int, eval_on: str, name: str, workers: int = 0) -> tuple[nn.Module, dict]:
    """Train ``method`` with ``lr = (learning rate, memory learning-rate scale)``; score it on ``data[eval_on]``."""
    torch.manual_seed(seed)
    model = build(method, base, data["num_classes"], name)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data["train"], batch_size=batch, shuffle=True, generator=g, drop_last=True,
                        num_workers=workers)
    start = time.perf_counter()
    fit(model, loader, steps=steps, lr=lr[0], memory_lr_scale=lr[1], optimizer="sgd", momentum=0.9, warmup=0.05,
        clip=1.0, seed=seed, progress=False)
    seconds = time.perf_counter() - start
    res = evaluate(model, DataLoader(data[eval_on], batch_size=EVAL_BATCH, num_workers=workers))
    return model, {"accuracy": res["accuracy"], "seconds": seconds, "trainable_params": count_trainable(model)}


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
    p.add_argument("--fixed-lr", action="store_true", help="skip tuning: use each method's default learning rate")
    p.add_argument("--limit", type=int, help="use at most this many training and test images per task")
    add_model_options(p, "base model (default: the shipped Fashion-MNIST ViT)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (for lazily loaded images)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice); 1 is faster for this "
                   "small model on a busy CPU, where every small parallel op waits for a descheduled thread")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    setting = dict(FULL if args.full else DEFAULT)
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
    print(f"data ready ({time.perf_counter() - start:.0f} s)", flush=True)

    lrs: dict[str, dict[str, tuple[float, float]]] = {t: {} for t in tasks}
    tuning: dict[str, dict[str, dict[str, float]]] = {t: {} for t in tasks}
    for task in tasks:
        for method in methods:
            if not tune:
                lrs[task][method] = default_lr(method)
                continue
            def score(lr, task=task, method=method):
                _, r = train_one(method, base, datas[task], lr, seeds[0], steps, args.batch, "val",
                                 f"{task}_{method}", args.workers)
                return r["accuracy"]

            best, scores = tune_lr(score, lr_grid(method))
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
                model, r = train_one(method, base, datas[task], lrs[task][method], seed, steps, args.batch, "test",
                                     name, args.workers)
                lr, scale = lrs[task][method]
                entry = results[task].setdefault(method, {"lr": lr, "memory_lr_scale": scale, "accuracies": [],
                                                          "seconds": []})
                entry["accuracies"].append(r["accuracy"])
                entry["seconds"].append(r["seconds"])
                entry["trainable_params"] = r["trainable_params"]
                if method.startswith("nd_m") or method == "head_cls":
                    adapters[name] = (model, task, r["accuracy"])
                print(f"  seed {seed} {task:10s} {method:9s} {lr_name(lrs[task][method]):12s} acc {r['accuracy']:.4f} "
                      f"({r['seconds']:.0f} s; total {time.perf_counter() - start:.0f} s)", flush=True)
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

    machine["load_average_end"] = common.load_average()
    result = {"benchmark": "accuracy", "command": common.command_line(), "machine": machine,
              "settings": {"steps": steps, "batch": args.batch, "seeds": seeds, "tasks": tasks, "methods": methods,
                           "tuned": tune, "limit": args.limit,
                           "optimizer": "SGD momentum 0.9, clip 1, 5% warm-up, cosine",
                           "base": {k: v for k, v in spec.items() if v} or "learnable_memory.data.load_demo_base()"},
              "learning_rates": lrs, "tuning": tuning, "results": results, "concatenation": concat,
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
    print(f"\nwrote {args.out / 'accuracy.json'} and {args.out / 'accuracy.png'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
