"""Training many tasks in one pass: what a sweep saves, per step and end to end.

Phase ``step``: one training step over K tasks of a ``MemoryViT`` in one pass against K single-task
steps, on a random-weight timm ViT (model in ``.train()``, non-destructive tasks of m memory tokens, the
same labels for every task, as in a sweep). Both run the library's own step code, the one
``learnable_memory.train.fit`` runs per batch (``learnable_memory.training.step``): ONE ``forward_all``
over the tasks, their summed cross-entropy, one backward, then each task's own clipping, SGD step,
schedule step and the finite check. A single-task step is the same code with one task, as
``fit(model, tasks=[name])`` runs it. Repetitions are interleaved; per repetition, K separate steps cost
K times the mean of ``--single`` timed single-task steps (each on another task): exactly K steps timed
when K <= ``--single``, extrapolated above (the output says which). Peak training memory at K=32 against
K=1: each in a fresh process (``common.measure_in_subprocess``), the RSS high-water mark over two steps
minus the RSS once the model and its optimizers are built.

Phase ``e2e``: ``learnable-memory train --sweep lr=... --sweep n-mem=... --sweep seed=...`` (27
configurations) against the 27 ``learnable-memory train`` runs of the same configurations, one after the
other, on the shipped Fashion-MNIST base (``train``'s default base), each a fresh process as a user would
run it: the wall time ratio, and each configuration's validation accuracy against its own run. The sweep's
``seed`` axis seeds only the initialisation (the data order keeps the run's ``--seed``, 0), so the own run
of a configuration of seed S is ``train --init-seed S`` (with ``--seed`` 0): the same computation, and
every configuration is expected to equal its run. Every run writes its folder and its wall time under
``--out``; a finished run is read, not run again, when the benchmark is restarted with the same ``--out``
and the same command (a run stored for another command runs again; ``--fresh``: run everything again).

    python benchmarks/sweep.py                      # both phases: ViT-S/16, batch 32, 224 px, m=10
    python benchmarks/sweep.py --phases step --reps 3
    python benchmarks/sweep.py --phases e2e         # 27 configurations on the shipped base
    python benchmarks/sweep.py --quick              # tiny model, 2 configurations (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import common
import torch
from accelerate import Accelerator

from learnable_memory import MemoryViT, TaskConfig
from learnable_memory.training.optim import TaskSettings, settings_per_task
from learnable_memory.training.step import Run, backward, optimizer_step
from learnable_memory.training.trainees import make_trainees, start_optimizers, start_schedules

KS = (1, 8, 32, 100)
#: Speed targets: K separate steps / one step over K tasks, at least this.
SPEED_TARGETS = {8: 6.0, 32: 16.0, 100: 25.0}
MEMORY_K, MEMORY_TARGET = 32, 2.0
E2E_TARGET = 10.0
#: Every configuration's validation accuracy equals its own run's (``train --init-seed S``), within this.
E2E_TOLERANCE = 1e-4
E2E_GRID = ["lr=0.03,0.1,0.3", "n-mem=1,5,10", "seed=0,1,2"]
E2E_QUICK_GRID = ["lr=0.3", "n-mem=1", "seed=0,1"]  # seed 1: its own run is train --init-seed 1
#: The ``train`` options every run of phase e2e shares (Fashion-MNIST classes 5-9, validated on the test split).
E2E_ARGS = ["--data", "fashion-mnist", "--class-subset", "5-9", "--steps", "60", "--batch-size", "64"]
E2E_QUICK_ARGS = ["--data", "fashion-mnist", "--class-subset", "5-9", "--steps", "2", "--batch-size", "16",
                  "--max-train", "64", "--val-fraction", "0.25"]


# ----- phase step -----
def task_model(vit: torch.nn.Module, k: int, m: int) -> MemoryViT:
    """A ``MemoryViT`` on ``vit`` with ``k`` trainable non-destructive tasks ``t0..`` of ``m`` memory tokens."""
    model = MemoryViT(vit)
    for i in range(k):
        model.add_task(TaskConfig(f"t{i}", m, common.NUM_CLASSES))
    for task in model.tasks.values():
        task.requires_grad_(True)
    return model.train()


def step_fn(model: MemoryViT, names: list[str], x: torch.Tensor, y: torch.Tensor,
            accelerator: Accelerator) -> Callable[[], None]:
    """One training step of ``names`` as ``fit(model, tasks=names)`` takes it per batch, as a callable."""
    trainees = make_trainees(model, names, settings_per_task(TaskSettings(lr=0.01), names, None))
    start_optimizers(trainees, None, None)
    start_schedules(trainees, 10**9, 0)
    run = Run(accelerator, lambda images, live: model.forward_all(images, live), trainees, several=len(names) > 1)
    count = [0]

    def step() -> None:
        with accelerator.accumulate(model):
            backward(run, x, y)
            count[0] += 1
            optimizer_step(run, count[0])

    return step


def batch_for(vit: torch.nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return common.images_for(vit, batch, g), torch.randint(0, common.NUM_CLASSES, (batch,), generator=g)


def measure_memory_child(job: dict) -> int:
    """Child mode: a model of ``job["k"]`` tasks and its optimizers, then two one-pass steps measured."""
    vit = common.build_vit(job["model"], job["quick"])
    x, y = batch_for(vit, job["batch"])
    model = task_model(vit, job["k"], job["m"])
    common.report_memory(job, step_fn(model, model.task_names, x, y, Accelerator(cpu=True)))
    return 0


def step_phase(args: argparse.Namespace, start: float) -> dict:
    vit = common.build_vit(args.model, args.quick)
    x, y = batch_for(vit, args.batch)
    model = task_model(vit, max(KS), args.m)
    names = model.task_names
    accelerator = Accelerator(cpu=True)
    methods = {f"one_pass_{k}": step_fn(model, names[:k], x, y, accelerator) for k in KS}
    singles = [step_fn(model, [n], x, y, accelerator) for n in names[:args.single]]
    methods["single"] = lambda: [s() for s in singles]
    print(f"{args.model}: batch {args.batch}, m={args.m}, K={list(KS)}, {args.reps} interleaved repetitions; "
          f"separate steps: {args.single} single-task steps timed per repetition", flush=True)
    times = common.interleaved_times(methods, args.reps, warmups={"single": singles[0]},
                                     progress=lambda s: print(f"  {s} ({time.perf_counter() - start:.0f} s)",
                                                              flush=True))
    per_step = [t / args.single for t in times["single"]]
    rows = []
    for k in KS:
        one = times[f"one_pass_{k}"]
        separate = [k * s for s in per_step]
        rows.append({"k": k, "one_pass_s": common.summary(one), "separate_s": common.summary(separate),
                     "speedup": common.ratio_summary(separate, one), "one_pass_over_single":
                     common.ratio_summary(one, per_step), "separate_timed": k <= args.single,
                     "times": one, "separate_times": separate})
    memory = {}
    if not args.no_memory:
        for k in (1, MEMORY_K):
            job = {"k": k, "model": args.model, "batch": args.batch, "m": args.m, "quick": args.quick}
            memory[str(k)] = common.measure_in_subprocess(Path(__file__), job)
            print(f"  memory K={k}: +{memory[str(k)]['extra_mb']:.0f} MiB (peak {memory[str(k)]['peak_mb']:.0f} MiB)",
                  flush=True)
    return {"rows": rows, "single_step_s": common.summary(per_step), "memory": memory}


def step_targets(step: dict) -> list[dict]:
    by = {r["k"]: r for r in step["rows"]}
    out = [common.target_row(f"K={k}: {k} separate steps / one step over {k} tasks", by[k]["speedup"], ">=", t)
           for k, t in SPEED_TARGETS.items()]
    mem = step["memory"]
    if mem:
        v = mem[str(MEMORY_K)]["extra_mb"] / mem["1"]["extra_mb"]
        out.append(common.target_row(f"peak training memory K={MEMORY_K} / K=1", {"median": v, "q1": v, "q3": v,
                                                                                 "n": 1}, "<=", MEMORY_TARGET))
    return out


# ----- phase e2e -----
def e2e_grid(quick: bool) -> list[dict]:
    """The configurations of the e2e grid: ``{"name", "options"}`` (the ``train`` options of its own run)."""
    from learnable_memory.cli.sweep import grid
    from learnable_memory.cli.sweep_axes import SWEEPABLE, sweep_axis

    axes = [sweep_axis(a) for a in (E2E_QUICK_GRID if quick else E2E_GRID)]
    option = {key: "--" + attr.replace("_", "-") for key, (attr, _) in SWEEPABLE.items()}  # seed: --init-seed
    return [{"name": c.name, "values": c.values,
             "options": [opt for key, value in c.values.items() for opt in (option[key], str(value))]}
            for c in grid(axes)]


def timed_run(argv: list[str], folder: Path, fresh: bool) -> dict:
    """Run ``learnable-memory ARGV --out FOLDER`` in a fresh process, or read the record of a finished one
    (``FOLDER.json``: its wall time) when it was run with the same ``argv``."""
    record = folder.with_name(folder.name + ".json")
    if record.is_file() and not fresh:
        stored = json.loads(record.read_text())
        if stored.get("argv") == argv:
            return stored | {"cached": True}
    cmd = [sys.executable, "-m", "learnable_memory", *argv, "--no-progress", "--out", str(folder), "--overwrite"]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    seconds = time.perf_counter() - began
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.with_name(folder.name + ".log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = {"command": " ".join(["learnable-memory", *argv]), "argv": argv, "seconds": seconds}
    common.write_json(record, result)
    return result


def e2e_phase(args: argparse.Namespace, start: float) -> dict:
    root = args.out / ("sweep_e2e_quick" if args.quick else "sweep_e2e")
    shared = E2E_QUICK_ARGS if args.quick else E2E_ARGS
    configs = e2e_grid(args.quick)
    axes = E2E_QUICK_GRID if args.quick else E2E_GRID
    print(f"e2e: {len(configs)} configurations ({' x '.join(axes)}), train {' '.join(shared)}; runs in {root}",
          flush=True)
    sweep = timed_run(["train", *shared, *(o for a in axes for o in ("--sweep", a))], root / "sweep", args.fresh)
    print(f"  sweep: {sweep['seconds']:.1f} s{' (read)' if sweep.get('cached') else ''} "
          f"(total {time.perf_counter() - start:.0f} s)", flush=True)
    rows = {r["name"]: r for r in json.loads((root / "sweep" / "sweep.json").read_text())}
    out = []
    for c in configs:
        alone = timed_run(["train", *shared, *c["options"]], root / "sequential" / c["name"], args.fresh)
        info = json.loads((root / "sequential" / c["name"] / "training.json").read_text())
        seq_val = [h.get("val_accuracy") for h in info["history"] if "val_accuracy" in h]
        swept = rows[c["name"]]
        out.append({"name": c["name"], **c["values"], "seconds": alone["seconds"], "sweep_val": swept["val"],
                    "sequential_val": seq_val, "sweep_last": swept["last"], "sequential_last": info["val_accuracy"],
                    "diff": abs(swept["last"] - info["val_accuracy"])})
        print(f"  {c['name']}: {alone['seconds']:.1f} s{' (read)' if alone.get('cached') else ''}, val "
              f"{info['val_accuracy']:.4f} alone / {swept['last']:.4f} in the sweep "
              f"(total {time.perf_counter() - start:.0f} s)", flush=True)
    total = sum(r["seconds"] for r in out)
    return {"root": str(root), "train_args": shared, "grid": axes, "sweep_seconds": sweep["seconds"],
            "sequential_seconds": total, "ratio": total / sweep["seconds"], "configs": out,
            "max_diff": max(r["diff"] for r in out)}


def e2e_targets(e2e: dict) -> list[dict]:
    v = e2e["ratio"]
    out = [common.target_row(f"{len(e2e['configs'])} train runs / one sweep (wall time)",
                             {"median": v, "q1": v, "q3": v, "n": 1}, ">=", E2E_TARGET)]
    d = e2e["max_diff"]
    out.append(common.target_row("max |val acc sweep - own run|, all configurations",
                                 {"median": d, "q1": d, "q3": d, "n": 1}, "<=", E2E_TOLERANCE))
    return out


# ----- output -----
def plot(result: dict, path: Path) -> None:
    step, e2e = result.get("step"), result.get("e2e")
    fig, axes = common.new_figure(2, width=5.5, height=4.0)
    if step:
        ks = [str(r["k"]) for r in step["rows"]]
        axes[0].bar(ks, [r["speedup"]["median"] for r in step["rows"]], label="measured")
        axes[0].scatter([str(k) for k in SPEED_TARGETS], list(SPEED_TARGETS.values()), color="C3", marker="_",
                        s=400, label="target")
        axes[0].set_xlabel("tasks K")
        axes[0].set_ylabel("K separate steps / one step over K tasks")
        axes[0].legend()
    if e2e:
        names = [c["name"] for c in e2e["configs"]]
        axes[1].scatter([c["sequential_last"] for c in e2e["configs"]], [c["sweep_last"] for c in e2e["configs"]],
                        c="C0")
        lo = min(min(c["sequential_last"], c["sweep_last"]) for c in e2e["configs"])
        axes[1].plot([lo, 1], [lo, 1], color="gray", lw=0.8)
        axes[1].set_xlabel("validation accuracy, own train run")
        axes[1].set_ylabel("validation accuracy, in the sweep")
        axes[1].set_title(f"{len(names)} configurations: {e2e['ratio']:.1f}x less wall time")
    common.save_figure(fig, path)


def print_step(step: dict) -> None:
    print(common.format_table(
        ["K", "one pass s", "K separate s", "separate / one pass [IQR]", "one pass / 1 step", "separate"],
        [[r["k"], f"{r['one_pass_s']['median']:.3f}", f"{r['separate_s']['median']:.3f}",
          common.ratio_text(r["speedup"]), common.ratio_text(r["one_pass_over_single"]),
          "timed" if r["separate_timed"] else "extrapolated"] for r in step["rows"]]))
    for k, m in step["memory"].items():
        print(f"peak training memory K={k}: +{m['extra_mb']:.0f} MiB over the built model "
              f"(peak {m['peak_mb']:.0f} MiB)")


def print_e2e(e2e: dict) -> None:
    print(common.format_table(["configuration", "own run s", "val alone", "val in sweep", "|diff|"],
                              [[c["name"], f"{c['seconds']:.1f}", f"{c['sequential_last']:.4f}",
                                f"{c['sweep_last']:.4f}", f"{c['diff']:.4f}"] for c in e2e["configs"]]))
    print(f"sweep {e2e['sweep_seconds']:.1f} s, {len(e2e['configs'])} runs {e2e['sequential_seconds']:.1f} s: "
          f"{e2e['ratio']:.2f}x; max |diff| of validation accuracy, every configuration against its own run "
          f"(train --init-seed S): {e2e['max_diff']:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, batch 4, 1 repetition, 2 e2e configurations")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT)
    p.add_argument("--phases", nargs="+", choices=("step", "e2e"), default=["step", "e2e"])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--m", type=int, default=10, help="memory tokens per block of every task")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--single", type=int, default=8, help="single-task steps timed per repetition")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--fresh", action="store_true", help="e2e: run every train run again, even when it finished")
    common.add_memory_child_option(p)
    args = p.parse_args(argv)

    if args.measure_memory:
        return measure_memory_child(args.measure_memory)
    if args.quick:
        args.model, args.batch, args.reps = common.QUICK_MODEL[0], 4, 1
    machine = common.announce_machine()
    start = time.perf_counter()
    result: dict = {"benchmark": "sweep", "command": common.command_line(), "machine": machine,
                    "settings": {"model": args.model, "batch": args.batch, "m": args.m, "ks": list(KS),
                                 "reps": args.reps, "single": args.single, "quick": args.quick, "phases": args.phases,
                                 "weights": "random", "optimizer": "SGD momentum 0.9, lr 0.01, clip 1"},
                    "step": None, "e2e": None, "targets": []}
    if "step" in args.phases:
        result["step"] = step_phase(args, start)
        result["targets"] += step_targets(result["step"])
    if "e2e" in args.phases:
        result["e2e"] = e2e_phase(args, start)
        result["targets"] += e2e_targets(result["e2e"])
    machine["load_average_end"] = common.load_average()
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "sweep.json", result)
    plot(result, args.out / "sweep.png")
    print()
    if result["step"]:
        print_step(result["step"])
        if args.single < max(KS):
            print(f"(K separate steps: K x the mean of {args.single} single-task steps timed in the same repetition; "
                  f"timed, not extrapolated, for K <= {args.single})")
        print()
    if result["e2e"]:
        print_e2e(result["e2e"])
        print()
    common.print_targets(result["targets"])
    print(f"\nwrote {args.out / 'sweep.json'} and {args.out / 'sweep.png'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
