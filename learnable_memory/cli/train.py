"""``learnable-memory train``: fine-tune one memory adapter on a frozen base and save it with its
``training.json``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from .. import data as D
from ..model import load_adapters
from .base import TRAINING_FILE, base_spec, create_base, make_accelerator, read_training_info


def _default_task_name(source: str, subset: str | None) -> str:
    name = source if D.is_builtin(source) else Path(source).resolve().name
    name = f"{name}-{subset.replace(',', '_')}" if subset else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def cmd_train(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from ..model import wrap_model
    from ..train import count_trainable, fit

    if args.steps is None and args.epochs is None:
        args.epochs = 3
    accelerator = make_accelerator()
    set_seed(args.seed)
    # base model and task
    spec = base_spec(args)
    extend = list(args.extend or [])
    if args.resume:
        info = read_training_info(args.resume)
        if args.model is None and args.checkpoint is None:
            spec = info.get("base", spec)
        extend = extend or info.get("extends", [])
        base = create_base(**spec)
        start = load_adapters(base, extend) if extend else base  # earlier tasks stay frozen
        model = load_adapters(start, [args.resume], trainable=True)
        task = model.task_names[-1]
        cfg = model.tasks[task].config
        for opt, have in (("n_mem", cfg.n_mem), ("mode", cfg.mode)):
            if getattr(args, opt) is not None and getattr(args, opt) != have:
                raise ValueError(f"--{opt.replace('_', '-')} {getattr(args, opt)} differs from the resumed "
                                 f"adapter's {have}; drop it to resume")
        classes, source = cfg.class_names, args.data or info.get("data")
        if source is None:
            raise ValueError(f"no data for resumed task {task!r}: pass --data")
        subset = classes if classes else (args.class_subset or info.get("class_subset"))
    else:
        if args.data is None:
            raise ValueError("train needs --data: fashion-mnist, digits or an ImageFolder directory")
        base = create_base(**spec)
        source, subset = args.data, args.class_subset
        task = args.task or _default_task_name(source, subset)
    out = Path(args.out) if args.out else (Path(args.resume) if args.resume else Path("adapters") / task)
    resuming_in_place = args.resume is not None and out.resolve() == Path(args.resume).resolve()
    if out.exists() and not (args.overwrite or resuming_in_place):
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    config = D.data_config(base)
    train_ds = D.load_dataset(source, "train", config, classes=subset)
    train_ds = D.subsample(train_ds, args.max_train, seed=args.seed)
    val_ds = None
    if args.val_fraction:
        train_ds, val_ds = D.holdout(train_ds, args.val_fraction, seed=args.seed)
    elif not args.no_val:
        try:
            val_ds = D.load_dataset(source, "test", config, classes=subset)
        except FileNotFoundError:
            if D.is_builtin(source):
                raise
            accelerator.print("no val/test folder: holding out 10% of the training images for validation")
            train_ds, val_ds = D.holdout(train_ds, 0.1, seed=args.seed)
    class_names = list(train_ds.classes)

    if not args.resume:
        n_mem = args.n_mem if args.n_mem is not None else 5
        start = load_adapters(base, extend) if extend else base
        model = wrap_model(start, n_mem=n_mem, task=task, mode=args.mode or "non_destructive",
                           class_names=class_names)
    elif len(class_names) != model.tasks[task].config.num_classes:
        raise ValueError(f"the data has {len(class_names)} classes but task {task!r} has "
                         f"{model.tasks[task].config.num_classes}")
    model.set_task(task)

    g = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, generator=g,
                              num_workers=args.workers)
    val_loader = DataLoader(val_ds, batch_size=args.batch_size * 2, num_workers=args.workers) if val_ds else None
    accelerator.print(f"task {task!r}: {len(class_names)} classes, {len(train_ds)} training images"
                      f"{f', {len(val_ds)} validation images' if val_ds else ''}; "
                      f"{count_trainable(model):,} trainable parameters; {accelerator.num_processes} process(es)")
    result = fit(model, train_loader, val_loader, steps=args.steps, epochs=args.epochs, lr=args.lr,
                 memory_lr_scale=args.memory_lr_scale, optimizer=args.optimizer, weight_decay=args.weight_decay,
                 warmup=args.warmup, clip=args.clip,
                 bf16=args.bf16, accelerator=accelerator, seed=args.seed, progress=not args.no_progress,
                 desc=task, log=accelerator.print)
    if accelerator.is_main_process:
        saved = Path(model.save_adapter(out, task=task))
        previous = read_training_info(args.resume) if args.resume else {}
        info = dict(task=task, data=str(Path(source).resolve()) if not D.is_builtin(source) else source,
                    class_subset=subset if isinstance(subset, str) else previous.get("class_subset"),
                    class_names=class_names, base=spec, extends=[str(Path(e).resolve()) for e in extend],
                    settings=dict(steps=result.steps, batch_size=args.batch_size, processes=accelerator.num_processes,
                                  lr=args.lr, memory_lr_scale=args.memory_lr_scale,
                                  optimizer=args.optimizer, weight_decay=args.weight_decay,
                                  warmup=args.warmup, clip=args.clip, bf16=args.bf16, seed=args.seed),
                    total_steps=previous.get("total_steps", 0) + result.steps,
                    resumed_from=str(Path(args.resume).resolve()) if args.resume else None,
                    history=previous.get("history", []) + result.history,
                    val_accuracy=result.val.get("accuracy"))
        (saved / TRAINING_FILE).write_text(json.dumps(info, indent=2))
        acc = f"validation accuracy {result.val['accuracy']:.4f}; " if result.val else ""
        print(f"{acc}saved adapter {saved}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group, so every process exits cleanly
    return 0
