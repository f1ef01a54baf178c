"""Datasets and preprocessing: Fashion-MNIST, scikit-learn's digits, ImageFolder, and the demo base model.

Everything is read from local files; nothing is downloaded.

- Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` package (idx ``.gz`` files under
  ``/usr/share/datasets/fashion-mnist``, or ``$LEARNABLE_MEMORY_FASHION_MNIST``).
- Digits come from scikit-learn's bundled 8x8 set: a fixed, seeded split of 1,200 training images,
  the other 597 for test.
- Glyphs (``glyphs-pretrain``, ``glyphs-near``, ``glyphs-far``) are characters rendered from Debian font
  packages by :mod:`learnable_memory.glyphs`: one class per character, 28x28, a fixed seed, train and test
  images drawn from different random streams.
- An ImageFolder directory is read with torchvision. ``root/train`` and ``root/val`` (or ``root/test``)
  are used as splits when present; otherwise ``root`` itself is the training split.

Images are preprocessed with timm's own transform for the model (:mod:`learnable_memory.preprocessing`), so a
real pretrained model gets its own resizing and normalisation; grayscale images become 3 channels for
3-channel models, and 8x8 digits are upsampled to the model's input size. The shipped base models are in
:mod:`learnable_memory.bases`; this module re-exports both modules' names for older callers.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .bases import DEMO_BASE_DIR, DEMO_BASES, GLYPH_BASE_DIR, label_names, load_demo_base
from .preprocessing import data_config, model_transform, open_image, pil_mode

__all__ = [  # the names of .bases and .preprocessing are re-exported for older callers
    "BUILTIN_DATASETS", "DEMO_BASES", "DEMO_BASE_DIR", "DIGITS_CLASSES", "DIGITS_TRAIN_SIZE", "FASHION_MNIST_CLASSES",
    "GLYPH_BASE_DIR", "LabelTable", "fashion_mnist_dir",
    "ArrayImages", "Selection", "data_config", "holdout", "image_folder_split", "is_builtin", "label_names",
    "load_dataset", "load_demo_base", "load_digits_arrays", "load_fashion_mnist", "model_transform", "open_image",
    "parse_class_subset", "pil_mode", "read_idx", "select_classes", "subsample",
]

#: The built-in data sources (anything else is an ImageFolder directory).
BUILTIN_DATASETS = ("fashion-mnist", "digits", "glyphs-pretrain", "glyphs-near", "glyphs-far")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_TRAIN_SIZE = 1200

def fashion_mnist_dir() -> Path:
    """Directory of the Fashion-MNIST idx files (``$LEARNABLE_MEMORY_FASHION_MNIST`` overrides)."""
    return Path(os.environ.get("LEARNABLE_MEMORY_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def read_idx(path: str | Path) -> np.ndarray:
    """Read one (gzipped) idx file into a uint8 array, e.g. ``[N, 28, 28]`` images or ``[N]`` labels."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``[N, 28, 28]`` (uint8) and labels ``[N]`` (int64) of ``split``."""
    root = Path(root) if root is not None else fashion_mnist_dir()
    prefix = {"train": "train", "test": "t10k"}[_check_split(split)]
    images_file = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_file = root / f"{prefix}-labels-idx1-ubyte.gz"
    for f in (images_file, labels_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {f} not found: install it with `apt-get install -y dataset-fashion-mnist` "
                "or point $LEARNABLE_MEMORY_FASHION_MNIST at a directory holding the idx .gz files"
            )
    return read_idx(images_file), read_idx(labels_file).astype(np.int64)


