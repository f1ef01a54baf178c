"""The columns of a batch prediction: one row per image, the same in Parquet, JSONL and CSV.

======================  ====================================  ==============================================
column                  Arrow type                            holds
======================  ====================================  ==============================================
``path``                string                                the image, as listed
input id columns        as in the input table                 the other columns of a CSV/Parquet source
``TASK.label``          string                                the most likely label (its index as text when
                                                              the task has no label names)
``TASK.index``          int64                                 its class index
``TASK.prob``           float32                               its softmax probability (rounded to 6 decimals)
``TASK.topk``           list<struct<label: string,            the ``top_k`` most likely labels, most likely
                        index: int64, prob: float32>>         first
``TASK.logits``         fixed_size_list<float32>[C]           with ``logits=True``: the task's raw logits
``TASK.features``       fixed_size_list<float32>[D]           with ``features=True``: the pooled features its
                                                              head takes
``error``               string                                why the image could not be read, else null
======================  ====================================  ==============================================

``TASK`` is each output asked for: a task name or ``base`` (the base model's own head); a task name may
hold dots, the field is what follows the last one. A row with an ``error`` has nulls in every task
column. In CSV, ``TASK.topk``, ``TASK.logits`` and ``TASK.features`` are JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import data as D
from ..config import BASE_KEY
from .pipeline import Outputs

if TYPE_CHECKING:
    import pyarrow as pa

#: The per-output fields, in column order (``logits`` and ``features`` only when asked for).
FIELDS = ("label", "index", "prob", "topk", "logits", "features")


@dataclass(frozen=True)
class Schema:
    """The columns of one job.

    Attributes:
        outputs: Task names and/or ``"base"``, in column order.
        labels: Output -> its label names (None: the index as text).
        sizes: Output -> ``(num_classes, feature width)``.
        id_columns: The input's id columns, after ``path``.
        top_k: Labels in ``TASK.topk``.
        logits: Whether ``TASK.logits`` columns are written.
        features: Whether ``TASK.features`` columns are written.
    """

    outputs: tuple[str, ...]
    labels: dict[str, list[str] | None]
    sizes: dict[str, tuple[int, int]]
    id_columns: tuple[str, ...] = ()
    top_k: int = 3
    logits: bool = False
    features: bool = False

    @classmethod
    def of(cls, model: nn.Module, outputs: Sequence[str], id_columns: Sequence[str] = (), *, top_k: int = 3,
           logits: bool = False, features: bool = False) -> Schema:
        labels: dict[str, list[str] | None] = {}
        sizes: dict[str, tuple[int, int]] = {}
        for name in outputs:
            if name == BASE_KEY:
                labels[name] = D.label_names(model.base)
                width = int(model.base.num_features)
                sizes[name] = (int(model.base.num_classes) or width, width)
            else:
                cfg = model.tasks[name].config
                labels[name], sizes[name] = cfg.class_names, (cfg.num_classes, int(model.embed_dim))
        return cls(tuple(outputs), labels, sizes, tuple(id_columns), top_k, logits, features)

    def fields(self) -> tuple[str, ...]:
        return tuple(f for f in FIELDS if (f != "logits" or self.logits) and (f != "features" or self.features))

    def columns(self) -> list[str]:
        """Every column name, in order."""
        return ["path", *self.id_columns, *(f"{o}.{f}" for o in self.outputs for f in self.fields()), "error"]

    def arrow(self, ids: pa.Schema | None = None) -> pa.Schema:
        """The Arrow schema (``ids``: the types of the id columns, else inferred)."""
        import pyarrow as pa

        top = pa.list_(pa.struct([("label", pa.string()), ("index", pa.int64()), ("prob", pa.float32())]))
        fields = [pa.field("path", pa.string())]
        fields += [ids.field(c) if ids is not None else pa.field(c, pa.null()) for c in self.id_columns]
        for o in self.outputs:
            classes, width = self.sizes[o]
            types = {"label": pa.string(), "index": pa.int64(), "prob": pa.float32(), "topk": top,
                     "logits": pa.list_(pa.float32(), classes), "features": pa.list_(pa.float32(), width)}
            fields += [pa.field(f"{o}.{f}", types[f]) for f in self.fields()]
        return pa.schema([*fields, pa.field("error", pa.string())])

    def rows(self, paths: Sequence[str], ids: dict[str, list], ok: Sequence[bool], errors: Sequence[str | None],
             outputs: Outputs) -> list[dict[str, Any]]:
        """One row per image of a batch: ``outputs`` hold the rows that were read (``ok``), in order."""
        per_output = {o: self._predictions(o, outputs) for o in self.outputs}
        rows, j = [], 0
        for i, path in enumerate(paths):
            row: dict[str, Any] = {"path": path, **{c: ids[c][i] for c in self.id_columns}}
            for o in self.outputs:
                pred = per_output[o][j] if ok[i] else {}
                row.update({f"{o}.{f}": pred.get(f) for f in self.fields()})
            row["error"] = errors[i]
            j += bool(ok[i])
            rows.append(row)
        return rows

    def _predictions(self, name: str, outputs: Outputs) -> list[dict[str, Any]]:
        logits = outputs.logits.get(name, torch.zeros(0, 1))
        probs = logits.softmax(-1)
        top = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
        labels = self.labels[name]
        preds = []
        for r, (p_row, i_row) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            topk = [{"label": labels[j] if labels else str(j), "index": j, "prob": round(p, 6)}
                    for p, j in zip(p_row, i_row, strict=True)]
            pred = {"label": topk[0]["label"], "index": topk[0]["index"], "prob": topk[0]["prob"], "topk": topk}
            if self.logits:
                pred["logits"] = logits[r].tolist()
            if self.features:
                pred["features"] = outputs.features[name][r].tolist()
            preds.append(pred)
        return preds


def csv_value(value: Any) -> Any:
    """A cell of the CSV output: lists (``topk``, ``logits``, ``features``) as JSON text."""
    return json.dumps(value) if isinstance(value, list) else value
