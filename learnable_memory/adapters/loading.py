"""Turning adapter folders into tasks for a backbone: read, check, build :class:`TaskMemory` objects.

:func:`learnable_memory.load_adapters` and ``MemoryViT.from_pretrained`` call :func:`prepare_tasks`.
Everything is read and checked before any model is touched, so a refused load changes nothing.
Checks, each a ``ValueError`` (:class:`~learnable_memory.adapters.AdapterError`) naming the file:

- the backbone: same width, depth and prefix tokens, and (unless ``check_fingerprint=False``)
  the same weights, by fingerprint;
- the rules of :func:`~learnable_memory.mask.check_task_order`, the model's own (no reserved name, no two
  tasks with one name, a full-mode task stands alone, extension tasks after the tasks they extend, in
  order), on the tasks the model will hold; ``rename`` resolves name clashes;
- extension tasks: the tasks they were trained on have the same weights (task fingerprints,
  :func:`check_predecessors`, which ``add_task`` also runs).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TaskConfig
from ..mask import TaskOrderError, check_task_order
from ..memory import TaskMemory
from .fingerprint import (
    backbone_shape,
    base_state,
    coarsest_dtype,
    dependency_record,
    dtype_name,
    own_tensors,
    same_as_record,
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
    same = same_as_record(saved, state)
    if same is None:
        _unverified("the backbone's identity", source, state, stacklevel=6)
    elif not same:
        dtype = coarsest_dtype(state)
        raise AdapterError(
            f"{source}: task {task!r} was made for a backbone of the same shape but other "
            f"weights ({made_for}, {saved.get('dtype', 'float32')}; backbone fingerprint {saved['fingerprint']}; "
            f"this one, {dtype_name(dtype)}, {tensors_fingerprint(state)}; compared in {dtype_name(dtype)}). "
            "Load the checkpoint it was trained on; if you know the weights are equivalent, skip this check "
            "(check_fingerprint=False)."
        )


def _check_backbone(adapters: list[AdapterFile], base: nn.Module, check_fingerprint: bool) -> None:
    state = base_state(base) if check_fingerprint else None
    for a in adapters:
        check_backbone(a.cfg["base_model"], a.config.name, a.source, base, state)


def check_predecessors(task: str, trained_on: Sequence[tuple[str, Mapping[str, Any]]],
                       served: Mapping[str, Mapping[str, torch.Tensor]], source: str | Path, fix: str) -> None:
    """Refuse (:class:`AdapterError`) extension task ``task`` on predecessors other than the ones it was
    trained on: ``trained_on`` pairs each predecessor's name here with what the task recorded of it (a
    :func:`~.fingerprint.dependency_record`), ``served`` holds each predecessor's tensors as the model
    serves them. Warns where a record is too old to compare in the serving dtype. ``fix``: how to skip it."""
    for name, record in trained_on:
        same = same_as_record(record, served[name])
        if same is None:
            _unverified(f"the identity of task {name!r}", source, served[name])
        elif not same:
            raise AdapterError(f"{source}: task {name!r} here is not the one extension task {task!r} was trained "
                               f"on (its weights differ: fingerprint {tensors_fingerprint(served[name])}, expected "
                               f"{record['fingerprint']}). Put it on the same task {name!r}; {fix}")


def check_trained_on(task: TaskMemory, tasks: Mapping[str, TaskMemory]) -> None:
    """``add_task``'s check of an extension ``TaskMemory`` joining a model whose tasks are ``tasks``: refuse
    it (:class:`AdapterError`) when its predecessors there are not the ones it recorded
    (``TaskMemory.trained_on``), as :func:`prepare_tasks` does for a file; warn when it records none
    (built by hand: it can not be checked)."""
    deps = task.config.depends_on
    if not deps:
        return
    if task.trained_on is None:
        warnings.warn(f"extension task {task.name!r} records nothing of the tasks it extends ({deps}): it was "
                      "built by hand, so add_task can not check that they are the ones it was trained on",
                      stacklevel=4)
        return
    served = {d: own_tensors(tasks[d]) for d in deps}
    check_predecessors(task.name, list(zip(deps, task.trained_on, strict=True)), served, f"add_task({task.name!r})",
                       "add it to a model that holds the tasks it was trained on")


def _dependency_names(adapters: list[AdapterFile], names: list[str], rename: Rename) -> list[list[str]]:
    """Each adapter's ``depends_on`` in model names: a predecessor loaded earlier in this call under a new
    name, else renamed by a ``rename`` mapping, else as saved."""
    dep_map = dict(rename) if isinstance(rename, Mapping) else {}
    seen: dict[str, str] = {}  # old -> new name of the adapters already placed in this call
    out = []
    for a, n in zip(adapters, names, strict=True):
        out.append([seen.get(d, dep_map.get(d, d)) for d in a.config.depends_on])
        seen[a.config.name] = n
    return out


def _check_task_order(existing: Mapping[str, TaskMemory], adapters: list[AdapterFile],
                      configs: list[TaskConfig]) -> None:
    """:func:`~learnable_memory.mask.check_task_order` on the tasks the model will hold, its error as an
    :class:`AdapterError` naming the file (and its ``TaskOrderError`` as the cause, e.g. ``.rule``)."""
    try:
        check_task_order([t.config for t in existing.values()] + configs)
    except TaskOrderError as err:
        first: dict[str, str] = {n: "already in the model" for n in existing}
        where = ""
        for a, c in zip(adapters, configs, strict=True):
            if c.name == err.task and (c.name in first or err.rule != "duplicate"):
                where = str(a.source)
                break
            first.setdefault(c.name, str(a.source))
        hints = {
            "reserved": f"load it with rename={{{err.task!r}: 'new_name'}}",
            "duplicate": f"two tasks named {err.task!r}: the other is {first.get(err.task)}. Load one under "
                         "another name, e.g. rename="
                         f"{{{err.task!r}: '{err.task}_2'}} or a list with one entry (a new name or None) per adapter",
            "full": "load a full-mode adapter alone onto its backbone",
            "missing": "load the adapters of the tasks it extends before it, in the order they were trained",
            "order": "load the tasks it extends in the order they were trained",
        }
        raise AdapterError(f"{where or adapters[0].source}: {err}; {hints[err.rule]}") from err


def _trained_on(adapters: list[AdapterFile], configs: list[TaskConfig], existing: Mapping[str, TaskMemory],
                check_fingerprint: bool, dtype: torch.dtype) -> list[list[tuple[str, dict[str, Any]]] | None]:
    """Per adapter, the identity of each predecessor it extends, checked against the ones here unless
    ``check_fingerprint=False`` (then the ones here are recorded: they are taken to be equivalent)."""
    served = {n: own_tensors(t) for n, t in existing.items()}  # each task's tensors as the model serves them
    out = []
    for a, c in zip(adapters, configs, strict=True):
        if check_fingerprint:
            pairs = list(zip(c.depends_on, a.cfg["depends_on"], strict=True))
            check_predecessors(c.name, pairs, served, a.source, "or skip this check (check_fingerprint=False)")
        else:
            pairs = [(d, dependency_record(d, served[d])) for d in c.depends_on]
        out.append(pairs)
        served[c.name] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in a.tensors.items()}
    return out


def trainable_tasks(trainable: bool | str | Iterable[str], loaded: Sequence[TaskMemory],
                    existing: Iterable[TaskMemory]) -> set[str]:
    """The names of the ``loaded`` tasks to keep trainable (``load_adapters(trainable=...)``): ``True``: every
    one that no task, loaded or ``existing``, extends; ``False``: none; names: exactly those, refused
    (``ValueError``) when one is not loaded here or another task extends it (the extension would no
    longer match it)."""
    extended = {d for t in [*existing, *loaded] for d in t.config.depends_on}
    if trainable is True:
        return {t.name for t in loaded if t.name not in extended}
    if trainable is False:
        return set()
    train = {trainable} if isinstance(trainable, str) else set(trainable)
    names = [t.name for t in loaded]
    if not train <= set(names):
        raise ValueError(f"trainable names {sorted(train - set(names))}, which are not among the tasks loaded "
                         f"here ({names})")
    if train & extended:
        raise ValueError(f"task(s) {sorted(train & extended)} can not be trained: other loaded tasks extend "
                         "them and would no longer match; train the extension task instead")
    return train


def _as_task(a: AdapterFile, config: TaskConfig, trained_on: list[tuple[str, dict[str, Any]]],
             shape: dict[str, int], like: torch.Tensor | None) -> TaskMemory:
    """A ``TaskMemory`` holding the adapter's tensors, on ``like``'s device and dtype."""
    with torch.random.fork_rng(devices=[]):  # the fresh init is overwritten: leave the user's RNG alone
        task = TaskMemory(config, shape["depth"], shape["embed_dim"], torch.zeros(shape["embed_dim"]))
    with torch.no_grad():
        for key, param in task.named_tensors().items():
            param.copy_(a.tensors[key])
    task.trained_on = [record for _, record in trained_on] if config.depends_on else None
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

    See :func:`learnable_memory.load_adapters` for the arguments; ``paths`` may also hold adapters
    already read with :func:`~.folder.read_adapter`, which are used as they are. Raises :class:`AdapterError`
    (naming the file, what is wrong and how to fix it) before anything is built.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    adapters = []  # an AdapterFile in paths was read already (read_adapter): it is not read again
    for p in paths:
        adapters += [p] if isinstance(p, AdapterFile) else [read_adapter(f) for f in adapter_folders(p, cache_dir)]
    if not adapters:
        raise AdapterError("no adapter to load: paths is empty")
    _check_backbone(adapters, base, check_fingerprint)
    names = _new_names(adapters, rename)
    deps = _dependency_names(adapters, names, rename)
    configs = [dataclasses.replace(a.config, name=n, depends_on=d) for a, n, d in zip(adapters, names, deps,
                                                                                      strict=True)]
    _check_task_order(existing, adapters, configs)
    like = next(iter(base.parameters()), None)
    trained_on = _trained_on(adapters, configs, existing, check_fingerprint,
                             like.dtype if like is not None else torch.float32)
    shape = backbone_shape(base)
    return [_as_task(a, c, t, shape, like) for a, c, t in zip(adapters, configs, trained_on, strict=True)]
