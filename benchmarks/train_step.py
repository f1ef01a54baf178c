"""Cost of one training step: memory fine-tuning against the usual alternatives.

Methods, on one frozen timm ViT with random weights (model in ``.train()``, cross-entropy, an SGD
step with momentum 0.9 over the trainable parameters, the optimizer the project trains with):

- ``memory_nd``: a ``MemoryViT`` task with m memory tokens, non-destructive mode.
- ``memory_full``: the same in full mode (every token sees the memory).
- ``head_only``: a linear probe on the frozen backbone's own features
  (``base.forward_head(base.forward_features(x), pre_logits=True)`` under ``no_grad``).
- ``head_cls``: head + class token, a ``MemoryViT`` task with ``n_mem=0``.
- ``full_ft``: a copy of the ViT with every parameter trainable and a new head.
- ``lora``: peft LoRA (r=8 on ``qkv``) on a copy of the ViT, plus its new head.

Step time: interleaved repetitions; per repetition, each method's time over ``full_ft``'s.
Peak memory: each method in a fresh process (see ``benchmarks/common.py``): the RSS high-water mark
over two steps minus the RSS once the model and optimizer are built, so it counts gradients,
optimizer state and activations. Run times and results: ``benchmarks/RESULTS.md``.

    python benchmarks/train_step.py            # ViT-S/16, batch 32, 224 px
    python benchmarks/train_step.py --quick    # tiny model (smoke test)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from torch import nn

from learnable_memory import wrap_model
from learnable_memory.baselines import HeadOnly, full_finetune, lora

METHODS = ("memory_nd", "memory_full", "head_only", "head_cls", "full_ft", "lora")


def build_method(method: str, vit: nn.Module, m: int, copy_base: bool = True) -> nn.Module:
    """The trainable model of ``method``; ``vit`` is only frozen, never changed (copies are made)."""
    if method == "memory_nd":
        return wrap_model(vit, n_mem=m, num_classes=common.NUM_CLASSES, task="t", mode="non_destructive")
    if method == "memory_full":
        return wrap_model(vit, n_mem=m, num_classes=common.NUM_CLASSES, task="t", mode="full")
    if method == "head_cls":
        return wrap_model(vit, n_mem=0, num_classes=common.NUM_CLASSES, task="t")
    if method == "head_only":
        return HeadOnly(vit, common.NUM_CLASSES)
    if method == "full_ft":
        return full_finetune(vit, common.NUM_CLASSES, copy_base=copy_base)
    if method == "lora":
        return lora(vit, common.NUM_CLASSES, r=8, copy_base=copy_base)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """One training step (forward, cross-entropy, backward, SGD step) as a zero-argument callable."""
    model.train()
    opt = torch.optim.SGD(trainable(model), lr=1e-3, momentum=0.9)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def batch_for(vit: nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images ``[batch, C, H, W]`` and labels ``[batch]``."""
    g = torch.Generator().manual_seed(0)
    x = common.images_for(vit, batch, g)
    return x, torch.randint(0, common.NUM_CLASSES, (batch,), generator=g)


def measure_memory_child(job: dict) -> None:
    """Child mode: build the model of ``job`` and its optimizer, then measure two training steps."""
    vit = common.build_vit(job["model"], job["quick"])
    x, y = batch_for(vit, job["batch"])
    model = build_method(job["method"], vit, job["m"], copy_base=False)
    common.report_memory(job, step_fn(model, x, y))


