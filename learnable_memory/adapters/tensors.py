"""A task's tensors read from a file, and the one check they get before they become a task: names,
shapes, floating dtype, no NaN/Inf and, where the file records one, the task fingerprint.

Both loaders call :func:`check_tensors`: :func:`~learnable_memory.adapters.folder.read_adapter` (our
``load_adapters``) and the peft tuner (``PeftModel.from_pretrained`` / ``load_adapter``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..memory import TENSOR_NAMES
from .fingerprint import tensors_fingerprint


class AdapterError(ValueError):
    """An adapter folder is missing, damaged, or does not fit the model it is loaded onto."""


def non_finite(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{tensor name: number of NaN/Inf values}`` for the tensors that hold any."""
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if v.is_floating_point()}
    return {k: n for k, n in counts.items() if n}


def check_tensors(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, list[int]], where: str, sized: str, *,
                  fingerprint: str | None = None, allow_non_finite: bool = False) -> str:
    """Refuse (:class:`AdapterError`, starting with ``where``) a task's tensors, under our names
    (:data:`~learnable_memory.memory.TENSOR_NAMES`), that are not exactly the four a task needs:
    a name missing or unexpected, a shape other than ``shapes[name]`` (``sized``: what sets the shapes,
    e.g. ``"adapter_config.json (n_mem=2, ...)"``), a dtype that is not floating, NaN or Inf (unless
    ``allow_non_finite``), or a float32 fingerprint other than ``fingerprint`` (when given).

    Returns:
        The fingerprint of the tensors cast to float32 (the task fingerprint of adapter files).
    """
    missing, extra = sorted(set(TENSOR_NAMES) - tensors.keys()), sorted(tensors.keys() - set(TENSOR_NAMES))
    if missing or extra:
        raise AdapterError(f"{where}: expected tensors {list(TENSOR_NAMES)}; missing {missing}, unexpected {extra}")
    for k in TENSOR_NAMES:
        if list(tensors[k].shape) != list(shapes[k]):
            raise AdapterError(f"{where}: tensor {k!r} has shape {list(tensors[k].shape)} but {sized} needs "
                               f"{list(shapes[k])}")
        if not tensors[k].is_floating_point():
            raise AdapterError(f"{where}: tensor {k!r} has dtype {tensors[k].dtype}, expected float32")
    bad = non_finite(tensors)
    if bad and not allow_non_finite:
        raise AdapterError(f"{where}: tensors {sorted(bad)} hold NaN or Inf ({sum(bad.values())} values): the task "
                           "diverged in training; train it again")
    got = tensors_fingerprint({k: v.to("cpu", torch.float32) for k, v in tensors.items()})
    if fingerprint is not None and got != fingerprint:
        raise AdapterError(f"{where}: the tensors' fingerprint {got} is not the task_fingerprint recorded in its "
                           f"config ({fingerprint}): the two files do not belong together; save the adapter again")
    return got
