"""Options several commands share, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse
import sys

from irformer.engine.fp16 import FP16_UNSAFE_ACTIONS
from irformer.engine.precision import AUTOCAST_DTYPES, PRECISIONS


class formatter(argparse.RawDescriptionHelpFormatter):
    """Every command's help: descriptions as written, and each option's default
    appended as ``(default: X)`` unless its help already says it or it has none
    (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default in (None, False, argparse.SUPPRESS)
            or default == []
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE ...``: config overrides, the same in every command taking a
    config (repeatable, several per flag; values are YAML: quote brackets for the shell,
    ``--set 'data.train=[a, b]'``)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config values (YAML), e.g. --set train.lr=1e-4 data.batch_size=8; "
        "quote values with brackets or spaces: --set 'data.train=[a, b]'",
    )


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option, hidden from ``--help``: stores into the new
    option's destination and warns once on stderr."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: object):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(
            f"irformer: warning: {option_string} is deprecated; use {self.new}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--precision`` (cast weights and features) and ``--autocast`` (fp32 weights,
    ops under torch.autocast): see :mod:`irformer.engine.precision`."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="cast weights and features to this dtype (the i-LN paper's W+F)",
    )
    parser.add_argument(
        "--autocast",
        choices=AUTOCAST_DTYPES,
        default=None,
        help="keep fp32 weights and run matmuls/convs under torch.autocast in this dtype "
        "(mixed precision, usual on GPUs); only with --precision fp32",
    )


def add_fp16_unsafe_argument(
    parser: argparse.ArgumentParser, *, fallback: str = "run in bf16", anyway: str = "black dots"
) -> None:
    """``--fp16-unsafe refuse|bf16|run``: what fp16 (``--precision`` or ``--autocast``)
    does with a model whose measured features would overflow fp16
    (:func:`irformer.engine.fp16.resolve_fp16_options`)."""
    parser.add_argument(
        "--fp16-unsafe",
        choices=FP16_UNSAFE_ACTIONS,
        default="refuse",
        help="what fp16 (--precision or --autocast) does with a model whose measured "
        f"features would overflow fp16: refuse (default; the message names the layer), "
        f"bf16 ({fallback} instead), or run fp16 anyway ({anyway})",
    )


def parse_levels(text: str | None, kind: type, flag: str) -> list:
    """``--sigma``/``--quality`` lists: ``"15,25,50"`` -> ``[15.0, 25.0, 50.0]`` (``kind``
    float or int); ``None`` -> ``[None]``. One parser, so eval and lowprec read them alike."""
    if text is None:
        return [None]
    values = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            values.append(kind(part.strip()))
        except ValueError:
            what = "a number" if kind is float else "an integer"
            raise ValueError(f"{flag} {text!r}: {part.strip()!r} is not {what}") from None
    if not values:
        raise ValueError(f"{flag} {text!r} names no value")
    return values
