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

Images are preprocessed with timm's own transform for the model (:func:`model_transform`), so a real
pretrained model gets its own resizing and normalisation; grayscale images become 3 channels for
3-channel models, and 8x8 digits are upsampled to the model's input size.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import timm
from PIL import Image
from timm.data import create_transform, resolve_input_data_config
from torch import nn
from torch.utils.data import Dataset

#: The built-in data sources (anything else is an ImageFolder directory).
BUILTIN_DATASETS = ("fashion-mnist", "digits", "glyphs-pretrain", "glyphs-near", "glyphs-far")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_TRAIN_SIZE = 1200

#: The small base model shipped with the package (timm's ``local-dir`` export format:
#: ``config.json`` + ``model.safetensors``), produced by ``benchmarks/pretrain_base.py``.
DEMO_BASE_DIR = Path(__file__).parent / "assets" / "fmnist_vit_base"
#: The broad base: the same architecture pretrained on the 1,188 characters of ``glyphs-pretrain``.
GLYPH_BASE_DIR = Path(__file__).parent / "assets" / "glyph_vit_base"
#: The shipped bases by name, for :func:`load_demo_base`.
DEMO_BASES = {"fmnist": DEMO_BASE_DIR, "glyphs": GLYPH_BASE_DIR}


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

    def _map(self, t: int) -> int:
        return int(t) if self.label_map is None else self.label_map[int(t)]

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


def data_config(model: nn.Module) -> dict:
    """timm's preprocessing config for ``model`` (a timm model or a ``MemoryViT``).

    Uses :func:`timm.data.resolve_input_data_config`, which follows the model's current input size
    and channels as well as its pretrained mean/std/interpolation.
    """
    base = getattr(model, "base", model)
    return resolve_input_data_config(base)


def model_transform(config: dict) -> Callable:
    """timm's evaluation transform (resize, centre crop, to tensor, normalise) for ``config``."""
    return create_transform(**config, is_training=False)


def pil_mode(config: dict) -> str:
    """PIL mode for a model input with ``config["input_size"][0]`` channels."""
    return "L" if config["input_size"][0] == 1 else "RGB"


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


def open_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Read an image file in PIL ``mode`` ("L" or "RGB")."""
    with Image.open(path) as img:
        return img.convert(mode)


def load_demo_base(path: str | Path | None = None) -> nn.Module:
    """A small ViT shipped with the package, by name (``DEMO_BASES``), or another timm ``local-dir`` export.

    Both shipped bases are a timm ``VisionTransformer`` (28x28 grayscale, patch 7, width 128, depth 4,
    4 heads): ``"fmnist"`` (the default) pretrained on Fashion-MNIST classes 0-4, ``"glyphs"`` on the 1,188
    character classes of ``glyphs-pretrain``. Its ``pretrained_cfg`` carries the data mean/std, input
    size, interpolation and label names, so :func:`data_config` gives the right preprocessing.
    """
    if path is None or (isinstance(path, str) and path in DEMO_BASES):
        path = DEMO_BASES[path or "fmnist"]
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no base model at {path}: expected config.json and model.safetensors "
                                "(run benchmarks/pretrain_base.py to create it)")
    return timm.create_model(f"local-dir:{path}", pretrained=True)


def label_names(model: nn.Module) -> list[str] | None:
    """Label names of a timm model's own head, from its ``pretrained_cfg`` when it has them."""
    names = getattr(model, "pretrained_cfg", {}).get("label_names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    return list(names) if names else None

