"""Inference cost of serving K tasks: one ``forward_all`` pass against its lower bound and the alternatives.

Methods, all on the same frozen timm ViT with random weights, under ``torch.inference_mode``:

- ``plain``: one forward of the timm model itself (the reference: ratio 1).
- ``one_pass``: ``MemoryViT.forward_all`` with K non-destructive tasks of m memory tokens each (memory
  keys/values cached across passes, as served).
- ``lower_bound``: the same pass with the new class tokens' attention skipped (each takes its own
  value): what the K class tokens cost by going through every norm, projection and MLP. No
  implementation of Table 1 can cost less; ``one_pass`` is reported against it.
- ``one_pass_full``: one full-mode task (K=1 only: full mode serves one task).
- ``dense``: the naive dense formulation (``learnable_memory.testing.dense_forward_all``): every
  task's class token and memory in one masked sequence through timm's blocks.
- ``separate``: K single-task ``MemoryViT`` models, each run with ``model(x)``.
- ``lora``: peft LoRA (r=8 on ``qkv``), one model holding K adapters, each task a separate
  forward after ``set_adapter``.

Phases, each rewriting the JSON when done (a run cut short keeps what it finished):

1. scale: per model (ViT-B/16 with the targets, ViT-S/16), every K of ``--ks`` at m=``--m``, with
   ``plain``, ``lower_bound`` and ``one_pass``; ``dense``, ``separate`` and ``lora`` up to
   ``--slow-max-k`` in fewer repetitions (beyond, they take minutes and prove nothing new). Within a
   repetition every method runs once, in a fixed order; ratios are per repetition against the
   ``plain`` of the same repetition.
2. families: K=8 against each family's own plain forward (rotary, relative position bias,
   distillation token, parallel blocks; and the largest common architecture of the modules added
   since: ViTamin, relpos, ConViT, Qwen3-VL, DeepSeek, Gemma 4, the last three at batch 1).
3. compile: ``torch.compile`` (default backend) of ``forward_all`` against eager, one task and K=8,
   on the first model; the compile time of the first call is reported beside.
4. memory: peak working memory of each method in a fresh process, after one warm-up call (so the
   memory key/value cache, reported on its own, is excluded), against a plain forward's; the child's
   large blocks go back to the system when freed (``common.MEMORY_CHILD_ENV``), so the mark is the
   measured call's own working set.

Allocator: the timings run with glibc keeping freed memory (``common.keep_freed_memory``), so that
they measure work, not where glibc's page returns happen to fall; ``--malloc default`` times with
glibc's defaults. The setting is printed and recorded in the JSON. Results: ``benchmarks/RESULTS.md``.

    python benchmarks/inference.py            # every phase
    python benchmarks/inference.py --quick    # tiny model, 1 repetition (smoke test)
    python benchmarks/inference.py --phases memory   # the peak-memory subprocesses alone
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import common
import torch

import learnable_memory.attention as attention
from learnable_memory import MemoryViT, TaskConfig
from learnable_memory.testing import dense_forward_all

TARGET_MODEL = "vit_base_patch16_224"
#: (K, target on one pass / plain minus the lower bound / plain of the same repetition)
LOWER_BOUND_TARGETS = {8: 0.03, 100: 0.10, 256: 0.15}
FAMILIES = ["eva02_base_patch14_224", "beit_base_patch16_224", "deit_base_distilled_patch16_224",
            "vit_base_patch16_xp_224", "vitamin_large_224", "vit_relpos_base_patch16_224", "convit_base",
            "qwen3_vit_416m", "deepseek_vit_412m", "gemma4_vit_570m"]
#: Families timed at another batch than ``--batch``: the largest of their modules, at their native resolution
#: (768 px: 2,304 patches; DeepSeek 546 px: 1,521), take seconds per image on a CPU.
FAMILY_BATCH = {"qwen3_vit_416m": 1, "deepseek_vit_412m": 1, "gemma4_vit_570m": 1}
SLOW = ("dense", "separate", "lora")
PHASES = ("scale", "families", "compile", "memory")


def memory_model(vit: torch.nn.Module, k: int, m: int, mode: str = "non_destructive") -> MemoryViT:
    model = MemoryViT(vit)
    for i in range(k):
        model.add_task(TaskConfig(name=f"t{i}", n_mem=m, num_classes=common.NUM_CLASSES, mode=mode))
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


@contextlib.contextmanager
def new_tokens_skip_attention() -> Iterator[None]:
    """The lower bound: every new class token takes its own value instead of attending."""
    real = attention.attend_new
    attention.attend_new = lambda q_c, k_x, v_x, k_c, v_c, *args, **kwargs: v_c
    try:
        yield
    finally:
        attention.attend_new = real


def method_fn(method: str, vit: torch.nn.Module, k: int, m: int, x: torch.Tensor,
              cache: dict | None = None) -> Callable[[], object]:
    """A zero-argument callable running ``method`` once (models shared through ``cache``)."""
    cache = {} if cache is None else cache
    if method == "plain":
        return lambda: vit(x)
    if method in ("one_pass", "dense", "lower_bound"):
        model = cache.get(("memory", k, m)) or cache.setdefault(("memory", k, m), memory_model(vit, k, m))
        if method == "dense":
            return lambda: dense_forward_all(model, x)
        if method == "lower_bound":
            def lower_bound() -> object:
                with new_tokens_skip_attention():
                    return model.forward_all(x)
            return lower_bound
        return lambda: model.forward_all(x)
    if method == "one_pass_full":
        model = memory_model(vit, 1, m, mode="full")
        return lambda: model.forward_all(x)
    if method == "separate":
        models = cache.setdefault(("separate", m), [])
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
def measure_memory_child(job: dict) -> None:
    """Child mode: build the models of ``job``, warm up once (caches and lazily made buffers are
    built then, and are not counted), then measure the method."""
    vit = common.build_vit(job["model"], job["quick"])
    x = common.images_for(vit, job["batch"])
    cache: dict = {"copy_base": False}
    fn = method_fn(job["method"], vit, job["k"], job["m"], x, cache)
    model = cache.get(("memory", job["k"], job["m"]))
    with torch.inference_mode():
        if job["method"] not in ("separate", "lora"):
            fn()
        job["kv_cache_mb"] = model.kv_cache.nbytes / 2**20 if model is not None else 0.0
        common.report_memory(job, fn, calls=1 if job["method"] in ("separate", "lora") else 2)


def measure_memory(model: str, ks: list[int], m: int, batch: int, quick: bool, slow_max_k: int) -> list[dict]:
    rows = []
    jobs = [("plain", 1), ("one_pass", max(ks))]
    if not quick:
        jobs[1:1] = [("one_pass_full", 1)] + [("one_pass", k) for k in ks[:-1]]
        jobs += [(meth, k) for meth in SLOW for k in ks if 1 < k <= slow_max_k]
    for method, k in jobs:
        job = {"method": method, "model": model, "k": k, "m": m, "batch": batch, "quick": quick}
        rows.append(common.measure_in_subprocess(Path(__file__), job))
        print(f"  memory {model} {method} K={k} m={m}: +{rows[-1]['extra_mb']:.0f} MiB "
              f"(peak {rows[-1]['peak_mb']:.0f} MiB, cache {rows[-1]['kv_cache_mb']:.0f} MiB)", flush=True)
    return rows


# ----- timing phases -----
def timed_rows(name: str, methods: dict[str, Callable], reps: int, batch: int, warmups: dict | None = None,
               reps_of: dict | None = None, phase: str = "") -> tuple[list[dict], dict[str, list[float]]]:
    """Interleaved timing of ``methods`` (keys ``"method|K|m"``, with ``"plain|1|0"``) of model ``name``:
    one row each."""
    start = time.perf_counter()
    with torch.inference_mode():
        times = common.interleaved_times(
            methods, reps, warmups=warmups, reps_of=reps_of,
            progress=lambda s: print(f"  {name} {phase} {s} ({time.perf_counter() - start:.0f} s)", flush=True))
    rows = []
    for key, t in times.items():
        method, k, m = key.split("|")
        med = common.summary(t)["median"]
        rows.append({"model": name, "method": method, "k": int(k), "m": int(m), "seconds": common.summary(t),
                     "times": t, "images_per_s": batch / med, "task_images_per_s": batch * int(k) / med,
                     "ratio_to_plain": common.ratio_summary(t, times["plain|1|0"])})
    return rows, times


def scale_phase(vit: torch.nn.Module, name: str, ks: list[int], m: int, x: torch.Tensor, reps: int,
                slow_reps: int, slow_max_k: int) -> list[dict]:
    """Every K at m: plain, lower bound, one pass (and the slow methods up to ``slow_max_k``)."""
    cache: dict = {}
    methods: dict[str, Callable] = {"plain|1|0": method_fn("plain", vit, 1, 0, x),
                                    f"one_pass_full|1|{m}": method_fn("one_pass_full", vit, 1, m, x)}
    warmups: dict[str, Callable] = {}
    reps_of: dict[str, int] = {}
    for k in ks:
        methods[f"lower_bound|{k}|{m}"] = method_fn("lower_bound", vit, k, m, x, cache)
        methods[f"one_pass|{k}|{m}"] = method_fn("one_pass", vit, k, m, x, cache)
    slow_ks = [k for k in ks if k <= slow_max_k]
    if slow_ks:
        method_fn("lora", vit, max(slow_ks), 0, x, cache)  # one peft model holding every adapter
    for k in slow_ks:
        for method in SLOW:
            key = f"{method}|{k}|{0 if method == 'lora' else m}"
            methods[key] = method_fn(method, vit, k, m, x, cache)
            reps_of[key] = slow_reps
            if method != "dense":
                warmups[key] = method_fn(method, vit, 1, m, x, cache)  # K identical forwards: one warms up
    rows, times = timed_rows(name, methods, reps, x.shape[0], warmups, reps_of, phase="scale")
    for r in rows:
        if r["method"] == "one_pass":
            lb = times[f"lower_bound|{r['k']}|{m}"]
            r["over_lower_bound"] = common.summary([(o - b) / p for o, b, p in
                                                    zip(r["times"], lb, times["plain|1|0"], strict=False)])
            r["kv_cache_mb"] = cache[("memory", r["k"], m)].kv_cache.nbytes / 2**20
    return rows


def families_phase(names: list[str], k: int, m: int, batch: int, reps: int, quick: bool) -> list[dict]:
    """K tasks against each family's own plain forward."""
    rows = []
    for name in names:
        vit = common.build_vit(name, quick)
        x = common.images_for(vit, FAMILY_BATCH.get(name, batch))
        methods = {"plain|1|0": method_fn("plain", vit, 1, 0, x),
                   f"one_pass|{k}|{m}": method_fn("one_pass", vit, k, m, x)}
        rows += timed_rows(name, methods, reps, FAMILY_BATCH.get(name, batch), phase=f"K={k}")[0]
        del vit
    return rows


