"""Adapter folders: one fine-tuned task in a small file that loads onto the same backbone and
combines with other tasks in one forward pass (the paper's concatenation, made practical).

Layout of an adapter folder (the one peft users know)::

    adapter_config.json        sorted-key JSON, see below
    adapter_model.safetensors  memory [depth, n_mem, D], class_token [D],
                               head.weight [num_classes, D], head.bias [num_classes]  (float32)

``save_pretrained`` writes one such folder per task plus ``adapters.json``, the ordered list of
task folders (order matters for extension tasks).

``adapter_config.json`` holds ``format_version`` (2) and ``method`` ("learnable_memory"); the
task (``task``, ``mode``, ``n_mem``, ``num_classes``, ``class_names``, ``init_std``,
``task_fingerprint``, and for extension tasks ``depends_on``: the ordered tasks it attends to,
each ``{"name", "fingerprint"}``); ``base_model``: class, timm architecture, pretrained tag,
hf_hub_id, ``model_args`` to recreate it, ``embed_dim``, ``depth``, ``num_prefix_tokens`` and the
backbone ``fingerprint`` with its ``dtype`` and ``fingerprints_by_dtype``; ``preprocessing`` (input
size, mean, std, interpolation, crop) and ``weights_sha256``, the sha256 of
``adapter_model.safetensors``. Fingerprints are defined in :mod:`learnable_memory.adapters.fingerprint`.
Saving refuses a task whose tensors hold NaN or Inf, and loading refuses such a file.

Format 2 adds the fields peft needs (``peft_type`` ...), so that ``PeftModel.from_pretrained`` loads our
folders and ``load_adapters`` loads folders written by peft: see :mod:`learnable_memory.adapters.peft_format`.
Format 1 (the same without the peft fields) still loads.

Consistent saves. Each file is written to a temporary file in the same folder, flushed and
fsynced, then renamed over the old one with ``os.replace`` (atomic), and the folder is fsynced.
A killed process or a full disk therefore leaves each file either old or new, never torn. Two
files can not be renamed together, so the pair is made consistent by two rules:

1. the tensor file carries its own complete copy of the config (everything but
   ``weights_sha256``) in its safetensors metadata, and it is replaced first;
2. ``adapter_config.json`` names the tensor file it belongs to by ``weights_sha256``.

When the recorded sha256 matches, the folder is a pair written by one save and the JSON
(which a user may have edited) is used. When it does not, the save was interrupted between
the two renames (new tensors, old JSON, or no JSON yet after a first save); the loader warns and
uses the config stored in the tensor file, i.e. the new adapter. Either way a folder loads the old
or the new adapter whole. Leftover ``.*.tmp`` files of an interrupted save are ignored by the
loader and removed by the next save into the folder (those of a writer still running are left).

``save_pretrained`` saves each task folder this way and writes ``adapters.json`` last. An
interrupted ``save_pretrained`` leaves every task folder whole, old or new; the task
fingerprints recorded by extension tasks refuse a predecessor from the other save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from ..config import TaskConfig
from ..memory import TaskMemory
from ..version import __version__
from .fingerprint import base_identity, fingerprints, preprocessing, task_tensors, tensors_fingerprint
from .peft_format import TENSOR_NAMES, our_names, peft_fields, written_by_peft

FORMAT_VERSION = 2
#: Format versions this version reads (1: before the peft fields).
READS = (1, 2)
METHOD = "learnable_memory"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INDEX_NAME = "adapters.json"
META_KEY = "learnable_memory_config"


class AdapterError(ValueError):
    """An adapter folder is missing, damaged, or does not fit the model it is loaded onto."""


@runtime_checkable
class TaskModel(Protocol):
    """What saving needs of a model (such as a :class:`~learnable_memory.MemoryViT`): the frozen timm
    backbone, the tasks by name in model order, and the task ``forward`` serves."""

    base: nn.Module
    tasks: Mapping[str, TaskMemory]
    active_task: str | None


@dataclass
class AdapterFile:
    """One adapter read from disk and checked against itself."""

    source: Path  # the file whose config is used (the JSON, or the tensor file after an interrupted save)
    cfg: dict[str, Any]
    config: TaskConfig
    tensors: dict[str, torch.Tensor]
    fingerprint: str


# ----- writing -----
def _write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` via a fsynced temporary file in the same folder and ``os.replace``."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not possible on every OS)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _version() -> str:
    return f"{METHOD} {__version__}"


def _pick_task(model: TaskModel, task: str | None) -> str:
    if task is not None:
        if task not in model.tasks:
            raise ValueError(f"unknown task {task!r}; this model has {list(model.tasks)}")
        return task
    if model.active_task is not None:
        return model.active_task
    if len(model.tasks) == 1:
        return next(iter(model.tasks))
    raise ValueError(f"say which task to save (task=...); this model has {list(model.tasks)}")


def _save_one(model: TaskModel, folder: Path, name: str, base: dict[str, Any]) -> Path:
    task = model.tasks[name]
    c = task.config
    if (folder / INDEX_NAME).exists():
        raise ValueError(f"{folder} holds a save_pretrained model ({INDEX_NAME}); save the adapter elsewhere")
    tensors = task_tensors(task)
    _refuse_non_finite(name, tensors)
    fields = c.to_dict()  # the TaskConfig, under the adapter config's names
    cfg = {
        "format_version": FORMAT_VERSION, "method": METHOD, "created_with": _version(),
        "task": fields["name"], **{k: fields[k] for k in ("mode", "n_mem", "num_classes", "class_names", "init_std")},
        "depends_on": [_dependency(d, model.tasks[d]) for d in c.depends_on],
        "task_fingerprint": tensors_fingerprint(tensors),
        "base_model": base, "base_model_name_or_path": base["hf_hub_id"] or base["architecture"],
        "preprocessing": fields["data_config"] or preprocessing(model.base), **peft_fields(),
    }
    meta = {"format": "pt", META_KEY: json.dumps(cfg, sort_keys=True)}
    data = safetensors.torch.save(tensors, metadata=meta)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    _write_atomic(folder / WEIGHTS_NAME, data)
    _write_atomic(folder / CONFIG_NAME, _dumps({**cfg, "weights_sha256": hashlib.sha256(data).hexdigest()}))
    return folder


def non_finite(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{tensor name: number of NaN/Inf values}`` for the tensors that hold any."""
    counts = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if v.is_floating_point()}
    return {k: n for k, n in counts.items() if n}


