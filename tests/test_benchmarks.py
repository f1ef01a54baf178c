"""Smoke tests: every benchmark script runs end to end with ``--quick`` and writes its JSON and plot.

They check that the scripts still run against the package; the numbers of a quick run mean nothing.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# script -> keys its JSON must have
SCRIPTS = {
    "inference": ["command", "machine", "settings", "grid", "targets", "memory"],
    "train_step": ["command", "machine", "settings", "methods", "targets"],
    "accuracy": ["command", "machine", "settings", "learning_rates", "results", "concatenation"],
}


def run_quick(name: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / f"{name}.png").stat().st_size > 0
    data = json.loads((out / f"{name}.json").read_text())
    missing = [k for k in SCRIPTS[name] if k not in data]
    assert not missing, f"{name}.json lacks {missing}"
    assert "| target" in proc.stdout or name == "accuracy", "the target table was not printed"
    return data


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_writes_results(name: str, tmp_path: Path) -> None:
    data = run_quick(name, tmp_path)
    assert data["machine"]["torch_threads"] >= 1
    if name == "inference":
        methods = {r["method"] for r in data["grid"]}
        assert methods == {"plain", "one_pass", "one_pass_full", "dense", "separate", "lora"}
        assert len(data["targets"]) == 5 and all(isinstance(t["pass"], bool) for t in data["targets"])
        assert all(r["extra_mb"] >= 0 for r in data["memory"])
        glibc = platform.libc_ver()[0] == "glibc"
        assert data["machine"]["malloc"] == ("keep freed memory" if glibc else "default")
    elif name == "train_step":
        by = {r["method"]: r for r in data["methods"]}
        assert set(by) == {"memory_nd", "memory_full", "head_only", "head_cls", "full_ft", "lora"}
        assert by["full_ft"]["time_ratio"]["median"] == pytest.approx(1.0)
        # the frozen-backbone methods train a small fraction of the full model's parameters
        assert by["memory_nd"]["trainable_params"] < by["full_ft"]["trainable_params"] / 10
        assert by["head_only"]["trainable_params"] < by["head_cls"]["trainable_params"]
    else:
        concat = data["concatenation"]["0"]
        assert concat["all_unchanged"], concat
        assert concat["base_max_logit_diff"] < 1e-4
        for task in data["settings"]["tasks"]:
            assert set(data["results"][task]) == set(data["settings"]["methods"])


def test_accuracy_tuning_moves_past_an_edge_of_the_grid() -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.accuracy import tune_lr

    tried = []

    def score(lr):  # peaks at lr 2.7 without memory scale, lower with it
        tried.append(lr)
        return -abs(lr[0] - 2.7) - (lr[1] > 1)

    best, scores = tune_lr(score, [(0.1, 1.0), (0.3, 1.0), (0.1, 10.0)], max_extra=3)
    assert best == (2.7, 1.0)
    assert tried == [(0.1, 1.0), (0.3, 1.0), (0.1, 10.0), (0.9, 1.0), (2.7, 1.0), (8.1, 1.0)]
    assert set(scores) == set(tried)
    # an interior best stops at once; a best at the low edge goes down
    assert tune_lr(lambda lr: -abs(lr[0] - 0.3), [(0.1, 1.0), (0.3, 1.0), (1.0, 1.0)])[1].keys() == {
        (0.1, 1.0), (0.3, 1.0), (1.0, 1.0)}
    assert tune_lr(lambda lr: -lr[0], [(0.3, 1.0), (1.0, 1.0)], max_extra=1)[0] == (0.1, 1.0)


def test_accuracy_runs_on_a_timm_backbone_with_lazily_loaded_images(tmp_path: Path) -> None:
    """``--model``: a 3-channel 96 px timm ViT, so Fashion-MNIST and digits are resized and loaded lazily."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--out", str(tmp_path),
                           "--model", "vit_tiny_patch16_224", "--model-kwargs", '{"depth": 1, "img_size": 96}'],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "accuracy.json").read_text())
    assert data["settings"]["base"]["model"] == "vit_tiny_patch16_224"
    assert data["concatenation"]["0"]["all_unchanged"]
