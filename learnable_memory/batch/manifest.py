"""``_manifest.json``: what an output folder holds, so that ``--resume`` continues it and never mixes
two datasets.

A manifest records the job's *identity* and the parts finished::

    {"format": "learnable_memory.batch/1",
     "identity": {"inputs": {"count": 20000, "sha256": "sha256:..."},
                  "base": "sha256:...",                           # the backbone's weights
                  "tasks": {"digits": "sha256:...", ...},         # every task served, by fingerprint
                  "outputs": ["base", "digits"],                  # the outputs written, in order
                  "preprocessing": {...}, "options": {...}},      # per output; top-k, dtype, format, part size
     "adapters": ["/abs/path/adapters/digits", ...],              # where the tasks came from (not compared)
     "shard": [0, 1],
     "parts": {"part-00000-of-00001-000000.parquet": {"rows": 4096, "errors": 0}, ...}}

Every shard of a folder keeps its own manifest (``_manifest.json`` for a job that is not sharded,
``_manifest-I-of-N.json`` for shard I of N), rewritten atomically after each part is renamed into
place, so a kill loses at most the part in flight. A resumed job must have the same identity as every
manifest in the folder; otherwise it is refused, naming what differs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..adapters.fingerprint import base_fingerprint, task_tensors, tensors_fingerprint
from ..pass_groups import PassGroup
from .sources import Listing
from .writers import atomic_write, part_prefix

FORMAT = "learnable_memory.batch/1"
PREFIX = "_manifest"


def manifest_name(shard: tuple[int, int]) -> str:
    return f"{PREFIX}.json" if shard == (0, 1) else f"{PREFIX}-{shard[0]}-of-{shard[1]}.json"


@dataclass
class Manifest:
    """One shard's record in an output folder (see the module docstring)."""

    identity: dict[str, Any]
    shard: tuple[int, int]
    adapters: list[str] = field(default_factory=list)
    parts: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "identity": self.identity, "adapters": self.adapters, "shard": list(self.shard),
                "parts": self.parts}

    def save(self, folder: Path) -> None:
        """Write atomically (a temporary file, then a rename)."""
        text = json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n"
        atomic_write(folder / manifest_name(self.shard), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} can not be read ({e}); delete the output folder or choose another --out") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("identity"), dict):
        raise ValueError(f"{path} is not a batch prediction manifest; choose another --out")
    return data


def _differences(want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    words = {"inputs": "the input images", "base": "the base model's weights", "tasks": "the tasks (adapters)",
             "outputs": "the outputs (--tasks)", "preprocessing": "the preprocessing", "options": "the options"}
    return [words.get(k, k) for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]


def open_folder(folder: Path, identity: dict[str, Any], shard: tuple[int, int], adapters: list[str], *,
                resume: bool) -> Manifest:
    """The manifest this job writes into ``folder``: a new one, or with ``resume`` the shard's own, its
    finished parts kept.

    Raises ``ValueError`` (one line) when ``folder`` is a file, holds files that are no dataset, holds this
    shard's dataset and ``resume`` is off (other shards of the same dataset are welcome), or holds another
    dataset (other images, tasks, adapters or options).
    """
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file; give a folder")
    folder.mkdir(parents=True, exist_ok=True)
    manifests = sorted(folder.glob(f"{PREFIX}*.json"))
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if not manifests:
        if entries:
            raise ValueError(f"--out {folder} holds other files ({entries[0].name}, ...) and no {PREFIX}.json; "
                             "choose a new or empty folder")
        return Manifest(identity, shard, adapters)
    own = folder / manifest_name(shard)
    if own.is_file() and not resume:
        raise ValueError(f"--out {folder} already holds a dataset; pass --resume to continue it, or choose "
                         "another --out")
    for path in manifests:
        data = read_manifest(path)
        if data["identity"] != identity:
            raise ValueError(f"--out {folder} holds another dataset ({path.name} differs in "
                             f"{', '.join(_differences(identity, data['identity']))}); resume with the same "
                             "inputs, adapters and options, or choose another --out")
    if not own.is_file():
        return Manifest(identity, shard, adapters)
    parts = read_manifest(own)["parts"]
    kept = {name: info for name, info in parts.items() if (folder / name).is_file()}
    return Manifest(identity, shard, adapters, kept)


def remove_stale_temporaries(folder: Path, shard: tuple[int, int]) -> None:
    """Delete the temporary part files a killed run of ``shard`` left (other shards may be writing theirs)."""
    for tmp in folder.glob(f".{part_prefix(shard)}*.tmp"):
        tmp.unlink(missing_ok=True)


def needed_tasks(model: nn.Module, outputs: Sequence[str]) -> list[str]:
    """The tasks ``outputs`` are computed from: themselves and the tasks they extend, in model order."""
    need = {o for o in outputs if o in model.tasks}
    for name in reversed(model.task_names):
        if name in need:
            need.update(model.tasks[name].config.depends_on)
    return [n for n in model.task_names if n in need]


def job_identity(model: nn.Module, listing: Listing, outputs: Sequence[str], groups: Sequence[PassGroup],
                 options: dict[str, Any]) -> dict[str, Any]:
    """What a resumed job must share with the run it continues (see :mod:`.manifest`)."""
    return {"inputs": {"count": len(listing), "sha256": listing.digest()},
            "base": base_fingerprint(model.base),
            "tasks": {n: tensors_fingerprint(task_tensors(model.tasks[n])) for n in needed_tasks(model, outputs)},
            "outputs": list(outputs),
            "preprocessing": {o: g.data_config for g in groups for o in g.outputs},
            "options": options}
