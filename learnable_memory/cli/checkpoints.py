"""What ``train`` writes and reads to continue: the settings it records and reuses (``training.json``),
the adapter folder written whole or not at all (also periodically, ``--save-every``; a sweep's folders all
or none), the optimizer state, schedule and data position and random states beside it
(``training_state.pt``), the folder a resumed run writes by default, and Ctrl-C / SIGTERM turned into one
line."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import data as D
from ..training import FitState
from .records import TRAINING_FILE
from .train_settings import RECORDED as RECORDED  # where its readers take it

#: Written beside the adapter: the optimizer state, schedule and data position, random states (a ``FitState``),
#: for --resume.
STATE_FILE = "training_state.pt"


def apply_recorded(args: argparse.Namespace, settings: dict) -> None:
    """Fill the options of ``RECORDED`` not given on the command line: from a resumed adapter's recorded
    ``settings``, else their defaults."""
    for key, default in RECORDED.items():
        if getattr(args, key) is None:
            setattr(args, key, settings.get(key, default))


def recorded(spec: str | Path) -> str:
    """An adapter spec as ``training.json`` records it: ``hf-hub:`` as given, a folder made absolute."""
    return str(spec) if str(spec).startswith("hf-hub:") else str(Path(spec).resolve())


def training_record(args: argparse.Namespace, plan, class_names: list[str], result, processes: int,
                    validation: dict | None, complete: bool = True) -> dict:
    """The ``training.json`` of the saved adapter (``plan``: the ``train`` command's ``Plan``); a resumed one adds
    to its steps and history."""
    previous = plan.previous
    start = plan.state.step if plan.state is not None else 0
    return dict(
        task=plan.task, data=plan.source if D.is_builtin(plan.source) else str(Path(plan.source).resolve()),
        class_subset=plan.subset if isinstance(plan.subset, str) else previous.get("class_subset"),
        class_names=class_names, base=plan.spec, extends=[recorded(e) for e in plan.extend],
        settings=dict(steps=result.steps, processes=processes, **{k: getattr(args, k) for k in RECORDED}) | {
            "init_seed": args.seed if args.init_seed is None else args.init_seed},  # --init-seed's default: --seed
        validation=validation,
        total_steps=previous.get("total_steps", 0) - start + result.state.step,
        planned_steps=result.state.total, complete=complete,
        resumed_from=recorded(args.resume) if args.resume else None,
        history=previous.get("history", []) + result.history,
        val_accuracy=result.val.get("accuracy"))


def adapter_writer(model, task: str, record: dict, state: FitState) -> Callable[[Path], None]:
    """``write(folder)``: the adapter of ``task``, its ``training.json`` and its ``training_state.pt`` (the
    optimizer state, schedule and data position, random states) in ``folder``."""

    def write(folder: Path) -> None:
        model.save_adapter(folder, task=task)
        (folder / TRAINING_FILE).write_text(json.dumps(record, indent=2))
        torch.save(state.as_dict(), folder / STATE_FILE)

    return write


def save_adapter_run(model, out: Path, task: str, record: dict, state: FitState) -> Path:
    """The adapter, its ``training.json`` and its ``training_state.pt``, put in place of ``out`` whole."""
    return save_run(out, adapter_writer(model, task, record, state))




def read_state(folder: Path) -> FitState | None:
    """The :class:`FitState` saved in an adapter folder, or None (an adapter saved without one)."""
    f = Path(folder) / STATE_FILE
    if not f.is_file():
        return None
    try:
        return FitState.from_dict(torch.load(f, map_location="cpu", weights_only=True))
    except Exception as e:  # a damaged file: say which and how to go on
        raise ValueError(f"{f} can not be read ({type(e).__name__}: {e}); delete it to resume with a fresh "
                         "optimizer and schedule") from e


def resumed_folder(folder: Path) -> Path:
    """Where a resumed run writes by default: ``NAME-resumed`` beside ``folder`` (``-resumed-2`` ... when taken),
    so the adapter it continues is never written over."""
    stem = re.sub(r"-resumed(-\d+)?$", "", folder.name)
    for i in range(1, 10_000):
        out = folder.with_name(f"{stem}-resumed" + (f"-{i}" if i > 1 else ""))
        if not out.exists():
            return out
    raise FileExistsError(f"{folder.parent} holds 10,000 resumed copies of {stem}; pass --out")


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while a folder is swapped in (they arrive right after)."""
    held = {signal.SIGINT, signal.SIGTERM}
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    if main:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def save_run(out: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder with ``write(folder)`` beside ``out``, then put it in the place of ``out``: a reader
    (or an interrupted run) sees the old folder or the new one, never half of one."""
    return save_runs([(out, write)])[0]


def save_runs(runs: list[tuple[Path, Callable[[Path], None]]]) -> list[Path]:
    """:func:`save_run` for several folders: every one written first, then all put in place (renames only),
    so a run stopped while writing (even by kill -9) leaves the previous folders as they were."""
    pid, places = os.getpid(), []
    for out, _ in runs:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        places.append((out, out.with_name(f".{out.name}.writing-{pid}"), out.with_name(f".{out.name}.old-{pid}")))
    try:
        for (_, tmp, _), (_, write) in zip(places, runs, strict=True):
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
        with _signals_held():
            for out, tmp, old in places:
                if out.exists():
                    out.rename(old)
                tmp.rename(out)
    finally:
        for _, tmp, _ in places:
            shutil.rmtree(tmp, ignore_errors=True)
    for _, _, old in places:
        shutil.rmtree(old, ignore_errors=True)
    return [out for out, _, _ in places]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, like Ctrl-C's ``KeyboardInterrupt``."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises :class:`Terminated` (in the main thread; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def report_interrupt(e: KeyboardInterrupt, out: Path, saved_step: int | None, prog: str) -> int:
    """One line on stderr for an interrupted run; the exit status (130 for Ctrl-C, 143 for SIGTERM)."""
    what = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
    if saved_step is None:
        where = "nothing was saved (no --save-every checkpoint yet)"
    else:
        where = f"the checkpoint of step {saved_step} is in {out}; continue with: {prog} train --resume {out}"
    print(f"{prog}: interrupted ({what}): {where}", file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130
