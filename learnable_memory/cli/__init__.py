"""The ``learnable-memory`` command line.

    learnable-memory train --data digits --n-mem 5 --steps 300 --out adapters/digits
    learnable-memory eval adapters/digits adapters/fmnist
    learnable-memory predict shoe.png --adapter adapters/digits hf-hub:owner/repo
    learnable-memory inspect adapters/digits
    learnable-memory demo

Commands are found, not listed: every module of this package that defines ``add_parser(subparsers)``
(:class:`CommandModule`) is a command, so a new command is one new file. ``HELP_ORDER`` places the
commands it names first in ``--help``; the others follow in module-name order.

Start-up: only the command that runs is imported. The name and help line of the others are read from
their source (the literal arguments of their ``subparsers.add_parser(NAME, help=...)`` call), so
``learnable-memory --help`` and ``learnable-memory COMMAND --help`` import no torch unless that command's
module does at its top. A module whose call does not give them as literals is imported to find out.

Errors: bad input (a missing file, an unknown model, an adapter made for another backbone, a bad
option value) prints one line, ``learnable-memory: error: ...``, and exits with status 2; ``--debug``
shows the traceback. These are the exceptions of ``EXPECTED_ERRORS`` and argparse's own. Anything
else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NoReturn, Protocol, runtime_checkable

from .base import create_base

__all__ = ["EXPECTED_ERRORS", "PROG", "TRAINING_FILE", "CommandModule", "build_parser", "command_modules",
           "create_base", "main", "read_training_info"]

PROG = "learnable-memory"
#: Command modules shown first in ``--help``, in this order.
HELP_ORDER = ("train", "evaluate", "predict", "serve", "inspect", "demo")


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that come from bad input: reported in one line. ``AdapterError`` is a ``ValueError``."""
    from ..registry import UnsupportedModelError

    return (OSError, ValueError, UnsupportedModelError)


def __getattr__(name: str) -> Any:
    """``EXPECTED_ERRORS``, ``TRAINING_FILE`` and ``read_training_info``, imported on first use (they import
    torch)."""
    if name == "EXPECTED_ERRORS":
        return expected_errors()
    if name in ("TRAINING_FILE", "read_training_info"):
        from . import records

        return getattr(records, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@runtime_checkable
class CommandModule(Protocol):
    """A module of this package that is a command.

    ``add_parser(subparsers)`` adds the command's parser with ``subparsers.add_parser(NAME, help=...,
    description=...)`` (NAME and help as string literals, so ``--help`` can list the command without
    importing it), its options, and its handler with ``parser.set_defaults(run=handler)``; it returns the
    parser. The handler takes the parsed arguments and returns the exit status. Import what the command
    needs to run (torch, timm, ...) inside the handler, so that other commands and ``--help`` start fast.
    Shared options: ``add_model_options``/``base_spec``/``create_base`` (:mod:`.base`), adapters and
    ``training.json`` (:mod:`.records`), value types (:mod:`.options`).
    """

    def add_parser(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser: ...


@dataclass(frozen=True)
class CommandInfo:
    """A command module as read from its source: its module name, and the command's name and help line
    (None when its ``add_parser`` does not give them as literals: then only importing it tells)."""

    module: str
    name: str | None
    help: str | None


class Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _read_command(module: str) -> CommandInfo | None:
    """The command ``module`` defines, read from its source without importing it; None if it defines no
    ``add_parser`` (not a command)."""
    spec = importlib.util.find_spec(module)
    try:
        tree = ast.parse(open(spec.origin, encoding="utf-8").read())  # noqa: SIM115 - read at once
    except (OSError, SyntaxError, TypeError):  # no source file: import it to find out
        return CommandInfo(module, None, None)
    adders = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "add_parser"]
    if not adders:
        return None
    for call in ast.walk(adders[0]):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "add_parser" \
                and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
            helps = [k.value for k in call.keywords if k.arg == "help"]
            if not helps or isinstance(helps[0], ast.Constant) and isinstance(helps[0].value, str):
                return CommandInfo(module, call.args[0].value, helps[0].value if helps else None)
    return CommandInfo(module, None, None)


def command_infos() -> list[CommandInfo]:
    """Every command module of this package, read from source: ``HELP_ORDER`` first, then by name."""
    names = sorted((i.name for i in pkgutil.iter_modules(__path__)),
                   key=lambda n: (HELP_ORDER.index(n) if n in HELP_ORDER else len(HELP_ORDER), n))
    infos = [_read_command(f"{__name__}.{n}") for n in names]
    return [i for i in infos if i is not None]


def command_modules() -> list[ModuleType]:
    """Every command module of this package (imported): ``HELP_ORDER`` first, then by name."""
    modules = [importlib.import_module(i.module) for i in command_infos()]
    return [m for m in modules if isinstance(m, CommandModule)]


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command found by :func:`command_infos`, each with ``--debug``.

    Args:
        commands: The commands to build in full (importing their modules); the others are only listed,
            by the name and help line read from their source. None: all of them.
    """
    parser = Parser(prog=PROG, description=(
        "Fine-tune frozen timm Vision Transformers with learnable memory (Sandler et al., CVPR 2022) "
        "and serve many tasks in one forward pass."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in command_infos():
        if info.name is not None and commands is not None and info.name not in commands:
            sub.add_parser(info.name, help=info.help)  # listed in --help; never parses: its command did not run
            continue
        module = importlib.import_module(info.module)
        if not isinstance(module, CommandModule):
            continue
        p = module.add_parser(sub)
        if not callable(p.get_default("run")):
            raise TypeError(f"{module.__name__}.add_parser must set its handler: parser.set_defaults(run=handler)")
    for p in [parser, *{id(p): p for p in sub.choices.values()}.values()]:
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``learnable-memory``; returns the exit status. Only the command named in ``argv`` is
    imported (the top-level options, ``--help`` and ``--debug``, take no value, so it is the first word that
    is not an option)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser([command] if command else []).parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:
        if not isinstance(e, expected_errors()) or vars(args).get("debug", False):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
