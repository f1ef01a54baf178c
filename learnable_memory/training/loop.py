"""The training loop, :func:`fit`: one task, several tasks of a ``MemoryViT`` in one pass per batch, or a
plain model; with validation, the best state per task, checkpoints and resuming."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .metrics import evaluate, evaluate_tasks
from .optim import DEFAULTS, TaskSettings, settings_per_task
from .position import epoch_start, loader_generators, rest_of_epoch, rng_states
from .results import FitResult, FitState
from .step import Run, backward, optimizer_step
from .trainees import (
    check_shared_pass,
    fit_state,
    make_trainees,
    resume_progress,
    select_tasks,
    start_optimizers,
    start_schedules,
)


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader | None = None, *,
        steps: int | None = None, epochs: int | None = None, lr: float = DEFAULTS["lr"],
        optimizer: str = DEFAULTS["optimizer"], momentum: float = DEFAULTS["momentum"],
        weight_decay: float = DEFAULTS["weight_decay"], memory_lr_scale: float = DEFAULTS["memory_lr_scale"],
        warmup: int | float = DEFAULTS["warmup"],
        clip: float | None = DEFAULTS["clip"], bf16: bool = False, accelerator: Accelerator | None = None,
        seed: int | None = None, progress: bool = True, desc: str = "train",
        log: Callable[[str], None] | None = None, tasks: Sequence[str] | None = None,
        settings: Mapping[str, TaskSettings | Mapping] | None = None, val_every: int | None = None,
        restore_best: bool = False, resume: FitState | None = None, checkpoint_every: int | None = None,
        on_checkpoint: Callable[[FitState, FitResult], None] | None = None) -> FitResult:
    """Train with cross-entropy: the tasks of a ``MemoryViT`` (each on its own), or a plain model's
    trainable parameters.

    Args:
        model: A ``MemoryViT``, or any model of images ``[B, C, H, W]`` -> logits ``[B, K]``. Trained in place.
        train_loader, val_loader: Loaders of ``(images, labels)``: labels ``[B]`` for every task (a sweep)
            or ``{task: labels [B]}`` (a label per task); -100 leaves an image out of a task's loss.
            Validation runs after every epoch (or every ``val_every`` steps).
        steps, epochs: Length of this call (exactly one of them). An epoch is one pass over
            ``train_loader`` (per process under ``accelerate launch``); ``steps`` may span several. An
            optimizer step takes ``accelerator.gradient_accumulation_steps`` batches.
        lr, optimizer, momentum, weight_decay, memory_lr_scale, warmup, clip: Every task's
            :class:`TaskSettings` (the warm-up as steps, or a fraction of the steps if < 1; clip: the max
            norm of each task's own gradient, None for none).
        bf16: Run forward passes under bf16 autocast.
        accelerator: An ``accelerate.Accelerator``; a default one is made when None.
        seed: Seeds python/numpy/torch (``accelerate.utils.set_seed``) before training.
        progress: Show a tqdm bar (main process, and only on a terminal).
        log: Called with one line per epoch on the main process (e.g. ``print``).
        tasks: The ``MemoryViT`` tasks to train, with ONE ``forward_all`` per batch (default: every task
            with trainable parameters). A task trained with others ends where it would alone, with the same
            data and seed. A task whose loss or parameters turn NaN or Inf is stopped, keeps its parameters
            of the step before, and the others train on. (A full-mode task is alone in its model, so it
            trains alone.) A task extending another trained task is refused: their gradients would mix.
        settings: ``task -> TaskSettings`` or a mapping of the fields to change for that task, e.g.
            ``{"a": {"lr": 0.1}}``: each task has its own optimizer, schedule and clipping.
        val_every: Validate every this many steps (and at the end) instead of every epoch.
        restore_best: Give each task back its parameters of its best validation accuracy at the end.
        resume: A :class:`FitState` (``FitResult.state``): continue its optimizers, schedule position, data
            position, random states and each task's best validation so far (a stopped task stays stopped);
            the schedule then runs to ``resume.step`` + this call's steps. With ``train_loader`` built as
            before (the same data, batch size and generator seed), the resumed fit ends exactly where one
            uninterrupted fit ends, for data whose items draw no random numbers (:mod:`.position`). A state
            without a data position (or for a loader of another length) begins a fresh epoch.
        checkpoint_every, on_checkpoint: Call ``on_checkpoint(state, result_so_far)`` every this many steps.

    Returns:
        A :class:`FitResult`; with several tasks, one per task in ``result.tasks``.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    if (steps is not None and steps < 1) or (epochs is not None and epochs < 1):
        raise ValueError(f"steps/epochs must be >= 1, got steps={steps} epochs={epochs}")
    shared = TaskSettings(lr, optimizer, momentum, weight_decay, memory_lr_scale, warmup, clip)
    names = select_tasks(model, tasks)
    if names is not None:
        check_shared_pass(model, names)
    trainees = make_trainees(model, names, settings_per_task(shared, names or [""], settings))
    if seed is not None:
        set_seed(seed)
    accelerator = accelerator or Accelerator()
    several = len(trainees) > 1
    if several and accelerator.scaler is not None:
        raise ValueError("fp16 mixed precision scales one loss for all tasks; train several tasks with bf16=True")
    start_optimizers(trainees, resume, log)
    model, train_loader, val_loader = _prepare(accelerator, model, names, trainees, train_loader, val_loader)
    resume_progress(trainees, resume, restore_best)
    if len(train_loader) == 0:
        raise ValueError("the training data is empty")
    start = resume.step if resume is not None else 0
    per_epoch = -(-len(train_loader) // accelerator.gradient_accumulation_steps)
    total = start + (steps if steps is not None else epochs * per_epoch)
    start_schedules(trainees, total, start)
    run = Run(accelerator, _forward(model, names), trainees, bf16=bf16, several=several,
              reduce_grads=names is not None and accelerator.num_processes > 1, restore_best=restore_best, log=log)
    shown = progress and accelerator.is_local_main_process and sys.stderr.isatty()
    bar = tqdm(total=total - start, desc=desc, disable=not shown, dynamic_ncols=True, leave=False)
    began = time.perf_counter()
    generators = loader_generators(train_loader)
    where = _position_to_resume(resume, train_loader, generators, log)
    step, epoch = start, (where.epoch - 1 if where is not None else 0)
    model.train()
    while step < total:
        epoch += 1
        if where is not None:  # the rest of the interrupted epoch
            pos = _Position(epoch, where.batches, len(train_loader), where.epoch_rng)
            batches = rest_of_epoch(train_loader, generators, where.epoch_rng, where.batches, where.rng)
            where = None
        else:
            pos = _Position(epoch, 0, len(train_loader), epoch_start(generators))
            batches = train_loader
        for x, y in batches:
            pos.batches += 1
            with accelerator.accumulate(model):
                backward(run, x, y)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                optimizer_step(run, step)
            bar.update(1)
            bar.set_postfix(_postfix(run))
            if val_every and step % val_every == 0 and step < total:
                _close_row(run, model, val_loader, epoch, step, total, bar)
            if on_checkpoint is not None and checkpoint_every and (step - start) % checkpoint_every == 0 \
                    and step < total:
                so_far = _assemble(run, step - start, began, step, total, pos)
                on_checkpoint(so_far.state, so_far)
            if step >= total:
                break
        if not val_every or step >= total:
            _close_row(run, model, val_loader, epoch, step, total, bar)
    if pos.batches >= pos.epoch_batches:  # the epoch ended (and its row closed): the next one begins afresh
        pos = _Position(epoch + 1, 0, len(train_loader), epoch_start(generators))
    bar.close()
    if restore_best:
        for t in trainees:
            if t.best is not None:
                t.restore(t.best)
    model.eval()
    accelerator.wait_for_everyone()
    return _assemble(run, step - start, began, step, total, pos)


@dataclasses.dataclass
class _Position:
    """Where the fit is in its data: ``batches`` of epoch ``epoch`` (of ``epoch_batches``) trained on; what
    ordered that epoch when it began (:func:`.position.epoch_start`)."""

    epoch: int
    batches: int
    epoch_batches: int
    epoch_rng: dict


def _position_to_resume(resume: FitState | None, loader, generators: list, log) -> FitState | None:
    """``resume`` when its data position fits ``loader`` (the same batches per epoch and generators), else
    None: the resumed fit begins a fresh epoch (a state saved without a position, or other data)."""
    if resume is None or resume.epoch == 0:
        return None
    fits = (resume.epoch_batches == len(loader) and resume.rng
            and len(resume.epoch_rng.get("generators", [])) == len(generators))
    if not fits and log is not None:
        log(f"the saved data position is for {resume.epoch_batches} batches per epoch and "
            f"{len(resume.epoch_rng.get('generators', []))} generator(s), this loader has {len(loader)} and "
            f"{len(generators)}: a fresh epoch begins")
    return resume if fits else None


def _prepare(accelerator: Accelerator, model: nn.Module, names: list[str] | None, trainees, train_loader,
             val_loader):
    """``accelerator.prepare`` the optimizers and loaders, and a plain model (DDP under ``accelerate launch``);
    a ``MemoryViT`` is only moved to the device, its tasks' gradients are reduced per task."""
    opts = [t.optimizer for t in trainees]
    loaders = [train_loader] + ([val_loader] if val_loader is not None else [])
    if names is None:
        model, *rest = accelerator.prepare(model, *opts, *loaders)
    else:
        model = model.to(accelerator.device)
        rest = accelerator.prepare(*opts, *loaders)  # at least two objects: a tuple
    for t, opt in zip(trainees, rest[:len(opts)], strict=True):
        t.optimizer = opt
    train_loader = rest[len(opts)]
    return model, train_loader, (rest[len(opts) + 1] if val_loader is not None else None)


def _forward(model: nn.Module, names: list[str] | None) -> Callable:
    if names is None:
        return lambda x, _names: {"": model(x)}
    return lambda x, live: model.forward_all(x, live)


def _postfix(run: Run) -> dict:
    live = [t for t in run.live if t.batches]
    if not live:
        return {}
    loss = sum(t.loss_sum / t.batches for t in live) / len(live)
    out = {"loss": f"{loss:.3f}", "lr": f"{live[0].schedule.get_last_lr()[0]:.3g}"}
    if run.several:
        out["tasks"] = f"{len(run.live)}/{len(run.trainees)}"
        best = [t.result.best_metric for t in run.trainees if t.result.best_metric is not None]
        if best:
            out["best_val"] = f"{max(best):.3f}"
    return out


def _close_row(run: Run, model: nn.Module, val_loader, epoch: int, step: int, total: int, bar) -> None:
    """A history row for every live task (train loss since the last row, lr, validation), then the log line."""
    live = run.live
    vals = _validate(run, model, val_loader, [t.name for t in live]) if val_loader is not None else {}
    parts = []
    for t in live:
        row = {"epoch": epoch, "step": step, "train_loss": t.loss_sum / max(t.batches, 1),
               "lr": t.schedule.get_last_lr()[0]}
        if t.name in vals:
            row.update(val_accuracy=vals[t.name]["accuracy"], val_loss=vals[t.name]["loss"])
            if t.result.record_val(vals[t.name], step) and run.restore_best:
                t.best = t.keep(t.best)
        t.result.history.append(row)
        t.loss_sum, t.batches = 0.0, 0
        extra = f"  val_acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
        parts.append(f"{t.name + ': ' if run.several else ''}train_loss {row['train_loss']:.4f}{extra}")
    model.train()
    if run.log is not None and run.accelerator.is_main_process and parts:
        bar.clear()
        run.log(f"epoch {epoch}  step {step}/{total}  " + "  |  ".join(parts))


def _validate(run: Run, model: nn.Module, val_loader, names: list[str]) -> dict[str, dict]:
    if names == [""]:
        unwrapped = run.accelerator.unwrap_model(model)
        return {"": evaluate(unwrapped, val_loader, accelerator=run.accelerator, bf16=run.bf16)}
    return evaluate_tasks(model, val_loader, names, accelerator=run.accelerator, bf16=run.bf16)


def _assemble(run: Run, steps: int, began: float, step: int, total: int, pos: _Position) -> FitResult:
    """The fit's result: one task's own at the top level, or every task's in ``tasks``; its state at ``pos``."""
    seconds = time.perf_counter() - began
    state = fit_state(run.trainees, step, total, **dataclasses.asdict(pos), rng=rng_states())
    for t in run.trainees:
        t.result.seconds = seconds
        t.result.state = state
    by_task = {t.name: t.result for t in run.trainees if t.name}
    if not run.several:
        return dataclasses.replace(run.trainees[0].result, steps=steps, tasks=by_task, state=state)
    return FitResult(steps=steps, seconds=seconds, tasks=by_task, state=state)
