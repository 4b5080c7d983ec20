"""Command-line entry point.

Each sub-command lives in its own module under ``irformer.cli`` and exposes
``register(subparsers)``; the module parses arguments and calls one library
function. The console (tables, progress bars) belongs here, never to the library.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="irformer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"irformer.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"irformer.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from irformer.engine.runtime import tune_cpu_allocator

    parser = build_parser()
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # keep freed tensor memory mapped (see irformer.engine.runtime)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as exc:
        if args.verbose:
            raise
        print(f"irformer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
