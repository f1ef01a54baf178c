"""Adapter format 2: one adapter folder that both ``load_adapters`` and peft's ``PeftModel.from_pretrained``
read (``learnable_memory.peft`` registers the method with peft).

Format 2 is format 1 (see :mod:`learnable_memory.adapters.folder`) with ``format_version`` 2 and the
fields peft needs added to ``adapter_config.json``, every format-1 field kept:

- ``peft_type``: ``"LEARNABLE_MEMORY"`` (peft looks the config class and tuner up by it);
- ``task_type`` (null), ``inference_mode`` (true), ``revision`` (null), ``auto_mapping`` (null) and
  ``peft_version`` (the peft installed when saving), as every peft config has them;
- ``base_model_name_or_path``, already in format 1: the backbone's Hub id or timm architecture.

Two writers produce format-2 folders:

- ``save_adapter`` / ``save_pretrained`` (ours): tensors named ``memory``, ``class_token``,
  ``head.weight``, ``head.bias``, the config embedded in the tensor file, ``weights_sha256`` and
  ``task_fingerprint`` pairing the two files, atomic saves (all as in format 1).
- ``PeftModel.save_pretrained`` (peft's, through :class:`learnable_memory.peft.LearnableMemoryConfig`):
  the same config fields but no ``weights_sha256``, no ``task_fingerprint`` and no embedded config
  (peft writes the two files itself, one after the other); tensors named as peft names them, with
  the prefix of their module path, ``base_model.model.tasks.memory`` and so on. ``task`` is the
  adapter name and ``base_model_name_or_path`` is null (peft would otherwise look the backbone's
  ``config.json`` up on the Hub at every save).

The loader tells them apart by ``weights_sha256``: a format-2 config without it was written by peft.
Such a folder gets the checks its contents allow: tensor names and shapes against the config, no
NaN/Inf, and the backbone's shape and weight fingerprint from ``base_model``; there is no pairing
hash to check. Format-1 folders load as before (``PeftModel.from_pretrained`` needs format 2: save
them again).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from typing import Any

import torch

from ..memory import TENSOR_NAMES

#: The ``peft_type`` of a learnable-memory adapter (a string key in peft's mapping tables, not a
#: member of peft's closed ``PeftType`` enum).
PEFT_TYPE = "LEARNABLE_MEMORY"
#: The last part of the module path under which peft's state dict keys hold a task's tensors, before the
#: tensor name: ``MemoryViT.tasks`` (``base_model.model.tasks.<task>.memory``; peft removes ``<task>.``).
PEFT_TASKS_PATH = "tasks"


def peft_fields() -> dict[str, Any]:
    """The fields peft's configs have, as our saves write them."""
    try:
        version = metadata.version("peft")
    except metadata.PackageNotFoundError:
        version = None
    return {"peft_type": PEFT_TYPE, "task_type": None, "inference_mode": True, "revision": None,
            "auto_mapping": None, "peft_version": version}


def written_by_peft(cfg: Mapping[str, Any]) -> bool:
    """Whether a format-2 config was written by peft (no ``weights_sha256`` pairing it with its tensors)."""
    return cfg.get("format_version") == 2 and "weights_sha256" not in cfg


def tensor_name(key: str) -> str | None:
    """Our name of a saved tensor: ``key`` itself, or the tensor name after ``tasks.`` in a key prefixed
    as peft writes it (``base_model.model.tasks.head.weight`` -> ``head.weight``); None for another key."""
    if key in TENSOR_NAMES:
        return key
    for name in TENSOR_NAMES:
        if key.endswith(f".{PEFT_TASKS_PATH}.{name}") or key == f"{PEFT_TASKS_PATH}.{name}":
            return name
    return None


def our_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` under our names (see :func:`tensor_name`); keys it does not know are kept as they are,
    so that the shape check names them. ``ValueError`` when two keys give one name."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = tensor_name(key) or key
        if name in out:
            raise ValueError(f"two tensors are named {name!r} (one is {key!r})")
        out[name] = value
    return out
