"""The JSON shape of ``adapter_config.json`` and ``adapters.json``: the type of every field the loaders
read, checked up front so that a malformed file is an :class:`~.tensors.AdapterError` naming the field,
never a raw ``TypeError`` from deep inside the loader (see :mod:`learnable_memory.adapters.folder` for
what the fields mean)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .tensors import AdapterError

#: The JSON types a field may have, and those types in words.
Kind = tuple[tuple[type, ...], str]
STRING: Kind = ((str,), "a string")
INTEGER: Kind = ((int,), "an integer")
OBJECT: Kind = ((dict,), "an object")
Fields = Mapping[str, Kind]

#: The top-level fields of an adapter config.
CONFIG_FIELDS: Fields = {
    "task": STRING, "mode": STRING, "n_mem": INTEGER, "num_classes": INTEGER, "init_std": ((int, float), "a number"),
    "class_names": ((list, type(None)), "a list of strings or null"), "depends_on": ((list,), "a list of objects"),
    "base_model": OBJECT, "preprocessing": OBJECT, "task_fingerprint": STRING, "weights_sha256": STRING,
}
#: The fields of ``base_model``, and of each entry of ``depends_on`` (``name`` instead of the shape).
BASE_FIELDS: Fields = {"embed_dim": INTEGER, "depth": INTEGER, "num_prefix_tokens": INTEGER, "fingerprint": STRING,
                       "dtype": STRING, "fingerprints_by_dtype": OBJECT}
DEPENDENCY_FIELDS: Fields = {"name": STRING, "fingerprint": STRING, "dtype": STRING, "fingerprints_by_dtype": OBJECT}


def _check(obj: Mapping[str, Any], fields: Fields, where: str, prefix: str, skip_none: bool) -> None:
    for key, (types, words) in fields.items():
        value = obj.get(key)
        if key in obj and not isinstance(value, types) and not (skip_none and value is None):
            raise AdapterError(f"{where}: '{prefix}{key}' is {json.dumps(value)[:60]}, expected {words}; fix the "
                               "file or save the adapter again")
    by_dtype = obj.get("fingerprints_by_dtype")
    if isinstance(by_dtype, dict) and not all(isinstance(v, str) for v in by_dtype.values()):
        raise AdapterError(f"{where}: '{prefix}fingerprints_by_dtype' must map dtype names to fingerprint strings")
    names = obj.get("class_names")
    if isinstance(names, list) and not all(isinstance(n, str) for n in names):
        raise AdapterError(f"{where}: '{prefix}class_names' must be a list of strings")


def check_config_fields(cfg: Mapping[str, Any], where: str | Path, skip_none: bool = False) -> None:
    """Refuse (:class:`AdapterError`) an adapter config whose fields (those present; all of them
    nested, ``base_model`` and ``depends_on`` entries included) have the wrong JSON type.
    ``skip_none``: accept null for any field (peft's configs leave the ones it fills in null)."""
    where = str(where)
    _check(cfg, CONFIG_FIELDS, where, "", skip_none)
    if isinstance(cfg.get("base_model"), dict):
        _check(cfg["base_model"], BASE_FIELDS, where, "base_model.", skip_none)
    for i, dep in enumerate(cfg.get("depends_on") or []):
        if not isinstance(dep, dict):
            raise AdapterError(f"{where}: 'depends_on[{i}]' is {json.dumps(dep)[:60]}, expected an object "
                               "{name, fingerprint, ...}")
        _check(dep, DEPENDENCY_FIELDS, where, f"depends_on[{i}].", skip_none)


def index_folders(index: Mapping[str, Any], where: Path) -> list[str]:
    """The task folder names an ``adapters.json`` lists, in order (``{"adapters": [{"task", "folder"}, ...]}``);
    :class:`AdapterError` for any other shape or a folder name that leaves the folder."""
    entries = index.get("adapters")
    ok = isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries)
    names = [e.get("folder") for e in entries] if ok else []
    if not ok or not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")
                         for n in names):
        raise AdapterError(f"{where}: 'adapters' must list the task folders ({{\"task\": ..., \"folder\": ...}} "
                           f"objects), got {json.dumps(entries)[:80]}")
    return names
