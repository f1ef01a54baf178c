"""One training step of a fit: the forward pass (ONE ``forward_all`` for every task trained), each task's
loss, the backward pass, and each task's own gradient reduction, clipping and optimizer step; then the
check that keeps a task whose loss or parameters turned NaN or Inf from spoiling anything."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from .metrics import IGNORE_INDEX, autocast, labels_of
from .trainees import Trainee


class NonFiniteError(ValueError):
    """Training diverged: the loss or a trained parameter is NaN or Inf."""


class NonFiniteInputError(ValueError):
    """The training images hold NaN or Inf: the data is broken, not the training."""


@dataclass
class Run:
    """What every step of one fit shares.

    Attributes:
        forward: Images -> ``task -> logits [B, K]`` for the given task names.
        several: More than one task: a task that diverges is stopped (and rolled back), not raised.
        reduce_grads: Average each task's gradients over the processes here (a ``MemoryViT``'s tasks are
            not wrapped in DDP, so that a stopped task leaves the others' reduction alone).
        window: The images of the micro-batches since the last optimizer step.
    """

    accelerator: Accelerator
    forward: Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]
    trainees: list[Trainee]
    bf16: bool = False
    several: bool = False
    reduce_grads: bool = False
    restore_best: bool = False  # keep each task's parameters of its best validation
    log: Callable[[str], None] | None = None
    window: list[torch.Tensor] = field(default_factory=list)
    batch: int = 0  # micro-batches seen

    @property
    def live(self) -> list[Trainee]:
        return [t for t in self.trainees if t.live]


def backward(run: Run, x: torch.Tensor, y: torch.Tensor | dict) -> None:
    """Forward ``x`` for every live task, add up the tasks' cross-entropy (labels -100 left out) and
    backpropagate; a task with no label in the batch adds nothing."""
    run.batch += 1
    run.window.append(x)
    live = run.live
    with autocast(run.accelerator.device, run.bf16):
        outs = run.forward(x, [t.name for t in live])
    labels = [labels_of(y, t.name) if t.name else y for t in live]
    losses = [F.cross_entropy(outs[t.name].float(), yt) for t, yt in zip(live, labels, strict=True)]
    counts = [(yt != IGNORE_INDEX).sum() for yt in labels]
    stats = torch.stack([c.to(losses[0].dtype) for c in counts] + [loss.detach() for loss in losses]).tolist()
    kept = []
    for t, loss, count, value in zip(live, losses, stats[:len(live)], stats[len(live):], strict=True):
        if count == 0:
            continue
        t.labelled += int(count)
        t.loss_sum += value
        t.batches += 1
        t.bad_loss = t.bad_loss if t.bad_loss is not None or math.isfinite(value) else value
        kept.append(loss)
    if not kept:
        return
    total = kept[0]
    for loss in kept[1:]:
        total = total + loss
    if not total.requires_grad:
        raise ValueError(f"the loss does not depend on the trainable parameters {[n for n, _ in live[0].named][:3]}: "
                         "the model's output must come from them (for a MemoryViT: make the task to train active, "
                         "or pass tasks= to fit)")
    run.accelerator.backward(total)


def optimizer_step(run: Run, step: int) -> None:
    """Each live task's optimizer step (reduce, clip, step, schedule), then :func:`check_finite`."""
    for t in run.live:
        if run.several:
            t.snapshot = t.keep(t.snapshot)
        if run.reduce_grads:
            _reduce(run.accelerator, t)
        if t.labelled:
            if t.settings.clip is not None:
                run.accelerator.clip_grad_norm_(t.params, t.settings.clip)
            t.optimizer.step()
            t.schedule.step()
        else:  # no label for this task since the last step: its schedule moves on alone
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
                t.schedule.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.result.steps += 1
        t.labelled = 0
    check_finite(run, step)
    run.window.clear()
    for t in run.trainees:
        t.bad_loss = None


def _reduce(accelerator: Accelerator, t: Trainee) -> None:
    """Average the task's gradients over the processes (one flat all-reduce)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in t.params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for p, g in zip(t.params, flat.split([g.numel() for g in grads]), strict=True):
        p.grad = g.view_as(p)


def check_finite(run: Run, step: int) -> None:
    """After an optimizer step: a task whose loss or parameters are NaN or Inf is stopped with its
    parameters of the step before (several tasks), or :class:`NonFiniteError` is raised (one task).
    Images holding NaN or Inf are :class:`NonFiniteInputError` first. (Checked after the step, so every
    process of a distributed run stops at the same step: a NaN gradient reaches every process.)"""
    live = run.live
    sums = torch.stack([sum(p.detach().sum(dtype=torch.float64) for p in t.params) for t in live]).tolist()
    bad = [t.bad_loss is not None or not math.isfinite(s) for t, s in zip(live, sums, strict=True)]
    if run.accelerator.num_processes > 1:
        flags = torch.tensor(bad, dtype=torch.float32, device=run.accelerator.device)
        bad = [f > 0 for f in run.accelerator.reduce(flags, reduction="sum").tolist()]
    if not any(bad):
        return
    diverged = [t for t, b in zip(live, bad, strict=True) if b]
    if not all(bool(torch.isfinite(x).all()) for x in run.window):
        _roll_back(run, diverged)
        raise NonFiniteInputError(f"the training images of batch {run.batch} (step {step}) hold NaN or Inf: the "
                                  "data is broken, not the training; check the dataset and its transform (nothing "
                                  "was saved)")
    reasons = {t.name: _what(t) for t in diverged}
    if not run.several or len(diverged) == len(live):
        _roll_back(run, diverged)
        what = "; ".join(f"{n}: {w}" if n and run.several else w for n, w in reasons.items())
        raise NonFiniteError(f"training diverged at step {step}: {what}; nothing was saved. Lower the learning "
                             "rate (--lr) or clip gradients (--clip)")
    _roll_back(run, diverged)
    for t in diverged:
        t.result.stopped = f"diverged at step {step}: {reasons[t.name]}"
        t.result.steps -= 1
        if run.log is not None:
            run.log(f"task {t.name!r} stopped: {t.result.stopped}; it keeps its parameters of step {step - 1}")


def _what(t: Trainee) -> str:
    if t.bad_loss is not None:
        return f"the loss is {t.bad_loss}"
    bad = [n for n, p in t.named if not bool(torch.isfinite(p).all())]
    return f"{bad[:3]} hold NaN or Inf"


def _roll_back(run: Run, diverged: list[Trainee]) -> None:
    """Several tasks: give the diverged tasks back their parameters of the step before."""
    if run.several:
        for t in diverged:
            t.restore(t.snapshot)
