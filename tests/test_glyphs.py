"""The glyph source (``learnable_memory.glyphs``), its data sets, the broad base and their scripts.

The checksums pin the fonts (the Debian packages in ``glyphs.FONT_GROUPS``) and Pillow: if one of them
changes, the same seed no longer gives the same images, and these tests say so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from learnable_memory import data as D
from learnable_memory import glyphs as G

ROOT = Path(__file__).resolve().parents[1]

SET_SIZES = {"pretrain": 1188, "near": 60, "far": 27}
SET_SHA256 = {"pretrain": "4c6827cdb416fd94", "near": "e0e33ec3bbcc57ac", "far": "fc17d8bbf796c2ea"}
#: sha256 of ``render_set(chars, 4, split)`` images for a few characters of each set.
BATCH_SHA256 = {
    ("!ɒ₱", "train"): "4ae82539bac502ea", ("!ɒ₱", "test"): "53524f659b2e439c",
    ("ЂЃЄ", "train"): "73ecc136cda305bc", ("ЂЃЄ", "test"): "1869ed0ffe8aa6fb",
    ("רשת", "train"): "079cadc798045405", ("רשת", "test"): "ee908c6fee37e935",
}


def _sha(x: np.ndarray | str) -> str:
    return hashlib.sha256(x.encode() if isinstance(x, str) else x.tobytes()).hexdigest()[:16]


def _load_script(name: str, monkeypatch):
    """Import ``benchmarks/NAME.py`` as ``python benchmarks/NAME.py`` sees it (its folder first on the path)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_font_pool_is_sorted_and_a_missing_package_is_named(monkeypatch, tmp_path):
    files = G.font_files()
    assert len(files) == 180 and list(files) == sorted(files)
    assert not {f.name for f in files} & G.EXCLUDED_FONTS
    G.font_files.cache_clear()
    monkeypatch.setattr(G, "FONT_ROOT", tmp_path)
    try:
        with pytest.raises(FileNotFoundError, match=r"apt-get install -y fonts-dejavu-core=2\.37-6"):
            G.font_files()
    finally:
        G.font_files.cache_clear()


def test_class_sets_are_pinned_disjoint_and_of_their_scripts():
    sets = G.class_sets()
    assert {k: len(v) for k, v in sets.items()} == SET_SIZES
    assert {k: _sha("".join(v)) for k, v in sets.items()} == SET_SHA256
    assert not set(sets["pretrain"]) & set(sets["near"]) and not set(sets["near"]) & set(sets["far"])
    assert all("CYRILLIC" in unicodedata.name(c) for c in sets["near"])
    assert all("HEBREW" in unicodedata.name(c) for c in sets["far"])
    assert not any("CYRILLIC" in unicodedata.name(c) or "HEBREW" in unicodedata.name(c) for c in sets["pretrain"])
    # homoglyphs make one class: Latin A stays, Greek Alpha and Cyrillic A go
    assert "A" in sets["pretrain"] and "\u0391" not in sets["pretrain"] and "\u0410" not in sets["near"]
    assert all(len(G.fonts_for(c)) >= G.MIN_FONTS for c in sets["near"] + sets["far"])


def test_rendered_batches_match_their_checksums():
    for (chars, split), sha in BATCH_SHA256.items():
        images, labels = G.render_set(chars, 4, split)
        assert images.shape == (12, 28, 28) and images.dtype == np.uint8
        assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert _sha(images) == sha, (chars, split)


def test_an_image_depends_on_seed_split_character_and_index_only():
    ab, _ = G.render_set("AB", 3, "train")
    b, _ = G.render_set("B", 3, "train")
    np.testing.assert_array_equal(ab[3:], b)
    test, _ = G.render_set("B", 3, "test")
    other, _ = G.render_set("B", 3, "train", seed=1)
    assert not np.array_equal(b, test) and not np.array_equal(b, other)
    assert len({img.tobytes() for img in b}) == 3
    ink = b.astype(float).max(axis=(1, 2)) - b.astype(float).min(axis=(1, 2))
    assert ink.min() > 100  # a glyph, not a blank square


