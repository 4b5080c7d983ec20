"""``irformer data``: make training data fast to read (DIV2K / Flickr2K / DF2K or any HR folder).

irformer data prepare SRC [SRC ...] --out DIR   sub-images, MATLAB-bicubic LR, manifest, packs
irformer data verify DIR                        recompute every checksum of a prepared folder

Train on the result with
``--set data.train=[DIR/HR] data.train_lq=[DIR/LR_bicubic/X4]`` (folders) or
``--set data.train=[DIR/packs/HR.irpack] data.train_lq=[DIR/packs/LR_bicubic_X4.irpack]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare training data (sub-images, LR, manifest, packs) and verify it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser(
        "prepare",
        help="cut HR images into sub-images with MATLAB-bicubic LR per scale (resumable)",
        description="Cut HR images into overlapping sub-images (BasicSR's extract_subimages "
        "geometry), make their LR with MATLAB-exact bicubic once per scale, list every file "
        "with its sha256 in manifest.jsonl, and optionally pack each split into one file. "
        "A rerun skips finished images.",
    )
    p.add_argument("sources", nargs="+", type=Path, metavar="SRC", help="HR folders or images")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--crop", type=int, default=480, help="sub-image side (HR pixels)")
    p.add_argument("--step", type=int, default=240, help="distance between sub-image origins")
    p.add_argument(
        "--thresh",
        type=int,
        default=0,
        help="uncovered border pixels tolerated before a window flush with the border is added",
    )
    p.add_argument(
        "--scales",
        type=_int_list,
        default=(2, 3, 4),
        help="LR scales, comma-separated ('' for HR only: denoising/JPEG)",
    )
    p.add_argument("--compression", type=int, default=3, help="PNG compression level 0-9")
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="worker processes (0: this process)",
    )
    p.add_argument(
        "--pack",
        choices=("raw", "png"),
        help="also write one .irpack per split: raw pixels (fastest, ~4x the PNG size) or PNG",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)

    p = sub.add_parser("verify", help="recompute every checksum of a prepared folder")
    p.add_argument("out", type=Path, metavar="DIR")
    p.set_defaults(func=run_verify)


def run_prepare(args: argparse.Namespace) -> int:
    from irformer.data.prepare import PrepareSettings, prepare_dataset

    settings = PrepareSettings(
        crop=args.crop,
        step=args.step,
        thresh=args.thresh,
        scales=args.scales,
        compression=args.compression,
    )
    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            bar = tqdm(total=total, initial=done, unit="img", dynamic_ncols=True)
        else:
            bar.update(done - bar.n)

    try:
        result = prepare_dataset(
            args.sources,
            args.out,
            settings,
            workers=args.workers,
            pack=args.pack,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    print(
        f"{result.out}: {result.sources} source image(s), {result.prepared} prepared now, "
        f"{result.skipped} finished earlier; {result.files} files in manifest.jsonl"
    )
    for split, path in result.packs.items():
        print(f"  pack {split}: {path}")
    if settings.scales:
        s = settings.scales[-1]
        print(
            f"train with: --set data.train=[{result.out / 'HR'}] "
            f"data.train_lq=[{result.out / f'LR_bicubic/X{s}'}]  (x{s})"
        )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from irformer.data.prepare import verify_prepared

    problems = verify_prepared(args.out)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{args.out}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.out}: every file and pack record matches its checksum")
    return 0
