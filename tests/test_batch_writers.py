"""learnable_memory.batch.writers: Parquet, JSONL and CSV parts hold the same rows; a part is renamed into
place only when whole."""

from __future__ import annotations

import csv
import json

import pytest

from learnable_memory import predict_dataset
from learnable_memory.batch import writers
from learnable_memory.batch.schema import Schema
from tests.helpers import demo_model, fashion_files, read_dataset


def test_jsonl_and_csv_parts_hold_the_rows_of_the_parquet_ones(tmp_path):
    model = demo_model()
    fashion_files(tmp_path / "imgs", 5)
    for fmt in ("parquet", "jsonl", "csv"):
        predict_dataset(model, tmp_path / "imgs", tmp_path / fmt, format=fmt, part_size=3, progress=False)
        assert sorted(p.name for p in (tmp_path / fmt).iterdir()) == [
            "_manifest.json", f"part-00000-of-00001-000000.{fmt}", f"part-00000-of-00001-000001.{fmt}"]
    want = read_dataset(tmp_path / "parquet")
    lines = [json.loads(line) for p in sorted((tmp_path / "jsonl").glob("part-*")) for line in p.open()]
    cells = [r for p in sorted((tmp_path / "csv").glob("part-*")) for r in csv.DictReader(p.open())]
    assert len(lines) == len(cells) == len(want) == 5
    for row, line, cell in zip(want.to_dict("records"), lines, cells, strict=True):
        assert list(line) == list(cell) == list(row)
        assert line["path"] == cell["path"] == row["path"] and line["error"] is None and cell["error"] == ""
        assert line["shoes.label"] == cell["shoes.label"] == row["shoes.label"]
        assert line["base.prob"] == pytest.approx(row["base.prob"]) == pytest.approx(float(cell["base.prob"]))
        assert line["digits.topk"] == json.loads(cell["digits.topk"])
        assert [t["index"] for t in line["digits.topk"]] == [t["index"] for t in row["digits.topk"]]


def test_a_part_is_renamed_into_place_only_when_whole(tmp_path, monkeypatch):
    """A write that fails half-way leaves no part file (a dot-named temporary at most, which readers skip)."""
    model = demo_model()
    schema = Schema.of(model, ["shoes"])
    row = {"path": "x.png", "shoes.label": "boot", "shoes.index": 2, "shoes.prob": 0.5,
           "shoes.topk": [{"label": "boot", "index": 2, "prob": 0.5}], "error": None}

    def torn(table, path, *args, **kwargs):
        path.write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    import pyarrow.parquet as pq

    monkeypatch.setattr(pq, "write_table", torn)
    target = tmp_path / writers.part_name((0, 1), 0, "parquet")
    with pytest.raises(OSError, match="disk full"):
        writers.write_part(target, [row], schema, "parquet")
    assert not target.exists() and writers.temp_path(target).name.startswith(".")
    monkeypatch.undo()
    writers.write_part(target, [row], schema, "parquet")
    assert pq.read_table(target).to_pylist() == [row]
    with pytest.raises(ValueError, match="--format"):
        writers.write_part(target, [row], schema, "xml")