def compile_phase(vit: torch.nn.Module, name: str, ks: list[int], m: int, x: torch.Tensor, reps: int) -> list[dict]:
    """Eager against ``torch.compile`` of the one pass (and of the plain forward), per K."""
    methods: dict[str, Callable] = {"plain|1|0": method_fn("plain", vit, 1, 0, x)}
    compile_s: dict[str, float] = {}
    compiled_vit = torch.compile(vit)
    with torch.inference_mode():
        start = time.perf_counter()
        compiled_vit(x)
        compile_s["plain_compiled|1|0"] = time.perf_counter() - start
    methods["plain_compiled|1|0"] = lambda: compiled_vit(x)
    for k in ks:
        model = memory_model(vit, k, m)
        compiled = torch.compile(model.forward_all)
        with torch.inference_mode():
            start = time.perf_counter()
            compiled(x)  # the first call compiles
            compile_s[f"one_pass_compiled|{k}|{m}"] = time.perf_counter() - start
        methods[f"one_pass|{k}|{m}"] = lambda model=model: model.forward_all(x)
        methods[f"one_pass_compiled|{k}|{m}"] = lambda compiled=compiled: compiled(x)
    rows, times = timed_rows(name, methods, reps, x.shape[0], phase="compile")
    for r in rows:
        r["phase"] = "compile"
        r["compile_seconds"] = compile_s.get(f"{r['method']}|{r['k']}|{r['m']}")
        if r["method"] == "one_pass_compiled":
            r["compiled_over_eager"] = common.ratio_summary(r["times"], times[f"one_pass|{r['k']}|{m}"])
    return rows


