"""Batch prediction: label a whole image collection with every task, on this machine or a Ray cluster.

    from learnable_memory import load_adapters, predict_dataset
    model = load_adapters(vit, ["adapters/digits", "adapters/fmnist"])
    summary = predict_dataset(model, "photos/", "labels/", workers=4)   # a Parquet dataset, one row per image
    pandas.read_parquet("labels/")

The modules, in the order a job runs through them:

- :mod:`.sources`: what to label (files, folders, globs, ``@list.txt``, CSV/Parquet with a ``path``
  column, webdataset ``.tar`` shards) as one ordered :class:`~.sources.Listing`, and ``--shard I/N``.
- :mod:`.pipeline`: a torch ``DataLoader`` whose workers decode with PIL and prepare with the backbone's
  own timm transform; ONE ``forward_all`` per batch and preprocessing (tasks trained with other
  preprocessing get a pass of their own, :mod:`learnable_memory.pass_groups`).
- :mod:`.schema`: the columns (``path``, the input's ids, ``TASK.label``/``index``/``prob``/``topk``,
  optional ``TASK.logits``/``TASK.features``, ``error``): the table is in that module's docstring.
- :mod:`.writers`: Parquet, JSONL or CSV part files, each written to a temporary file and renamed into place.
- :mod:`.manifest`: ``_manifest.json``, what ``resume`` checks and continues.
- :mod:`.summary`: the progress bar and the :class:`~.summary.Summary` at the end.
- :mod:`.job`: :func:`~.job.predict_dataset`, which runs them all on this machine.
- :mod:`.ray_engine`: the same job on Ray Data (the optional ``ray`` extra).

The names below are imported on first use (PEP 562), so that :mod:`.sources` and :mod:`.formats`, which
``predict``'s parser takes, import no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .job import predict_dataset
    from .sources import Listing, list_images
    from .summary import Summary

#: Each public name and the module that defines it.
_HOMES = {"predict_dataset": "job", "Listing": "sources", "list_images": "sources", "Summary": "summary"}

__all__ = ["Listing", "Summary", "list_images", "predict_dataset"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