def load_digits_arrays(split: str = "train", n_train: int = DIGITS_TRAIN_SIZE,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images ``[N, 8, 8]`` (0..255) and labels ``[N]``.

    A fixed permutation (``seed``) puts ``n_train`` images in "train" and the rest in "test".
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    idx = order[:n_train] if _check_split(split) == "train" else order[n_train:]
    return images[idx], digits.target[idx].astype(np.int64)


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    return split


class ArrayImages(Dataset):
    """Grayscale images held in memory; item ``i`` is ``(transform(image), label)``.

    Args:
        images: ``[N, H, W]`` uint8.
        labels: ``[N]`` integer labels.
        class_names: Name of every label.
        transform: Callable on a PIL image, e.g. :func:`model_transform`.
        mode: PIL mode the image is converted to before ``transform`` ("L" or "RGB").
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 transform: Callable | None = None, mode: str = "L"):
        self.images = images
        self.targets = [int(t) for t in labels]
        self.classes = list(class_names)
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], "L")
        if self.mode != "L":
            img = img.convert(self.mode)
        return (self.transform(img) if self.transform else img), self.targets[i]


class Selection(Dataset):
    """Some items of a labelled dataset, optionally with labels renumbered.

    Args:
        dataset: Any dataset with ``targets`` and ``classes`` attributes.
        indices: The items kept, in order.
        label_map: Original label -> new label (``None`` keeps labels).
        class_names: Names of the new labels (defaults to ``dataset.classes``).
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], label_map: dict[int, int] | None = None,
                 class_names: Sequence[str] | None = None):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.label_map = label_map
        self.classes = list(class_names if class_names is not None else dataset.classes)
        src = dataset.targets
        self.targets = [self._map(src[i]) for i in self.indices]

    def _map(self, t):
        return t if self.label_map is None else self.label_map[int(t)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, _ = self.dataset[self.indices[i]]
        return x, self.targets[i]


def parse_class_subset(spec: str | Sequence[str | int] | None, class_names: Sequence[str]) -> list[int] | None:
    """Resolve a class subset to label indices, in the given order.

    ``spec`` is a comma-separated string (or a list) of indices, ranges ``a-b`` and class names,
    e.g. ``"5-9"``, ``"0,2,4"`` or ``"Sandal,Bag"``.
    """
    if spec is None or spec == "" or spec == []:
        return None
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = list(class_names)
    out: list[int] = []
    for item in items:
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit() and item not in names):
            out.append(int(item))
        elif isinstance(item, str) and item in names:
            out.append(names.index(item))
        elif isinstance(item, str) and re.fullmatch(r"\d+-\d+", item):
            lo, hi = (int(v) for v in item.split("-"))
            out.extend(range(lo, hi + 1))
        else:
            raise ValueError(f"unknown class {item!r} in class subset: use indices 0-{len(names) - 1}, "
                             f"ranges like 5-9 or names from {names}")
    bad = [i for i in out if not 0 <= i < len(names)]
    if bad:
        raise ValueError(f"class index {bad[0]} out of range: the data has {len(names)} classes (0-{len(names) - 1})")
    if len(set(out)) != len(out):
        raise ValueError(f"class subset {spec!r} names a class twice")
    return out


def select_classes(dataset: Dataset, classes: Sequence[int]) -> Selection:
    """The items of ``classes`` only, relabelled ``0..len(classes)-1`` in that order."""
    label_map = {c: i for i, c in enumerate(classes)}
    idx = [i for i, t in enumerate(dataset.targets) if int(t) in label_map]
    return Selection(dataset, idx, label_map, [dataset.classes[c] for c in classes])


def subsample(dataset: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """A fixed random ``n`` items of ``dataset`` (all of it when ``n`` is None or too large)."""
    if n is None or n >= len(dataset):
        return dataset
    idx = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:n])
    return Selection(dataset, idx)


