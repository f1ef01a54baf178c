"""``train --sweep KEY=V1,V2 ...``: a grid of configurations trained as tasks of one model, in ONE pass per
batch (:func:`~learnable_memory.training.fit` with a task per configuration), then written as one adapter
folder per configuration, ``sweep.json``, ``sweep.csv``, ``sweep.png``, the best one copied to ``best``,
and the leaderboard printed."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TaskConfig
from ..model import MemoryViT
from ..training import FitState
from .checkpoints import adapter_writer, read_state, save_run, save_runs
from .sweep_axes import SWEEPABLE

#: Written in a sweep's folder: its grid and step, so ``--resume OUT`` continues it.
SWEEP_STATE = "sweep_state.json"
#: The fit settings among them (the others shape a task when it is made).
FIT_KEYS = ("lr", "memory_lr_scale", "weight_decay", "warmup", "clip", "optimizer")


@dataclass
class Config:
    """One configuration of the grid: its readable name and the values it sets (option name -> value)."""

    name: str
    values: dict[str, object]

    def setting(self, args: argparse.Namespace, key: str):
        """The configuration's value of ``args`` attribute ``key`` (swept, else the run's)."""
        for option, value in self.values.items():
            if SWEEPABLE[option][0] == key:
                return value
        return getattr(args, key)


def grid(axes: list[tuple[str, list]]) -> list[Config]:
    """Every combination of the axes, named ``lr-0.1_n-mem-5`` (folder and task name alike)."""
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--sweep names {sorted({k for k in keys if keys.count(k) > 1})} twice: give each key once")
    options = [SWEEPABLE[k][0] for k in keys]
    if len(set(options)) != len(options):
        same = sorted(k for k in keys if options.count(SWEEPABLE[k][0]) > 1)
        raise ValueError(f"--sweep {' and '.join(same)} are one option: give one of them")
    return [Config("_".join(f"{k}-{v}" for k, v in zip(keys, combo, strict=True)), dict(zip(keys, combo, strict=True)))
            for combo in itertools.product(*(values for _, values in axes))]


def sweep_model(args: argparse.Namespace, base, configs: list[Config], class_names: list[str],
                seed_rng: Callable[[int], None]) -> MemoryViT:
    """A model with one trainable task per configuration, each initialised as ``train --init-seed S`` would
    (``seed_rng(S)`` puts the random state where a run of init seed S has it when it makes its task)."""
    model = MemoryViT(base)
    for c in configs:
        seed_rng(init_seed(args, c))
        model.add_task(TaskConfig(c.name, c.setting(args, "n_mem"), len(class_names), mode=args.mode
                                  or "non_destructive", init_std=c.setting(args, "init_std"),
                                  class_names=list(class_names)))
    for task in model.tasks.values():
        task.requires_grad_(True)
    return model


def fit_settings(args: argparse.Namespace, configs: list[Config]) -> dict[str, dict]:
    """``fit``'s ``settings``: each configuration's optimizer settings."""
    return {c.name: {k: c.setting(args, k) for k in FIT_KEYS} for c in configs}


def leaderboard(configs: list[Config], result, seconds: float) -> list[dict]:
    """One row per configuration, best validation accuracy first."""
    rows = []
    for c in configs:
        r = result.tasks[c.name]
        rows.append(dict(name=c.name, **c.values, best=r.best_metric, best_step=r.best_step,
                         last=r.val.get("accuracy"), stopped=r.stopped, seconds=seconds,
                         val=[row.get("val_accuracy") for row in r.history]))
    return sorted(rows, key=lambda r: -1.0 if r["best"] is None else -r["best"])


def write_tables(out: Path, rows: list[dict], keys: list[str]) -> None:
    """``sweep.json`` and ``sweep.csv`` (configuration, validation accuracy per evaluation, best, time)."""
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    evaluations = max(len(r["val"]) for r in rows)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", *keys, *(f"val_{i + 1}" for i in range(evaluations)), "best", "best_step", "stopped",
                    "seconds"])
        for r in rows:
            vals = r["val"] + [None] * (evaluations - len(r["val"]))
            w.writerow([r["name"], *(r[k] for k in keys), *vals, r["best"], r["best_step"], r["stopped"] or "",
                        f"{r['seconds']:.1f}"])


def write_figure(out: Path, rows: list[dict], axes: list[tuple[str, list]]) -> None:
    """``sweep.png``: best validation accuracy per configuration, a heat map when two axes vary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varying = [(k, v) for k, v in axes if len(v) > 1]
    best = {r["name"]: (r["best"] if r["best"] is not None else float("nan")) for r in rows}
    fig, ax = plt.subplots(figsize=(7, 5))
    if len(varying) == 2 and len(axes) == 2:
        (ky, vy), (kx, vx) = axes
        cells = [[best[f"{ky}-{y}_{kx}-{x}"] for x in vx] for y in vy]
        im = ax.imshow(cells, cmap="viridis")
        ax.set_xticks(range(len(vx)), [str(x) for x in vx])
        ax.set_yticks(range(len(vy)), [str(y) for y in vy])
        ax.set_xlabel(kx)
        ax.set_ylabel(ky)
        for i, row in enumerate(cells):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(im, ax=ax, label="best validation accuracy")
    else:
        names = [r["name"] for r in rows]
        ax.barh(names[::-1], [best[n] for n in names[::-1]])
        ax.set_xlabel("best validation accuracy")
    ax.set_title("sweep: validation accuracy per configuration")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def copy_best(out: Path, name: str) -> Path:
    """Copy configuration ``name``'s folder to ``OUT/best``, whole or not at all."""
    return save_run(out / "best", lambda folder: shutil.copytree(out / name, folder))


