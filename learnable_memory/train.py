"""Training and evaluation loops on Hugging Face ``accelerate``.

:func:`fit` trains whatever parameters of a model have ``requires_grad`` (for a ``MemoryViT``: the
active task's memory, class token and head) with a linear warm-up and a cosine decay, gradient
clipping and optional bf16 autocast. The same code runs on one CPU, one GPU, or several processes
under ``accelerate launch`` (accelerate's ``Accelerator`` prepares the model, optimizer and loaders
and gathers the validation predictions). :func:`evaluate` gives accuracy and a confusion matrix with
torchmetrics.

Optimizer: SGD with momentum 0.9 and gradient clipping at norm 1, as in the paper, with the peak
learning rate and warm-up of ``DEFAULTS``, chosen by the sweep recorded in ``benchmarks/RESULTS.md``
("Optimizer defaults"). AdamW is available with ``optimizer="adamw"`` (``benchmarks/pretrain_base.py``
uses it to pretrain a whole model). ``memory_lr_scale`` gives the memory tokens their own peak rate
(``lr * memory_lr_scale``); it defaults to 1 (same section).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from tqdm.auto import tqdm

#: Default hyper-parameters of :func:`fit` for memory fine-tuning.
DEFAULTS = dict(optimizer="sgd", lr=0.6, momentum=0.9, weight_decay=0.0, warmup=0.05, clip=1.0, memory_lr_scale=1.0)


@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes:
        history: One row per epoch: ``epoch``, ``step``, ``train_loss``, ``lr`` and, with a
            validation loader, ``val_accuracy`` and ``val_loss``.
        steps: Optimizer steps taken.
        seconds: Wall time of the training loop (validation included).
        val: The last validation result of :func:`evaluate` (empty without a validation loader).
    """

    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    val: dict = field(default_factory=dict)


def _is_trainable(p: nn.Parameter) -> bool:
    return p.requires_grad and p.numel() > 0


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters :func:`fit` optimizes: those with ``requires_grad`` and at least one element."""
    return [p for p in model.parameters() if _is_trainable(p)]


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars of ``model``."""
    return sum(p.numel() for p in trainable_parameters(model))