def test_glyph_data_sources_have_fixed_disjoint_splits():
    cfg = D.data_config(D.load_demo_base())
    train = D.load_dataset("glyphs-far", "train", cfg)
    test = D.load_dataset("glyphs-far", "test", cfg)
    assert train.classes == test.classes == list(G.class_sets()["far"])
    assert (len(train), len(test)) == (27 * 200, 27 * 100)
    assert not {img.tobytes() for img in train.images} & {img.tobytes() for img in test.images}
    x, y = train[250]
    assert x.shape == (1, 28, 28) and y == 1
    sub = D.load_dataset("glyphs-far", "test", cfg, classes="0-4")
    assert sub.classes == list(G.class_sets()["far"][:5]) and len(sub) == 500


def test_shipped_glyph_base_knows_its_characters():
    """The broad base, by name: it reads held-out test renderings of its own classes as its record says."""
    base = D.load_demo_base("glyphs")
    meta = json.loads((D.GLYPH_BASE_DIR / "config.json").read_text())
    chars = G.class_sets()["pretrain"]
    assert D.label_names(base) == list(chars) and base.num_classes == len(chars)
    assert D.data_config(base)["input_size"] == (1, 28, 28)
    assert (D.GLYPH_BASE_DIR / "model.safetensors").stat().st_size < 5 * 2**20
    picked = chars[::10]
    images, labels = G.render_set(picked, 4, "test")
    cfg = D.data_config(base)
    x = (torch.from_numpy(images).float().div(255).unsqueeze(1) - cfg["mean"][0]) / cfg["std"][0]
    with torch.inference_mode():
        pred = base(x).argmax(-1)
    acc = float((pred == torch.tensor([chars.index(picked[i]) for i in labels])).float().mean())
    assert acc > 0.7, acc
    assert abs(meta["training"]["test_accuracy"] - acc) < 0.1, (meta["training"]["test_accuracy"], acc)


def test_glyph_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """An interrupted run, resumed with the same command, ends where an uninterrupted run ends."""
    mod = _load_script("pretrain_base", monkeypatch)
    args = ["--source", "glyphs", "--steps", "4", "--batch-size", "8", "--per-class", "2", "--max-classes", "12",
            "--checkpoint-every", "2", "--threads", "1"]
    run_a = args + ["--checkpoint-dir", str(tmp_path / "a"), "--out", str(tmp_path / "base_a")]
    with pytest.raises(SystemExit, match="stopped after step 2"):
        mod.main(run_a + ["--stop-after", "2"])
    assert torch.load(tmp_path / "a" / "state.pt", weights_only=False)["step"] == 2
    assert mod.main(run_a) == 0
    assert mod.main(args + ["--checkpoint-dir", str(tmp_path / "b"), "--out", str(tmp_path / "base_b")]) == 0
    a, b = D.load_demo_base(tmp_path / "base_a"), D.load_demo_base(tmp_path / "base_b")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)
    meta = json.loads((tmp_path / "base_a" / "config.json").read_text())["training"]
    assert meta["classes"] == 12 and meta["steps"] == 4 and [r["step"] for r in meta["log"]] == [2, 4]


@pytest.mark.integration
def test_accuracy_grid_resumes_from_its_cells(tmp_path, monkeypatch):
    """A second run of the same command reads every cell and gives the same table; on the glyph base."""
    mod = _load_script("accuracy", monkeypatch)
    args = ["--quick", "--base", "glyphs", "--tasks", "glyphs_near", "glyphs_far", "--threads", "1",
            "--out", str(tmp_path)]
    assert mod.main(args) == 0
    first = json.loads((tmp_path / "accuracy.json").read_text())
    cells = sorted(Path(first["settings"]["cells"]).rglob("*.json"))
    assert len(cells) >= 2 * 3 * 5 and Path(first["settings"]["cells"]).name.startswith("glyph_vit_base_s3_b32_n256")
    stamp = {c: c.stat().st_mtime_ns for c in cells}
    assert mod.main(args) == 0
    second = json.loads((tmp_path / "accuracy.json").read_text())
    assert {c: c.stat().st_mtime_ns for c in cells} == stamp  # nothing trained again
    assert second["results"] == first["results"] and second["learning_rates"] == first["learning_rates"]
    assert second["concatenation"]["0"]["all_unchanged"]
    assert first["results"]["glyphs_near"]["head_only"]["trainable_params"] == 60 * 128 + 60
