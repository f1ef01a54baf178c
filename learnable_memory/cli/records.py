"""The adapters named on the command line, and the ``training.json`` that ``train`` writes beside each.

Adapters are named as the Python API takes them: adapter folders, ``save_pretrained`` folders, or
``hf-hub:owner/repo[/subfolder][@revision]`` (through the Hugging Face cache; ``HF_HUB_OFFLINE=1``
uses the cache only).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..adapters.folder import AdapterError, adapter_folders
from ..mask import TaskOrderError
from ..model import MemoryViT, load_adapters
from ..pass_groups import grouped_by_caller
from .base import base_spec, create_base, refuse_random_weights
from .options import add_adapter_options as add_adapter_options  # where the parsers of the commands take it

#: Written by ``train`` into the adapter folder: how the adapter was made (data, base model, settings).
TRAINING_FILE = "training.json"

_STR, _INT, _LIST, _DICT, _NONE = (str,), (int,), (list,), (dict,), (type(None),)
#: The ``training.json`` fields the commands read: the JSON types each may have, in words.
TRAINING_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "task": (_STR, "a string"),
    "data": (_STR + _NONE, "a string or null"),
    "class_subset": (_STR + _LIST + _NONE, "a string, a list or null"),
    "base": (_DICT, "an object"),
    "extends": (_LIST, "a list"),
    "total_steps": (_INT, "an integer"),
    "history": (_LIST, "a list"),
}
#: The fields of its ``base`` object: the base spec, :func:`~.base.base_spec`.
BASE_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "model": (_STR + _NONE, "a string or null"),
    "pretrained": ((bool,), "true or false"),
    "checkpoint": (_STR + _NONE, "a string or null"),
    "model_kwargs": (_DICT, "an object"),
}


def read_training_info(folder: str | Path) -> dict:
    """The ``training.json`` in an adapter folder ({} when absent), its fields checked."""
    f = Path(folder) / TRAINING_FILE
    if not f.is_file():
        return {}
    fix = "fix or delete it (then pass --data and the base model options yourself)"
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e}); {fix}") from e
    _check_fields(info, TRAINING_FIELDS, f, "", fix)
    _check_fields(info.get("base", {}), BASE_FIELDS, f, "base.", fix)
    return info


def _check_fields(obj: object, fields: dict[str, tuple[tuple[type, ...], str]], f: Path, prefix: str,
                  fix: str) -> None:
    if not isinstance(obj, dict):
        where = f"'{prefix.rstrip('.')}' is" if prefix else "holds"
        raise ValueError(f"{f}: {where} a JSON {type(obj).__name__}, expected an object; {fix}")
    if prefix:
        unknown = sorted(set(obj) - set(fields))
        if unknown:
            raise ValueError(f"{f}: unknown entries {unknown} in '{prefix.rstrip('.')}'; {fix}")
    for key, (types, words) in fields.items():
        if key in obj and not isinstance(obj[key], types):
            raise ValueError(f"{f}: '{prefix}{key}' is {json.dumps(obj[key])[:60]}, expected {words}; {fix}")


def resolve_adapters(specs: Sequence[str | Path]) -> list[Path]:
    """The local adapter folders ``specs`` stand for, in order (``hf-hub:`` specs through the cache)."""
    return [f for s in specs for f in adapter_folders(s)]


def load_named_adapters(model: nn.Module, folders: Sequence[Path], *, check_fingerprint: bool = True,
                        trainable: bool = False) -> MemoryViT:
    """:func:`~learnable_memory.load_adapters` with its advice given as command-line options (each adapter
    is read once, by the loader)."""
    try:
        with grouped_by_caller():  # every command runs one pass per preprocessing group
            return load_adapters(model, list(folders), check_fingerprint=check_fingerprint, trainable=trainable)
    except AdapterError as e:
        layout = e.__cause__ if isinstance(e.__cause__, TaskOrderError) else None
        if layout is not None and layout.rule == "duplicate":  # the command line can not rename tasks
            raise AdapterError(f"two adapters hold task {layout.task!r} ({e}); a model serves each task name "
                               "once, so give one of them at a time") from e
        raise AdapterError(str(e).replace("check_fingerprint=False", "--no-fingerprint-check")) from e


def base_for_adapters(args: argparse.Namespace, folders: Sequence[Path]) -> nn.Module:
    """The base given on the command line, else the one the first adapter was trained on (its
    ``training.json``), else the shipped demo base."""
    if args.model is not None or args.checkpoint is not None or args.pretrained or args.model_kwargs:
        spec = base_spec(args)
    else:
        spec = read_training_info(folders[0]).get("base", {}) if folders else {}
    refuse_random_weights(spec)
    return create_base(**spec)