def format_leaderboard(rows: list[dict], keys: list[str]) -> str:
    """The leaderboard as an aligned text table."""
    head = ["rank", *keys, "best val", "step", "note"]
    body = [[str(i + 1), *(str(r[k]) for k in keys), "-" if r["best"] is None else f"{r['best']:.4f}",
             str(r["best_step"] or "-"), "stopped: " + r["stopped"] if r["stopped"] else ""]
            for i, r in enumerate(rows)]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])


def init_seed(args: argparse.Namespace, config: Config | None = None) -> int:
    """The seed of a new task's initialisation: ``config``'s (its ``seed`` axis), else ``--init-seed``, else
    ``--seed``."""
    value = config.setting(args, "init_seed") if config is not None else args.init_seed
    return args.seed if value is None else value


def torch_rng_after(make_base: Callable[[], object]) -> Callable[[int], None]:
    """``seed_rng(S)``: torch's random state as a ``train --init-seed S`` run has it when it makes its task
    (after seeding S and building the base, as ``train --seed S`` has it), recorded once per seed."""
    from accelerate.utils import set_seed

    states: dict[int, torch.Tensor] = {}

    def seed_rng(seed: int) -> None:
        if seed not in states:
            set_seed(seed)
            make_base()
            states[seed] = torch.get_rng_state()
        torch.set_rng_state(states[seed])

    return seed_rng


def check_sweep_args(args: argparse.Namespace) -> None:
    """What a sweep can not be combined with, as one-line errors."""
    for option, given in (("--resume", args.resume), ("--extend", args.extend), ("--task", args.task)):
        if given:
            raise ValueError(f"--sweep trains new tasks named by their configuration: drop {option}")
    if args.mode == "full":
        raise ValueError("--sweep trains its configurations in one pass; full-mode tasks can not share one: use "
                         "--mode non_destructive")


