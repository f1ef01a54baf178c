"""The benchmark scripts: one start-up convention and one harness, the family sweep's README table, and
smoke runs (``--quick``) that check every script still runs end to end against the package and writes
its JSON and plot. The numbers of a quick run mean nothing."""

from __future__ import annotations

import ast
import collections
import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

# script -> keys its JSON must have
SCRIPTS = {
    "inference": ["command", "machine", "settings", "grid", "targets", "memory"],
    "train_step": ["command", "machine", "settings", "methods", "targets"],
    "accuracy": ["command", "machine", "settings", "learning_rates", "tuning_time", "results", "concatenation"],
    "batch_predict": ["command", "machine", "settings", "jobs", "workers", "ray", "targets"],
    "sweep": ["command", "machine", "settings", "step", "e2e", "targets"],
}
#: Defined once, in ``benchmarks/common.py``, for every script.
HARNESS = ("build_vit", "images_for", "QUICK_MODEL", "NUM_CLASSES", "measure_in_subprocess", "report_memory",
           "add_memory_child_option")


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script as ``python benchmarks/NAME.py`` sees it: its folder first on ``sys.path``."""
    monkeypatch.syspath_prepend(str(BENCH))
    loaded: list[str] = []

    def load(name: str):
        loaded.append(name)
        return importlib.import_module(name)

    yield load
    for name in [*loaded, "common"]:
        sys.modules.pop(name, None)


def test_scripts_share_one_start_up_and_one_harness():
    """No script edits ``sys.path`` or imports from ``tests/``; they import the harness as ``common``,
    which alone defines the models, the random batch and the memory-measuring child."""
    defined = collections.defaultdict(list)
    for path in sorted(BENCH.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = [n for n in names if n.split(".")[0] in ("tests", "benchmarks")]
                assert not bad, f"{path.name} imports {bad}: scripts import the package, and the harness as common"
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                pytest.fail(f"{path.name} uses sys.path (line {node.lineno}); run it as python benchmarks/{path.name}")
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node]
            for t in targets:
                name = getattr(t, "id", None) or getattr(t, "name", None)
                if name:
                    defined[name].append(path.name)
    for name in HARNESS:
        assert defined[name] == ["common.py"], f"{name} is defined in {defined[name]}, should be in common.py only"


def test_accuracy_tuning_moves_past_an_edge_of_the_grid(bench) -> None:
    tune_lr = bench("accuracy").tune_lr
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


def test_accuracy_tuning_in_one_pass_scores_each_setting_as_its_own_run(bench, tmp_path) -> None:
    """The settings of a non-destructive method trained as tasks of one model give each setting the
    validation accuracy of its own run; their cells are then read, and the time saved is counted from them."""
    acc = bench("accuracy")
    from learnable_memory.data import load_demo_base

    g = torch.Generator().manual_seed(0)
    images = lambda n: TensorDataset(torch.randn(n, 1, 28, 28, generator=g),  # noqa: E731
                                     torch.randint(0, 3, (n,), generator=g))
    data = {"train": images(48), "val": images(32), "num_classes": 3}
    base, grid = load_demo_base(), [(0.2, 1.0), (0.6, 1.0), (0.6, 10.0)]
    cell = dict(base=base, data=data, steps=4, batch=8)
    assert acc.tune_in_one_pass(tmp_path / "one", "t", "nd_m1", grid, 0, **cell) == grid
    assert acc.tune_in_one_pass(tmp_path / "one", "t", "nd_m1", grid, 0, **cell) == []  # the cells are there
    for lr in grid:
        together = json.loads(acc.cell_path(tmp_path / "one", "t", "nd_m1", lr, 0, "val").read_text())
        alone = acc.run_cell(tmp_path / "alone", "t", "nd_m1", lr, 0, "val", **cell)
        assert together["one_pass"] == 3 and together["accuracy"] == alone["accuracy"], lr
        assert together["trainable_params"] == alone["trainable_params"]
    saved = acc.tuning_time(tmp_path / "one", "t", "nd_m1", grid, 0, alone_seconds=2.0)
    assert (saved["settings"], saved["passes"], saved["separate_s"]) == (3, 1, 6.0)
    assert saved["saved_s"] == pytest.approx(6.0 - together["seconds"])
    assert acc.tuning_time(tmp_path / "alone", "t", "nd_m1", grid, 0, alone_seconds=2.0) is None


def test_sweep_e2e_reads_a_finished_run_instead_of_running_it_again(bench, tmp_path, monkeypatch) -> None:
    sweep = bench("sweep")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    folder = tmp_path / "sequential" / "lr-0.1"
    first = sweep.timed_run(["train", "--lr", "0.1"], folder, fresh=False)
    again = sweep.timed_run(["train", "--lr", "0.1"], folder, fresh=False)
    assert calls[0][-3:] == ["--out", str(folder), "--overwrite"]
    assert len(calls) == 1 and again == first | {"cached": True} and "cached" not in first
    sweep.timed_run(["train", "--lr", "0.1"], folder, fresh=True)
    assert len(calls) == 2
    sweep.timed_run(["train", "--lr", "0.1", "--init-seed", "1"], folder, fresh=False)  # another command
    assert len(calls) == 3
    configs = sweep.e2e_grid(quick=False)
    assert len(configs) == 27 and configs[0]["options"] == ["--lr", "0.03", "--n-mem", "1", "--init-seed", "0"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
  <testcase classname="tests.test_families" name="test_every_architecture[vit_a]" time="1.5"><properties>
    <property name="module" value="vision_transformer"/>
    <property name="kinds" value="attention:attention.Attention,backbone:vision_transformer.VisionTransformer,\
block:vision_transformer.Block,embed:patch_embed.PatchEmbed"/>
    <property name="status" value="supported"/></properties></testcase>
  <testcase classname="tests.test_families" name="test_every_architecture[vit_b]" time="2.0"><properties>
    <property name="module" value="vision_transformer"/>
    <property name="kinds" value="backbone:vision_transformer.VisionTransformer,block:vision_transformer.Block"/>
    </properties><failure message="base output changed">trace</failure></testcase>
  <testcase classname="tests.test_families" name="test_every_architecture[beit_a]" time="1.0"><properties>
    <property name="module" value="beit"/>
    <property name="kinds" value="attention:beit.Attention,backbone:beit.Beit,block:beit.Block"/>
    <property name="status" value="supported"/></properties></testcase>
  <testcase classname="tests.test_families" name="test_sample_spans_every_family" time="0.1"/>
</testsuite></testsuites>
"""


