"""``learnable-memory predict``: label images with the base model and every adapter's task, ONE forward
pass per batch for all of them (one per preprocessing, when tasks were trained with different ones).

    learnable-memory predict shoe.png cat.jpg --adapter adapters/digits       # JSONL rows on stdout
    learnable-memory predict photos/ --adapter adapters/* --out labels/ --workers 4
    learnable-memory predict @list.txt --adapter a b --out labels/ --resume --shard 0/8

The inputs, the columns, the output folder and ``--resume`` are those of :mod:`learnable_memory.batch`
(:func:`~learnable_memory.batch.job.predict_dataset`); the schema is in :mod:`learnable_memory.batch.schema`.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..batch.formats import DTYPE_NAMES, FORMATS, PART_SIZE
from ..batch.sources import TABLES, is_image_name, list_images, parse_shard
from .base import add_model_options
from .options import add_adapter_options, non_negative_int, positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="label images with every task in one forward pass (JSONL, or a Parquet dataset)",
        description="Label images with the base model and every adapter in ONE forward pass per batch. Without "
                    "--out, prints one JSON line per image; with --out DIR, writes a resumable dataset of part "
                    "files (Parquet by default) and DIR/_manifest.json.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, folders (searched recursively), glob patterns, @list.txt (one path a line, "
                        "relative to the list), CSV/Parquet files with a 'path' column, webdataset .tar shards")
    p.add_argument("--adapter", nargs="+", default=[], metavar="ADAPTER",
                   help="adapter folders, save_pretrained folders or hf-hub:owner/repo (images after them are "
                        "taken as inputs; default: the base model alone)")
    p.add_argument("--tasks", type=_names, action="extend", metavar="NAMES",
                   help="comma-separated outputs to write, task names and/or base (default: base and every task)")
    p.add_argument("--top-k", type=positive_int, default=3, help="labels per task and image (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default %(default)s)")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="processes decoding images (default %(default)s: decode in the main process)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or mps (default %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="float32", help="precision (default %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="folder of the dataset (default: JSON lines on stdout)")
    g.add_argument("--format", choices=list(FORMATS), help="part files in --out (default: parquet)")
    g.add_argument("--logits", action="store_true", help="also write TASK.logits")
    g.add_argument("--features", action="store_true", help="also write TASK.features (the pooled features)")
    g.add_argument("--resume", action="store_true", help="continue the dataset in --out: finished parts are kept")
    g.add_argument("--shard", type=_shard, metavar="I/N",
                   help="label shard I of N (0 <= I < N) into --out, for job arrays (default: RANK/WORLD_SIZE "
                        "under accelerate launch or torchrun, else everything)")
    g.add_argument("--part-size", type=positive_int, default=PART_SIZE,
                   help="images per part file, the most a kill loses (default %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("engine")
    r.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local (this process and --workers) or ray (Ray Data; needs --out)")
    r.add_argument("--address", help="Ray cluster address (default: a local Ray, or RAY_ADDRESS)")
    r.add_argument("--concurrency", type=positive_int, default=1, help="Ray model actors (default %(default)s)")
    r.add_argument("--num-gpus", type=float, default=0, help="GPUs per Ray model actor (default %(default)s)")
    add_model_options(p)
    add_adapter_options(p)
    p.set_defaults(run=run)
    return p


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated task names, e.g. base,digits; got {text!r}")
    return names


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--shard {text!r}: ")) from None


def launched_shard(env: Mapping[str, str]) -> tuple[int, int]:
    """This process's shard under ``accelerate launch`` or ``torchrun`` (``RANK`` of ``WORLD_SIZE``), else
    ``(0, 1)``: each process labels its own share into the one dataset."""
    try:
        return parse_shard(f"{env['RANK']}/{env['WORLD_SIZE']}")
    except (KeyError, ValueError):
        return 0, 1


def is_adapter_spec(value: str) -> bool:
    """Whether a value given to ``--adapter`` names an adapter: ``hf-hub:``, an adapter or ``save_pretrained``
    folder, or a path that does not exist (refused by the adapter loader, naming it)."""
    from ..adapters.folder import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME

    path = Path(value).expanduser()
    if value.startswith("hf-hub:"):
        return True
    if value.startswith("@") or path.is_file() or is_image_name(value) or path.suffix.lower() in TABLES:
        return False
    if not path.exists() and glob.has_magic(value):
        return False
    return not path.is_dir() or any((path / n).exists() for n in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME))


def split_adapters(values: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--adapter``'s values as ``(adapters, inputs)``: ``nargs="+"`` also takes the images written after it
    (``--adapter A B img.png``); the first value is always an adapter."""
    adapters = [v for i, v in enumerate(values) if i == 0 or is_adapter_spec(v)]
    return adapters, [v for i, v in enumerate(values) if i > 0 and not is_adapter_spec(v)]


def run(args: argparse.Namespace) -> int:
    """List the images, load the adapters on their base, label batch by batch, print the summary."""
    from ..batch.job import predict_dataset
    from ..model import MemoryViT
    from .records import base_for_adapters, load_named_adapters, resolve_adapters

    if args.out is None and args.format is not None:
        raise ValueError(f"--format {args.format} needs --out DIR (without it, rows go to stdout as JSON lines)")
    adapters, more = split_adapters(args.adapter)
    listing = list_images([*args.inputs, *more])  # bad inputs fail before any model is built
    folders = resolve_adapters(adapters)
    base = base_for_adapters(args, folders)
    model = (load_named_adapters(base, folders, check_fingerprint=not args.no_fingerprint_check) if folders
             else MemoryViT(base))
    summary = predict_dataset(
        model, listing, args.out, tasks=args.tasks, top_k=args.top_k, batch_size=args.batch_size,
        workers=args.workers, device=args.device, dtype=args.dtype, format=args.format or "parquet", logits=args.logits,
        features=args.features, resume=args.resume, shard=args.shard or launched_shard(os.environ),
        part_size=args.part_size, progress=False if args.no_progress else None,
        adapters=[str(f.resolve()) for f in folders], engine=args.engine,
        ray_options={"address": args.address, "concurrency": args.concurrency, "num_gpus": args.num_gpus})
    print(summary.text() + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 0
