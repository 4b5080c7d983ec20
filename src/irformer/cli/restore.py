"""``irformer restore``: restore image files and folders with a model.

irformer restore IMG_OR_DIR... -o OUTDIR [--model CKPT_OR_PRESET]
    [--tile N [--tile-overlap M] [--tile-blend mean|ramp] | --exact-chunk K]
    [--ensemble] [--precision fp32|bf16|fp16] [--device auto|cpu|cuda] [--overwrite]

Large images: ``--tile`` splits the input into overlapping tiles (fine for LN
models; i-LN models normalise with whole-image statistics, so tiles disagree);
``--exact-chunk K`` runs the whole image with attention in chunks of K windows,
in bounded memory, with the same result as an unlimited-memory pass.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from torch import nn

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
"""Reference checkpoints shipped with the package (``irformer/weights``)."""

DEFAULT_WEIGHTS_STEM = "swinir_light_x2_iln"
"""Preferred default when the weights folder holds several checkpoints."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "restore",
        help="restore image files/folders (tiling, exact large-image path, x8 ensemble, bf16/fp16)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUTDIR", help="output folder")
    p.add_argument(
        "--model",
        help="checkpoint (.pth/.safetensors) or preset name (untrained weights); "
        "default: the reference checkpoint in irformer/weights, when present",
    )
    p.add_argument("--param-key", help="state-dict key in a .pth (params_ema, params, ...)")
    large = p.add_mutually_exclusive_group()
    large.add_argument("--tile", type=int, metavar="N", help="tile size in input pixels")
    large.add_argument(
        "--exact-chunk",
        type=int,
        metavar="K",
        help="exact bounded-memory path: window attention in chunks of K windows",
    )
    p.add_argument("--tile-overlap", type=int, default=32, metavar="M", help="tile overlap")
    p.add_argument("--tile-blend", choices=("mean", "ramp"), default="mean")
    p.add_argument("--ensemble", action="store_true", help="x8 self-ensemble (flips, rotations)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--ext",
        default=".png",
        help="output suffix (.png, .tif, .bmp, .jpg) or 'keep' for the input's own",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="skip the fp16 overflow check (an fp32 probe on a crop of the first image)",
    )
    p.set_defaults(func=run)


def default_checkpoint(weights_dir: Path = WEIGHTS_DIR) -> Path | None:
    """The shipped reference checkpoint: the only one, or ``DEFAULT_WEIGHTS_STEM``."""
    if not weights_dir.is_dir():
        return None
    files = sorted(
        p for p in weights_dir.iterdir() if p.suffix in (".safetensors", ".pth") and p.is_file()
    )
    if len(files) == 1:
        return files[0]
    for p in files:
        if p.stem == DEFAULT_WEIGHTS_STEM:
            return p
    return None


def load_model(spec: str | None, *, param_key: str | None = None) -> tuple[nn.Module, str]:
    """``(model in eval mode, description)`` for ``--model`` (or the default checkpoint)."""
    from irformer.archs import build_model, load_checkpoint_model

    if spec is None:
        path = default_checkpoint()
        if path is None:
            raise ValueError(
                f"no reference checkpoint in {WEIGHTS_DIR} to default to; pass --model "
                "CKPT_OR_PRESET"
            )
        spec = str(path)
    path = Path(spec)
    if path.is_file():
        kwargs = {"param_key": param_key} if param_key else {}
        model, meta = load_checkpoint_model(path, **kwargs)
        return model.eval(), f"{path} ({meta.get('arch')}, norm={meta.get('norm')})"
    if path.suffix in (".pth", ".pt", ".safetensors") or "/" in spec:
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    model = build_model(spec)
    logger.warning("model %r built from its preset with untrained (random) weights", spec)
    return model.eval(), f"preset {spec} (untrained)"


def run(args: argparse.Namespace) -> int:
    from irformer.engine.evaluate import resolve_device
    from irformer.engine.infer import RestoredFile, RestoreOptions, restore_files

    options = RestoreOptions(
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        tile_blend=args.tile_blend,
        chunk_windows=args.exact_chunk,
        ensemble=args.ensemble,
        precision=args.precision,
    )
    model, described = load_model(args.model, param_key=args.param_key)
    device = resolve_device(args.device)
    model = model.to(device)
    print(f"model: {described}; device {device}; precision {args.precision}", file=sys.stderr)

    def show(done: RestoredFile) -> None:
        h, w = done.output_size
        note = "" if done.report.finite else f"  WARNING {done.report.summary()}"
        print(f"{done.source} -> {done.output} ({w}x{h}, {done.seconds:.2f} s){note}")

    results = restore_files(
        model,
        args.inputs,
        args.out,
        options,
        overwrite=args.overwrite,
        ext=None if args.ext == "keep" else args.ext,
        guard=not args.no_guard,
        on_done=show,
    )
    bad = sum(not r.report.finite for r in results)
    print(
        f"restored {len(results)} image(s) into {args.out}"
        + (f"; {bad} with non-finite pixels (written as black)" if bad else ""),
        file=sys.stderr,
    )
    return 0