def save_configs(model: MemoryViT, out: Path, configs: list[Config], result, args: argparse.Namespace,
                 record: Callable, complete: bool = True) -> None:
    """Every configuration's adapter folder under ``out`` (with its ``training.json`` and optimizer state), and
    ``sweep_state.json``, from which ``--resume OUT`` continues the sweep."""
    out.mkdir(parents=True, exist_ok=True)
    writers = []
    for c in configs:
        r = result.tasks[c.name]
        cargs = argparse.Namespace(**vars(args))
        for option, value in c.values.items():
            setattr(cargs, SWEEPABLE[option][0], value)
        writers.append((out / c.name, adapter_writer(model, c.name, record(cargs, c.name, r, complete),
                                                     r.state.of_task(c.name))))
    save_runs(writers)  # every folder written, then all put in place: a kill -9 while writing keeps the last set
    (out / SWEEP_STATE).write_text(json.dumps({"sweep": args.sweep, "step": result.state.step,
                                               "complete": complete}))


def checkpoint_step(out: Path) -> int | None:
    """The step of the sweep checkpoint in ``out``, or None."""
    f = Path(out) / SWEEP_STATE
    return json.loads(f.read_text())["step"] if f.is_file() else None


def resumed_sweep(folder: Path, args: argparse.Namespace) -> tuple[list[Path], FitState]:
    """The configuration folders of the sweep in ``folder`` (its grid set on ``args.sweep``) and their
    states (optimizers, schedule and data position) merged into one ``FitState``."""
    recorded = json.loads((folder / SWEEP_STATE).read_text())
    if args.sweep:
        raise ValueError(f"--resume {folder} continues the grid it recorded: drop --sweep")
    args.sweep = [(k, list(v)) for k, v in recorded["sweep"]]
    folders = [folder / c.name for c in grid(args.sweep)]
    states = [read_state(f) for f in folders]
    if any(s is None for s in states):
        raise ValueError(f"{folder}: a configuration has no training_state.pt; the sweep can not be resumed")
    return folders, FitState.merged(states)


def run_sweep(args: argparse.Namespace, model: MemoryViT | None, base, out: Path, loaders: tuple,
              class_names: list[str], fit: Callable, record: Callable, make_base: Callable, accelerator,
              resume=None) -> list[dict]:
    """Train the grid of ``args.sweep`` in one pass per batch (``model``: a resumed sweep's, else a new one on
    ``base``) and write what the module docstring lists; ``--save-every`` writes every configuration
    periodically. ``record(config_args, task, task_result, complete)`` is a configuration's ``training.json``;
    ``make_base()`` builds the base as ``train`` does."""
    configs = grid(args.sweep)
    if model is None:
        model = sweep_model(args, base, configs, class_names, torch_rng_after(make_base))
    accelerator.print(f"sweep: {len(configs)} configurations of {' x '.join(k for k, _ in args.sweep)}, "
                      "trained in one pass per batch" + (f", from step {resume.step}" if resume else ""))

    def checkpoint(state, so_far) -> None:
        if accelerator.is_main_process:
            save_configs(model, out, configs, so_far, args, record, complete=False)
        accelerator.wait_for_everyone()

    train_loader, val_loader = loaders
    result = fit(model, train_loader, val_loader, settings=fit_settings(args, configs),
                 restore_best=val_loader is not None, resume=resume, checkpoint_every=args.save_every,
                 on_checkpoint=checkpoint)
    rows = leaderboard(configs, result, result.seconds)
    if accelerator.is_main_process:
        save_configs(model, out, configs, result, args, record)
        keys = [k for k, _ in args.sweep]
        write_tables(out, rows, keys)
        write_figure(out, rows, args.sweep)
        if rows[0]["best"] is not None:
            copy_best(out, rows[0]["name"])
        print(format_leaderboard(rows, keys))
        best = f"; best {rows[0]['name']} ({rows[0]['best']:.4f}) copied to {out / 'best'}" if rows[0]["best"] else ""
        print(f"saved {len(configs)} adapters, sweep.json, sweep.csv and sweep.png in {out}{best}")
    return rows
