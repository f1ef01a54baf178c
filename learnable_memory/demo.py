"""``learnable-memory demo``: the paper's story in miniature, offline, in a few minutes on a CPU.

1. Load the small base ViT shipped with the package (pretrained on Fashion-MNIST classes 0-4).
2. Fine-tune two new tasks on the frozen base, Fashion-MNIST classes 5-9 and scikit-learn's digits,
   three ways each: head only (a linear head on the base's own features), head + class token
   (``n_mem=0``) and memory (``n_mem=5``, non-destructive).
3. Save every adapter, load the two memory adapters together on a fresh base, and classify test
   images for the base task and both new tasks in ONE forward pass (checking that each output is
   exactly what the task gives alone, and that the base output is unchanged).
4. Print a results table: accuracy, trainable parameters, adapter size on disk, and the time of one
   pass against separate passes.
5. Write a figure: the Table 1 attention mask of the combined model and the accuracy bars.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from . import data as D
from .baselines import HeadOnly
from .train import count_trainable, evaluate, fit

STEPS = 300
BATCH = 128
N_MEM = 5


@dataclass
class DemoTask:
    """A new task of the demo: ``source`` data, optional class subset, training set size."""

    name: str
    title: str
    source: str
    classes: str | None = None
    max_train: int | None = None


TASKS = [
    DemoTask("fmnist-5-9", "Fashion-MNIST 5-9", "fashion-mnist", classes="5-9", max_train=5000),
    DemoTask("digits", "digits (8x8, upsampled)", "digits"),
]
METHODS = ["head only", "head + class", f"memory m={N_MEM}"]


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (or of the file ``path``)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.1f} MiB"


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _train_one(method: str, task: DemoTask, train_ds, test_ds, *, steps: int, batch: int, seed: int,
               adapter_dir: Path) -> dict:
    from .wrapping import wrap_model

    torch.manual_seed(seed)
    base = D.load_demo_base()
    classes = list(train_ds.classes)
    if method == "head only":
        model: nn.Module = HeadOnly(base, len(classes))
    else:
        n_mem = 0 if method == "head + class" else N_MEM
        model = wrap_model(base, n_mem=n_mem, task=task.name, class_names=classes)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=batch, shuffle=True, generator=g)
    result = fit(model, loader, steps=steps, seed=seed, desc=f"{task.name}: {method}")
    acc = evaluate(model, DataLoader(test_ds, batch_size=512))["accuracy"]
    path = adapter_dir / f"{task.name}-{method.replace(' ', '').replace('+', '-').replace('=', '')}"
    if isinstance(model, HeadOnly):
        path.mkdir(parents=True, exist_ok=True)
        save_file({"weight": model.head.weight.detach(), "bias": model.head.bias.detach()},
                  str(path / "head.safetensors"))
    else:
        path = Path(model.save_adapter(path))
    return dict(task=task.name, method=method, accuracy=acc, trainable=count_trainable(model),
                size=folder_size(path), path=str(path), seconds=result.seconds, model=model)


def _figure(model, results: list[dict], base_acc: float, path: Path) -> None:
    """Left: the Table 1 mask of ``model`` (from ``build_attention_mask``); right: accuracy bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import plot_attention_mask

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw=dict(width_ratios=[1, 1.2]))
    plot_attention_mask(model.task_configs, num_patches=model.base.patch_embed.num_patches,
                        num_prefix_tokens=model.num_prefix_tokens, ax=ax1)
    ax1.set_title("Attention mask of the combined model (paper Table 1)\nrows: queries, columns: keys; "
                  "dark = attends", fontsize=10)

    tasks = list(dict.fromkeys(r["task"] for r in results))
    width = 0.8 / len(METHODS)
    for j, method in enumerate(METHODS):
        accs = [next(r["accuracy"] for r in results if r["task"] == t and r["method"] == method) for t in tasks]
        xs = [i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(tasks))]
        bars = ax2.bar(xs, accs, width, label=method)
        ax2.bar_label(bars, fmt="%.3f", fontsize=8)
    ax2.axhline(base_acc, color="black", ls="--", lw=1, label=f"base on its own task ({base_acc:.3f})")
    ax2.set_xticks(range(len(tasks)), tasks)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("test accuracy")
    ax2.set_title("New tasks on a frozen base")
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _describe_base(base: nn.Module, config: dict, info: dict, log: Callable[[str], None]) -> None:
    """Step 1: the shipped base."""
    log(f"1. Base: timm {type(base).__name__} ({sum(p.numel() for p in base.parameters()):,} parameters, "
        f"{base.patch_embed.num_patches} patches of {config['input_size'][1]}x{config['input_size'][2]} images), "
        f"pretrained on Fashion-MNIST classes {info.get('classes', '0-4')}: {', '.join(D.label_names(base) or [])}.")