def test_family_sweep_writes_only_the_generated_table(bench, tmp_path):
    """The modules come from the report (the test's list is the only one); the script replaces what is
    between the README's markers, and the prose around them stays as written."""
    sweep = bench("family_sweep")
    (tmp_path / "sweep.xml").write_text(JUNIT)
    results = sweep.read_results(tmp_path / "sweep.xml")
    assert set(results) == {"vit_a", "vit_b", "beit_a"} and results["vit_b"]["status"] == "failed"
    table = sweep.summarize(results)
    assert list(table) == ["vision_transformer", "beit"]  # most architectures first
    assert (table["vision_transformer"]["supported"], table["vision_transformer"]["failed"]) == (1, ["vit_b"])
    machine = {"cores": 2, "cpu": "a CPU", "load_average": [1.0], "timm": "1.0", "torch": "2.0"}
    section = sweep.markdown(table, 90.0, "2 passed, 1 failed", machine, quick=False)
    vit_row = "| `vision_transformer` | 2 | 1 | 0 | vit_b | Block (vision_transformer) | Attention (timm.layers) |"
    assert vit_row in section
    assert "| `beit` | 1 | 1 | 0 | 0 | Block (beit) | Attention (beit) | Beit |" in section
    assert "| **all** | **3** | **2** | **0** | **1** |" in section
    assert "Full sweep (`python -m pytest tests/test_families.py -m slow`): 2 passed, 1 failed, 1.5 min" in section
    assert "learnable_memory.registry.UNSUPPORTED" in section
    readme = tmp_path / "README.md"
    head = "# Title\n\nProse before the table.\n\n"
    tail = "\n\nProse after the table: how each kind meets the memory.\n"
    readme.write_text(f"{head}{sweep.START}\nold table\n{sweep.END}{tail}")
    sweep.write_readme(section, readme)
    assert readme.read_text() == f"{head}{sweep.START}\n{section}\n{sweep.END}{tail}"
    readme.write_text(f"{head}{sweep.START}\nno end marker")
    with pytest.raises(SystemExit, match="exactly one"):
        sweep.write_readme(section, readme)


def run_quick(name: str, out: Path, *extra: str, plot: bool = True) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)  # generous: a loaded machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not plot or (out / f"{name}.png").stat().st_size > 0
    data = json.loads((out / f"{name}.json").read_text())
    missing = [k for k in SCRIPTS[name] if k not in data]
    assert not missing, f"{name}.json lacks {missing}"
    assert "| target" in proc.stdout or name == "accuracy", "the target table was not printed"
    return data


@pytest.mark.integration
def test_inference_runs_the_phases_asked_for(tmp_path: Path) -> None:
    """``--phases memory`` re-measures memory alone: no timing rows, the memory rows and their target."""
    data = run_quick("inference", tmp_path, "--phases", "memory", plot=False)  # the plot is of timings
    assert data["grid"] == [] and data["families"] == [] and data["compile"] == []
    assert {r["method"] for r in data["memory"]} == {"plain", "one_pass"}
    assert [t["target"] for t in data["targets"]] == ["K=8 peak working memory (cache excluded) / plain's"]


