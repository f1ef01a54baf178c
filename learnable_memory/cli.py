"""The ``learnable-memory`` command line: train, eval, predict, inspect and demo.

    learnable-memory train --data digits --n-mem 5 --steps 300 --out adapters/digits
    learnable-memory eval adapters/digits adapters/fmnist
    learnable-memory predict shoe.png --adapter adapters/digits adapters/fmnist
    learnable-memory inspect adapters/digits
    learnable-memory demo

``train`` runs unchanged under ``accelerate launch`` (several processes or GPUs). Expected failures
(a bad path, an unknown model, an adapter made for another backbone) print one line,
``learnable-memory: error: ...``, and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from . import data as D
from .config import MODES
from .train import DEFAULTS

PROG = "learnable-memory"
#: Written by ``train`` into the adapter folder: how the adapter was made (data, base model, settings).
TRAINING_FILE = "training.json"


# ----- the base model -----
def create_base(model: str | None = None, *, pretrained: bool = False, checkpoint: str | None = None,
                model_kwargs: dict | None = None) -> nn.Module:
    """Build the frozen base from a model spec.

    Args:
        model: None (the shipped demo base), a directory in timm's ``local-dir`` export format
            (``config.json`` + weights), ``hf-hub:...``/``local-dir:...``, or a timm model name.
        pretrained: Load the timm name's pretrained weights (from the Hugging Face cache or hub).
        checkpoint: A local state dict (``.safetensors``/``.pth``) for the timm name; its head size is
            read from the file.
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``img_size``, ``in_chans``).
    """
    import timm

    kwargs = dict(model_kwargs or {})
    if model is None and checkpoint is None:
        return D.load_demo_base()
    if model is None:
        raise ValueError("--checkpoint needs --model NAME, the timm architecture of the checkpoint")
    if Path(model).is_dir():
        return D.load_demo_base(model)
    if model.startswith(("hf-hub:", "local-dir:")):
        return _create_pretrained(model, kwargs)
    if Path(model).suffix in (".safetensors", ".pth", ".pt", ".bin") or Path(model).is_file():
        raise ValueError(f"{model} is a file: give the architecture and the file, --model NAME --checkpoint {model}")
    if not timm.is_model(model):
        raise ValueError(f"unknown timm model {model!r}; list names with "
                         "python -c \"import timm; print(timm.list_models('vit*'))\"")
    if checkpoint is not None:
        return _create_from_checkpoint(model, Path(checkpoint), kwargs)
    if pretrained:
        return _create_pretrained(model, kwargs)
    return timm.create_model(model, pretrained=False, **kwargs)


def _create_pretrained(name: str, kwargs: dict) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not load pretrained weights for {name} ({first}); offline, use weights already "
                         "in the Hugging Face cache (HF_HUB_OFFLINE=1 skips the network), or a local file with "
                         "--checkpoint FILE") from e


def _create_from_checkpoint(name: str, path: Path, kwargs: dict) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg, load_state_dict

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    state = load_state_dict(str(path))
    cfg = get_pretrained_cfg(name)
    classifier = getattr(cfg, "classifier", None) or "head"
    head = state.get(f"{classifier}.weight")
    if head is not None and "num_classes" not in kwargs:
        kwargs["num_classes"] = head.shape[0]
    model = timm.create_model(name, pretrained=False, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ValueError(f"checkpoint {path} does not fit timm model {name!r}: {detail} "
                         "(pass the architecture's arguments with --model-kwargs)") from e
    return model


def _base_spec(args: argparse.Namespace) -> dict:
    """The model options of ``args`` as a dict (paths made absolute)."""
    model = args.model
    if model is not None and Path(model).is_dir():
        model = str(Path(model).resolve())
    return dict(model=model, pretrained=bool(args.pretrained),
                checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                model_kwargs=_json_arg(args.model_kwargs))


def _json_arg(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs must be a JSON object, e.g. '{{\"img_size\": 28}}': {e}") from e
    if not isinstance(value, dict):
        raise ValueError("--model-kwargs must be a JSON object, e.g. '{\"img_size\": 28}'")
    return value


def read_training_info(adapter: str | Path) -> dict:
    """The ``training.json`` that ``train`` wrote into an adapter folder ({} when absent)."""
    f = Path(adapter) / TRAINING_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _base_for_adapters(args: argparse.Namespace, adapters: Sequence[str]) -> nn.Module:
    """The base given on the command line, else the one the first adapter was trained on, else the demo base."""
    for a in adapters:
        if not Path(a).exists():
            raise FileNotFoundError(f"adapter {a} not found")
    if args.model is not None or args.checkpoint is not None:
        return create_base(**_base_spec(args))
    info = read_training_info(adapters[0]) if adapters else {}
    return create_base(**info.get("base", {}))


def _load_adapters(base: nn.Module, paths: Sequence[str], trainable: bool = False):
    from .loading import load_adapters

    return load_adapters(base, list(paths), trainable=trainable)


# ----- train -----
def _default_task_name(source: str, subset: str | None) -> str:
    name = source if D.is_builtin(source) else Path(source).resolve().name
    name = f"{name}-{subset.replace(',', '_')}" if subset else name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def make_accelerator():
    """accelerate's ``Accelerator``; on a machine without GPUs, one that runs distributed on CPU (gloo)
    when started by ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun``."""
    import os

    from accelerate import Accelerator

    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    return Accelerator(cpu=launched and not torch.cuda.is_available())


def cmd_train(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from .model import wrap_model
    from .train import count_trainable, fit

    if args.steps is None and args.epochs is None:
        args.epochs = 3
    accelerator = make_accelerator()
    set_seed(args.seed)
    # base model and task
    spec = _base_spec(args)
    extend = list(args.extend or [])
    if args.resume:
        info = read_training_info(args.resume)
        if args.model is None and args.checkpoint is None:
            spec = info.get("base", spec)
        extend = extend or info.get("extends", [])
        base = create_base(**spec)
        start = _load_adapters(base, extend) if extend else base  # earlier tasks stay frozen
        model = _load_adapters(start, [args.resume], trainable=True)
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
        start = _load_adapters(base, extend) if extend else base
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
                 optimizer=args.optimizer, weight_decay=args.weight_decay, warmup=args.warmup, clip=args.clip,
                 bf16=args.bf16, accelerator=accelerator, seed=args.seed, progress=not args.no_progress,
                 desc=task, log=accelerator.print)
    if accelerator.is_main_process:
        saved = Path(model.save_adapter(out, task=task))
        previous = read_training_info(args.resume) if args.resume else {}
        info = dict(task=task, data=str(Path(source).resolve()) if not D.is_builtin(source) else source,
                    class_subset=subset if isinstance(subset, str) else previous.get("class_subset"),
                    class_names=class_names, base=spec, extends=[str(Path(e).resolve()) for e in extend],
                    settings=dict(steps=result.steps, batch_size=args.batch_size, processes=accelerator.num_processes,
                                  lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
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


# ----- eval -----
def _parse_data_map(items: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        task, sep, source = item.partition("=")
        if not sep or not task or not source:
            raise ValueError(f"--data takes TASK=SOURCE (e.g. digits=digits), got {item!r}")
        out[task] = source
    return out


def _task_data(task: str, mapping: dict, info: dict, class_names, num_classes: int, split: str,
               config: dict, limit: int | None = None):
    source = mapping.get(task) or info.get("data")
    if source is None:
        raise ValueError(f"no data for task {task!r}: pass --data {task}=SOURCE")
    classes = class_names or info.get("class_subset")
    ds = D.subsample(D.load_dataset(source, split, config, classes=classes), limit)
    if len(ds.classes) != num_classes:
        raise ValueError(f"data {source!r} has {len(ds.classes)} classes but task {task!r} predicts {num_classes}")
    return ds


def _format_confusion(conf: torch.Tensor, names: Sequence[str]) -> str:
    labels = [str(n)[:10] for n in names]
    width = max(6, *(len(lbl) for lbl in labels), len(str(int(conf.max()))) + 1)
    lines = [" " * (width + 2) + "".join(f"{lbl:>{width}}" for lbl in labels) + "   <- predicted"]
    for lbl, row in zip(labels, conf.tolist(), strict=True):
        lines.append(f"{lbl:>{width}}  " + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from .adapter_io import CONFIG_NAME, adapter_folders
    from .train import evaluate

    accelerator = make_accelerator()
    base = _base_for_adapters(args, args.adapters)
    model = _load_adapters(base, args.adapters)
    mapping = _parse_data_map(args.data)
    config = D.data_config(base)
    infos = {}
    for path in args.adapters:
        for folder in adapter_folders(path):
            info = read_training_info(folder)
            infos[info.get("task") or json.loads((folder / CONFIG_NAME).read_text())["task"]] = info
    unknown = sorted(set(mapping) - set(model.task_names) - {"base"})
    if unknown:
        raise ValueError(f"--data names unknown task(s) {unknown}; the tasks are {model.task_names} (and base)")
    jobs = [(t, model.tasks[t].config) for t in model.task_names]
    results = {}
    for task, cfg in jobs:
        ds = _task_data(task, mapping, infos.get(task, {}), cfg.class_names, cfg.num_classes, args.split, config,
                        args.limit)
        loader = accelerator.prepare(DataLoader(ds, batch_size=args.batch_size))
        results[task] = dict(evaluate(model.set_task(task), loader, accelerator=accelerator), classes=ds.classes)
    if "base" in mapping:
        names = D.label_names(base)
        ds = _task_data("base", mapping, {}, names, base.num_classes, args.split, config, args.limit)
        loader = accelerator.prepare(DataLoader(ds, batch_size=args.batch_size))
        results["base"] = dict(evaluate(base, loader, accelerator=accelerator), classes=ds.classes)
    accelerator.end_training()
    if not accelerator.is_main_process:
        return 0
    if args.json:
        print(json.dumps({t: dict(accuracy=r["accuracy"], n=r["n"], classes=r["classes"],
                                  confusion=r["confusion"].tolist()) for t, r in results.items()}, indent=2))
        return 0
    for task, r in results.items():
        print(f"\n== {task}: accuracy {r['accuracy']:.4f} on {r['n']} {args.split} images")
        print(_format_confusion(r["confusion"], r["classes"]))
    return 0


# ----- predict -----
def cmd_predict(args: argparse.Namespace) -> int:
    base = _base_for_adapters(args, args.adapter)
    model = _load_adapters(base, args.adapter)
    config = D.data_config(base)
    transform, mode = D.model_transform(config), D.pil_mode(config)
    images = []
    for p in args.images:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image {p} not found")
        images.append(transform(D.open_image(p, mode)))
    names = {"base": D.label_names(base)}
    names.update({t: model.tasks[t].config.class_names for t in model.task_names})
    predictions = [{"image": str(p), "tasks": {}} for p in args.images]
    with torch.inference_mode():
        for start in range(0, len(images), args.batch_size):
            outputs = model.forward_all(torch.stack(images[start:start + args.batch_size]))
            for task, logits in outputs.items():
                probs = logits.float().softmax(-1)
                top = probs.topk(min(args.top_k, probs.shape[-1]), dim=-1)
                for i, (p_row, i_row) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
                    labels = names.get(task)
                    predictions[start + i]["tasks"][task] = [
                        {"label": labels[j] if labels else str(j), "index": j, "prob": round(p, 6)}
                        for p, j in zip(p_row, i_row, strict=True)]
    print(json.dumps({"tasks": list(outputs), "predictions": predictions}, indent=2))
    return 0


# ----- inspect -----
def _print_tree(value: dict, indent: int = 1) -> None:
    """Print a nested dict as indented ``key: value`` lines; short lists stay on one line."""
    pad = "  " * indent
    for k, v in value.items():
        if isinstance(v, dict) and v:
            print(f"{pad}{k}:")
            _print_tree(v, indent + 1)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            print(f"{pad}{k}:")
            for x in v:
                print(f"{pad}  - " + ", ".join(f"{a}={_short(b)}" for a, b in x.items()))
        else:
            print(f"{pad}{k}: {_short(v)}")


def _short(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple):
        items = [_short(x) for x in v[:12]] + ([f"... ({len(v)} items)"] if len(v) > 12 else [])
        return "[" + ", ".join(items) + "]"
    if isinstance(v, dict):
        return "{}" if not v else ", ".join(f"{a}={_short(b)}" for a, b in v.items())
    return str(v)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .adapter_io import inspect_adapter

    if not Path(args.adapter).exists():
        raise FileNotFoundError(f"adapter {args.adapter} not found")
    info = inspect_adapter(args.adapter)
    training = read_training_info(args.adapter)
    if args.json:
        print(json.dumps(dict(info, training=training) if training else info, indent=2, default=str))
        return 0
    size = info.get("file_size")
    print(f"adapter {args.adapter}: task {info.get('task')!r}, {info.get('mode')}, {info.get('n_mem')} memory "
          f"tokens per block, {info.get('num_classes')} classes, {info.get('num_params', 0):,} parameters"
          + (f", {size / 1024:.1f} KiB on disk" if isinstance(size, int) else ""))
    _print_tree(info)
    if training:
        print("  training (training.json):")
        keep = {k: training[k] for k in ("data", "class_subset", "base", "extends", "settings", "total_steps",
                                          "val_accuracy", "resumed_from") if training.get(k) not in (None, [])}
        _print_tree(keep, 2)
    return 0


# ----- demo -----
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=args.out, quick=args.quick, steps=args.steps, seed=args.seed)
    return 0


# ----- parser -----
def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "base model (default: the one the adapter was trained on, else the shipped Fashion-MNIST ViT)")
    g.add_argument("--model", help="timm model name, hf-hub:/local-dir: spec, or a timm export directory")
    g.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights")
    g.add_argument("--checkpoint", help="local weights file (.safetensors/.pth) for --model")
    g.add_argument("--model-kwargs", help="JSON object of extra timm.create_model arguments")


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog=PROG, parents=[debug], description=(
        "Fine-tune frozen timm Vision Transformers with learnable memory (Sandler et al., CVPR 2022) "
        "and serve many tasks in one forward pass."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", parents=[debug], help="fine-tune one memory adapter",
                       description="Fine-tune a memory adapter (memory, class token and head) on a frozen base. "
                       "Runs unchanged under `accelerate launch` (--batch-size is per process).")
    p.add_argument("--data", help="fashion-mnist, digits or an ImageFolder directory")
    p.add_argument("--class-subset", help="classes to train on: indices, ranges or names, e.g. 5-9 or Sandal,Bag")
    p.add_argument("--task", help="task name (default: from the data)")
    _add_model_options(p)
    p.add_argument("--n-mem", type=int, help="memory tokens per block (default 5; 0 = head + class token)")
    p.add_argument("--mode", choices=MODES, help="attention regime (default non_destructive)")
    p.add_argument("--extend", nargs="+", metavar="ADAPTER", help="earlier adapters loaded frozen first "
                   "(what --mode extension attends to)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=int, help="passes over the training data (default 3)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate (default %(default)s)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=DEFAULTS["optimizer"],
                   help="default %(default)s (momentum 0.9)")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--warmup", type=float, default=DEFAULTS["warmup"],
                   help="warm-up steps, or fraction of the steps if < 1 (default %(default)s)")
    p.add_argument("--clip", type=float, default=DEFAULTS["clip"], help="max gradient norm (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="per process (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--max-train", type=int, help="use at most this many training images")
    p.add_argument("--val-fraction", type=float, help="validate on this fraction of the training images "
                   "(default: the test split)")
    p.add_argument("--no-val", action="store_true", help="skip per-epoch validation")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--out", help="adapter folder to write (default adapters/TASK)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--resume", metavar="ADAPTER", help="continue training a saved adapter (written back in place "
                   "unless --out is given)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", parents=[debug], help="accuracy and confusion matrix per task",
                       description="Accuracy and confusion matrix of every task of one or more adapters, "
                       "on each task's own data (from its training.json, or --data TASK=SOURCE).")
    p.add_argument("adapters", nargs="+", help="adapter folders")
    p.add_argument("--data", nargs="+", metavar="TASK=SOURCE", help="data per task; base=SOURCE evaluates the "
                   "base model too")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--limit", type=int, help="evaluate on a fixed random subset of at most this many images per task")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_model_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", parents=[debug], help="top-k labels of every task in one forward pass (JSON)",
                       description="Classify image files with the base model and every adapter in ONE forward "
                       "pass; prints JSON.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--adapter", nargs="+", required=True, help="adapter folders")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    _add_model_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("inspect", parents=[debug], help="describe a saved adapter",
                       description="Print what an adapter holds: task, shapes, sizes, base fingerprint.")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", parents=[debug], help="the whole story in one command (offline, a few minutes)",
                       description="Fine-tune memory adapters for two new tasks on the shipped base, compare with "
                       "head-only, serve all tasks in one pass, print a table and write a figure.")
    p.add_argument("--out", default="demo_output", help="output directory (default %(default)s)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per run (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny run (seconds) to check the set-up")
    p.set_defaults(func=cmd_demo)
    return parser


#: Errors that come from bad input: reported in one line.
EXPECTED_ERRORS = (OSError, ValueError, TypeError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``learnable-memory``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EXPECTED_ERRORS as e:
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
