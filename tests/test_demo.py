"""The demo, end to end in its quick mode (same code path, a few steps on a few hundred images)."""

from __future__ import annotations

import json

import torch
from PIL import Image

from learnable_memory import data as D
from learnable_memory import load_adapters
from learnable_memory.baselines import HeadOnly
from learnable_memory.cli import main
from learnable_memory.demo import METHODS, TASKS


def test_head_only_uses_the_base_features_exactly():
    base = D.load_demo_base()
    model = HeadOnly(base, 3)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        model.head.weight.copy_(base.head.weight[:3])
        model.head.bias.copy_(base.head.bias[:3])
        assert torch.allclose(model(x), base(x)[:, :3], atol=1e-6)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    model.train()
    assert not base.training


def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for step in ("1. Base", "2. Fine-tuning", "3. Loaded", "4. Results", "5. Figure", "6. Files"):
        assert step in text
    summary = json.loads((out / "results.json").read_text())
    rows = summary["results"]
    assert [(r["task"], r["method"]) for r in rows] == [(t.name, m) for t in TASKS for m in METHODS]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["size"] > 0 and r["trainable"] > 0
    by = {(r["task"], r["method"]): r for r in rows}
    fm = "fmnist-5-9"
    assert by[(fm, "head only")]["trainable"] == 128 * 5 + 5
    assert by[(fm, "head + class")]["trainable"] == 128 * 5 + 5 + 128
    assert by[(fm, "memory m=5")]["trainable"] == 128 * 5 + 5 + 128 + 4 * 5 * 128
    # one pass serves every task exactly as alone, and leaves the base output unchanged
    assert summary["checks"]["base output unchanged"] == 0.0
    assert all(v < 1e-4 for v in summary["checks"].values()), summary["checks"]
    for r in rows:
        if r["method"] == METHODS[-1]:
            assert abs(r["combined_accuracy"] - r["accuracy"]) <= 0.005  # at most one argmax tie flips
    assert summary["one_pass_ms"] > 0 and summary["separate_ms"] > 0
    with Image.open(out / "demo.png") as png:
        assert png.size[0] > 800 and png.size[1] > 300
    assert "memory m=5" in (out / "results.txt").read_text()
    memory = [r["path"] for r in rows if r["method"] == METHODS[-1]]
    assert load_adapters(D.load_demo_base(), memory).task_names == [t.name for t in TASKS]
