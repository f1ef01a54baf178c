"""What one ``train`` run fine-tunes: its :class:`Plan` (a new task, a resumed adapter or a resumed
sweep), the folder it writes, its training and validation images, and how long it trains."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from .. import data as D
from ..model import MemoryViT
from ..training.results import FitState
from .base import base_spec, create_base, refuse_random_weights, save_base, saved_base_spec
from .checkpoints import apply_recorded, read_state, resumed_folder
from .records import load_named_adapters, read_training_info, resolve_adapters
from .sweep import resumed_sweep
from .train_settings import EPOCHS


@dataclass
class Plan:
    """What one ``train`` run fine-tunes, and what its ``training.json`` records."""

    spec: dict  # the base spec (``base_spec``) that rebuilds ``base``
    base: nn.Module
    extend: list[Path]  # adapter folders loaded frozen before the task
    task: str
    source: str  # the data: a built-in name or an ImageFolder directory
    subset: str | list[str] | None  # --class-subset, or the resumed task's class names
    model: MemoryViT | None = None  # the resumed adapter, loaded trainable
    previous: dict = field(default_factory=dict)  # the resumed adapter's training.json
    state: FitState | None = None  # the resumed adapter's optimizer state and schedule position
    records: dict[str, dict] = field(default_factory=dict)  # a resumed sweep: each configuration's training.json


def default_task_name(source: str, subset: str | None) -> str:
    """The data's name (a built-in name or the folder's), with the class subset; only path separators
    and white space are replaced, since the name is also the default folder ``adapters/NAME``."""
    name = source if D.is_builtin(source) else Path(source).resolve().name
    name = f"{name}-{subset.replace(',', '_')}" if subset else name
    return re.sub(r"[\s/\\]+", "_", name)


def _has_model_options(args: argparse.Namespace) -> bool:
    return bool(args.model or args.checkpoint or args.pretrained or args.model_kwargs)


def new_plan(args: argparse.Namespace, accelerator) -> Plan:
    """A new task on the base of the model options (saved first with ``--save-base``)."""
    if args.data is None:
        raise ValueError("train needs --data: fashion-mnist, digits or an ImageFolder directory")
    spec = base_spec(args)
    if not args.save_base:
        refuse_random_weights(spec)
    base = create_base(**spec)
    if args.save_base:
        MemoryViT(base)  # an unsupported base is refused before it is written
        if accelerator.is_main_process:
            save_base(base, spec, args.save_base, overwrite=args.overwrite)
        accelerator.wait_for_everyone()
        spec = saved_base_spec(args.save_base)
        base = create_base(**spec)  # the base as eval and predict will load it
    task = args.task or default_task_name(args.data, args.class_subset)
    return Plan(spec, base, resolve_adapters(args.extend or []), task, args.data, args.class_subset)


def resume_plan(args: argparse.Namespace) -> Plan:
    """The saved adapter ``--resume`` names, on the base and data its ``training.json`` records."""
    if args.save_base:
        raise ValueError("--save-base is for a new adapter; --resume uses the base the adapter was trained on")
    if args.resume.startswith("hf-hub:") and not args.out:
        raise ValueError(f"--resume {args.resume} needs --out DIR: an adapter from the Hub is not written back")
    folders = resolve_adapters([args.resume])
    if len(folders) != 1:
        raise ValueError(f"--resume takes one adapter folder; {args.resume} holds {len(folders)}")
    info = read_training_info(folders[0])
    settings = info.get("settings", {})
    apply_recorded(args, settings if isinstance(settings, dict) else {})
    spec = base_spec(args) if _has_model_options(args) else info.get("base", base_spec(args))
    refuse_random_weights(spec)
    base = create_base(**spec)
    extend = resolve_adapters(args.extend or info.get("extends", []))
    start = load_named_adapters(base, extend, check_fingerprint=not args.no_fingerprint_check) if extend else base
    model = load_named_adapters(start, folders, check_fingerprint=not args.no_fingerprint_check, trainable=True)
    task = model.task_names[-1]
    cfg = model.tasks[task].config
    for opt, have in (("n_mem", cfg.n_mem), ("mode", cfg.mode)):
        if getattr(args, opt) is not None and getattr(args, opt) != have:
            raise ValueError(f"--{opt.replace('_', '-')} {getattr(args, opt)} differs from the resumed "
                             f"adapter's {have}; drop it to resume")
    source = args.data or info.get("data")
    if source is None:
        raise ValueError(f"no data for resumed task {task!r}: pass --data")
    subset = cfg.class_names or args.class_subset or info.get("class_subset")
    return Plan(spec, base, extend, task, source, subset, model, info, read_state(folders[0]))


def sweep_resume_plan(args: argparse.Namespace) -> Plan:
    """A sweep ``--resume`` continues: its configurations loaded trainable on the base they record, their
    optimizer states merged, the grid and settings they record."""
    folders, state = resumed_sweep(Path(args.resume), args)
    records = {f.name: read_training_info(f) for f in folders}
    info = records[folders[0].name]
    apply_recorded(args, info.get("settings", {}))
    spec = info.get("base", {})
    base = create_base(**spec)
    model = load_named_adapters(base, folders, check_fingerprint=not args.no_fingerprint_check, trainable=True)
    cfg = model.tasks[model.task_names[0]].config
    return Plan(spec, base, [], cfg.name, args.data or info.get("data"), cfg.class_names, model, {}, state, records)


def output_folder(args: argparse.Namespace, task: str) -> Path:
    """``--out``, else (resuming) a new folder beside the resumed adapter, else ``adapters/TASK``. An
    existing folder, the resumed adapter included, is refused unless ``--overwrite``: nothing saved is lost."""
    if args.resume and not args.out:
        return resumed_folder(Path(args.resume))
    out = Path(args.out) if args.out else Path("adapters") / task
    if out.exists() and not args.overwrite:
        if args.resume and out.resolve() == Path(args.resume).resolve():
            raise FileExistsError(f"{out} is the adapter being resumed: pass --overwrite to write over it, or drop "
                                  f"--out to write {resumed_folder(out)}")
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    return out


def datasets(args: argparse.Namespace, plan: Plan, accelerator) -> tuple[Dataset, Dataset | None, dict | None]:
    """Training and validation images (``--val-fraction``, else the test split, else 10% held out), and
    how the validation images were chosen, as ``training.json`` records it for ``eval``."""
    config = D.data_config(plan.base)
    train_ds = D.load_dataset(plan.source, "train", config, classes=plan.subset)
    train_ds = D.subsample(train_ds, args.max_train, seed=args.seed)
    held_out = dict(split="held_out", fraction=args.val_fraction, seed=args.seed, max_train=args.max_train)
    if args.val_fraction:
        return *D.holdout(train_ds, args.val_fraction, seed=args.seed), held_out
    if args.no_val:
        return train_ds, None, None
    try:
        return train_ds, D.load_dataset(plan.source, "test", config, classes=plan.subset), dict(split="test")
    except FileNotFoundError:
        if D.is_builtin(plan.source):
            raise
        accelerator.print("no val/test folder: holding out 10% of the training images for validation")
        return *D.holdout(train_ds, 0.1, seed=args.seed), dict(held_out, fraction=0.1)


def run_length(args: argparse.Namespace, plan: Plan) -> tuple[int | None, int | None]:
    """``(steps, epochs)`` of this run: as given; resuming, the rest of the recorded schedule; else
    ``EPOCHS`` epochs."""
    if args.steps or args.epochs:
        return args.steps, args.epochs
    if plan.state is not None:
        if plan.state.step < plan.state.total:
            return plan.state.total - plan.state.step, None
        raise ValueError(f"{args.resume} finished its {plan.state.total} steps: pass --steps N or --epochs N to "
                         "train N more")
    return None, EPOCHS
