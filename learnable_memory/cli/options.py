"""Value types of command-line options: each checks its value where argparse reads it, so a bad value
is a one-line error naming the option (``argument --top-k: ...``), not a failure deep inside a command."""

from __future__ import annotations

import argparse
import json


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, steps, top-k, limits)."""
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (memory tokens, worker processes)."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates and their scales)."""
    value = _number(text, float, "a number > 0")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay, warm-up)."""
    value = _number(text, float, "a number >= 0")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a share of the images)."""
    value = _number(text, float, "a number between 0 and 1")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {text}")
    return value


def task_name(text: str) -> str:
    """A task name: not empty (the library checks the rest)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a task name can not be empty")
    return text


def json_object(text: str) -> dict:
    """A JSON object, e.g. ``'{"img_size": 28}'``."""
    example = "e.g. '{\"img_size\": 28}'"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, {example}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, {example}; got a JSON {type(value).__name__}")
    return value


def add_adapter_options(p: argparse.ArgumentParser) -> None:
    """``--no-fingerprint-check``, which :func:`~.records.load_named_adapters` reads as ``check_fingerprint``."""
    p.add_argument("--no-fingerprint-check", action="store_true",
                   help="load adapters onto a backbone whose weights are not byte-identical to the one they were "
                        "trained on (only when you know the weights are equivalent)")
