"""The ``learnable-memory`` command line.

    learnable-memory train --data digits --n-mem 5 --steps 300 --out adapters/digits
    learnable-memory eval adapters/digits adapters/fmnist
    learnable-memory predict shoe.png --adapter adapters/digits hf-hub:owner/repo
    learnable-memory inspect adapters/digits
    learnable-memory demo

Commands are found, not listed: every module of this package that defines ``add_parser(subparsers)``
(:class:`CommandModule`) is a command, so a new command is one new file. ``HELP_ORDER`` places the
commands it names first in ``--help``; the others follow in module-name order.

Errors: bad input (a missing file, an unknown model, an adapter made for another backbone, a bad
option value) prints one line, ``learnable-memory: error: ...``, and exits with status 2; ``--debug``
shows the traceback. These are the exceptions of ``EXPECTED_ERRORS`` and argparse's own. Anything
else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn, Protocol, runtime_checkable

from ..registry import UnsupportedModelError
from .base import create_base
from .records import TRAINING_FILE, read_training_info

__all__ = ["EXPECTED_ERRORS", "PROG", "TRAINING_FILE", "CommandModule", "build_parser", "command_modules",
           "create_base", "main", "read_training_info"]

PROG = "learnable-memory"
#: Command modules shown first in ``--help``, in this order.
HELP_ORDER = ("train", "evaluate", "predict", "serve", "inspect", "demo")
#: Errors that come from bad input: reported in one line. ``AdapterError`` is a ``ValueError``.
EXPECTED_ERRORS = (OSError, ValueError, UnsupportedModelError)

@runtime_checkable
class CommandModule(Protocol):
    """A module of this package that is a command.

    ``add_parser(subparsers)`` adds the command's parser with ``subparsers.add_parser(NAME, help=...,
    description=...)``, its options, and its handler with ``parser.set_defaults(run=handler)``; it
    returns the parser. The handler takes the parsed arguments and returns the exit status. Shared
    options: ``add_model_options``/``base_spec``/``create_base`` (:mod:`.base`), adapters and
    ``training.json`` (:mod:`.records`), value types (:mod:`.options`).
    """

    def add_parser(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser: ...


class Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def command_modules() -> list[ModuleType]:
    """Every command module of this package: ``HELP_ORDER`` first, then by name."""
    names = sorted((i.name for i in pkgutil.iter_modules(__path__)),
                   key=lambda n: (HELP_ORDER.index(n) if n in HELP_ORDER else len(HELP_ORDER), n))
    modules = [importlib.import_module(f"{__name__}.{n}") for n in names]
    return [m for m in modules if isinstance(m, CommandModule)]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command found by :func:`command_modules`, each with ``--debug``."""
    parser = Parser(prog=PROG, description=(
        "Fine-tune frozen timm Vision Transformers with learnable memory (Sandler et al., CVPR 2022) "
        "and serve many tasks in one forward pass."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in command_modules():
        p = module.add_parser(sub)
        if not callable(p.get_default("run")):
            raise TypeError(f"{module.__name__}.add_parser must set its handler: parser.set_defaults(run=handler)")
    for p in [parser, *{id(p): p for p in sub.choices.values()}.values()]:
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``learnable-memory``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except EXPECTED_ERRORS as e:
        if vars(args).get("debug", False):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
