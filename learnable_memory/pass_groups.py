"""Which outputs can share one pass: those whose tasks were trained on images prepared the same way.

One pass gives every task the same input tensor. Tasks trained on the same backbone weights can still
expect different preprocessing (another mean and std, crop or interpolation, e.g. a base rebuilt from a
checkpoint that lost its ``pretrained_cfg``): served from one tensor, all but one of them would be
given images they were not trained on, and answer worse with no error. :func:`pass_groups` splits the
outputs a caller wants into groups, one per preprocessing, so that the caller prepares the images once
per group and runs one :meth:`~learnable_memory.MemoryViT.forward_all` per group.

A task's preprocessing is the one recorded when it was trained (``TaskConfig.data_config``), or the
backbone's own (``"base"``, and tasks made in this process). An extension task runs in its own group's
pass together with the tasks it extends (``forward_all`` computes them), so its predecessors need not
share its preprocessing.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from .adapters.fingerprint import preprocessing
from .config import BASE_KEY
from .memory import TaskStore


class MemoryViT(Protocol):
    """What grouping reads of a :class:`~learnable_memory.MemoryViT` (named so here to keep this module
    free of an import of the model, which imports it)."""

    base: nn.Module
    tasks: TaskStore

    @property
    def task_names(self) -> list[str]: ...

#: How :func:`warn_mixed_preprocessing`'s warning starts (what :func:`grouped_by_caller` silences).
MIXED_PREPROCESSING = "these tasks were trained with different preprocessing"

#: The fields of a timm data config that change the input tensor.
PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class PassGroup:
    """Outputs served by one pass, and how that pass's images are prepared.

    Attributes:
        data_config: The timm data config of the pass (``input_size``, ``mean``, ``std``, ...), for
            ``timm.data.create_transform(**data_config)``.
        outputs: Output names (task names and/or ``"base"``) in the order the caller asked for them.
    """

    data_config: dict[str, Any]
    outputs: tuple[str, ...]


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``config`` that change the input, with tuples as lists (as JSON gives them back)."""
    return json.loads(json.dumps({k: config[k] for k in PREPROCESSING_KEYS if k in config}))


def preprocessing_key(data_config: dict[str, Any]) -> str:
    """A key naming one preprocessing: equal for (normalised) data configs that prepare images the same way."""
    return json.dumps(data_config, sort_keys=True)


def output_preprocessing(model: MemoryViT, name: str, backbone: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preprocessing output ``name`` (a task or ``"base"``) expects its images prepared with.
    ``backbone``: the backbone's own, if the caller has it already (it is resolved otherwise)."""
    if name != BASE_KEY and name not in model.tasks:
        raise ValueError(f"unknown task {name!r}; this model has {model.task_names} and {BASE_KEY!r}")
    own = None if name == BASE_KEY else model.tasks[name].config.data_config
    if own is None:
        return backbone if backbone is not None else _normalised(preprocessing(model.base))
    return _normalised(own)


def pass_groups(model: MemoryViT, outputs: Sequence[str]) -> list[PassGroup]:
    """``outputs`` split into groups that share a preprocessing, in order of first appearance.

    Args:
        model: The ``MemoryViT`` that serves them.
        outputs: Task names and/or ``"base"``, as ``forward_all(tasks=...)`` takes them (checked there).

    Returns:
        One :class:`PassGroup` per distinct preprocessing; a single group when all agree (the common case).
    """
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    backbone = _normalised(preprocessing(model.base))  # once, not per output: the server calls this per request
    for name in outputs:
        config = output_preprocessing(model, name, backbone)
        key = preprocessing_key(config)
        groups.setdefault(key, (config, []))[1].append(name)
    return [PassGroup(config, tuple(names)) for config, names in groups.values()]


def warn_mixed_preprocessing(model: MemoryViT, stacklevel: int = 3) -> None:
    """Warn (``UserWarning``) when ``model``'s outputs need more than one pass group: one
    ``forward_all`` would give every task the same images. ``load_adapters`` calls it."""
    groups = pass_groups(model, model.task_names)
    if len(groups) > 1:
        warnings.warn(f"{MIXED_PREPROCESSING}: {[list(g.outputs) for g in groups]}. One forward_all gives every "
                      "task the same images: prepare each group's images with its own data_config and run one "
                      "pass per group (learnable_memory.pass_groups.pass_groups; predict, eval and serve do)",
                      UserWarning, stacklevel=stacklevel)


@contextmanager
def grouped_by_caller() -> Iterator[None]:
    """Silence :func:`warn_mixed_preprocessing` for a caller that runs one pass per group (the commands
    and the server), so its users are not told of a mix they are not exposed to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", MIXED_PREPROCESSING, UserWarning)
        yield