def _task_data(config: dict, limit: int | None, seed: int, log: Callable[[str], None]) -> dict[str, tuple]:
    """Step 2 (data): ``task -> (train, test)`` of every demo task."""
    data = {}
    for task in TASKS:
        train_ds = D.subsample(D.load_dataset(task.source, "train", config, task.classes),
                               limit or task.max_train, seed)
        test_ds = D.subsample(D.load_dataset(task.source, "test", config, task.classes), limit, seed)
        data[task.name] = (train_ds, test_ds)
        log(f"   {task.title}: {len(train_ds.classes)} classes ({', '.join(train_ds.classes)}), "
            f"{len(train_ds)} training / {len(test_ds)} test images")
    return data


def _train_all(data: dict[str, tuple], *, steps: int, batch: int, seed: int, adapter_dir: Path,
               log: Callable[[str], None]) -> list[dict]:
    """Step 2 (training): every task, every method; one result row each."""
    results = []
    for task in TASKS:
        for method in METHODS:
            r = _train_one(method, task, *data[task.name], steps=steps, batch=batch, seed=seed,
                           adapter_dir=adapter_dir)
            results.append(r)
            log(f"   {task.name:<11} {method:<13} accuracy {r['accuracy']:.3f}  ({r['seconds']:.0f} s)")
    return results


