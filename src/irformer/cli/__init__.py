"""Command-line entry point.

Each sub-command lives in its own module under ``irformer.cli`` and exposes
``register(subparsers)``; the module parses arguments and calls one library
function. The console (tables, progress bars) belongs here, never to the library.

Exit status: 0 done; 1 done but with failures the command reports (an image
that could not be read, non-finite outputs); 2 refused with one line on stderr
(bad input: see :func:`is_input_error`). Any other exception is a bug or an
environment failure and keeps its traceback (as does everything with ``-v``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from types import TracebackType

from irformer.errors import IrformerError

# Sub-command modules, in the order they appear in ``irformer --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "demo",
    "train",
    "data",
    "eval",
    "restore",
    "analyze",
    "study",
    "lowprec",
    "compress",
    "models",
)


def _version() -> str:
    import torch

    import irformer

    return f"irformer {irformer.__version__} (torch {torch.__version__})"


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every sub-command parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += _all_parsers(child)
    return found


def build_parser() -> argparse.ArgumentParser:
    from irformer.cli.options import formatter

    parser = argparse.ArgumentParser(prog="irformer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"irformer.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"irformer.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    for each in _all_parsers(parser):
        each.formatter_class = formatter  # one help layout: text as written, defaults shown
    return parser


def _raised_by_irformer(tb: TracebackType | None) -> bool:
    """True when the innermost frame of ``tb`` is irformer's own code (a check of
    its own), not a library it called (where the same class means a bug)."""
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return module == "irformer" or module.startswith("irformer.")


def is_input_error(exc: BaseException) -> bool:
    """Whether ``exc`` is reported as one line (exit 2) rather than a traceback.

    That is every :class:`~irformer.errors.IrformerError`; an ``OSError`` naming
    a file (not found, permission denied, read-only...); and a ``ValueError``,
    ``KeyError``, ``FileNotFoundError`` or ``FileExistsError`` raised by
    irformer's own argument checks (the library's convention for bad values).
    """
    if isinstance(exc, IrformerError):
        return True
    if isinstance(exc, OSError) and exc.filename is not None:
        return True
    return isinstance(exc, ValueError | KeyError | OSError) and _raised_by_irformer(
        exc.__traceback__
    )


def error_message(exc: BaseException) -> str:
    """The message alone (a KeyError's own text, not its repr); one line except
    where irformer lays out a list on purpose (a checkpoint's mismatched keys)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    return text.strip() or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from irformer.engine.runtime import tune_cpu_allocator

    parser = build_parser()
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # keep freed tensor memory mapped (see irformer.engine.runtime)
    from irformer.cli.progress import TqdmLoggingHandler

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[TqdmLoggingHandler()],
    )
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (``irformer models list | head``): not an error. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if args.verbose or not is_input_error(exc):
            raise
        print(f"irformer {args.command}: error: {error_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
