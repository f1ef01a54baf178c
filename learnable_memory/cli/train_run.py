"""``train``'s run: the model of the task, ``fit`` with checkpoints (``--save-every``, Ctrl-C / SIGTERM),
``--labels`` and ``--sweep``, then the adapter, its record and its optimizer state saved. The parser is
:mod:`.train`; the plan, the output folder and the data :mod:`.train_plan`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import data as D
from ..model import MemoryViT
from ..training.results import FitState
from .base import create_base, make_accelerator
from .checkpoints import RECORDED, apply_recorded, report_interrupt, save_adapter_run, sigterm_raises, training_record
from .labels import check_labels_args, label_data, labels_model, save_labels_run
from .records import load_named_adapters
from .sweep import SWEEP_STATE, check_sweep_args, checkpoint_step, run_sweep, torch_rng_after
from .train_plan import Plan, datasets, new_plan, output_folder, resume_plan, run_length, sweep_resume_plan
from .train_settings import N_MEM


def task_model(args: argparse.Namespace, plan: Plan, class_names: list[str]) -> MemoryViT:
    """The model with the task to train active: the resumed one, or a new task on the base (after
    the ``--extend`` adapters, frozen)."""
    from ..wrapping import wrap_model

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
    if args.init_seed is not None:  # the random state a sweep's configuration of this init seed has
        torch_rng_after(lambda: create_base(**plan.spec))(args.init_seed)
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
        if plan.state and plan.state.epoch:
            at += f" (epoch {plan.state.epoch}, after batch {plan.state.batches})"
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