def _whole(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a dataset as one batch: images and labels."""
    return next(iter(DataLoader(ds, batch_size=len(ds))))


@torch.inference_mode()
def _one_pass_checks(combined, base: nn.Module, base_test, data: dict[str, tuple], memory_runs: list[dict]) -> tuple:
    """Step 3: base accuracy and, per memory task, the one-pass output against the task alone (the
    rows' ``combined_accuracy`` are filled in); returns ``(base_acc, checks)``."""
    from .model import BASE_KEY

    x, y = _whole(base_test)
    base_out = combined.forward_all(x)[BASE_KEY]
    base_acc = float((base_out.argmax(-1) == y).float().mean())
    checks = {"base output unchanged": float((base_out - base(x)).abs().max())}
    for r in memory_runs:
        xt, yt = _whole(data[r["task"]][1])
        together = combined.forward_all(xt)[r["task"]]
        checks[f"{r['task']} same as alone"] = float((together - r["model"](xt)).abs().max())
        r["combined_accuracy"] = float((together.argmax(-1) == yt).float().mean())
    return base_acc, checks


def _sample_table(combined, base: nn.Module, base_test, data: dict[str, tuple], log: Callable[[str], None]) -> None:
    """Step 3: two images of each data set through every head, in one pass."""
    from .model import BASE_KEY

    samples = [(name, ds[i]) for name, ds in [("fmnist 0-4", base_test)] +
               [(t.name, data[t.name][1]) for t in TASKS] for i in range(2)]
    with torch.inference_mode():
        outs = combined.forward_all(torch.stack([s[1][0] for s in samples]))
    names = {BASE_KEY: D.label_names(base)} | {t: combined.tasks[t].config.class_names for t in combined.task_names}
    log(f"   {'image from':<12}{'true label':<13}" + "".join(f"{k:<14}" for k in outs))
    for i, (src, (_, label)) in enumerate(samples):
        true = (base_test if src == "fmnist 0-4" else data[src][1]).classes[label]
        row = "".join(f"{names[k][int(v[i].argmax())][:12]:<14}" for k, v in outs.items())
        log(f"   {src:<12}{true[:12]:<13}{row}")


def _timing(combined, base: nn.Module, base_test, singles: list[nn.Module], quick: bool) -> tuple[int, float, float]:
    """Step 4: median ms of one pass for every task against separate passes; ``(images, one, separate)``."""
    xb = torch.stack([base_test[i][0] for i in range(min(256, len(base_test)))])
    repeats = 3 if quick else 10
    with torch.inference_mode():
        one_pass = _median_ms(lambda: combined.forward_all(xb), repeats)
        separate = _median_ms(lambda: [base(xb)] + [m(xb) for m in singles], repeats)
    return len(xb), one_pass, separate


def _results_table(results: list[dict], base_acc: float, n_images: int, n_tasks: int, one_pass: float,
                   separate: float) -> list[str]:
    """Step 4: the table's lines."""
    table = [f"   {'task':<12}{'method':<15}{'accuracy':>9}{'trainable params':>18}{'adapter on disk':>17}"]
    table.append(f"   {'fmnist 0-4':<12}{'base model':<15}{base_acc:>9.3f}{'(frozen)':>18}{'':>17}")
    for r in results:
        table.append(f"   {r['task']:<12}{r['method']:<15}{r['accuracy']:>9.3f}{r['trainable']:>18,}"
                     f"{_fmt_bytes(r['size']):>17}")
    base_size = folder_size(D.DEMO_BASE_DIR / "model.safetensors")
    table.append(f"   (the base model itself: {_fmt_bytes(base_size)} on disk)")
    table.append(f"   time for base + {n_tasks} tasks on {n_images} images: one pass {one_pass:.1f} ms, "
                 f"separate passes {separate:.1f} ms ({separate / one_pass:.2f}x)")
    return table


def run_demo(out: str | Path = "demo_output", *, quick: bool = False, steps: int | None = None, seed: int = 0,
             log: Callable[[str], None] = print) -> dict:
    """Run the demo and write its files under ``out``; returns the results (also in ``results.json``).

    ``quick`` runs the same code path with a few steps on a few hundred images (a smoke test).
    """
    from .model import load_adapters

    start = time.perf_counter()
    out = Path(out)
    adapter_dir = out / "adapters"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    steps = steps or (5 if quick else STEPS)
    batch = 32 if quick else BATCH
    limit = 200 if quick else None

    base = D.load_demo_base()
    config = D.data_config(base)
    info = json.loads((D.DEMO_BASE_DIR / "config.json").read_text()).get("training", {})
    _describe_base(base, config, info, log)

    log(f"2. Fine-tuning {len(TASKS)} new tasks on the frozen base, {steps} steps of batch {batch} each:")
    data = _task_data(config, limit, seed, log)
    results = _train_all(data, steps=steps, batch=batch, seed=seed, adapter_dir=adapter_dir, log=log)

    memory_runs = [r for r in results if r["method"] == METHODS[-1]]
    combined = load_adapters(D.load_demo_base(), [r["path"] for r in memory_runs]).eval()
    log(f"3. Loaded {len(memory_runs)} memory adapters on a fresh base: tasks {combined.task_names} "
        "plus the base's own head, served in ONE forward pass.")
    base_test = D.subsample(D.load_dataset("fashion-mnist", "test", config, info.get("classes", "0-4")), limit, seed)
    base_acc, checks = _one_pass_checks(combined, base, base_test, data, memory_runs)
    _sample_table(combined, base, base_test, data, log)
    log("   (each head answers its own question; the digits head has no useful answer for a shoe)")
    log("   max |difference| one pass vs alone: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))

    singles = [r["model"] for r in memory_runs]
    n_images, one_pass, separate = _timing(combined, base, base_test, singles, quick)
    log(f"4. Results ({steps} fine-tuning steps, test accuracy):")
    table = _results_table(results, base_acc, n_images, len(singles), one_pass, separate)
    for line in table:
        log(line)

    figure = out / "demo.png"
    _figure(combined, results, base_acc, figure)
    summary = dict(steps=steps, batch=batch, base_accuracy=base_acc, checks=checks,
                   one_pass_ms=one_pass, separate_ms=separate, seconds=time.perf_counter() - start,
                   results=[{k: v for k, v in r.items() if k != "model"} for r in results])
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.txt").write_text("\n".join(line.strip() for line in table) + "\n")
    log(f"5. Figure (attention mask + accuracy bars): {figure}")
    log(f"6. Files: adapters in {adapter_dir}/, table in {out / 'results.txt'}, "
        f"everything in {out / 'results.json'} (total {summary['seconds']:.0f} s)")
    log(f"   Next: learnable-memory predict IMAGE --adapter {' '.join(r['path'] for r in memory_runs)}")
    return summary
