"""Options several commands share, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse

from irformer.engine.precision import AUTOCAST_DTYPES, PRECISIONS


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--precision`` (cast weights and features) and ``--autocast`` (fp32 weights,
    ops under torch.autocast): see :mod:`irformer.engine.precision`."""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="cast weights and features to this dtype (the i-LN paper's W+F) (default: fp32)",
    )
    parser.add_argument(
        "--autocast",
        choices=AUTOCAST_DTYPES,
        default=None,
        help="keep fp32 weights and run matmuls/convs under torch.autocast in this dtype "
        "(mixed precision, usual on GPUs); only with --precision fp32",
    )
