"""``irformer restore``: restore image files and folders with a model.

irformer restore IMG_OR_DIR... -o OUTDIR [--model CKPT_OR_PRESET | --scale 2|4]
    [--tile N [--tile-overlap M] [--tile-blend mean|ramp] | --exact-chunk K]
    [--ensemble] [--precision fp32|bf16|fp16 [--fp16-unsafe refuse|bf16|run]]
    [--device auto|cpu|cuda] [--backend torch|onnx] [--overwrite | --skip-existing]

Large images: ``--tile`` splits the input into overlapping tiles (fine for LN
models; i-LN models normalise with whole-image statistics, so tiles disagree);
``--exact-chunk K`` runs the whole image with attention in chunks of K windows,
in bounded memory, with the same result as an unlimited-memory pass.

fp16: the model's feature magnitudes are measured on a crop of the first image
first; a model that would overflow fp16 is refused, naming the layer, or run in
bf16 with ``--fp16-unsafe bf16`` (``--no-guard`` skips the check).

ONNX: ``--backend onnx --model FILE.onnx`` (implied by a ``.onnx`` model) runs an
exported file in ONNX Runtime with the same tiling and ensemble options; the
file's own precision applies, and ``--exact-chunk`` does not (the graph always
computes the whole image: the exact path's output without its memory bound).

Folders: an input that cannot be read is reported and skipped; the others are
restored, the unreadable ones are listed at the end and the exit status is 1.
``--skip-existing`` makes a rerun skip outputs that are complete (decodable and
``scale`` times the input's size) and redo incomplete ones. Inputs are never
overwritten; existing outputs only with ``--overwrite``.
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

DEFAULT_WEIGHTS_STEM = "swinir_light_x{scale}_iln"
"""Preferred default (formatted with the scale) when the weights folder holds several."""


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
    p.add_argument(
        "--scale",
        type=int,
        default=None,
        help="SR scale; without --model it picks the shipped reference checkpoint "
        "(2 or 4, default 2), with --model it must match the checkpoint's",
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
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    existing.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip inputs whose output exists and is complete (decodes, right size); "
        "redo incomplete ones",
    )
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="skip the fp16 overflow check (an fp32 probe on a crop of the first image)",
    )
    p.add_argument(
        "--fp16-unsafe",
        choices=("refuse", "bf16", "run"),
        default="refuse",
        help="what --precision fp16 does with a model whose features would overflow fp16: "
        "refuse (default), run in bf16, or run fp16 anyway (black dots)",
    )
    p.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default=None,
        help="run the model in PyTorch or an exported .onnx file in ONNX Runtime "
        "(default: onnx for a .onnx --model, else torch)",
    )
    p.set_defaults(func=run)


def default_checkpoint(weights_dir: Path = WEIGHTS_DIR, *, scale: int = 2) -> Path | None:
    """The shipped reference checkpoint for ``scale``: ``DEFAULT_WEIGHTS_STEM``, or the
    folder's only checkpoint (its scale is checked when it is loaded)."""
    if not weights_dir.is_dir():
        return None
    files = sorted(
        p for p in weights_dir.iterdir() if p.suffix in (".safetensors", ".pth") and p.is_file()
    )
    for p in files:
        if p.stem == DEFAULT_WEIGHTS_STEM.format(scale=scale):
            return p
    return files[0] if len(files) == 1 else None


def load_model(
    spec: str | None, *, param_key: str | None = None, scale: int | None = None
) -> tuple[nn.Module, str]:
    """``(model in eval mode, description)`` for ``--model`` (or the default checkpoint
    for ``scale``); a model whose scale differs from a given ``scale`` is an error."""
    from irformer.archs import build_model, load_checkpoint_model

    if spec is None:
        path = default_checkpoint(scale=scale or 2)
        if path is None:
            raise ValueError(
                f"no reference checkpoint for scale {scale or 2} in {WEIGHTS_DIR} to default "
                "to; pass --model CKPT_OR_PRESET"
            )
        spec = str(path)
    path = Path(spec)
    if path.is_file():
        kwargs = {"param_key": param_key} if param_key else {}
        model, meta = load_checkpoint_model(path, **kwargs)
        described = f"{path} ({meta.get('arch')}, norm={meta.get('norm')})"
    elif path.suffix in (".pth", ".pt", ".safetensors") or "/" in spec:
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    else:
        model = build_model(spec)
        logger.warning("model %r built from its preset with untrained (random) weights", spec)
        described = f"preset {spec} (untrained)"
    own = int(getattr(model, "upscale", 1))
    if scale is not None and own != scale:
        raise ValueError(f"--scale {scale} but {described} restores at scale {own}")
    return model.eval(), described


