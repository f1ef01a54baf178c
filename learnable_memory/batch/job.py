"""A batch prediction job on this machine: the listing cut into parts, the parts run through the
:mod:`~learnable_memory.batch.pipeline` and written by :mod:`~learnable_memory.batch.writers`, the
``_manifest.json`` kept up to date for ``resume``, the progress bar and the summary of :mod:`.summary`.

:func:`predict_dataset` is the library call behind ``learnable-memory predict``; ``engine="ray"`` hands
the same job to :mod:`~learnable_memory.batch.ray_engine`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from torch import nn
from torch.utils.data import DataLoader

from ..pass_groups import PassGroup, pass_groups
from .formats import PART_SIZE as PART_SIZE  # where its readers take it
from .manifest import Manifest, job_identity, open_folder, remove_stale_temporaries
from .pipeline import ImageFiles, Preparation, check_device, collate, resolve_outputs, run_passes
from .schema import Schema
from .sources import Listing, check_shard, list_images
from .summary import Summary, progress_bar
from .writers import FORMATS, part_name, write_part, write_stream


def _parts(listing: Listing, part_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + part_size, len(listing))) for s in range(0, len(listing), part_size)]


def _batches(listing: Listing, ranges: Sequence[tuple[int, int]], preparations: Sequence[Preparation],
             batch_size: int, workers: int) -> Iterator:
    """One loader over every range still to do; no batch crosses a range's end (a part's end)."""
    flat = [i for s, e in ranges for i in range(s, e)]  # listing index of each item of the loader
    sampler, done = [], 0
    for s, e in ranges:
        sampler += [list(range(done + b, done + min(b + batch_size, e - s))) for b in range(0, e - s, batch_size)]
        done += e - s
    loader = DataLoader(ImageFiles([listing.paths[i] for i in flat], preparations), batch_sampler=sampler,
                        num_workers=workers, collate_fn=collate, prefetch_factor=4 if workers else None)
    start = 0
    for batch in loader:
        n = len(batch.ok)
        yield flat[start:start + n], batch
        start += n


def predict_dataset(
    model: nn.Module | Callable[[], nn.Module],
    source: str | Path | Sequence[str | Path] | Listing,
    out: str | Path | None = None,
    *,
    tasks: Sequence[str] | None = None,
    top_k: int = 3,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    format: str = "parquet",
    logits: bool = False,
    features: bool = False,
    resume: bool = False,
    shard: tuple[int, int] = (0, 1),
    part_size: int = PART_SIZE,
    progress: bool | None = None,
    stream: IO[str] | None = None,
    adapters: Sequence[str] = (),
    engine: str = "local",
    ray_options: dict[str, Any] | None = None,
) -> Summary:
    """Label every image of ``source`` with every output of ``model``, one row per image.

    Args:
        model: A ``MemoryViT`` (moved to ``device`` and ``dtype``), or a function building one (the Ray
            engine calls it once per actor).
        source: What :func:`~learnable_memory.batch.sources.list_images` takes (files, folders, globs,
            ``@list.txt``, CSV/Parquet with a ``path`` column, ``.tar`` shards), or a ``Listing``.
        out: Output folder of part files and ``_manifest.json``; None writes JSONL rows to ``stream``
            (default stdout).
        tasks: Outputs to write, task names and/or ``"base"`` (default: ``"base"`` and every task).
        top_k: Labels in each ``TASK.topk``.
        batch_size: Images per pass.
        workers: ``DataLoader`` processes decoding images (0: decode in this process).
        device, dtype: Where and in what precision the passes run (``float32``, ``bfloat16``, ``float16``).
        format: ``parquet``, ``jsonl`` or ``csv`` part files.
        logits, features: Also write ``TASK.logits`` / ``TASK.features``.
        resume: Continue the dataset in ``out``: finished parts are kept, the others (re)written. Refused
            when ``out`` holds another dataset (other images, tasks or options).
        shard: ``(I, N)``: label only shard I of N of the listing (contiguous and disjoint), into the
            same folder as the other shards.
        part_size: Images per part file.
        progress: The progress bar (None: on, throttled when stderr is not a terminal).
        adapters: Where the tasks came from, recorded in the manifest.
        engine: ``"local"`` (this process and its ``DataLoader`` workers) or ``"ray"`` (Ray Data).
        ray_options: For the Ray engine: ``address``, ``concurrency``, ``num_gpus``.

    Returns:
        The :class:`~.summary.Summary`. Columns: see :mod:`learnable_memory.batch.schema`.
    """
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    check_shard(*shard)
    if out is None and resume:
        raise ValueError("--resume needs --out DIR (rows written to stdout can not be resumed)")
    dev, torch_dtype = check_device(device, dtype)
    listing = source if isinstance(source, Listing) else list_images(source)
    if engine == "ray":
        from .ray_engine import predict_with_ray

        if resume or format != "parquet":
            raise ValueError(f"{'--resume' if resume else '--format ' + format} is the local engine's; --engine ray "
                             "writes a whole Parquet dataset into a new --out")

        return predict_with_ray(model, listing, out, tasks=tasks, top_k=top_k, batch_size=batch_size,
                                device=device, dtype=dtype, logits=logits, features=features, shard=shard,
                                **(ray_options or {}))
    if engine != "local":
        raise ValueError(f"--engine {engine!r}: choose local or ray")
    model = model if isinstance(model, nn.Module) else model()
    outputs = resolve_outputs(model, tasks)
    groups = pass_groups(model, outputs)
    schema = Schema.of(model, outputs, list(listing.ids), top_k=top_k, logits=logits, features=features)
    options = {"top_k": top_k, "logits": logits, "features": features, "dtype": dtype, "format": format,
               "part_size": part_size, "shards": shard[1]}
    mine = listing.shard(*shard)
    manifest = None
    if out is not None:
        folder = Path(out)
        identity = job_identity(model, listing, outputs, groups, options)
        manifest = open_folder(folder, identity, shard, [str(a) for a in adapters], resume=resume)
        remove_stale_temporaries(folder, shard)
        manifest.save(folder)
    model.to(device=dev, dtype=torch_dtype).eval()
    return _run(model, mine, groups, schema, manifest, Path(out) if out is not None else None, format,
                batch_size=batch_size, workers=workers, part_size=part_size, progress=progress,
                stream=stream or sys.stdout, device=dev, dtype=torch_dtype, features=features)


def _run(model, listing: Listing, groups: Sequence[PassGroup], schema: Schema,
         manifest: Manifest | None, folder: Path | None, fmt: str, *, batch_size: int, workers: int, part_size: int,
         progress: bool | None, stream: IO[str], device, dtype, features: bool) -> Summary:
    start = time.perf_counter()
    summary = Summary(passes_per_batch=len(groups), out=str(folder) if folder is not None else None)
    parts = _parts(listing, part_size)
    names = [part_name(manifest.shard, k, fmt) if manifest else "" for k in range(len(parts))]
    todo = [(k, r) for k, r in enumerate(parts) if not (manifest and names[k] in manifest.parts)]
    summary.skipped = len(listing) - sum(e - s for _, (s, e) in todo)
    bar = progress_bar(len(listing), progress)
    bar.update(summary.skipped)
    pending: list[dict] = []
    preparations = [Preparation.of(g) for g in groups]
    for rows_index, batch in _batches(listing, [r for _, r in todo], preparations, batch_size, workers):
        t0 = time.perf_counter()
        outputs = run_passes(model, groups, batch.images, features=features, device=device, dtype=dtype)
        summary.model_s += time.perf_counter() - t0
        summary.decode_s += batch.decode_s
        sub = listing.select(rows_index[0], rows_index[-1] + 1)
        rows = schema.rows(sub.paths, sub.ids, batch.ok, batch.errors, outputs)
        summary.images += len(rows)
        summary.errors += sum(not ok for ok in batch.ok)
        bar.update(len(rows))
        if folder is None:
            write_stream(stream, rows)
            continue
        pending += rows
        k = rows_index[-1] // part_size  # parts are part_size images from the start of the shard
        if rows_index[-1] + 1 == parts[k][1]:  # the part is complete: write it, then record it
            write_part(folder / names[k], pending, schema, fmt)
            manifest.parts[names[k]] = {"rows": len(pending), "errors": sum(r["error"] is not None for r in pending)}
            manifest.save(folder)
            pending = []
    bar.close()
    summary.wall_s = time.perf_counter() - start
    return summary
