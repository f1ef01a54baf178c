"""Decoding and the model's passes: a torch ``DataLoader`` whose workers read images with PIL and
prepare them with the backbone's own timm transform, and the passes over each batch.

Images are prepared once per *pass group* (:func:`learnable_memory.pass_groups.pass_groups`): the outputs
whose tasks were trained with the same preprocessing share one ``forward_all``; tasks trained with another
mean, crop or size get a pass of their own with their own transform, never another task's. In the common
case (one preprocessing) that is ONE ``forward_all`` per batch for every task and ``base``.

An image that can not be read (missing, truncated, not an image, a decompression bomb) is not fatal: its
row carries the error and no prediction, and the run goes on.
"""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import data as D
from ..config import BASE_KEY
from ..pass_groups import PassGroup
from .sources import TAR_SUFFIX

#: Dtypes by their ``--dtype`` name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_outputs(model: nn.Module) -> list[str]:
    """``forward_all``'s default: ``"base"`` (unless a full-mode task changes the shared tokens) and every task."""
    full = any(t.mode == "full" for t in model.tasks.values())
    return ([] if full else [BASE_KEY]) + model.task_names


def resolve_outputs(model: nn.Module, tasks: Sequence[str] | None) -> list[str]:
    """The outputs a job writes: ``tasks`` as given (checked), or :func:`default_outputs`."""
    if tasks is None:
        return default_outputs(model)
    wanted = list(dict.fromkeys(tasks))
    unknown = [t for t in wanted if t != BASE_KEY and t not in model.tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in --tasks; this model has {model.task_names} and {BASE_KEY!r}")
    return wanted


def check_device(device: str | torch.device, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``--device`` and ``--dtype`` as torch objects; float16 only where the device runs it."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        raise ValueError(f"--device {device}: no such device here (cpu{', cuda' * available['cuda']}"
                         f"{', mps' * available['mps']})")
    if dev.type == "cpu" and dtype == "float16":
        raise ValueError("--dtype float16 is for GPUs; on the CPU use bfloat16 or float32")
    return dev, DTYPES[dtype]


# ----- decoding -----
#: Open ``.tar`` shards by (process id, path): a member is read without scanning the archive again, and a
#: DataLoader worker never shares a file offset with the process it was forked from.
_SHARDS: dict[tuple[int, str], tarfile.TarFile] = {}


def _member(shard: str, member: str):
    key = (os.getpid(), shard)
    if key not in _SHARDS:
        _SHARDS[key] = tarfile.open(shard)
    f = _SHARDS[key].extractfile(member)
    if f is None:
        raise KeyError(f"{member} is not a file")
    return f


def read_image(path: str, mode: str) -> Image.Image:
    """One image in PIL ``mode``, from a file or a ``shard.tar/member``; a one-line ``ValueError`` when it
    can not be read."""
    try:
        if TAR_SUFFIX + "/" in path:
            shard, member = path.split(TAR_SUFFIX + "/", 1)
            with Image.open(_member(shard + TAR_SUFFIX, member)) as img:
                return img.convert(mode)
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path} not found")
        return D.open_image(path, mode)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large for PIL ({e}); shrink it first") from e
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, EOFError, KeyError, tarfile.TarError) as e:  # truncated, damaged, not an image
        raise ValueError(f"image {path} can not be read: {e}") from e


@dataclass(frozen=True)
class Preparation:
    """How one pass group's images are prepared: the timm transform and the PIL mode it takes."""

    transform: Callable[[Image.Image], torch.Tensor]
    mode: str

    @classmethod
    def of(cls, group: PassGroup) -> Preparation:
        return cls(D.model_transform(group.data_config), D.pil_mode(group.data_config))


class ImageFiles(Dataset):
    """Item ``i``: the images of ``paths[i]`` prepared for every pass group (``[C, H, W]`` each), or the error
    that kept it from being read, and the seconds decoding took."""

    def __init__(self, paths: Sequence[str], preparations: Sequence[Preparation]):
        self.paths = list(paths)
        self.preparations = list(preparations)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor] | None, str | None, float]:
        start = time.perf_counter()
        images: dict[str, Image.Image] = {}
        try:
            tensors = []
            for prep in self.preparations:
                if prep.mode not in images:
                    images[prep.mode] = read_image(self.paths[i], prep.mode)
                tensors.append(prep.transform(images[prep.mode]))
        except (OSError, ValueError) as e:
            return None, " ".join(str(e).split()), time.perf_counter() - start
        return tensors, None, time.perf_counter() - start


@dataclass
class Batch:
    """A collated batch: per pass group the images that could be read ``[B_ok, C, H, W]``, which rows they
    are, every row's error (None when read) and the seconds the workers spent decoding it."""

    images: list[torch.Tensor]
    ok: list[bool]
    errors: list[str | None]
    decode_s: float


def collate(items: list[tuple[list[torch.Tensor] | None, str | None, float]]) -> Batch:
    good = [t for t, _, _ in items if t is not None]
    groups = len(good[0]) if good else 0
    return Batch([torch.stack([t[g] for t in good]) for g in range(groups)], [t is not None for t, _, _ in items],
                 [e for _, e, _ in items], sum(s for _, _, s in items))


def batches(paths: Sequence[str], preparations: Sequence[Preparation], batch_size: int,
            workers: int) -> Iterator[Batch]:
    """The images of ``paths`` in order, ``batch_size`` at a time, decoded by ``workers`` processes (0: here)."""
    loader = DataLoader(ImageFiles(paths, preparations), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, persistent_workers=False, prefetch_factor=4 if workers else None)
    yield from loader


# ----- the passes -----
@dataclass
class Outputs:
    """What the passes over one batch give, for the rows that could be read: per output its logits
    ``[B_ok, C]`` and, when asked for, its pooled features ``[B_ok, D]`` (the input of its head)."""

    logits: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]


@contextmanager
def feature_hooks(model: nn.Module, outputs: Sequence[str], store: dict[str, torch.Tensor]):
    """While open, each head of ``outputs`` records its input (the pooled features ``[B, D]``) in ``store``,
    so the features come out of the same pass as the logits."""
    def record(name: str):
        def hook(_module, args):
            store[name] = args[0]
        return hook

    heads = {n: model.base.get_classifier() if n == BASE_KEY else model.tasks[n].head for n in outputs}
    if not isinstance(heads.get(BASE_KEY, nn.Identity()), nn.Module):  # e.g. DeiT distilled: two heads, two inputs
        raise ValueError("--features: this base model has several heads, so 'base' has no one pooled feature; "
                         "leave base out of --tasks")
    handles = [head.register_forward_pre_hook(record(n)) for n, head in heads.items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def run_passes(model: nn.Module, groups: Sequence[PassGroup], images: Sequence[torch.Tensor], *,
               features: bool = False, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> Outputs:
    """One ``forward_all`` per pass group on that group's images ``[B, C, H, W]``; logits (and features) as
    float32 on the CPU. No images (none of the batch could be read): no pass, no outputs."""
    logits: dict[str, torch.Tensor] = {}
    feats: dict[str, torch.Tensor] = {}
    if not images:
        return Outputs(logits, feats)
    with torch.inference_mode():
        for group, x in zip(groups, images, strict=True):
            store: dict[str, torch.Tensor] = {}
            with feature_hooks(model, group.outputs if features else (), store):
                out = model.forward_all(x.to(device=device, dtype=dtype), tasks=list(group.outputs))
            logits.update({n: v.float().cpu() for n, v in out.items()})
            feats.update({n: v.float().cpu() for n, v in store.items()})
    return Outputs(logits, feats)