def holdout(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split ``dataset`` at random into ``(rest, held_out)`` with ``fraction`` of it held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be between 0 and 1, got {fraction}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    n_val = max(1, int(round(fraction * len(dataset))))
    return Selection(dataset, np.sort(order[n_val:])), Selection(dataset, np.sort(order[:n_val]))


class LabelTable(Dataset):
    """Images with a label per task, from a CSV file: a ``path`` column (relative to the file's folder, or
    absolute), then one column per task; an empty cell is no label. Item ``i`` is ``(image, {task: label})``
    with -100 for no label (what ``fit`` leaves out of that task's loss).

    Attributes:
        tasks: The task columns used, in the file's order (or ``tasks``'s).
        classes: ``task -> class names``: the column's distinct values, sorted.
        targets: Item ``i``'s labels, ``{task: label}`` (so :func:`subsample` and :func:`holdout` take it).
    """

    def __init__(self, path: str | Path, config: dict, tasks: Sequence[str] | None = None):
        import csv

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label file {path} not found")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        header = list(rows[0]) if rows else []
        if "path" not in header:
            raise ValueError(f"{path} has no 'path' column (its columns: {header}): the first column names each "
                             "image, the others hold a label per task")
        columns = [c for c in header if c != "path"]
        unknown = [t for t in tasks or [] if t not in columns]
        if unknown or not columns:
            raise ValueError(f"{path}: no label column {unknown or ''} (the label columns are {columns})")
        self.tasks = list(tasks or columns)
        self.classes = {t: sorted({r[t].strip() for r in rows if (r[t] or "").strip()}) for t in self.tasks}
        empty = [t for t, names in self.classes.items() if len(names) < 2]
        if empty:
            raise ValueError(f"{path}: column(s) {empty} hold fewer than two classes")
        self.paths = [(path.parent / r["path"]) for r in rows]
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: {len(missing)} image(s) not found, e.g. {missing[0]} (paths are "
                                    "relative to the label file's folder)")
        self.targets = [{t: self.classes[t].index(r[t].strip()) if (r[t] or "").strip() else -100
                         for t in self.tasks} for r in rows]
        self.transform, self.mode = model_transform(config), pil_mode(config)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(open_image(self.paths[i], self.mode)), self.targets[i]


def is_builtin(source: str) -> bool:
    return source in BUILTIN_DATASETS


def image_folder_split(root: str | Path, split: str) -> Path | None:
    """Directory of ``split`` inside an ImageFolder ``root``, or None when the folder has no such split."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} not found (expected an ImageFolder directory, "
                                f"or one of the built-in datasets: {', '.join(BUILTIN_DATASETS)})")
    names = ("train",) if split == "train" else ("val", "test")
    for name in names:
        if (root / name).is_dir():
            return root / name
    has_splits = any((root / n).is_dir() for n in ("train", "val", "test"))
    return root if split == "train" and not has_splits else None


def load_dataset(source: str, split: str, config: dict, classes: Sequence[str] | str | None = None) -> Dataset:
    """A dataset of ``(image [C, H, W] float, label)`` ready for a model with preprocessing ``config``.

    Args:
        source: "fashion-mnist", "digits", "glyphs-pretrain", "glyphs-near", "glyphs-far" or an ImageFolder
            directory.
        split: "train" or "test" (ImageFolder: the ``val``/``test`` sub-directory).
        config: A timm data config, e.g. from :func:`data_config`.
        classes: Optional class subset (see :func:`parse_class_subset`); labels are renumbered in its order.

    The result has ``targets`` (labels) and ``classes`` (their names).
    """
    _check_split(split)
    transform, mode = model_transform(config), pil_mode(config)
    if source == "fashion-mnist":
        images, labels = load_fashion_mnist(split)
        ds: Dataset = ArrayImages(images, labels, FASHION_MNIST_CLASSES, transform, mode)
    elif source == "digits":
        images, labels = load_digits_arrays(split)
        ds = ArrayImages(images, labels, DIGITS_CLASSES, transform, mode)
    elif source.startswith("glyphs-") and source in BUILTIN_DATASETS:
        from .glyphs import load_set

        images, labels, names = load_set(source.removeprefix("glyphs-"), split)
        ds = ArrayImages(images, labels, names, transform, mode)
    else:
        from torchvision.datasets import ImageFolder

        folder = image_folder_split(source, split)
        if folder is None:
            raise FileNotFoundError(f"{source} has no {split} split: add a '{'train' if split == 'train' else 'val'}'"
                                    " sub-directory, or hold out part of the training images")
        ds = ImageFolder(str(folder), transform=transform, loader=partial(open_image, mode=mode))
    subset = parse_class_subset(classes, ds.classes)
    return select_classes(ds, subset) if subset is not None else ds