def plot(rows: list[dict], path: Path) -> None:
    fig, (ax1, ax2) = common.new_figure(2, width=5.5, height=4.0)
    names = [r["method"] for r in rows]
    t = [r["time_ratio"]["median"] for r in rows]
    err = [[r["time_ratio"]["median"] - r["time_ratio"]["q1"] for r in rows],
           [r["time_ratio"]["q3"] - r["time_ratio"]["median"] for r in rows]]
    ax1.bar(names, t, yerr=err, capsize=3)
    ax1.set_ylabel("step time / full fine-tuning (median, IQR)")
    mem = [r.get("memory_ratio", float("nan")) for r in rows]
    ax2.bar(names, mem)
    ax2.set_ylabel("peak training memory / full fine-tuning")
    for ax in (ax1, ax2):
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.tick_params(axis="x", rotation=30)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, batch 4, 1 repetition")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--m", type=int, default=10, help="memory tokens per block of the memory methods")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    common.add_memory_child_option(p)
    args = p.parse_args(argv)

    if args.measure_memory:
        measure_memory_child(args.measure_memory)
        return 0
    if args.quick:
        args.model, args.batch, args.reps = common.QUICK_MODEL[0], 4, 1

    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), load {machine['load_average']}", flush=True)
    start = time.perf_counter()
    vit = common.build_vit(args.model, args.quick)
    x, y = batch_for(vit, args.batch)
    models = {m: build_method(m, vit, args.m) for m in METHODS}
    steps = {m: step_fn(model, x, y) for m, model in models.items()}
    print(f"{args.model}: batch {args.batch}, m={args.m}, {args.reps} interleaved repetitions", flush=True)
    times = common.interleaved_times(
        steps, args.reps,
        progress=lambda s: print(f"  {s} ({time.perf_counter() - start:.0f} s)", flush=True))

    memory: dict[str, dict] = {}
    if not args.no_memory:
        for method in (["memory_nd", "full_ft"] if args.quick else METHODS):
            job = {"method": method, "model": args.model, "batch": args.batch, "m": args.m, "quick": args.quick}
            memory[method] = common.measure_in_subprocess(Path(__file__), job)
            print(f"  memory {method}: +{memory[method]['extra_mb']:.0f} MiB", flush=True)

    rows = []
    for method in METHODS:
        row = {"method": method, "trainable_params": sum(p.numel() for p in trainable(models[method])),
               "seconds": common.summary(times[method]), "times": times[method],
               "time_ratio": common.ratio_summary(times[method], times["full_ft"]),
               "images_per_s": args.batch / common.summary(times[method])["median"]}
        if method in memory and "full_ft" in memory:
            row["memory"] = memory[method]
            row["memory_ratio"] = memory[method]["extra_mb"] / memory["full_ft"]["extra_mb"]
            row["peak_ratio"] = memory[method]["peak_mb"] / memory["full_ft"]["peak_mb"]
        rows.append(row)
    by = {r["method"]: r for r in rows}
    targets = [
        common.target_row("memory non-destructive step / full FT", by["memory_nd"]["time_ratio"], "<=", 0.45),
        common.target_row("memory full-mode step / full FT", by["memory_full"]["time_ratio"], "<=", 0.8),
    ]
    if "memory_ratio" in by["memory_nd"]:
        v = by["memory_nd"]["memory_ratio"]
        targets.append(common.target_row("memory non-destructive peak memory / full FT",
                                         {"median": v, "q1": v, "q3": v, "n": 1}, "<=", 0.35))
    machine["load_average_end"] = common.load_average()
    result = {"benchmark": "train_step", "command": common.command_line(), "machine": machine,
              "settings": {"model": args.model, "batch": args.batch, "m": args.m, "reps": args.reps,
                           "quick": args.quick, "optimizer": "SGD momentum 0.9", "weights": "random",
                           "memory_method": "fresh process, glibc mmap threshold fixed at 128 KiB: RSS high-water "
                                            "mark over 2 steps minus RSS after build"},
              "methods": rows, "targets": targets, "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "train_step.json", result)
    plot(rows, args.out / "train_step.png")

    print()
    print(common.format_table(
        ["method", "trainable params", "step s", "x full FT [IQR]", "img/s", "train mem MiB", "x full FT"],
        [[r["method"], f"{r['trainable_params']:,}", f"{r['seconds']['median']:.3f}",
          common.ratio_text(r["time_ratio"]),
          f"{r['images_per_s']:.1f}", f"{r['memory']['extra_mb']:.0f}" if "memory" in r else "-",
          f"{r['memory_ratio']:.3f}" if "memory_ratio" in r else "-"] for r in rows]))
    print()
    common.print_targets(targets)
    print(f"\nwrote {args.out / 'train_step.json'} and {args.out / 'train_step.png'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