def targets_of(rows: list[dict], families: list[dict], memory: list[dict], model: str, m: int) -> list[dict]:
    """The issue's targets, from the rows of ``model`` (and the families and memory phases)."""
    mine = {(r["method"], r["k"]): r for r in rows if r["model"] == model}
    out = []
    for k, limit in LOWER_BOUND_TARGETS.items():
        if ("one_pass", k) in mine:
            lb = mine[("lower_bound", k)]["ratio_to_plain"]["median"]
            row = common.target_row(f"K={k} m={m} one pass / plain - lower bound / plain (LB {lb:.3f})",
                                    mine[("one_pass", k)]["over_lower_bound"], "<=", limit)
            out.append(row)
    for k, meth, op, limit, what in ((8, "separate", ">=", 7.0, "separate passes"),
                                     (8, "dense", ">=", 1.3, "naive dense")):
        if (meth, k) in mine:
            stat = common.ratio_summary(mine[(meth, k)]["times"], mine[("one_pass", k)]["times"])
            out.append(common.target_row(f"K={k} {what} / one pass", stat, op, limit))
    if ("one_pass", 1) in mine:
        out.append(common.target_row(f"K=1 m={m} non-destructive / plain", mine[("one_pass", 1)]["ratio_to_plain"],
                                     "<=", 1.03))
        out.append(common.target_row(f"K=1 m={m} full mode / plain", mine[("one_pass_full", 1)]["ratio_to_plain"],
                                     "<=", 1.05))
    for r in families:
        if r["method"] == "one_pass":
            out.append(common.target_row(f"{r['model']} K={r['k']} / its plain forward", r["ratio_to_plain"],
                                         "<=", 1.15))
    mem = {(r["method"], r["k"]): r for r in memory if r["model"] == model}
    big = max((k for meth, k in mem if meth == "one_pass" and k <= 100), default=None)
    if big is not None and ("plain", 1) in mem:
        ratio = mem[("one_pass", big)]["extra_mb"] / max(mem[("plain", 1)]["extra_mb"], 1e-9)
        out.append(common.target_row(f"K={big} peak working memory (cache excluded) / plain's",
                                     {"median": ratio, "q1": ratio, "q3": ratio, "n": 1}, "<=", 1.8))
    return out


