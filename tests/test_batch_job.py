"""learnable_memory.batch.job: predict_dataset end to end: a resumed run (after an error, after kill -9)
gives the dataset of an uninterrupted one, shards add up to the whole, rows to a stream, the summary."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import learnable_memory.batch.job as job
from learnable_memory import predict_dataset
from tests.helpers import demo_model, fashion_files, records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def imgs(tmp_path) -> Path:
    fashion_files(tmp_path / "imgs", 24)
    return tmp_path / "imgs"


def test_a_run_stopped_by_an_error_resumes_into_the_uninterrupted_dataset(imgs, tmp_path, monkeypatch):
    model = demo_model()
    whole = predict_dataset(model, imgs, tmp_path / "whole", part_size=5, batch_size=2, progress=False)
    assert (whole.images, whole.errors, whole.skipped) == (24, 0, 0)
    calls = []
    real = job.run_passes

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # in the 3rd part's batches (parts of 5 images: 3 batches each)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "run_passes", failing)
    with pytest.raises(KeyboardInterrupt):
        predict_dataset(model, imgs, tmp_path / "resumed", part_size=5, batch_size=2, progress=False)
    assert len(json.loads((tmp_path / "resumed" / "_manifest.json").read_text())["parts"]) == 2
    monkeypatch.undo()
    summary = predict_dataset(model, imgs, tmp_path / "resumed", part_size=5, batch_size=2, resume=True,
                              progress=False)
    assert (summary.images, summary.skipped) == (14, 10)
    assert records(tmp_path / "resumed") == records(tmp_path / "whole")


KILLED_RUN = """
import sys, time
import learnable_memory.batch.job as job
from tests.helpers import demo_model

real = job.run_passes
def slow(*args, **kwargs):  # so that the run is still going when it is killed
    time.sleep(0.1)
    return real(*args, **kwargs)

job.run_passes = slow
job.predict_dataset(demo_model(), sys.argv[1], sys.argv[2], part_size=4, batch_size=2, resume=True, progress=False)
"""


@pytest.mark.integration
def test_kill_9_loses_at_most_the_part_in_flight(imgs, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(imgs), str(out)], cwd=ROOT)
    manifest = out / "_manifest.json"
    deadline = time.monotonic() + 600
    try:
        while not (manifest.is_file() and len(json.loads(manifest.read_text() or "{}").get("parts", {})) >= 2):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no part was finished"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    finished = json.loads(manifest.read_text())["parts"]
    assert 2 <= len(finished) < 6  # 24 images in parts of 4: the run was cut short
    model = demo_model()
    summary = predict_dataset(model, imgs, out, part_size=4, batch_size=2, resume=True, progress=False)
    assert summary.skipped >= 4 * len(finished) and summary.images == 24 - summary.skipped
    predict_dataset(model, imgs, tmp_path / "whole", part_size=4, batch_size=2, progress=False)
    assert records(out) == records(tmp_path / "whole")
    assert not list(out.glob(".*.tmp"))


def test_shards_are_disjoint_and_add_up_to_the_whole_dataset(imgs, tmp_path):
    model = demo_model()
    predict_dataset(model, imgs, tmp_path / "whole", part_size=5, progress=False)
    counts = [predict_dataset(model, imgs, tmp_path / "sharded", shard=(i, 3), part_size=5, progress=False).images
              for i in range(3)]
    assert counts == [8, 8, 8]
    rows = records(tmp_path / "sharded")
    assert len({r["path"] for r in rows}) == len(rows) == 24
    assert rows == records(tmp_path / "whole")


def test_without_an_output_folder_rows_go_to_the_stream_as_json_lines(imgs):
    stream = io.StringIO()
    summary = predict_dataset(demo_model(), sorted(imgs.iterdir())[:3], tasks=["digits"], top_k=1,
                              stream=stream, progress=False)
    rows = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["00000.png", "00001.jpg", "00002.png"]
    assert list(rows[0]) == ["path", "digits.label", "digits.index", "digits.prob", "digits.topk", "error"]
    assert summary.images == 3 and summary.out is None and summary.passes_per_batch == 1
    assert "labelled 3 images (0 could not be read)" in summary.text() and "images/s" in summary.text()
    with pytest.raises(ValueError, match="--resume needs --out"):
        predict_dataset(demo_model(), imgs, resume=True)
    with pytest.raises(ValueError, match="--format"):
        predict_dataset(demo_model(), imgs, "x", format="xml")


def test_a_builder_may_stand_for_the_model(imgs, tmp_path):
    built = []
    summary = predict_dataset(lambda: built.append(1) or demo_model(), imgs, tmp_path / "out", progress=False)
    assert built == [1] and summary.images == 24
    assert summary.decode_s > 0 and summary.model_s > 0 and 0 < summary.decode_share < 1



def test_bfloat16_runs_and_is_part_of_the_identity(imgs, tmp_path):
    model = demo_model()
    predict_dataset(model, imgs, tmp_path / "f32", progress=False)
    summary = predict_dataset(demo_model(), imgs, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert summary.images == 24
    a, b = records(tmp_path / "f32"), records(tmp_path / "bf16")
    assert sum(x["shoes.index"] == y["shoes.index"] for x, y in zip(a, b, strict=True)) >= 20  # bf16 rounding
    assert max(abs(x["base.prob"] - y["base.prob"]) for x, y in zip(a, b, strict=True)) < 0.1
    with pytest.raises(ValueError, match="the options"):
        predict_dataset(demo_model(), imgs, tmp_path / "f32", dtype="bfloat16", resume=True, progress=False)
