"""Writing the rows: Parquet (pyarrow), JSONL or CSV part files, each written to a temporary file beside
it and renamed into place, so a part file is either whole or absent; and JSONL to a stream (stdout).

Part files are named ``part-<shard>-of-<shards>-<part>.<ext>`` (zero-padded): a folder holds the parts of
every shard of one dataset, and ``pyarrow.dataset`` / ``pandas.read_parquet`` read it as one table
(they skip ``_manifest.json`` and the dot-named temporary files).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .formats import FORMATS as FORMATS  # where its readers take it
from .schema import Schema, csv_value


def part_prefix(shard: tuple[int, int]) -> str:
    """The start of the part file names of shard ``shard = (I, N)``."""
    return f"part-{shard[0]:05d}-of-{shard[1]:05d}-"


def part_name(shard: tuple[int, int], part: int, fmt: str) -> str:
    """The file name of part ``part`` of shard ``shard = (I, N)``."""
    return f"{part_prefix(shard)}{part:06d}{FORMATS[fmt]}"


def temp_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place (a dot name: dataset readers skip it)."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)``, flushed to disk, then renamed to ``path``."""
    tmp = temp_path(path)
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def arrow_table(rows: Sequence[dict[str, Any]], schema: Schema):
    """``rows`` as a ``pyarrow.Table`` with :meth:`Schema.arrow`'s types (id columns' types inferred)."""
    import pyarrow as pa

    ids = pa.Table.from_pylist([{c: r[c] for c in schema.id_columns} for r in rows]).schema if schema.id_columns \
        else None
    return pa.Table.from_pylist(list(rows), schema=schema.arrow(ids))


def write_part(path: Path, rows: Sequence[dict[str, Any]], schema: Schema, fmt: str) -> None:
    """Write one part file atomically in ``fmt`` (see :data:`FORMATS`)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = arrow_table(rows, schema)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    elif fmt == "jsonl":
        atomic_write(path, lambda tmp: tmp.write_text("".join(json_line(r) for r in rows), encoding="utf-8"))
    elif fmt == "csv":
        def write_csv(tmp: Path) -> None:
            with tmp.open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=schema.columns())
                w.writeheader()
                w.writerows({k: csv_value(v) for k, v in r.items()} for r in rows)

        atomic_write(path, write_csv)
    else:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False, default=str) + "\n"


def write_stream(stream: IO[str], rows: Sequence[dict[str, Any]]) -> None:
    """JSONL rows to an open text stream (stdout), flushed so a pipe sees every batch."""
    stream.write("".join(json_line(r) for r in rows))
    stream.flush()
