"""Inference cost of serving K tasks: one ``forward_all`` pass against the alternatives.

Methods, all on the same frozen timm ViT with random weights, under ``torch.inference_mode``:

- ``plain``: one forward of the timm model itself (the reference: ratio 1).
- ``one_pass``: ``MemoryViT.forward_all`` with K non-destructive tasks of m memory tokens each.
- ``one_pass_full``: the same with one full-mode task (K=1 only: full mode serves one task).
- ``dense``: the naive dense formulation (``tests/dense_reference.py``): every task's class token
  and memory in one masked sequence through timm's blocks, memory also run as queries and
  through the MLP.
- ``separate``: K single-task ``MemoryViT`` models, each run with ``model(x)``.
- ``lora``: peft LoRA (r=8 on ``qkv``), one model holding K adapters, each task a separate
  forward after ``set_adapter``.

Two phases. The target phase runs the configuration of the targets (K=8 and K=1, m=10, on the
target model) in more repetitions. The grid (every model, K, m) then gives the overview;
``separate`` is measured at one m per K (it barely depends on m) and, like ``lora``, in fewer
repetitions. Within a repetition every method runs once, in a fixed order; in the grid each K group
has its own ``plain`` run, and ratios are per repetition against the ``plain`` of the same group.
The JSON is rewritten after every phase, so a run cut short keeps what it finished.

Allocator: the timings run with glibc keeping freed memory (``common.keep_freed_memory``), so that
they measure work, not where glibc's page returns happen to fall; ``--malloc default`` times with
glibc's defaults. The setting is printed and recorded in the JSON.

Peak memory: each method runs in a fresh process (see ``benchmarks/common.py``), with glibc's defaults.

    python benchmarks/inference.py            # targets + default grid, ~9 min on 2 quiet cores
    python benchmarks/inference.py --quick    # tiny model, 1 repetition (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from learnable_memory import MemoryViT, TaskConfig  # noqa: E402
from tests.dense_reference import dense_forward_all  # noqa: E402

NUM_CLASSES = 10
TARGET_K, TARGET_M = 8, 10
QUICK_MODEL = ("vit_tiny_patch16_224", dict(depth=2, img_size=32, patch_size=8))


def build_vit(name: str, quick: bool) -> torch.nn.Module:
    """A random-weight timm ViT in eval mode (a depth-2 ViT-Tiny on 32 px with ``quick``)."""
    torch.manual_seed(0)
    kwargs = QUICK_MODEL[1] if quick else {}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def images_for(vit: torch.nn.Module, batch: int) -> torch.Tensor:
    h, w = vit.patch_embed.img_size
    return torch.randn(batch, vit.patch_embed.proj.in_channels, h, w, generator=torch.Generator().manual_seed(0))


def memory_model(vit: torch.nn.Module, k: int, m: int, mode: str = "non_destructive") -> MemoryViT:
    model = MemoryViT(vit)
    for i in range(k):
        model.add_task(TaskConfig(name=f"t{i}", n_mem=m, num_classes=NUM_CLASSES, mode=mode))
    return model.eval()


def lora_model(vit: torch.nn.Module, k: int, copy_base: bool = True) -> torch.nn.Module:
    """One peft model with K LoRA adapters (r=8 on ``qkv``), named ``t0..t{K-1}``."""
    import peft

    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["qkv"])
    model = peft.get_peft_model(copy.deepcopy(vit) if copy_base else vit, cfg, adapter_name="t0")
    for i in range(1, k):
        model.add_adapter(f"t{i}", cfg)
    return model.eval()


def run_lora(model: torch.nn.Module, k: int, x: torch.Tensor) -> None:
    for i in range(k):
        model.base_model.set_adapter(f"t{i}")
        model(x)


def method_fn(method: str, vit: torch.nn.Module, k: int, m: int, x: torch.Tensor,
              cache: dict | None = None) -> Callable[[], object]:
    """A zero-argument callable running ``method`` once (models shared through ``cache``)."""
    cache = {} if cache is None else cache
    if method == "plain":
        return lambda: vit(x)
    if method in ("one_pass", "dense"):
        model = memory_model(vit, k, m)
        return (lambda: model.forward_all(x)) if method == "one_pass" else (lambda: dense_forward_all(model, x))
    if method == "one_pass_full":
        model = memory_model(vit, 1, m, mode="full")
        return lambda: model.forward_all(x)
    if method == "separate":
        key = ("separate", m)
        models = cache.setdefault(key, [])
        while len(models) < k:
            models.append(memory_model(vit, 1, m))
        chosen = models[:k]
        return lambda: [s(x) for s in chosen]
    if method == "lora":
        if "lora" not in cache or cache["lora_k"] < k:
            cache["lora"], cache["lora_k"] = lora_model(vit, k, copy_base=cache.get("copy_base", True)), k
        model = cache["lora"]
        return lambda: run_lora(model, k, x)
    raise ValueError(f"unknown method {method!r}")


# ----- memory: one fresh process per method -----
def measure_memory_child(args: argparse.Namespace) -> None:
    """Child mode: build, reset the RSS high-water mark, run the method twice, read the mark."""
    vit = build_vit(args.model, args.quick)
    x = images_for(vit, args.batch)
    fn = method_fn(args.measure_memory, vit, args.k, args.m, x, {"copy_base": False})
    with torch.inference_mode():  # K forwards of one shape: the first of them warms up
        mem = common.peak_memory_of(fn, calls=1 if args.measure_memory in ("separate", "lora") else 2)
    print(json.dumps({"method": args.measure_memory, "model": args.model, "k": args.k, "m": args.m, **mem}))


def measure_memory(model: str, k: int, m: int, batch: int, quick: bool, methods: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        kk = 1 if method == "one_pass_full" else k
        args = ["--measure-memory", method, "--model", model, "--k", str(kk), "--m", str(m), "--batch", str(batch)]
        if quick:
            args.append("--quick")
        rows.append(common.measure_in_subprocess(Path(__file__), args))
        print(f"  memory {model} {method} K={kk} m={m}: +{rows[-1]['extra_mb']:.0f} MiB "
              f"(peak {rows[-1]['peak_mb']:.0f} MiB)", flush=True)
    return rows


# ----- timing phases -----
def grid_phase(vit: torch.nn.Module, name: str, ks: list[int], ms: list[int], x: torch.Tensor, reps: int,
               slow_reps: int) -> list[dict]:
    """Every (K, m) of one model; returns one row per (K, m, method)."""
    cache: dict = {}
    m_sep = TARGET_M if TARGET_M in ms else ms[len(ms) // 2]
    methods: dict[str, Callable] = {}
    warmups: dict[str, Callable] = {}
    reps_of: dict[str, int] = {}
    method_fn("lora", vit, max(ks), 0, x, cache)  # one peft model holding every adapter
    for k in ks:
        methods[f"plain|{k}|0"] = method_fn("plain", vit, k, 0, x)
        methods[f"separate|{k}|{m_sep}"] = method_fn("separate", vit, k, m_sep, x, cache)
        warmups[f"separate|{k}|{m_sep}"] = method_fn("separate", vit, 1, m_sep, x, cache)
        methods[f"lora|{k}|0"] = method_fn("lora", vit, k, 0, x, cache)
        warmups[f"lora|{k}|0"] = method_fn("lora", vit, 1, 0, x, cache)
        reps_of[f"separate|{k}|{m_sep}"] = reps_of[f"lora|{k}|0"] = slow_reps
        for m in ms:
            methods[f"one_pass|{k}|{m}"] = method_fn("one_pass", vit, k, m, x)
            methods[f"dense|{k}|{m}"] = method_fn("dense", vit, k, m, x)
            if k == 1:
                methods[f"one_pass_full|1|{m}"] = method_fn("one_pass_full", vit, 1, m, x)
    start = time.perf_counter()
    with torch.inference_mode():
        times = common.interleaved_times(
            methods, reps, warmups=warmups, reps_of=reps_of,
            progress=lambda s: print(f"  {name} grid {s} ({time.perf_counter() - start:.0f} s)", flush=True))
    rows = []
    batch = x.shape[0]
    for key, t in times.items():
        method, k, m = key.split("|")
        k, m = int(k), int(m)
        row = {"model": name, "method": method, "k": k, "m": m, "seconds": common.summary(t), "times": t,
               "images_per_s": batch / common.summary(t)["median"],
               "task_images_per_s": batch * k / common.summary(t)["median"]}
        row["ratio_to_plain"] = common.ratio_summary(t, times[f"plain|{k}|0"])
        rows.append(row)
    return rows


def target_phase(vit: torch.nn.Module, x: torch.Tensor, k: int, m: int, reps: int,
                 slow_reps: int) -> tuple[dict, list[dict]]:
    """The configuration of the targets, more repetitions. Returns raw times and target rows."""
    cache: dict = {}
    methods = {
        "plain": method_fn("plain", vit, k, m, x),
        "one_pass": method_fn("one_pass", vit, k, m, x),
        "dense": method_fn("dense", vit, k, m, x),
        "separate": method_fn("separate", vit, k, m, x, cache),
        "one_pass_k1": method_fn("one_pass", vit, 1, m, x),
        "one_pass_full_k1": method_fn("one_pass_full", vit, 1, m, x),
    }
    warmups = {"separate": method_fn("separate", vit, 1, m, x, cache)}
    start = time.perf_counter()
    with torch.inference_mode():
        times = common.interleaved_times(
            methods, reps, warmups=warmups, reps_of={"separate": slow_reps},
            progress=lambda s: print(f"  targets {s} ({time.perf_counter() - start:.0f} s)", flush=True))
    r = common.ratio_summary
    targets = [
        common.target_row(f"K={k} m={m} one pass / plain forward", r(times["one_pass"], times["plain"]), "<=", 1.10),
        common.target_row(f"K={k} separate passes / one pass", r(times["separate"], times["one_pass"]), ">=", 7.0),
        common.target_row(f"K={k} naive dense / one pass", r(times["dense"], times["one_pass"]), ">=", 1.3),
        common.target_row(f"K=1 m={m} non-destructive / plain", r(times["one_pass_k1"], times["plain"]), "<=", 1.03),
        common.target_row(f"K=1 m={m} full mode / plain", r(times["one_pass_full_k1"], times["plain"]), "<=", 1.05),
    ]
    return times, targets


# ----- output -----
def plot(rows: list[dict], targets_model: str, path: Path) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = common.new_figure(len(models), width=6.0, height=4.5)
    styles = {"one_pass": "-", "dense": "--", "separate": ":", "lora": "-."}
    for ax, model in zip(axes, models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for method, ls in styles.items():
            ms = sorted({r["m"] for r in mine if r["method"] == method})
            for m in ms:
                pts = sorted((r["k"], r["ratio_to_plain"]["median"]) for r in mine
                             if r["method"] == method and r["m"] == m)
                label = f"{method}" + (f" m={m}" if method in ("one_pass", "dense") else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tasks K")
        ax.set_ylabel("time / one plain forward (median)")
        ax.set_title(model + (" (targets)" if model == targets_model else ""))
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


def print_grid(rows: list[dict]) -> None:
    headers = ["model", "K", "m", "method", "median s", "x plain [IQR]", "img/s", "task-img/s", "reps"]
    order = {"plain": 0, "one_pass": 1, "one_pass_full": 2, "dense": 3, "separate": 4, "lora": 5}
    table = [[r["model"], r["k"], r["m"] or "-", r["method"], f"{r['seconds']['median']:.3f}",
              common.ratio_text(r["ratio_to_plain"]), f"{r['images_per_s']:.1f}", f"{r['task_images_per_s']:.1f}",
              r["seconds"]["n"]]
             for r in sorted(rows, key=lambda r: (r["model"], r["k"], order[r["method"]], r["m"]))
             if not (r["method"] == "plain" and r["k"] != min(x["k"] for x in rows))]
    print(common.format_table(headers, table))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, K in {1,2}, m in {1,2}, 1 repetition")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    p.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--target-model", default="vit_base_patch16_224")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--ms", type=int, nargs="+", default=[1, 10, 20])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=2, help="grid repetitions")
    p.add_argument("--slow-reps", type=int, default=1, help="grid repetitions of separate and LoRA passes")
    p.add_argument("--target-reps", type=int, default=5)
    p.add_argument("--target-slow-reps", type=int, default=3, help="target repetitions of the separate passes")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep: glibc keeps freed memory (common.keep_freed_memory), default: glibc's defaults")
    p.add_argument("--measure-memory", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--m", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.measure_memory:
        measure_memory_child(args)
        return 0
    if args.quick:
        args.models, args.target_model = [QUICK_MODEL[0]], QUICK_MODEL[0]
        args.ks, args.ms, args.batch = [1, 2], [1, 2], 2
        args.reps = args.slow_reps = args.target_reps = args.target_slow_reps = 1
    if args.target_model not in args.models:
        args.target_model = args.models[-1]
    tk = TARGET_K if TARGET_K in args.ks else max(args.ks)
    tm = TARGET_M if TARGET_M in args.ms else args.ms[-1]

    machine = common.machine_info()
    machine["malloc"] = "keep freed memory" if args.malloc == "keep" and common.keep_freed_memory() else "default"
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), load {machine['load_average']}, malloc: {machine['malloc']}",
          flush=True)
    start = time.perf_counter()
    rows: list[dict] = []
    targets: list[dict] = []
    target_times: dict = {}
    memory: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> dict:
        """Write the JSON (and plot) so far: a long run that is cut short keeps its finished phases."""
        machine["load_average_end"] = common.load_average()
        result = {
            "benchmark": "inference",
            "command": common.command_line(),
            "machine": machine,
            "settings": {"models": args.models, "target_model": args.target_model, "ks": args.ks, "ms": args.ms,
                         "batch": args.batch, "reps": args.reps, "slow_reps": args.slow_reps,
                         "target_reps": args.target_reps, "target_slow_reps": args.target_slow_reps,
                         "target_k": tk, "target_m": tm, "quick": args.quick, "weights": "random",
                         "memory_method": "fresh process: RSS high-water mark while running minus RSS after build"},
            "grid": rows,
            "target_times": target_times,
            "targets": targets,
            "memory": memory,
            "seconds": time.perf_counter() - start,
        }
        common.write_json(args.out / "inference.json", result)
        if rows:
            plot(rows, args.target_model, args.out / "inference.png")
        return result

    # the targets first, then the grid of every model, then peak memory
    order = [args.target_model] + [n for n in args.models if n != args.target_model]
    for name in order:
        vit = build_vit(name, args.quick)
        x = images_for(vit, args.batch)
        if name == args.target_model:
            print(f"{name}: targets K={tk} m={tm}, batch {args.batch}", flush=True)
            target_times, targets = target_phase(vit, x, tk, tm, args.target_reps, args.target_slow_reps)
            common.print_targets(targets)
            save()
        print(f"{name}: grid K={args.ks} m={args.ms}, batch {args.batch}", flush=True)
        rows += grid_phase(vit, name, args.ks, args.ms, x, args.reps, args.slow_reps)
        save()
        del vit
    if not args.no_memory:
        methods = ["plain", "one_pass", "one_pass_full", "dense", "separate", "lora"]
        if args.quick:
            methods = ["plain", "one_pass"]
        for name in order:
            memory += measure_memory(name, tk, tm, args.batch, args.quick, methods)
            save()
    result = save()

    print()
    print_grid(rows)
    if memory:
        print()
        print(common.format_table(
            ["model", "method", "K", "m", "extra MiB", "peak MiB"],
            [[r["model"], r["method"], r["k"], r["m"], f"{r['extra_mb']:.0f}", f"{r['peak_mb']:.0f}"] for r in memory]))
    print()
    print(f"targets ({args.target_model}, batch {args.batch}, {args.target_reps} interleaved repetitions, "
          f"malloc: {machine['malloc']}):")
    common.print_targets(targets)
    print(f"\nwrote {args.out / 'inference.json'} and {args.out / 'inference.png'} "
          f"in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
