"""What :func:`~learnable_memory.training.fit` optimizes and how: the trainable parameters, their optimizer
groups, the optimizers, the warm-up + cosine schedule, and a task's hyper-parameters (:class:`TaskSettings`).

Optimizer: SGD with momentum 0.9 and gradient clipping at norm 1, as in the paper, with the peak learning
rate and warm-up of ``DEFAULTS``, chosen by the sweep recorded in ``benchmarks/RESULTS.md`` ("Optimizer
defaults"). AdamW is available with ``optimizer="adamw"``. ``memory_lr_scale`` gives the memory tokens
their own peak rate (``lr * memory_lr_scale``); it defaults to 1 (same section).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

#: Default hyper-parameters of :func:`~learnable_memory.training.fit` for memory fine-tuning.
DEFAULTS = dict(optimizer="sgd", lr=0.6, momentum=0.9, weight_decay=0.0, warmup=0.05, clip=1.0, memory_lr_scale=1.0)
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TaskSettings:
    """The hyper-parameters of one task of a fit; every task has its own optimizer, schedule and clipping.

    Attributes:
        lr: Peak learning rate (reached after the warm-up, then cosine decay to 0).
        optimizer: "sgd" (with ``momentum``) or "adamw".
        momentum: SGD's momentum.
        weight_decay: The optimizer's weight decay.
        memory_lr_scale: The memory tokens' peak rate is ``lr * memory_lr_scale``.
        warmup: Warm-up steps (int), or a fraction of the total steps (float < 1).
        clip: Max norm of the task's gradient (None: no clipping).
    """

    lr: float = DEFAULTS["lr"]
    optimizer: str = DEFAULTS["optimizer"]
    momentum: float = DEFAULTS["momentum"]
    weight_decay: float = DEFAULTS["weight_decay"]
    memory_lr_scale: float = DEFAULTS["memory_lr_scale"]
    warmup: int | float = DEFAULTS["warmup"]
    clip: float | None = DEFAULTS["clip"]

    def __post_init__(self) -> None:
        if self.memory_lr_scale <= 0:
            raise ValueError(f"memory_lr_scale must be > 0, got {self.memory_lr_scale}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use 'sgd' or 'adamw'")
        if self.warmup < 0 or (self.clip is not None and self.clip <= 0):
            raise ValueError(f"warmup must be >= 0 and clip > 0 or None, got warmup={self.warmup} clip={self.clip}")

    def warmup_steps(self, total: int) -> int:
        """The warm-up in steps for a run of ``total`` steps (at least 1)."""
        w = self.warmup
        return max(1, int(round(w * total)) if isinstance(w, float) and w < 1 else int(w))


def settings_per_task(shared: TaskSettings, names: list[str],
                      overrides: Mapping[str, TaskSettings | Mapping] | None) -> dict[str, TaskSettings]:
    """Each task's settings: ``shared``, replaced by a ``TaskSettings`` or updated by a mapping of fields
    (e.g. ``{"lr": 0.1}``) given for the task in ``overrides``."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(names), key=str)
    if unknown:
        raise ValueError(f"settings name task(s) {unknown} that this fit does not train; it trains {names}")
    fields = {f.name for f in dataclasses.fields(TaskSettings)}
    out = {}
    for name in names:
        given = overrides.get(name, {})
        if isinstance(given, TaskSettings):
            out[name] = given
            continue
        bad = sorted(set(given) - fields)
        if bad:
            raise ValueError(f"unknown setting(s) {bad} for task {name!r}; the settings are {sorted(fields)}")
        out[name] = dataclasses.replace(shared, **given)
    return out


def is_trainable(p: nn.Parameter) -> bool:
    """Whether :func:`~learnable_memory.training.fit` optimizes ``p``: it requires grad and has elements."""
    return p.requires_grad and p.numel() > 0


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters fit optimizes: those with ``requires_grad`` and at least one element."""
    return [p for p in model.parameters() if is_trainable(p)]


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars of ``model``."""
    return sum(p.numel() for p in trainable_parameters(model))


def groups_of(named: Iterable[tuple[str, nn.Parameter]], lr: float, memory_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups of ``named`` parameters: memory tokens (named ``memory``) at ``lr * memory_lr_scale``,
    everything else at ``lr``. Empty groups are left out."""
    memory, other = [], []
    for name, p in named:
        (memory if name.rsplit(".", 1)[-1] == "memory" else other).append(p)
    groups = [{"params": other, "lr": lr}, {"params": memory, "lr": lr * memory_lr_scale}]
    return [g for g in groups if g["params"]]


def parameter_groups(model: nn.Module, lr: float, memory_lr_scale: float = 1.0) -> list[dict]:
    """:func:`groups_of` the trainable parameters of ``model`` (see :class:`~learnable_memory.TaskMemory`)."""
    return groups_of([(n, p) for n, p in model.named_parameters() if is_trainable(p)], lr, memory_lr_scale)


def make_optimizer(params: Iterable[nn.Parameter] | Iterable[dict], name: str = "sgd", lr: float = 0.1,
                   momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's choice) or AdamW, on parameters or parameter groups."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use 'sgd' or 'adamw'")


def task_optimizer(named: list[tuple[str, nn.Parameter]], s: TaskSettings) -> torch.optim.Optimizer:
    """The optimizer of one task: :func:`groups_of` its parameters with its settings."""
    return make_optimizer(groups_of(named, s.lr, s.memory_lr_scale), s.optimizer, s.lr, s.momentum, s.weight_decay)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict, what: str) -> None:
    """Load the per-parameter state (momentum, Adam's moments) of ``state`` into ``opt``, keeping ``opt``'s own
    hyper-parameters (so a resumed run may change the learning rate)."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise ValueError(f"the saved optimizer state of {what} does not fit its parameters ({e}); "
                         "resume without it") from e
    for group, hyper in zip(opt.param_groups, fresh, strict=True):
        params = group["params"]
        group.clear()
        group.update(hyper, params=params)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  start: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` to the base learning rate, then cosine decay to 0 at
    ``total_steps``; the first step is step ``start`` of that schedule (a resumed run)."""

    def factor(i: int) -> float:
        step = i + start
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
