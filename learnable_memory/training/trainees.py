"""Which parameters a fit trains, as *trainees*: each task of a ``MemoryViT`` (or a whole plain model) with
its own parameters, optimizer, schedule and result, so that tasks trained together never share a step."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model import MemoryViT
from .optim import TaskSettings, is_trainable, load_optimizer_state, task_optimizer, warmup_cosine
from .results import FitResult, FitState

HOW_TO_TRAIN = ("load adapters with load_adapters(..., trainable=True) (or trainable=[names]), add a task with "
                "wrap_model or add_task, or call requires_grad_() on what should train")


@dataclass
class Trainee:
    """One task of a fit (``name`` ``""``: a plain model's trainable parameters) and its training state."""

    name: str
    named: list[tuple[str, nn.Parameter]]
    settings: TaskSettings
    optimizer: torch.optim.Optimizer | None = None
    schedule: torch.optim.lr_scheduler.LambdaLR | None = None
    result: FitResult = field(default_factory=FitResult)
    snapshot: list[torch.Tensor] | None = None  # the last finite parameters (several tasks only)
    best: list[torch.Tensor] | None = None  # the parameters of the best validation (restore_best only)
    loss_sum: float = 0.0  # since the last history row
    batches: int = 0
    labelled: int = 0  # labels seen since the last optimizer step
    bad_loss: float | None = None  # the first NaN or Inf loss since the last optimizer step

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    @property
    def live(self) -> bool:
        return self.result.stopped is None

    def keep(self, into: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Copy the parameters into ``into`` (allocated on first use); returns it."""
        into = into or [torch.empty_like(p) for p in self.params]
        for dst, p in zip(into, self.params, strict=True):
            dst.copy_(p.detach())
        return into

    @torch.no_grad()
    def restore(self, saved: list[torch.Tensor]) -> None:
        for p, src in zip(self.params, saved, strict=True):
            p.copy_(src)


def _trainable_tasks(model: MemoryViT) -> list[str]:
    return [n for n in model.task_names if any(is_trainable(p) for p in model.tasks[n].parameters())]


def select_tasks(model: nn.Module, tasks: Sequence[str] | None) -> list[str] | None:
    """The tasks a fit trains, or None to train ``model``'s trainable parameters through ``model(x)``
    (a plain model, or a ``MemoryViT`` whose trainable parameters are not all in tasks)."""
    if not isinstance(model, MemoryViT):
        if tasks is not None:
            raise ValueError(f"tasks= names tasks of a MemoryViT; this model is a {type(model).__name__}")
        if not any(is_trainable(p) for p in model.parameters()):
            raise ValueError(f"the model has no trainable parameters: {HOW_TO_TRAIN}")
        return None
    trainable = _trainable_tasks(model)
    in_tasks = {id(p) for t in model.tasks.values() for p in t.parameters()}
    outside = [n for n, p in model.named_parameters() if is_trainable(p) and id(p) not in in_tasks]
    if tasks is None:
        if outside and trainable not in ([], [model.active_task]):
            raise ValueError(f"parameters outside the tasks require grad ({outside[:3]}) beside trainable tasks "
                             f"{trainable} that are not all the active task {model.active_task!r}: freeze them, or "
                             "train one task at a time")
        if outside:
            return None
        if not trainable:
            raise ValueError(f"the model has no trainable parameters (tasks {model.task_names} are frozen): "
                             f"{HOW_TO_TRAIN}")
        return trainable
    names = list(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
    unknown = [n for n in names if n not in model.tasks]
    if unknown or not names:
        raise ValueError(f"tasks= names unknown task(s) {unknown}; this model has {model.task_names}")
    frozen = [n for n in names if n not in trainable]
    if frozen:
        raise ValueError(f"task(s) {frozen} have no trainable parameters (trainable tasks: {trainable}, active task: "
                         f"{model.active_task!r}): pass tasks={trainable}, or make them trainable with "
                         f"load_adapters(..., trainable={frozen}) or model.tasks[name].requires_grad_()")
    if outside:
        raise ValueError(f"parameters outside the tasks require grad ({outside[:3]}); a fit with tasks= trains only "
                         "tasks: freeze them, or call fit without tasks= with one trainable task active")
    return names


def check_shared_pass(model: MemoryViT, names: list[str]) -> None:
    """Refuse a trained task that attends to another trained task's memory: their gradients would mix.
    (A full-mode task changes the original tokens, so it is alone in its model: ``check_task_order``.)"""
    for n in names:
        shared = sorted(set(model.tasks[n].config.depends_on) & set(names))
        if shared:
            raise ValueError(f"task {n!r} extends trained task(s) {shared}: its gradient would reach their memory; "
                             "freeze them, or train them in separate fits")


def make_trainees(model: nn.Module, names: list[str] | None, settings: dict[str, TaskSettings]) -> list[Trainee]:
    """One trainee per task of ``names`` (None: one for the whole ``model``), its parameters named as in
    ``model.named_parameters()``."""
    trainable = [(n, p) for n, p in model.named_parameters() if is_trainable(p)]
    if names is None:
        return [Trainee("", trainable, settings[""])]
    out = []
    for name in names:
        own = {id(p) for p in model.tasks[name].parameters()}
        out.append(Trainee(name, [(n, p) for n, p in trainable if id(p) in own], settings[name]))
    return out


def start_optimizers(trainees: list[Trainee], resume: FitState | None, log) -> None:
    """Give every trainee its optimizer, with the state ``resume`` holds for it when that is for the same
    optimizer."""
    for t in trainees:
        t.optimizer = task_optimizer(t.named, t.settings)
        saved = resume.optimizers.get(t.name) if resume is not None else None
        if saved is not None and resume.optimizer_names.get(t.name) == t.settings.optimizer:
            load_optimizer_state(t.optimizer, saved, f"task {t.name!r}" if t.name else "the model")
        elif saved is not None and log is not None:
            log(f"{t.name or 'the model'}: the saved state is for {resume.optimizer_names.get(t.name)}, not "
                f"{t.settings.optimizer}: the optimizer starts afresh")


def start_schedules(trainees: list[Trainee], total: int, start: int) -> None:
    """Every trainee's warm-up + cosine schedule over ``total`` steps, at step ``start`` of it."""
    for t in trainees:
        t.schedule = warmup_cosine(t.optimizer, total, t.settings.warmup_steps(total), start)


def fit_state(trainees: list[Trainee], step: int, total: int, **position) -> FitState:
    """The :class:`FitState` of ``trainees`` after ``step`` of ``total`` steps (a copy: later steps leave it
    alone); ``position``: its data position and random states (``epoch``, ``batches``, ...)."""
    progress = {t.name: {"best_step": t.result.best_step, "best_metric": t.result.best_metric,
                         "best": [b.detach().clone() for b in t.best or []], "stopped": t.result.stopped}
                for t in trainees}
    return FitState(step, total, {t.name: copy.deepcopy(t.optimizer.state_dict()) for t in trainees},
                    {t.name: t.settings.optimizer for t in trainees}, progress=progress, **position)


def resume_progress(trainees: list[Trainee], resume: FitState | None, restore_best: bool) -> None:
    """Carry on what ``resume`` holds of each trainee's result: its best validation (and, with ``restore_best``,
    its parameters) and whether it was stopped."""
    for t in trainees:
        saved = resume.progress.get(t.name) if resume is not None else None
        if saved is None:
            continue
        t.result.best_step, t.result.best_metric, t.result.stopped = (saved["best_step"], saved["best_metric"],
                                                                     saved["stopped"])
        if restore_best and saved["best"]:
            t.best = [b.to(p.device, p.dtype) for b, p in zip(saved["best"], t.params, strict=True)]