def load_onnx_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """``(ONNX Runtime model, description)`` for ``--backend onnx``; refuses the options
    that do not apply to an exported graph."""
    from irformer.export.onnx_runtime import OnnxRuntimeModel

    if args.model is None or Path(args.model).suffix.lower() != ".onnx":
        raise ValueError("--backend onnx needs --model FILE.onnx (irformer models export)")
    if args.exact_chunk is not None:
        raise ValueError(
            "--exact-chunk is a way of executing the PyTorch model; an ONNX graph always "
            "computes the whole image (the exact path's output, without its memory bound): "
            "use --tile for large images or --backend torch"
        )
    model = OnnxRuntimeModel(args.model)
    if args.precision != "fp32":
        raise ValueError(
            f"--precision {args.precision}: an ONNX file runs in its own precision (this one: "
            f"{model.precision}); export an fp16 file for fp16"
        )
    if args.device not in ("auto", "cpu"):
        raise ValueError(f"--device {args.device}: the ONNX backend runs on the CPU provider")
    if args.scale is not None and model.upscale != args.scale:
        raise ValueError(f"--scale {args.scale} but {args.model} restores at scale {model.upscale}")
    meta = model.irformer_meta
    described = (
        f"{args.model} (ONNX Runtime, {model.precision}; {meta.get('arch', 'no irformer metadata')}"
        f", norm={meta.get('norm', '?')})"
    )
    return model, described


def run(args: argparse.Namespace) -> int:
    from irformer.engine.evaluate import resolve_device
    from irformer.engine.infer import RestoredFile, RestoreOptions, restore_files

    backend = args.backend or (
        "onnx" if args.model and Path(args.model).suffix.lower() == ".onnx" else "torch"
    )
    if backend == "torch" and args.model and Path(args.model).suffix.lower() == ".onnx":
        raise ValueError(f"{args.model} is an ONNX file: use --backend onnx")
    options = RestoreOptions(
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        tile_blend=args.tile_blend,
        chunk_windows=args.exact_chunk,
        ensemble=args.ensemble,
        precision=args.precision,
    )
    if backend == "onnx":
        model, described = load_onnx_model(args)
        device = resolve_device("cpu")
    else:
        model, described = load_model(args.model, param_key=args.param_key, scale=args.scale)
        device = resolve_device(args.device)
        model = model.to(device)
    print(f"model: {described}; device {device}; precision {args.precision}", file=sys.stderr)

    def show(done: RestoredFile) -> None:
        h, w = done.output_size
        note = "" if done.report.finite else f"  WARNING {done.report.summary()}"
        print(f"{done.source} -> {done.output} ({w}x{h}, {done.seconds:.2f} s){note}")

    result = restore_files(
        model,
        args.inputs,
        args.out,
        options,
        overwrite=args.overwrite,
        skip_existing=args.skip_existing,
        ext=None if args.ext == "keep" else args.ext,
        guard=not args.no_guard,
        on_done=show,
        fp16_unsafe=args.fp16_unsafe,
    )
    bad = sum(not r.report.finite for r in result.restored)
    print(
        f"restored {len(result.restored)} image(s) into {args.out}"
        + (f"; {len(result.skipped)} complete output(s) skipped" if result.skipped else "")
        + (f"; {bad} with non-finite pixels (written as black)" if bad else ""),
        file=sys.stderr,
    )
    if result.failed:
        print(f"irformer restore: {len(result.failed)} input(s) not restored:", file=sys.stderr)
        for failed in result.failed:
            print(f"  {failed.source}: {failed.error}", file=sys.stderr)
        return 1
    return 0
