"""Turning adapter folders into tasks for a backbone: read, check, build :class:`TaskMemory` objects.

:func:`learnable_memory.load_adapters` and ``MemoryViT.from_pretrained`` call :func:`prepare_tasks`.
Everything is read and checked before any model is touched, so a refused load changes nothing.
Checks, each a ``ValueError`` (:class:`~learnable_memory.adapters.folder.AdapterError`) naming the file:

- the backbone: same width, depth and prefix tokens, and (unless ``check_fingerprint=False``)
  the same weights, by fingerprint;
- names: no two tasks with one name (``rename`` resolves clashes);
- modes: a full-mode task stands alone;
- extension tasks: the tasks they were trained on are present before them, in the same order,
  with the same weights (task fingerprints).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import BASE_KEY
from ..memory import TaskMemory
from .fingerprint import (
    backbone_shape,
    base_state,
    coarsest_dtype,
    own_tensors,
    preprocessing,
    same_weights,
    tensors_fingerprint,
)
from .folder import AdapterError, AdapterFile, adapter_folders, read_adapter

Rename = Mapping[str, str] | Sequence[str | None] | None


def _new_names(adapters: list[AdapterFile], rename: Rename) -> list[str]:
    """Each adapter's name in the model: ``rename`` is ``{old: new}`` or one entry per adapter (None keeps)."""
    old = [a.config.name for a in adapters]
    if rename is None:
        return old
    if isinstance(rename, Mapping):
        deps = {d for a in adapters for d in a.config.depends_on}
        unknown = sorted(set(rename) - set(old) - deps)
        if unknown:
            raise AdapterError(f"rename has {unknown}, which name no task being loaded (tasks: {old})")
        return [rename.get(n, n) for n in old]
    if isinstance(rename, str) or len(rename) != len(adapters):
        raise AdapterError(f"rename as a list needs one entry (a new name or None) per adapter loaded: "
                           f"{len(adapters)} for tasks {old}")
    return [n if r is None else r for n, r in zip(old, rename, strict=True)]


def _same(saved: Mapping[str, Any], named: Mapping[str, torch.Tensor]) -> bool | None:
    """:func:`same_weights` against a record ``{"fingerprint", "dtype", "fingerprints_by_dtype"}``
    (the last two absent in adapters saved before they were recorded: float32, none)."""
    return same_weights(saved["fingerprint"], saved.get("dtype", "float32"), saved.get("fingerprints_by_dtype", {}),
                        named)


def _name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def _unverified(what: str, source: str | Path, named: Mapping[str, torch.Tensor], stacklevel: int = 5) -> None:
    warnings.warn(f"{source}: {what} can not be checked in {coarsest_dtype(named)}: the adapter records only "
                  "the float32 hash (it was saved by an earlier version); loading it unchecked. Save it again "
                  "to record the hashes of every serving dtype.", stacklevel=stacklevel)


def check_backbone(saved: Mapping[str, Any], task: str, source: str | Path, base: nn.Module,
                   state: Mapping[str, torch.Tensor] | None) -> None:
    """Refuse (:class:`AdapterError`) to put task ``task``, read from ``source``, on ``base`` when the
    backbone its config records (``saved``, the ``base_model`` entry) is another one: another width,
    depth or prefix tokens, or, when ``state`` (``base_state(base)``) is given, other weights."""
    shape = backbone_shape(base)
    here = f"{type(base).__name__} {getattr(base, 'pretrained_cfg', {}).get('architecture')}"
    made_for = f"{saved.get('class')} {saved.get('architecture')} (tag {saved.get('tag')})"
    labels = {"embed_dim": "width (embed_dim)", "depth": "depth", "num_prefix_tokens": "prefix tokens"}
    diffs = [f"{labels[k]} {saved[k]} vs {shape[k]} here" for k in labels if saved[k] != shape[k]]
    if diffs:
        raise AdapterError(f"{source}: task {task!r} was made for another backbone, {made_for}: "
                           f"{'; '.join(diffs)} ({here}). Load it onto the backbone it was trained with.")
    if state is None:
        return
    same = _same(saved, state)
    if same is None:
        _unverified("the backbone's identity", source, state, stacklevel=6)
    elif not same:
        dtype = coarsest_dtype(state)
        raise AdapterError(
            f"{source}: task {task!r} was made for a backbone of the same shape but other "
            f"weights ({made_for}, {saved.get('dtype', 'float32')}; backbone fingerprint {saved['fingerprint']}; "
            f"this one, {_name(dtype)}, {tensors_fingerprint(state)}; compared in {_name(dtype)}). "
            "Load the checkpoint it was trained on; if you know the weights are equivalent, skip this check "
            "(check_fingerprint=False)."
        )


def _check_backbone(adapters: list[AdapterFile], base: nn.Module, check_fingerprint: bool) -> None:
    state = base_state(base) if check_fingerprint else None
    for a in adapters:
        check_backbone(a.cfg["base_model"], a.config.name, a.source, base, state)