# ----- output -----
def plot(rows: list[dict], path: Path) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = common.new_figure(len(models), width=6.0, height=4.5)
    styles = {"one_pass": ("-", "one pass"), "lower_bound": ("-", "lower bound (no attention for new tokens)"),
              "dense": ("--", "naive dense"), "separate": (":", "separate passes"),
              "lora": ("-.", "LoRA, one pass each")}
    for ax, model in zip(axes, models, strict=True):
        for method, (ls, label) in styles.items():
            pts = sorted((r["k"], r["ratio_to_plain"]["median"]) for r in rows
                         if r["model"] == model and r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", label=label,
                        color="gray" if method == "lower_bound" else None)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tasks K")
        ax.set_ylabel("time / one plain forward (median)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    common.save_figure(fig, path)


def print_rows(rows: list[dict]) -> None:
    headers = ["model", "K", "m", "method", "median s", "x plain [IQR]", "over LB", "task-img/s", "cache MiB", "reps"]
    order = {"plain": 0, "lower_bound": 1, "one_pass": 2, "one_pass_full": 3, "dense": 4, "separate": 5, "lora": 6}
    table = [[r["model"], r["k"], r["m"] or "-", r["method"], f"{r['seconds']['median']:.3f}",
              common.ratio_text(r["ratio_to_plain"]),
              f"{r['over_lower_bound']['median']:+.3f}" if "over_lower_bound" in r else "",
              f"{r['task_images_per_s']:.1f}", f"{r['kv_cache_mb']:.0f}" if "kv_cache_mb" in r else "",
              r["seconds"]["n"]]
             for r in sorted(rows, key=lambda r: (r["model"], r["k"], order[r["method"]]))]
    print(common.format_table(headers, table))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, K in {1, 8}, 1 repetition")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    p.add_argument("--models", nargs="+", default=[TARGET_MODEL, "vit_small_patch16_224"])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32, 100, 256])
    p.add_argument("--m", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--slow-reps", type=int, default=2, help="repetitions of dense, separate and LoRA")
    p.add_argument("--slow-max-k", type=int, default=32, help="largest K for dense, separate and LoRA")
    p.add_argument("--families", nargs="*", default=FAMILIES, help="timm models timed at K=8 (none: skip)")
    p.add_argument("--compile-ks", type=int, nargs="*", default=[1, 8],
                   help="K of the eager/torch.compile comparison on the first model (none: skip)")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                   help="what to run (default: all); e.g. --phases memory re-measures memory alone")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--malloc", choices=["keep", "default"], default="keep",
                   help="keep: glibc keeps freed memory (common.keep_freed_memory), default: glibc's defaults")
    common.add_memory_child_option(p)
    args = p.parse_args(argv)

    if args.measure_memory:
        measure_memory_child(args.measure_memory)
        return 0
    if args.quick:
        args.models, args.ks, args.batch, args.slow_max_k = [common.QUICK_MODEL[0]], [1, 8], 2, 8
        args.reps = args.slow_reps = 1
        args.families = args.families[:0]
        args.compile_ks = []
    target = args.models[0]
    machine = common.machine_info()
    machine["malloc"] = "keep freed memory" if args.malloc == "keep" and common.keep_freed_memory() else "default"
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), load {machine['load_average']}, malloc: {machine['malloc']}",
          flush=True)
    start = time.perf_counter()
    rows: list[dict] = []
    family_rows: list[dict] = []
    compile_rows: list[dict] = []
    memory: list[dict] = []
    targets: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> dict:
        """Write the JSON (and plot) so far: a long run that is cut short keeps its finished phases."""
        machine["load_average_end"] = common.load_average()
        targets[:] = targets_of(rows, family_rows, memory, target, args.m)
        result = {
            "benchmark": "inference",
            "command": common.command_line(),
            "machine": machine,
            "settings": {"models": args.models, "target_model": target, "ks": args.ks, "m": args.m,
                         "batch": args.batch, "reps": args.reps, "slow_reps": args.slow_reps,
                         "slow_max_k": args.slow_max_k, "families": args.families, "quick": args.quick,
                         "weights": "random",
                         "memory_method": "fresh process, glibc mmap threshold fixed at 128 KiB, after one "
                                          "warm-up call: RSS high-water mark while running minus RSS before"},
            "grid": rows,
            "families": family_rows,
            "compile": compile_rows,
            "targets": targets,
            "memory": memory,
            "seconds": time.perf_counter() - start,
        }
        common.write_json(args.out / "inference.json", result)
        if rows:
            plot(rows, args.out / "inference.png")
        return result

    for name in args.models:
        if "scale" not in args.phases:
            break
        vit = common.build_vit(name, args.quick)
        x = common.images_for(vit, args.batch)
        print(f"{name}: K={args.ks} m={args.m}, batch {args.batch}", flush=True)
        rows += scale_phase(vit, name, args.ks, args.m, x, args.reps, args.slow_reps, args.slow_max_k)
        save()
        del vit
    if args.families and "families" in args.phases:
        family_rows += families_phase(args.families, 8, args.m, args.batch, args.reps, args.quick)
        save()
    if args.compile_ks and "compile" in args.phases:
        vit = common.build_vit(target, args.quick)
        compile_rows += compile_phase(vit, target, args.compile_ks, args.m, common.images_for(vit, args.batch),
                                      args.reps)
        save()
        del vit
    if "memory" in args.phases and not args.no_memory:
        for name in args.models:
            memory += measure_memory(name, args.ks, args.m, args.batch, args.quick, args.slow_max_k)
            save()
    result = save()

    print()
    print_rows(rows + family_rows)
    if compile_rows:
        print()
        print(common.format_table(
            ["model", "K", "method", "median s", "x plain", "compiled / eager", "first call s"],
            [[r["model"], r["k"], r["method"], f"{r['seconds']['median']:.3f}", common.ratio_text(r["ratio_to_plain"]),
              common.ratio_text(r["compiled_over_eager"]) if "compiled_over_eager" in r else "",
              f"{r['compile_seconds']:.1f}" if r["compile_seconds"] else ""] for r in compile_rows]))
    if memory:
        print()
        print(common.format_table(
            ["model", "method", "K", "m", "extra MiB", "peak MiB", "cache MiB"],
            [[r["model"], r["method"], r["k"], r["m"], f"{r['extra_mb']:.0f}", f"{r['peak_mb']:.0f}",
              f"{r['kv_cache_mb']:.0f}"] for r in memory]))
    print()
    print(f"targets ({target}, batch {args.batch}, {args.reps} interleaved repetitions, malloc: {machine['malloc']}):")
    common.print_targets(targets)
    print(f"\nwrote {args.out / 'inference.json'} and {args.out / 'inference.png'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