@pytest.mark.integration
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_writes_results(name: str, tmp_path: Path) -> None:
    data = run_quick(name, tmp_path)
    assert data["machine"]["torch_threads"] == 1, "the script did not take the suite's one thread (OMP_NUM_THREADS)"
    if name == "inference":
        methods = {r["method"] for r in data["grid"]}
        assert methods == {"plain", "lower_bound", "one_pass", "one_pass_full", "dense", "separate", "lora"}
        names = [t["target"] for t in data["targets"]]
        assert len(names) == 6 and all(isinstance(t["pass"], bool) for t in data["targets"]), names
        assert any("lower bound" in n for n in names) and any("peak working memory" in n for n in names)
        one_pass = [r for r in data["grid"] if r["method"] == "one_pass"]
        assert all("over_lower_bound" in r and r["kv_cache_mb"] >= 0 for r in one_pass)
        assert {r["method"] for r in data["memory"]} == {"plain", "one_pass"}
        # the quick model's tensors are small enough for the heap to reuse, so its calls add about nothing; the
        # kernel syncs its RSS counters in steps of tens of pages, so "nothing" may read a little below 0
        assert all(r["extra_mb"] > -1.0 and r["model"] == "vit_tiny_patch16_224" for r in data["memory"])
        glibc = platform.libc_ver()[0] == "glibc"
        assert data["machine"]["malloc"] == ("keep freed memory" if glibc else "default")
    elif name == "train_step":
        by = {r["method"]: r for r in data["methods"]}
        assert set(by) == {"memory_nd", "memory_full", "head_only", "head_cls", "full_ft", "lora"}
        assert by["full_ft"]["time_ratio"]["median"] == pytest.approx(1.0)
        assert by["memory_nd"]["memory"]["extra_mb"] > 0 and by["memory_nd"]["memory_ratio"] > 0
        # the frozen-backbone methods train a small fraction of the full model's parameters
        assert by["memory_nd"]["trainable_params"] < by["full_ft"]["trainable_params"] / 10
        assert by["head_only"]["trainable_params"] < by["head_cls"]["trainable_params"]
    elif name == "sweep":
        by = {r["k"]: r for r in data["step"]["rows"]}
        assert list(by) == [1, 8, 32, 100] and [by[k]["separate_timed"] for k in by] == [True, True, False, False]
        assert all(r["speedup"]["median"] > 0 for r in by.values())
        assert set(data["step"]["memory"]) == {"1", "32"}
        e2e = data["e2e"]
        assert [c["name"] for c in e2e["configs"]] == ["lr-0.3_n-mem-1_seed-0", "lr-0.3_n-mem-1_seed-1"]
        assert e2e["ratio"] == pytest.approx(e2e["sequential_seconds"] / e2e["sweep_seconds"])
        # every configuration is its own train run's computation (train --init-seed S): the same accuracy
        assert e2e["max_diff"] == 0.0
        assert len(data["targets"]) == 6
    elif name == "batch_predict":
        (rep,) = data["jobs"]
        assert rep["one_job"]["images"] == 48 and len(rep["per_task"]) == 8
        assert rep["ratio"] == pytest.approx(sum(j["seconds"] for j in rep["per_task"]) / rep["one_job"]["seconds"])
        assert [w["workers"] for w in data["workers"]] == [0, 1, 2] and data["ray"] == []
        assert all(0 < w["decode_share"] < 1 for w in data["workers"])
    else:
        saved = data["tuning_time"]["fmnist_5_9"]["nd_m1"]  # its grid trained in one pass, the others alone
        assert data["settings"]["one_pass_tuning"] and saved["settings"] == 4 and saved["separate_s"] > 0
        assert all(set(by) == {"nd_m1"} for by in data["tuning_time"].values())
        concat = data["concatenation"]["0"]
        assert concat["all_unchanged"], concat
        assert concat["base_max_logit_diff"] < 1e-4
        for task in data["settings"]["tasks"]:
            assert set(data["results"][task]) == set(data["settings"]["methods"])


@pytest.mark.integration
def test_accuracy_runs_on_a_timm_backbone_with_lazily_loaded_images(tmp_path: Path) -> None:
    """``--model``: a 3-channel 96 px timm ViT, so Fashion-MNIST and digits are resized and loaded lazily."""
    data = run_quick("accuracy", tmp_path, "--model", "vit_tiny_patch16_224", "--model-kwargs",
                     '{"depth": 1, "img_size": 96}')
    assert data["settings"]["base"]["model"] == "vit_tiny_patch16_224"
    assert data["concatenation"]["0"]["all_unchanged"]
