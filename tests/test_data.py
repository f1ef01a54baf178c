"""Datasets, preprocessing and the shipped demo base (all local files, no downloads)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader

from learnable_memory import data as D

ROOT = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    _write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01a")
    with pytest.raises(ValueError, match="idx"):
        D.read_idx(tmp_path / "bad")


def test_fashion_mnist_from_debian_files():
    x, y = D.load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    assert len(D.load_fashion_mnist("train")[0]) == 60000


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LEARNABLE_MEMORY_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_fashion_mnist("train")


def test_digits_split_is_fixed_and_disjoint():
    xtr, ytr = D.load_digits_arrays("train")
    xte, yte = D.load_digits_arrays("test")
    assert xtr.shape == (1200, 8, 8) and xte.shape == (597, 8, 8)
    assert xtr.dtype == np.uint8 and xtr.max() == 255
    train_rows = {r.tobytes() + bytes([int(t)]) for r, t in zip(xtr, ytr, strict=True)}
    dup = sum(r.tobytes() + bytes([int(t)]) in train_rows for r, t in zip(xte, yte, strict=True))
    assert dup < 10  # sklearn's digits has a few exact duplicate images, never a shared index
    np.testing.assert_array_equal(D.load_digits_arrays("train")[1], ytr)
    with pytest.raises(ValueError, match="split"):
        D.load_digits_arrays("val")


def test_parse_class_subset():
    names = D.FASHION_MNIST_CLASSES
    assert D.parse_class_subset("5-9", names) == [5, 6, 7, 8, 9]
    assert D.parse_class_subset("2,0", names) == [2, 0]
    assert D.parse_class_subset("Sandal,Bag", names) == [5, 8]
    assert D.parse_class_subset(["Bag", 1], names) == [8, 1]
    assert D.parse_class_subset(None, names) is None
    assert D.parse_class_subset(["3", "1"], D.DIGITS_CLASSES) == [3, 1]  # names that look like numbers
    for bad, msg in [("Hat", "unknown class"), ("12", "out of range"), ("1,1", "twice")]:
        with pytest.raises(ValueError, match=msg):
            D.parse_class_subset(bad, names)


def test_class_subset_relabels_in_order():
    cfg = D.data_config(D.load_demo_base())
    ds = D.load_dataset("fashion-mnist", "test", cfg, classes="Bag,Sandal")
    assert ds.classes == ["Bag", "Sandal"] and len(ds) == 2000
    _, y = D.load_fashion_mnist("test")
    first_bag = int(np.flatnonzero(y == 8)[0])
    assert ds.indices[0] <= first_bag and set(ds.targets) == {0, 1}
    assert ds[ds.indices.index(first_bag)][1] == 0


def test_transform_follows_the_model_input():
    """Digits 8x8 grayscale become 3-channel 32x32 images normalised with the model's own mean/std."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8)
    cfg = D.data_config(model)
    assert cfg["input_size"] == (3, 32, 32)
    ds = D.load_dataset("digits", "train", cfg)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    white = 1.0  # the model's own normalisation: (1 - mean) / std for a white pixel
    assert float(x.max()) <= (white - cfg["mean"][0]) / cfg["std"][0] + 1e-4
    gray = D.load_dataset("digits", "train", D.data_config(D.load_demo_base()))[0][0]
    assert gray.shape == (1, 28, 28)


