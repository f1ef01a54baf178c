"""``learnable-memory train``: fine-tune one memory adapter on a frozen base and save it with its
``training.json`` (data, base model spec, settings, validation split, history), from which ``eval`` and
``predict`` rebuild the base and the data, and ``training_state.pt`` (the optimizer state and the
schedule position), from which ``--resume`` continues with the recorded settings. ``--save-every``
writes the same folder periodically; Ctrl-C or SIGTERM then keeps the last one."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import data as D
from ..config import MODES
from ..model import MemoryViT
from ..training.optim import DEFAULTS
from ..training.results import FitState
from .base import (
    add_model_options,
    base_spec,
    create_base,
    make_accelerator,
    refuse_random_weights,
    save_base,
    saved_base_spec,
)
from .checkpoints import (
    RECORDED,
    apply_recorded,
    read_state,
    report_interrupt,
    resumed_folder,
    save_adapter_run,
    sigterm_raises,
    training_record,
)
from .labels import check_labels_args, label_data, labels_model, save_labels_run
from .options import fraction, non_negative_float, non_negative_int, positive_float, positive_int, task_name
from .records import (
    add_adapter_options,
    load_named_adapters,
    read_training_info,
    resolve_adapters,
)
from .sweep import SWEEP_STATE, SWEEPABLE, check_sweep_args, checkpoint_step, resumed_sweep, run_sweep, sweep_axis

N_MEM, EPOCHS = 5, 3  # defaults of --n-mem and --epochs (None in the parser, so --resume can tell)

def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="fine-tune one memory adapter",
        description="Fine-tune a memory adapter (memory, class token and head) on a frozen base. "
        "Runs unchanged under `accelerate launch` (--batch-size is per process).")
    p.add_argument("--data", help="fashion-mnist, digits or an ImageFolder directory")
    p.add_argument("--class-subset", help="classes to train on: indices, ranges or names, e.g. 5-9 or Sandal,Bag")
    p.add_argument("--task", type=task_name, help="task name (default: from the data)")
    add_model_options(p)
    p.add_argument("--save-base", metavar="DIR", help="write the base model to DIR (timm's local-dir format) and "
                   "record DIR as the adapter's base; needed for a --model with random weights")
    p.add_argument("--n-mem", type=non_negative_int, help=f"memory tokens per block (default {N_MEM}; "
                   "0 = head + class token)")
    p.add_argument("--mode", choices=MODES, help="attention regime (default non_destructive)")
    p.add_argument("--extend", nargs="+", metavar="ADAPTER", help="earlier adapters loaded frozen first "
                   "(what --mode extension attends to)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help="optimizer steps")
    length.add_argument("--epochs", type=positive_int, help=f"passes over the training data (default {EPOCHS})")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--memory-lr-scale", type=positive_float,
                   help=f"the memory tokens' learning rate is --lr times this (default {DEFAULTS['memory_lr_scale']})")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), help=f"default {DEFAULTS['optimizer']} (momentum 0.9)")
    p.add_argument("--weight-decay", type=non_negative_float, help=f"default {DEFAULTS['weight_decay']}")
    p.add_argument("--warmup", type=non_negative_float,
                   help=f"warm-up steps, or fraction of the steps if < 1 (default {DEFAULTS['warmup']})")
    p.add_argument("--clip", type=positive_float, help=f"max gradient norm (default {DEFAULTS['clip']})")
    p.add_argument("--batch-size", type=positive_int, help=f"per process (default {RECORDED['batch_size']})")
    p.add_argument("--seed", type=non_negative_int, help="default 0; also the seed of --max-train and the "
                   "validation split")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    p.add_argument("--max-train", type=positive_int, help="use at most this many training images")
    p.add_argument("--val-fraction", type=fraction, help="validate on this fraction of the training images "
                   "(default: the test split); recorded, so eval can rebuild the split")
    p.add_argument("--no-val", action="store_true", default=None, help="skip per-epoch validation")
    p.add_argument("--workers", type=non_negative_int, default=0, help="data loader worker processes")
    p.add_argument("--out", help="adapter folder to write (default adapters/TASK; resuming: a new folder "
                   "ADAPTER-resumed beside the adapter)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --save-base)")
    p.add_argument("--resume", metavar="ADAPTER", help="continue training a saved adapter with its recorded "
                   "settings (options given here override them), optimizer state and schedule position")
    p.add_argument("--init-std", type=positive_float, help="the new memory's initial standard deviation "
                   "(default 0.02)")
    p.add_argument("--sweep", action="append", type=sweep_axis, metavar="KEY=V1,V2",
                   help="train the grid of every --sweep in one pass per batch, one adapter per configuration under "
                   f"--out, with sweep.json/.csv/.png and the best copied to OUT/best; KEY: {', '.join(SWEEPABLE)} "
                   "(seed: of the initialisation)")
    p.add_argument("--labels", metavar="FILE.csv", help="train an adapter per label column of FILE.csv (a 'path' "
                   "column, relative to the file, then a column per task; an empty cell is no label) in one pass "
                   "per batch, each under --out/COLUMN")
    p.add_argument("--tasks", nargs="+", metavar="COLUMN", help="with --labels: the columns to train (default all)")
    p.add_argument("--save-every", type=positive_int, metavar="STEPS", help="write the adapter (and what --resume "
                   "needs) to --out every STEPS steps; Ctrl-C or SIGTERM then keeps the last one")
    add_adapter_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


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


def task_model(args: argparse.Namespace, plan: Plan, class_names: list[str]) -> MemoryViT:
    """The model with the task to train active: the resumed one, or a new task on the base (after
    the ``--extend`` adapters, frozen)."""
    from ..model import wrap_model

    if plan.model is not None:
        have = plan.model.tasks[plan.task].config.num_classes
        if len(class_names) != have:
            raise ValueError(f"the data has {len(class_names)} classes but task {plan.task!r} has {have}")
        return plan.model.set_task(plan.task)
    start = plan.base
    if plan.extend:
        start = load_named_adapters(plan.base, plan.extend, check_fingerprint=not args.no_fingerprint_check)
        if plan.task in start.tasks:
            raise ValueError(f"an --extend adapter already holds task {plan.task!r}: name this one with --task NAME")
    return wrap_model(start, n_mem=N_MEM if args.n_mem is None else args.n_mem, task=plan.task,
                      init_std=args.init_std or 0.02,
                      mode=args.mode or "non_destructive", class_names=class_names)


def _fit_args(args: argparse.Namespace, steps: int | None, epochs: int | None, accelerator) -> dict:
    """``fit``'s keyword arguments from the options."""
    return dict(steps=steps, epochs=epochs, lr=args.lr, memory_lr_scale=args.memory_lr_scale,
                optimizer=args.optimizer, weight_decay=args.weight_decay, warmup=args.warmup, clip=args.clip,
                bf16=args.bf16, accelerator=accelerator, seed=args.seed, progress=not args.no_progress,
                log=accelerator.print)


