"""The batch job on Ray Data (``pip install "learnable-memory[ray]"``): ``predict --engine ray``.

The pipeline::

    the listing (path + id columns, any source of :mod:`.sources`)  ->  ray.data.from_arrow
      -> map_batches(decode)                     tasks: PIL + the backbone's timm transform, per pass group
      -> map_batches(Predictor,                  actors: each builds the MemoryViT ONCE, then one
            compute=ActorPoolStrategy(size=N),   forward_all per batch and preprocessing
            num_gpus=G)
      -> write_parquet(out)                      the columns of :mod:`.schema`

Images are read by the decode stage, not by ``ray.data.read_images``: that reader fails the whole job
on one unreadable file and hands over arrays already converted, while here an unreadable image is a
row with an ``error`` (as in the local engine) and every pass group gets its own timm transform of the
PIL image. The listing is the local engine's (a CSV or Parquet source is read in the driver, its
relative paths resolved), so the rows are those of the local engine, in the same order
(``preserve_order``).

The model reaches the actors as a function that builds it, called once per actor (and once in the
driver, which reads the columns and preprocessing off the model), or, when a
``MemoryViT`` is given (as the command line does), pickled with the stage and unpickled once per
actor. ``resume`` is the local engine's: a Ray job writes a whole dataset into an empty folder, with a
``_manifest.json`` naming what it holds. The summary has no decode/model split (the stages run in
other processes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..pass_groups import PassGroup, pass_groups
from .manifest import job_identity, open_folder
from .pipeline import DTYPES, ImageFiles, Preparation, resolve_outputs, run_passes
from .schema import Schema
from .sources import Listing
from .summary import Summary
from .writers import arrow_table


def _image_column(group: int) -> str:
    return f"__image_{group}"


def decode(batch: dict[str, np.ndarray], preparations: Sequence[Preparation],
           shapes: Sequence[tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The decode stage: a batch of rows -> the same rows with each pass group's prepared images
    ``[B, C, H, W]`` (zeros where the image could not be read), ``__ok`` and ``error`` (empty when read)."""
    files = ImageFiles([str(p) for p in batch["path"]], preparations)
    items = [files[i] for i in range(len(files))]
    out = dict(batch)
    for g, shape in enumerate(shapes):
        out[_image_column(g)] = np.stack([t[g].numpy() if t is not None else np.zeros(shape, np.float32)
                                          for t, _, _ in items])
    out["__ok"] = np.array([t is not None for t, _, _ in items])
    out["error"] = np.array([e or "" for _, e, _ in items])  # text only: Ray turns a column of None into NaN
    return out


class Given:
    """A model given as it is, as the zero-argument builder the actors call."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self) -> nn.Module:
        return self.model


class Predictor:
    """The model stage, a Ray actor: builds the ``MemoryViT`` once, then labels batch after batch."""

    def __init__(self, build: Callable[[], nn.Module], schema: Schema, device: str, dtype: str,
                 groups: Sequence[PassGroup]):
        model = build()
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.schema, self.groups = schema, list(groups)

    def __call__(self, batch: dict[str, np.ndarray]):
        ok = [bool(v) for v in batch["__ok"]]
        keep = np.flatnonzero(ok)
        images = [torch.from_numpy(np.ascontiguousarray(batch[_image_column(g)][keep]))
                  for g in range(len(self.groups))]
        outputs = run_passes(self.model, self.groups, images if len(keep) else [], features=self.schema.features,
                             device=self.device, dtype=self.dtype)
        ids = {c: batch[c].tolist() for c in self.schema.id_columns}
        errors = [None if read else str(e) for read, e in zip(ok, batch["error"], strict=True)]
        rows = self.schema.rows([str(p) for p in batch["path"]], ids, ok, errors, outputs)
        return arrow_table(rows, self.schema)


def predict_with_ray(model: nn.Module | Callable[[], nn.Module], listing: Listing, out: str | Path | None, *,
                     tasks: Sequence[str] | None, top_k: int, batch_size: int, device: str, dtype: str,
                     logits: bool, features: bool, shard: tuple[int, int], address: str | None = None,
                     concurrency: int = 1, num_gpus: float = 0):
    """:func:`~learnable_memory.batch.job.predict_dataset` on Ray Data (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        import ray
    except ImportError:
        raise ValueError('--engine ray needs Ray: pip install "learnable-memory[ray]"') from None
    if out is None:
        raise ValueError("--engine ray writes a Parquet dataset: give --out DIR")
    start = time.perf_counter()
    local = model if isinstance(model, nn.Module) else model()
    outputs = resolve_outputs(local, tasks)
    groups = pass_groups(local, outputs)
    schema = Schema.of(local, outputs, list(listing.ids), top_k=top_k, logits=logits, features=features)
    mine = listing.shard(*shard)
    folder = Path(out)
    options = {"top_k": top_k, "logits": logits, "features": features, "dtype": dtype, "format": "parquet",
               "engine": "ray", "shards": shard[1]}
    manifest = open_folder(folder, job_identity(local, listing, outputs, groups, options), shard, [], resume=False)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    build = Given(local) if isinstance(model, nn.Module) else model
    preparations = [Preparation.of(g) for g in groups]
    shapes = [tuple(g.data_config["input_size"]) for g in groups]
    table = pa.table({"path": list(mine.paths), **mine.ids})
    ds = ray.data.from_arrow(table)
    ds = ds.map_batches(decode, fn_kwargs={"preparations": preparations, "shapes": shapes}, batch_size=batch_size,
                        batch_format="numpy")
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={"build": build, "schema": schema, "device": device,
                                                          "dtype": dtype, "groups": groups},
                        batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=num_gpus)
    before = set(folder.glob("*.parquet"))  # other shards' files
    ds.write_parquet(str(folder))
    parts = sorted(p.name for p in set(folder.glob("*.parquet")) - before)
    for name in parts:
        read = pq.read_table(folder / name, columns=["error"]).column("error").null_count
        rows = pq.read_metadata(folder / name).num_rows
        manifest.parts[name] = {"rows": rows, "errors": rows - read}
    manifest.save(folder)
    summary = Summary(images=sum(p["rows"] for p in manifest.parts.values()),
                      errors=sum(p["errors"] for p in manifest.parts.values()), decode_s=None, model_s=None,
                      passes_per_batch=len(groups), out=str(folder))
    summary.wall_s = time.perf_counter() - start
    return summary