def _check_tasks(adapters: list[AdapterFile], names: list[str], existing: dict[str, TaskMemory],
                 rename: Rename, check_fingerprint: bool, dtype: torch.dtype) -> list[list[str]]:
    """Check names, modes and dependencies; return each adapter's ``depends_on`` in model names."""
    where: dict[str, str] = {n: "already in the model" for n in existing}
    for i, (a, n) in enumerate(zip(adapters, names, strict=True)):
        if n == BASE_KEY:
            raise AdapterError(f"{a.source}: task name {BASE_KEY!r} is reserved for the base output; "
                               f"load it with rename={{{BASE_KEY!r}: 'new_name'}}")
        if n in where:
            fix = [None] * len(adapters)
            fix[i] = f"{n}_2"
            raise AdapterError(f"two tasks named {n!r}: {where[n]} and {a.source}. Load one under another name, "
                               f"e.g. rename={fix!r} (one entry per adapter) or rename={{{n!r}: '{n}_2'}}")
        where[n] = str(a.source)
    everything = [(n, t.config.mode, "already in the model") for n, t in existing.items()]
    everything += [(n, a.config.mode, str(a.source)) for n, a in zip(names, adapters, strict=True)]
    full = [f"{n!r} ({src})" for n, mode, src in everything if mode == "full"]
    if full and len(everything) > 1:
        raise AdapterError(f"task {', '.join(full)} was trained in mode 'full', whose memory changes the tokens "
                           f"every task shares, so it can not be combined with other tasks (here "
                           f"{[n for n, _, _ in everything]}). Load a full-mode adapter alone onto its backbone.")
    served = {n: own_tensors(t) for n, t in existing.items()}  # each task's tensors as the model serves them
    seen: dict[str, str] = {}  # old -> new name of the adapters already placed in this call
    dep_map = dict(rename) if isinstance(rename, Mapping) else {}
    deps_out = []
    for a, n in zip(adapters, names, strict=True):
        before = list(served)
        deps = [seen.get(d, dep_map.get(d, d)) for d in a.config.depends_on]
        missing = [d for d in deps if d not in before]
        if missing:
            raise AdapterError(f"{a.source}: extension task {n!r} was trained on top of {deps}, in this order, but "
                               f"{missing} {'is' if len(missing) == 1 else 'are'} not loaded before it (tasks "
                               f"before it: {before}). Load the adapters of {deps} first, in this order.")
        present = [d for d in before if d in deps]
        if present != deps:
            raise AdapterError(f"{a.source}: extension task {n!r} needs the tasks it extends in the order {deps}, "
                               f"but they come as {present}. Load them in the order they were trained.")
        for d, saved in zip(deps, a.cfg["depends_on"], strict=True):
            same = _same(saved, served[d]) if check_fingerprint else True
            if same is None:
                _unverified(f"the identity of task {d!r}", a.source, served[d])
            elif not same:
                raise AdapterError(f"{a.source}: task {d!r} here is not the one extension task {n!r} was trained "
                                   f"on (its weights differ: fingerprint {tensors_fingerprint(served[d])}, expected "
                                   f"{saved['fingerprint']}). Load the same adapter {d!r}; or skip this check "
                                   "(check_fingerprint=False).")
        served[n] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in a.tensors.items()}
        seen[a.config.name] = n
        deps_out.append(deps)
    return deps_out


def warn_preprocessing(tasks: Sequence[TaskMemory], base: nn.Module, stacklevel: int = 3) -> None:
    """Warn when tasks sharing one forward pass were trained with different preprocessing."""
    seen: dict[str, list[str]] = {}
    base_pre = None
    for t in tasks:
        pre = t.config.data_config
        if pre is None:  # a task made in this process: the backbone's own preprocessing
            base_pre = base_pre or preprocessing(base)
            pre = base_pre
        seen.setdefault(repr(sorted(pre.items())), []).append(t.name)
    if len(seen) > 1:
        warnings.warn(f"these tasks were trained with different preprocessing, but forward_all gives them "
                      f"the same images: {list(seen.values())}", stacklevel=stacklevel)


def _as_task(a: AdapterFile, name: str, deps: list[str], shape: dict[str, int],
             like: torch.Tensor | None) -> TaskMemory:
    """A ``TaskMemory`` holding the adapter's tensors, on ``like``'s device and dtype."""
    config = dataclasses.replace(a.config, name=name, depends_on=deps)
    with torch.random.fork_rng(devices=[]):  # the fresh init is overwritten: leave the user's RNG alone
        task = TaskMemory(config, shape["depth"], shape["embed_dim"], torch.zeros(shape["embed_dim"]))
    with torch.no_grad():
        for key, param in (("memory", task.memory), ("class_token", task.class_token),
                           ("head.weight", task.head.weight), ("head.bias", task.head.bias)):
            param.copy_(a.tensors[key])
    return task.to(like.device, like.dtype) if like is not None else task


def prepare_tasks(
    base: nn.Module,
    existing: Mapping[str, TaskMemory],
    paths: str | Path | Sequence[str | Path],
    *,
    rename: Rename = None,
    check_fingerprint: bool = True,
    cache_dir: str | Path | None = None,
) -> list[TaskMemory]:
    """Read and check adapters for ``base``, after the tasks ``existing``; returns the new tasks.

    See :func:`learnable_memory.load_adapters` for the arguments. Raises :class:`AdapterError`
    (naming the file, what is wrong and how to fix it) before anything is built.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    folders = [f for p in paths for f in adapter_folders(p, cache_dir)]
    if not folders:
        raise AdapterError("no adapter to load: paths is empty")
    adapters = [read_adapter(f) for f in folders]
    _check_backbone(adapters, base, check_fingerprint)
    names = _new_names(adapters, rename)
    like = next(iter(base.parameters()), None)
    dtype = like.dtype if like is not None else torch.float32
    deps = _check_tasks(adapters, names, dict(existing), rename, check_fingerprint, dtype)
    shape = backbone_shape(base)
    return [_as_task(a, n, d, shape, like) for a, n, d in zip(adapters, names, deps, strict=True)]