def run_labels(args: argparse.Namespace, accelerator) -> int:
    """``--labels``: a task per column, trained in one pass per batch, saved one folder each."""
    from ..train import fit

    args.data, args.init_std = args.labels, args.init_std or 0.02
    args.n_mem = N_MEM if args.n_mem is None else args.n_mem
    plan = new_plan(args, accelerator)
    out = output_folder(args, Path(args.labels).stem)
    table, train_ds, val_ds, validation = label_data(args, D.data_config(plan.base))
    model = labels_model(args, plan.base, table, lambda: create_base(**plan.spec))
    g = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=g,
                              num_workers=args.workers)
    val_loader = DataLoader(val_ds, batch_size=args.batch_size * 2, num_workers=args.workers) if val_ds else None
    accelerator.print(f"{len(table.tasks)} tasks ({', '.join(table.tasks)}) on {len(train_ds)} training images"
                      f"{f', {len(val_ds)} validation images' if val_ds else ''}, in one pass per batch")
    steps, epochs = run_length(args, plan)
    result = fit(model, train_loader, val_loader, **_fit_args(args, steps, epochs, accelerator), desc="labels",
                 restore_best=val_loader is not None)
    if accelerator.is_main_process:
        save_labels_run(model, out, table, result, save_adapter_run,
                        lambda task, r: training_record(args, dataclasses.replace(plan, task=task),
                                                        table.classes[task], r, accelerator.num_processes,
                                                        validation))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def sweep(args: argparse.Namespace, plan: Plan, out: Path, loaders: tuple, class_names: list[str],
          validation: dict | None, fit_args: dict, accelerator) -> int:
    """``--sweep`` (or a sweep's ``--resume``): the grid in one pass per batch; Ctrl-C / SIGTERM in one line."""
    from ..train import fit

    args.n_mem, args.init_std = N_MEM if args.n_mem is None else args.n_mem, args.init_std or 0.02

    def record(cargs: argparse.Namespace, task: str, result, complete: bool) -> dict:
        config_plan = dataclasses.replace(plan, task=task, previous=plan.records.get(task, {}))
        return training_record(cargs, config_plan, class_names, result, accelerator.num_processes, validation,
                               complete)

    try:
        with sigterm_raises():
            run_sweep(args, plan.model, plan.base, out, loaders, class_names,
                      fit=lambda *a, **k: fit(*a, **fit_args, desc="sweep", **k), record=record,
                      make_base=lambda: create_base(**plan.spec), accelerator=accelerator, resume=plan.state)
    except KeyboardInterrupt as e:
        from . import PROG

        return report_interrupt(e, out, checkpoint_step(out), PROG)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def run(args: argparse.Namespace) -> int:
    """Plan, check the output folder, load the data, train (with checkpoints), then save the adapter, its
    record and its optimizer state."""
    from accelerate.utils import set_seed

    from ..train import count_trainable, fit

    accelerator = make_accelerator()
    if args.resume and (Path(args.resume) / SWEEP_STATE).is_file():
        plan = sweep_resume_plan(args)
        set_seed(args.seed)
    elif args.resume:
        plan = resume_plan(args)
        set_seed(args.seed)
    elif args.labels:
        check_labels_args(args)
        apply_recorded(args, {})
        set_seed(args.seed)
        return run_labels(args, accelerator)
    else:
        apply_recorded(args, {})
        set_seed(args.seed)
        plan = new_plan(args, accelerator)
    if args.sweep and not plan.records:
        check_sweep_args(args)
    out = output_folder(args, plan.task + ("-sweep" if args.sweep else ""))
    train_ds, val_ds, validation = datasets(args, plan, accelerator)
    class_names = list(train_ds.classes)
    model = None if args.sweep else task_model(args, plan, class_names)
    g = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=g,
                              num_workers=args.workers)
    val_loader = DataLoader(val_ds, batch_size=args.batch_size * 2, num_workers=args.workers) if val_ds else None
    steps, epochs = run_length(args, plan)
    fit_args = _fit_args(args, steps, epochs, accelerator)
    if args.sweep:
        return sweep(args, plan, out, (train_loader, val_loader), class_names, validation, fit_args, accelerator)
    accelerator.print(f"task {plan.task!r}: {len(class_names)} classes, {len(train_ds)} training images"
                      f"{f', {len(val_ds)} validation images' if val_ds else ''}; "
                      f"{count_trainable(model):,} trainable parameters; {accelerator.num_processes} process(es)")
    if args.resume:
        at = f"at step {plan.state.step} of its schedule" if plan.state else "with a fresh optimizer (no saved state)"
        accelerator.print(f"resuming {args.resume} {at}: " + ", ".join(f"{k} {getattr(args, k)}" for k in RECORDED)
                          + f"; writing {out}")
    saved: dict = {}

    def checkpoint(state: FitState, so_far) -> None:
        if accelerator.is_main_process:
            record = training_record(args, plan, class_names, so_far, accelerator.num_processes, validation, False)
            save_adapter_run(model, out, plan.task, record, state)
        saved["step"] = state.step
        accelerator.wait_for_everyone()

    try:
        with sigterm_raises():
            result = fit(model, train_loader, val_loader, **fit_args, desc=plan.task, resume=plan.state,
                         checkpoint_every=args.save_every, on_checkpoint=checkpoint)
    except KeyboardInterrupt as e:
        from . import PROG

        return report_interrupt(e, out, saved.get("step"), PROG)
    if accelerator.is_main_process:
        record = training_record(args, plan, class_names, result, accelerator.num_processes, validation)
        saved_to = save_adapter_run(model, out, plan.task, record, result.state)
        acc = f"validation accuracy {result.val['accuracy']:.4f}; " if result.val else ""
        print(f"{acc}saved adapter {saved_to}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group, so every process exits cleanly
    return 0
