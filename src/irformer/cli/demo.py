"""``irformer demo``: LN vs i-LN on a small SwinIR, CPU only, in minutes.

The pipeline and what it writes: :mod:`irformer.experiments.demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from irformer.cli.progress import ProgressBars
from irformer.experiments.demo import run_demo


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="LN vs i-LN on a small SwinIR (CPU, minutes, no downloads)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--out", default="irformer-demo", help="report folder")
    p.add_argument("--iters", type=int, default=1200, help="training iterations per model")
    p.add_argument("--probe-every", type=int, default=50, help="probe interval in iterations")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.iters < 1 or args.probe_every < 1:
        raise ValueError(
            f"--iters and --probe-every must be >= 1, got {args.iters}, {args.probe_every}"
        )
    with ProgressBars(unit="it", leave=True, disable=args.no_progress) as bars:
        result = run_demo(
            Path(args.out),
            iters=args.iters,
            probe_every=args.probe_every,
            lr=args.lr,
            seed=args.seed,
            progress=bars,
        )
    print(result.table)
    print(f"\nReport: {result.out / 'summary.md'} (plots and restored crops beside it)")
    return 0
