"""``train --sweep KEY=V1,V2``: the sweepable options and how an axis parses, importable without torch
(the parser of ``train`` takes them; :mod:`.sweep` runs the grid)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .options import non_negative_float, non_negative_int, positive_float

#: Sweepable options: the option's name -> (its ``args`` attribute, how a value parses). ``seed`` (or its
#: other name ``init-seed``) is ``--init-seed``, the seed of the configuration's initialisation: the data
#: order and split keep the run's ``--seed``, so a configuration of ``seed=S`` is ``train --init-seed S``.
SWEEPABLE: dict[str, tuple[str, Callable[[str], object]]] = {
    "lr": ("lr", positive_float),
    "memory-lr-scale": ("memory_lr_scale", positive_float),
    "weight-decay": ("weight_decay", non_negative_float),
    "n-mem": ("n_mem", non_negative_int),
    "init-std": ("init_std", positive_float),
    "seed": ("init_seed", non_negative_int),
    "init-seed": ("init_seed", non_negative_int),
    "warmup": ("warmup", non_negative_float),
    "clip": ("clip", positive_float),
    "optimizer": ("optimizer", lambda v: v if v in ("sgd", "adamw") else _bad(f"{v!r} is not sgd or adamw")),
}


def _bad(message: str):
    raise argparse.ArgumentTypeError(message)


def sweep_axis(text: str) -> tuple[str, list]:
    """``"lr=0.03,0.1"`` -> ``("lr", [0.03, 0.1])``: the ``--sweep`` option's type."""
    key, sep, values = text.partition("=")
    if not sep or not values:
        _bad(f"takes KEY=V1,V2,... (e.g. lr=0.03,0.1), got {text!r}")
    if key not in SWEEPABLE:
        _bad(f"can not sweep {key!r}: sweepable are {', '.join(SWEEPABLE)}")
    parse = SWEEPABLE[key][1]
    out = []
    for v in values.split(","):
        try:
            out.append(parse(v.strip()))
        except (argparse.ArgumentTypeError, ValueError) as e:
            _bad(f"{key}={v!r}: {e}")
    if len(set(map(str, out))) != len(out):
        _bad(f"{key} lists a value twice: {values}")
    return key, out