def parameter_groups(model: nn.Module, lr: float, memory_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups of the trainable parameters: memory tokens (parameters named ``memory``, see
    :class:`~learnable_memory.TaskMemory`) at ``lr * memory_lr_scale``, everything else at ``lr``.
    Empty groups are left out."""
    memory, other = [], []
    for name, p in model.named_parameters():
        if _is_trainable(p):
            (memory if name.rsplit(".", 1)[-1] == "memory" else other).append(p)
    groups = [{"params": other, "lr": lr}, {"params": memory, "lr": lr * memory_lr_scale}]
    return [g for g in groups if g["params"]]


def make_optimizer(params: Iterable[nn.Parameter] | Iterable[dict], name: str = "sgd", lr: float = 0.1,
                   momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's choice) or AdamW, on parameters or parameter groups."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use 'sgd' or 'adamw'")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` to the base learning rate, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class NonFiniteError(ValueError):
    """Training diverged: the loss or a trained parameter is NaN or Inf."""


def _check_finite(step: int, loss: float, named: list[tuple[str, nn.Parameter]]) -> None:
    """After an optimizer step: raise :class:`NonFiniteError` if the step's ``loss`` or a trained parameter is
    not finite. (Checked after the step, so that every process of a distributed run stops at the same step: a
    NaN gradient reaches every process's parameters.)"""
    bad: list[str] = []
    if not math.isfinite(float(sum(p.detach().sum(dtype=torch.float64) for _, p in named))):
        bad = [n for n, p in named if not bool(torch.isfinite(p).all())]
    if bad or not math.isfinite(loss):
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"{bad[:3]} hold NaN or Inf"
        raise NonFiniteError(f"training diverged at step {step}: {what}; nothing was saved. Lower the learning "
                             "rate (--lr) or clip gradients (--clip)")


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


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
    device = accelerator.device if accelerator is not None else _device_of(model)
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    acc = conf = None
    loss_sum, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with _autocast(device, bf16):
            logits = model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, reduction="sum")
        if accelerator is not None:
            logits, y = accelerator.gather_for_metrics((logits, y))
            loss = accelerator.reduce(loss, reduction="sum")
        if acc is None:
            k = num_classes or logits.shape[-1]
            acc = MulticlassAccuracy(num_classes=k, average="micro").to(logits.device)
            conf = MulticlassConfusionMatrix(num_classes=k).to(logits.device)
        preds = logits.argmax(-1)
        acc.update(preds, y)
        conf.update(preds, y)
        loss_sum += float(loss)
        n += len(y)
    if isinstance(model, nn.Module):
        model.train(was_training)
    if acc is None:
        raise ValueError("the evaluation data is empty")
    return {"accuracy": float(acc.compute()), "loss": loss_sum / max(n, 1), "n": n,
            "confusion": conf.compute().cpu()}


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None = None, *,
        steps: int | None = None, epochs: int | None = None, lr: float = DEFAULTS["lr"],
        optimizer: str = DEFAULTS["optimizer"], momentum: float = DEFAULTS["momentum"],
        weight_decay: float = DEFAULTS["weight_decay"], memory_lr_scale: float = DEFAULTS["memory_lr_scale"],
        warmup: int | float = DEFAULTS["warmup"],
        clip: float | None = DEFAULTS["clip"], bf16: bool = False, accelerator: Accelerator | None = None,
        seed: int | None = None, progress: bool = True, desc: str = "train",
        log: Callable[[str], None] | None = None) -> FitResult:
    """Train the trainable parameters of ``model`` with cross-entropy.

    Args:
        model: Maps images ``[B, C, H, W]`` to logits ``[B, K]`` (e.g. a ``MemoryViT`` with its task
            active). Trained in place.
        train_loader, val_loader: Loaders of ``(images, labels)``; validation runs after every epoch.
        steps, epochs: Length of training (exactly one of them). An epoch is one pass over
            ``train_loader`` (per process under ``accelerate launch``); ``steps`` may span several.
        lr, optimizer, momentum, weight_decay: See :func:`make_optimizer`.
        memory_lr_scale: The memory tokens' peak learning rate is ``lr * memory_lr_scale`` (see
            :func:`parameter_groups`); the warm-up and cosine decay scale every group alike.
        warmup: Warm-up steps (int) or fraction of the total (float < 1).
        clip: Max global gradient norm (None: no clipping).
        bf16: Run forward passes under bf16 autocast.
        accelerator: An ``accelerate.Accelerator``; a default one is made when None.
        seed: Seeds python/numpy/torch (``accelerate.utils.set_seed``) before training.
        progress: Show a tqdm bar (main process only).
        log: Called with one line per epoch on the main process (e.g. ``print``).
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    if (steps is not None and steps < 1) or (epochs is not None and epochs < 1):
        raise ValueError(f"steps/epochs must be >= 1, got steps={steps} epochs={epochs}")
    if memory_lr_scale <= 0:
        raise ValueError(f"memory_lr_scale must be > 0, got {memory_lr_scale}")
    groups = parameter_groups(model, lr, memory_lr_scale)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    named = [(n, p) for n, p in model.named_parameters() if _is_trainable(p)]
    if seed is not None:
        set_seed(seed)
    accelerator = accelerator or Accelerator()
    opt = make_optimizer(groups, optimizer, lr, momentum, weight_decay)
    if val_loader is not None:
        model, opt, train_loader, val_loader = accelerator.prepare(model, opt, train_loader, val_loader)
    else:
        model, opt, train_loader = accelerator.prepare(model, opt, train_loader)
    if len(train_loader) == 0:
        raise ValueError("the training data is empty")
    total = steps if steps is not None else epochs * len(train_loader)
    warmup_steps = int(round(warmup * total)) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    sched = warmup_cosine(opt, total, max(1, warmup_steps))
    device = accelerator.device
    bar = tqdm(total=total, desc=desc, disable=not (progress and accelerator.is_local_main_process),
               dynamic_ncols=True, leave=False)
    result = FitResult()
    start = time.perf_counter()
    step, epoch = 0, 0
    model.train()
    while step < total:
        epoch += 1
        loss_sum, n_batches = 0.0, 0
        for x, y in train_loader:
            with _autocast(device, bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            value = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if clip is not None:
                accelerator.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            step += 1
            _check_finite(step, value, named)
            loss_sum += value
            n_batches += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / n_batches:.3f}", lr=f"{sched.get_last_lr()[0]:.3g}")
            if step >= total:
                break
        row = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(n_batches, 1),
               "lr": sched.get_last_lr()[0]}
        if val_loader is not None:
            result.val = evaluate(accelerator.unwrap_model(model), val_loader, accelerator=accelerator, bf16=bf16)
            row.update(val_accuracy=result.val["accuracy"], val_loss=result.val["loss"])
            model.train()
        result.history.append(row)
        if log is not None and accelerator.is_main_process:
            extra = f"  val_acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
            bar.clear()
            log(f"epoch {epoch}  step {step}/{total}  train_loss {row['train_loss']:.4f}{extra}")
    bar.close()
    model.eval()
    result.steps, result.seconds = step, time.perf_counter() - start
    accelerator.wait_for_everyone()
    return result