def _image_folder(root: Path, splits=("train", "val")) -> None:
    rng = np.random.default_rng(0)
    for split in splits:
        for cls, value in (("cat", 30), ("dog", 200), ("emu", 120)):
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True)
            for i in range(3):
                arr = np.clip(rng.normal(value, 5, size=(20, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")


def test_image_folder_splits_and_subset(tmp_path):
    _image_folder(tmp_path)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8)
    cfg = D.data_config(model)
    train = D.load_dataset(str(tmp_path), "train", cfg)
    assert train.classes == ["cat", "dog", "emu"] and len(train) == 9
    assert train[0][0].shape == (3, 32, 32)
    val = D.load_dataset(str(tmp_path), "test", cfg, classes="emu,cat")
    assert val.classes == ["emu", "cat"] and sorted(val.targets) == [0, 0, 0, 1, 1, 1]
    x, y = next(iter(DataLoader(val, batch_size=6)))
    assert x.shape == (6, 3, 32, 32) and y.dtype == torch.long
    gray = D.load_dataset(str(tmp_path), "train", D.data_config(D.load_demo_base()))
    assert gray[0][0].shape == (1, 28, 28)


def test_image_folder_errors(tmp_path):
    cfg = D.data_config(D.load_demo_base())
    with pytest.raises(FileNotFoundError, match="not found"):
        D.load_dataset(str(tmp_path / "nope"), "train", cfg)
    _image_folder(tmp_path / "flat", splits=("",))
    assert len(D.load_dataset(str(tmp_path / "flat"), "train", cfg)) == 9
    with pytest.raises(FileNotFoundError, match="no test split"):
        D.load_dataset(str(tmp_path / "flat"), "test", cfg)


def test_holdout_and_subsample_are_disjoint_and_seeded():
    cfg = D.data_config(D.load_demo_base())
    ds = D.load_dataset("digits", "train", cfg)
    rest, held = D.holdout(ds, 0.25, seed=3)
    assert len(held) == 300 and len(rest) == 900
    assert not set(rest.indices) & set(held.indices)
    assert D.holdout(ds, 0.25, seed=3)[1].indices == held.indices
    small = D.subsample(ds, 50, seed=1)
    assert len(small) == 50 and small.classes == ds.classes
    assert D.subsample(ds, None) is ds
    with pytest.raises(ValueError):
        D.holdout(ds, 1.5)


def test_shipped_demo_base_is_a_good_fashion_mnist_model():
    base = D.load_demo_base()
    assert isinstance(base, timm.models.VisionTransformer)
    cfg = D.data_config(base)
    meta = json.loads((D.DEMO_BASE_DIR / "config.json").read_text())
    assert cfg["input_size"] == (1, 28, 28) and tuple(cfg["mean"]) == tuple(meta["pretrained_cfg"]["mean"])
    assert D.label_names(base) == D.FASHION_MNIST_CLASSES[:5]
    test = D.subsample(D.load_dataset("fashion-mnist", "test", cfg, classes="0-4"), 500, seed=0)
    x, y = next(iter(DataLoader(test, batch_size=500)))
    with torch.inference_mode():
        acc = float((base(x).argmax(-1) == y).float().mean())
    assert acc > 0.8, acc
    assert abs(meta["training"]["test_accuracy"] - acc) < 0.05


def test_pretrain_script_smoke(tmp_path):
    """benchmarks/pretrain_base.py writes a folder that load_demo_base reads back."""
    spec = importlib.util.spec_from_file_location("pretrain_base", ROOT / "benchmarks" / "pretrain_base.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--steps", "2", "--batch-size", "16", "--out", str(tmp_path / "base")]) == 0
    base = D.load_demo_base(tmp_path / "base")
    meta = json.loads((tmp_path / "base" / "config.json").read_text())
    assert meta["training"]["steps"] == 2 and "--steps 2" in meta["training"]["command"]
    assert D.data_config(base)["input_size"] == (1, 28, 28)
    with pytest.raises(FileNotFoundError, match="pretrain_base"):
        D.load_demo_base(tmp_path / "missing")


def test_preprocessing_and_bases_have_their_own_modules_and_data_re_exports_them():
    from learnable_memory import bases, preprocessing

    for name in ("data_config", "model_transform", "pil_mode", "open_image"):
        assert getattr(D, name) is getattr(preprocessing, name), name
    for name in ("load_demo_base", "label_names", "DEMO_BASE_DIR", "DEMO_BASES", "GLYPH_BASE_DIR"):
        assert getattr(D, name) is getattr(bases, name), name
    assert set(D.__all__) <= set(dir(D))
