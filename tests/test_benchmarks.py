"""Smoke tests: every benchmark script runs end to end with ``--quick`` and writes its JSON and plot.

They check that the scripts still run against the package; the numbers of a quick run mean nothing.
"""

from __future__ import annotations

import json
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
