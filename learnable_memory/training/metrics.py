"""Accuracy, loss and confusion matrix (torchmetrics) of one model, or of several tasks of a ``MemoryViT``
in one pass per batch. Labels of -100 (``IGNORE_INDEX``) are left out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

#: A label that leaves its image out of a task's loss and metrics (``F.cross_entropy``'s default).
IGNORE_INDEX = -100


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16``, else nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def labels_of(y: torch.Tensor | dict, task: str) -> torch.Tensor:
    """The labels ``[B]`` of ``task`` in a batch's labels: one tensor for every task, or ``{task: labels}``."""
    if not isinstance(y, dict):
        return y
    if task not in y:
        raise ValueError(f"the batch has no labels for task {task!r} (it has {sorted(y)}): give (images, "
                         "{task: labels}) with every trained task, or one label tensor for all")
    return y[task]


class Tally:
    """Running accuracy, summed loss and confusion matrix of one output."""

    def __init__(self, num_classes: int | None = None):
        self.num_classes = num_classes
        self.acc = self.conf = None
        self.loss_sum, self.n = 0.0, 0

    def update(self, logits: torch.Tensor, y: torch.Tensor, accelerator: Accelerator | None) -> None:
        """Add a batch: ``logits [B, K]`` (float), labels ``[B]``; gathered over processes with ``accelerator``."""
        loss = F.cross_entropy(logits, y, reduction="sum")
        if accelerator is not None:
            logits, y = accelerator.gather_for_metrics((logits, y))
            loss = accelerator.reduce(loss, reduction="sum")
        keep = y != IGNORE_INDEX
        if not bool(keep.all()):
            logits, y = logits[keep], y[keep]
        if self.acc is None:
            k = self.num_classes or logits.shape[-1]
            self.acc = MulticlassAccuracy(num_classes=k, average="micro").to(logits.device)
            self.conf = MulticlassConfusionMatrix(num_classes=k).to(logits.device)
        preds = logits.argmax(-1)
        self.acc.update(preds, y)
        self.conf.update(preds, y)
        self.loss_sum += float(loss)
        self.n += len(y)

    def result(self, what: str = "the evaluation data") -> dict:
        if self.acc is None or self.n == 0:
            raise ValueError(f"{what} is empty")
        return {"accuracy": float(self.acc.compute()), "loss": self.loss_sum / max(self.n, 1), "n": self.n,
                "confusion": self.conf.compute().cpu()}


@torch.no_grad()
def evaluate(model: nn.Module | Callable, loader: DataLoader, *, accelerator: Accelerator | None = None,
             bf16: bool = False, num_classes: int | None = None) -> dict:
    """Accuracy and confusion matrix of ``model`` (images ``[B, C, H, W]`` -> logits ``[B, K]``) on ``loader``.

    With an ``accelerator``, ``loader`` should be prepared by it: every process evaluates its shard and
    the predictions are gathered (``gather_for_metrics`` drops the padding of the last batch).

    Returns:
        ``{"accuracy": float, "loss": float, "n": int, "confusion": LongTensor [K, K]}`` with
        rows = true class, columns = predicted class.
    """
    device = accelerator.device if accelerator is not None else device_of(model)
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    tally = Tally(num_classes)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device, bf16):
            logits = model(x)
        tally.update(logits.float(), y, accelerator)
    if isinstance(model, nn.Module):
        model.train(was_training)
    return tally.result()


@torch.no_grad()
def evaluate_tasks(model: nn.Module, loader: DataLoader, tasks: Sequence[str], *,
                   accelerator: Accelerator | None = None, bf16: bool = False) -> dict[str, dict]:
    """:func:`evaluate` for each of ``tasks`` of a ``MemoryViT``, with ONE ``forward_all`` per batch.

    ``loader`` gives ``(images, labels)`` (the same labels for every task) or ``(images, {task: labels})``.
    Returns ``task -> evaluate``'s dict.
    """
    device = accelerator.device if accelerator is not None else device_of(model)
    was_training = model.training
    model.eval()
    tallies = {t: Tally() for t in tasks}
    for x, y in loader:
        with autocast(device, bf16):
            out = model.forward_all(x.to(device), list(tasks))
        for t in tasks:
            tallies[t].update(out[t].float(), labels_of(y, t).to(device), accelerator)
    model.train(was_training)
    return {t: tallies[t].result(f"the validation data of task {t!r}") for t in tasks}