def _refuse_non_finite(name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    bad = non_finite(tensors)
    if bad:
        what = ", ".join(f"{k!r} ({n} of {tensors[k].numel()} values)" for k, n in bad.items())
        raise ValueError(f"task {name!r} holds NaN or Inf in {what}: its training diverged; nothing was saved. "
                         "Train it again with a lower learning rate or gradient clipping")


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be writing (on this host)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or not a pid: leave its file alone
    return True


def _remove_stale_temps(folder: Path) -> None:
    """Remove the temporary files of saves into ``folder`` that were killed: ``.<file>.<pid>.<hex>.tmp``
    whose writer process is gone. A concurrent writer's file is left alone."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        for tmp in folder.glob(f".{name}.*.tmp"):
            pid = tmp.name[len(name) + 2:].split(".", 1)[0]
            if pid.isdigit() and not _writer_alive(int(pid)):
                with contextlib.suppress(OSError):
                    tmp.unlink()


def _dependency(name: str, task: TaskMemory) -> dict[str, Any]:
    """What an extension task records of a task it extends: its name and identity in every dtype."""
    tensors = task_tensors(task)
    return {"name": name, "fingerprint": tensors_fingerprint(tensors), "dtype": "float32",
            "fingerprints_by_dtype": fingerprints(tensors)}


def _check_model(model: Any) -> TaskModel:
    if not isinstance(model, TaskModel):
        raise TypeError(f"expected a MemoryViT (see wrap_model), got {type(model).__name__}")
    return model


def save_adapter(model: TaskModel, path: str | Path, task: str | None = None) -> Path:
    """Write one task (default: the active one) to the adapter folder ``path``; returns it."""
    name = _pick_task(_check_model(model), task)
    return _save_one(model, Path(path).expanduser(), name, base_identity(model.base))


def _folder_name(name: str, i: int, used: set[str]) -> str:
    ok = name[:1].isalnum() and all(ch.isalnum() or ch in "_.-" for ch in name) and name.isascii()
    folder = name if ok and name.lower() not in used else f"task_{i}"
    used.add(folder.lower())
    return folder


def save_pretrained(model: TaskModel, path: str | Path) -> Path:
    """Write every task under ``path``, one adapter folder each, and ``adapters.json`` (their order)."""
    path = Path(path).expanduser()
    if (path / CONFIG_NAME).exists():
        raise ValueError(f"{path} is an adapter folder ({CONFIG_NAME}); save the model elsewhere")
    if not _check_model(model).tasks:
        raise ValueError("this TaskModel has no task to save")
    for name, task in model.tasks.items():  # every task is checked before any folder is written
        _refuse_non_finite(name, task_tensors(task))
    base = base_identity(model.base)
    used: set[str] = set()
    entries = []
    for i, name in enumerate(model.tasks):
        folder = _folder_name(name, i, used)
        _save_one(model, path / folder, name, base)
        entries.append({"task": name, "folder": folder})
    index = {"format_version": FORMAT_VERSION, "method": METHOD, "adapters": entries}
    _write_atomic(path / INDEX_NAME, _dumps(index))
    return path


# ----- reading -----
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{path}: file missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path}: not valid JSON ({err}); the file is truncated or not an adapter config") from err
    if not isinstance(obj, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    method, version = obj.get("method"), obj.get("format_version")
    if method != METHOD:
        hint = f" (a peft adapter of type {obj['peft_type']!r}: load it with peft)" if "peft_type" in obj else ""
        raise AdapterError(f"{path}: method is {method!r}, not {METHOD!r}: not a learnable-memory adapter{hint}")
    if version not in READS:
        raise AdapterError(
            f"{path}: unknown format_version {version!r} (this learnable_memory reads versions "
            f"{', '.join(map(str, READS))}); upgrade learnable_memory or re-save the adapter"
        )
    return obj


def _task_config(cfg: dict[str, Any], source: Path) -> TaskConfig:
    """The TaskConfig a config describes, its fields checked."""
    try:
        base = cfg["base_model"]
        for key in ("embed_dim", "depth", "num_prefix_tokens"):
            if not isinstance(base[key], int):
                raise ValueError(f"base_model.{key} must be an integer, got {base[key]!r}")
        own = base["fingerprint"], *(() if written_by_peft(cfg) else (cfg["task_fingerprint"],))
        if not all(isinstance(f, str) for f in own):
            raise ValueError("fingerprints must be strings")
        deps = cfg["depends_on"]
        if not isinstance(deps, list) or not all(isinstance(d, dict) and {"name", "fingerprint"} <= d.keys()
                                                 for d in deps):
            raise ValueError(f"depends_on must be a list of {{name, fingerprint}} objects, got {deps!r}")
        if not isinstance(cfg["preprocessing"], dict):
            raise ValueError("preprocessing must be an object")
        return TaskConfig.from_dict({**cfg, "name": cfg["task"], "depends_on": [d["name"] for d in deps],
                                     "data_config": dict(cfg["preprocessing"])})
    except KeyError as err:
        raise AdapterError(f"{source}: required entry {err} is missing from the adapter config") from err
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{source}: bad adapter config: {err}") from err


def _check_tensors(tensors: dict[str, torch.Tensor], cfg: dict[str, Any], config: TaskConfig,
                   weights: Path, source: Path) -> None:
    d, depth = cfg["base_model"]["embed_dim"], cfg["base_model"]["depth"]
    want = dict(zip(TENSOR_NAMES, ([depth, config.n_mem, d], [d], [config.num_classes, d], [config.num_classes]),
                    strict=True))
    missing, extra = sorted(want.keys() - tensors.keys()), sorted(tensors.keys() - want.keys())
    if missing or extra:
        raise AdapterError(f"{weights}: expected tensors {sorted(want)}; missing {missing}, unexpected {extra}")
    for k, shape in want.items():
        if list(tensors[k].shape) != shape:
            raise AdapterError(f"{weights}: tensor {k!r} has shape {list(tensors[k].shape)} but {source.name} "
                               f"(n_mem={config.n_mem}, num_classes={config.num_classes}, depth={depth}, "
                               f"embed_dim={d}) needs {shape}")
        if not tensors[k].is_floating_point():
            raise AdapterError(f"{weights}: tensor {k!r} has dtype {tensors[k].dtype}, expected float32")


def _embedded_config(data: bytes) -> dict[str, Any] | None:
    """The config a tensor file carries in its safetensors metadata, or None."""
    try:
        n = int.from_bytes(data[:8], "little")
        cfg = json.loads(json.loads(data[8:8 + n])["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError):
        return None
    ok = isinstance(cfg, dict) and cfg.get("method") == METHOD and cfg.get("format_version") in READS
    return cfg if ok else None


def read_adapter(folder: Path, allow_non_finite: bool = False) -> AdapterFile:
    """Read and check one adapter folder (see the module docstring for how the pair is chosen).
    ``allow_non_finite``: accept NaN/Inf tensors (for :func:`inspect_adapter`, which reports them)."""
    cfg_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{weights}: file missing; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    data = weights.read_bytes()
    try:
        tensors = safetensors.torch.load(data)
    except SafetensorError as err:
        raise AdapterError(f"{weights}: not a readable safetensors file ({err}); it is truncated or damaged") from err
    sha = hashlib.sha256(data).hexdigest()
    if not cfg_path.exists() and _embedded_config(data) is not None:  # a first save killed between its renames
        cfg, source = {}, cfg_path
    else:
        cfg, source = _read_json(cfg_path), cfg_path
    by_peft = written_by_peft(cfg)  # no pairing hash: the checks below are all its contents allow
    if by_peft:
        try:
            tensors = our_names(tensors)
        except ValueError as err:
            raise AdapterError(f"{weights}: {err}") from err
    elif cfg.get("weights_sha256") != sha:
        embedded = _embedded_config(data)
        if embedded is None:
            config = _task_config(cfg, cfg_path)
            _check_tensors(tensors, cfg, config, weights, cfg_path)
            raise AdapterError(f"{weights}: its sha256 {sha} is not the weights_sha256 recorded in {CONFIG_NAME} "
                               f"({cfg.get('weights_sha256')}): the two files do not belong together; re-save it")
        why = "is missing" if not cfg else "does not describe it (sha256 differs)"
        warnings.warn(f"{cfg_path} {why}, as after an interrupted save of {weights}; using the config stored in "
                      f"{WEIGHTS_NAME}. Save the adapter again to repair the folder.", stacklevel=3)
        cfg, source = embedded, weights
    config = _task_config(cfg, source)
    _check_tensors(tensors, cfg, config, weights, source)
    bad = non_finite(tensors)
    if bad and not allow_non_finite:
        raise AdapterError(f"{weights}: tensors {sorted(bad)} hold NaN or Inf ({sum(bad.values())} values): the "
                           f"task {config.name!r} diverged in training; train it again")
    fingerprint = tensors_fingerprint({k: v.to(torch.float32) for k, v in tensors.items()})
    if not by_peft and fingerprint != cfg["task_fingerprint"]:
        raise AdapterError(f"{weights}: the tensors' fingerprint {fingerprint} is not the task_fingerprint "
                           f"recorded in {source.name} ({cfg['task_fingerprint']})")
    return AdapterFile(source=source, cfg=cfg, config=config, tensors=tensors, fingerprint=fingerprint)


def _hub_folder(spec: str, cache_dir: str | Path | None) -> Path:
    """``hf-hub:owner/repo[/subfolder][@revision]`` -> a local folder, through huggingface_hub's cache."""
    ref, _, revision = spec.removeprefix("hf-hub:").partition("@")
    parts = ref.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise AdapterError(f"{spec!r}: expected 'hf-hub:owner/repo', optionally with '/subfolder' and '@revision'")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo_id, revision=revision or None, cache_dir=cache_dir,
                                 allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as err:  # network, authorisation or cache errors of many kinds
        where = cache_dir or "the default Hugging Face cache"
        raise AdapterError(f"{spec}: could not get it from the Hugging Face Hub nor from {where} "
                           f"({type(err).__name__}: {err})") from err
    return Path(root) / sub


def adapter_folders(path: str | Path, cache_dir: str | Path | None = None) -> list[Path]:
    """The adapter folders ``path`` stands for: itself, or those of a ``save_pretrained`` folder, in order."""
    folder = _hub_folder(path, cache_dir) if str(path).startswith("hf-hub:") else Path(path).expanduser()
    if (folder / INDEX_NAME).is_file():
        index = _read_json(folder / INDEX_NAME)
        entries = index.get("adapters")
        names = [e.get("folder") if isinstance(e, dict) else None for e in entries or []]
        if not names or not all(isinstance(n, str) and n and "/" not in n and "\\" not in n and n not in (".", "..")
                                for n in names):
            raise AdapterError(f"{folder / INDEX_NAME}: 'adapters' must list the task folders, got {entries!r}")
        return [folder / n for n in names]
    if folder.is_dir() and ((folder / CONFIG_NAME).exists() or (folder / WEIGHTS_NAME).exists()):
        return [folder]
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder")
    raise AdapterError(f"{folder}: holds neither {CONFIG_NAME} (an adapter) nor {INDEX_NAME} (a save_pretrained "
                       "folder)")


def inspect_adapter(path: str | Path, *, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Summary of one adapter folder: task, mode, sizes, base model, class names, parameters, bytes."""
    folders = adapter_folders(path, cache_dir)
    if len(folders) != 1:
        raise AdapterError(f"{path} is a save_pretrained folder; inspect one of {[f.name for f in folders]}")
    ad = read_adapter(folders[0], allow_non_finite=True)
    return {
        "path": str(folders[0]),
        "non_finite": non_finite(ad.tensors),
        **_summary(ad.config, ad.cfg["base_model"], ad.tensors, ad.fingerprint, ad.cfg["preprocessing"]),
        "file_size": sum((folders[0] / n).stat().st_size for n in (CONFIG_NAME, WEIGHTS_NAME)),
        "format_version": ad.cfg["format_version"],
    }


def describe_task(model: TaskModel, name: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields of :func:`inspect_adapter` for a task of a loaded model (no folder needed): task,
    mode, sizes, class names, dependencies, base model, preprocessing, parameters, fingerprint, and
    ``bytes`` (the float32 tensors as saved). ``base``: a precomputed ``base_identity(model.base)``
    (hashing the backbone's weights takes a moment; reuse it for many tasks)."""
    task = _check_model(model).tasks[_pick_task(model, name)]
    tensors = task_tensors(task)
    base = base if base is not None else base_identity(model.base)
    pre = task.config.data_config or preprocessing(model.base)
    return {**_summary(task.config, base, tensors, tensors_fingerprint(tensors), pre),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def _summary(config: TaskConfig, base: dict[str, Any], tensors: dict[str, torch.Tensor], fingerprint: str,
             pre: dict[str, Any]) -> dict[str, Any]:
    return {
        "task": config.name, "mode": config.mode, "n_mem": config.n_mem, "num_classes": config.num_classes,
        "class_names": config.class_names, "depends_on": list(config.depends_on),
        "base_model": {k: base.get(k) for k in ("class", "architecture", "tag", "hf_hub_id", "model_args",
                                                 "embed_dim", "depth", "num_prefix_tokens", "fingerprint")},
        "preprocessing": pre, "num_params": sum(t.numel() for t in tensors.values()), "task_fingerprint": fingerprint,
    }
