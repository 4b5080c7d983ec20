"""``irformer restore``: restore image files and folders with a model.

irformer restore IMG_OR_DIR... -o OUTDIR [--model CKPT_OR_NAME | --scale 2|4 | --task dn|car]
    [--tile N [--tile-overlap M] [--tile-blend mean|ramp] | --exact-chunk K]
    [--ensemble] [--precision fp32|bf16|fp16] [--autocast bf16|fp16]
    [--fp16-unsafe refuse|bf16|run] [--device auto|cpu|cuda] [--backend torch|onnx]
    [--alpha keep|drop] [--overwrite | --skip-existing]

Without --model, the shipped i-LN reference model of the task runs: x2 or x4
super-resolution (``--scale``), colour denoising (``--task dn``) or JPEG artifact
removal (``--task car``). The dn and car models are blind (trained on noise sigma
0-50 and JPEG quality 10-40), so they take no noise level or quality.
``--model`` takes a weights file or a shipped model's name (``irformer models
list``, e.g. ``swinir_light_x4_ln``); a preset name (random weights) only with
``--random-weights``.

Alpha channels: ``--alpha keep`` (default) restores the colour and resizes the
alpha channel by the model's scale with MATLAB bicubic; ``--alpha drop`` writes
colour only, with a one-line notice (as does a JPEG output, which has no alpha).
WebP inputs are read when Pillow reads them; outputs are PNG unless ``--ext``.

Greyscale images (and RGB files whose three channels are equal) given to a colour
model are replicated to three channels and the output's channel mean is written:
grey in, grey out.

Large images: ``--tile`` splits the input into overlapping tiles (fine for LN
models; i-LN models normalise with whole-image statistics, so tiles disagree,
and tiling one warns); ``--exact-chunk K`` runs the whole image with attention in
chunks of K windows, in bounded memory, with the same result as an
unlimited-memory pass.

Memory: before each image, the peak of each path is estimated and the run
keeps within ``--max-memory`` (default: half of the memory available at
start): the plain pass if it fits, else the exact path, else (LN-type models
only) tiles; a model with whole-image statistics (i-LN) is never tiled
unasked. An image no path fits is refused, naming the estimates and what
would fit. With ``--tile``/``--exact-chunk`` the path is yours, still checked.

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
from typing import TYPE_CHECKING

from irformer.archs.zoo import DEFAULT_TASK_WEIGHTS
from irformer.cli.options import add_fp16_unsafe_argument, add_precision_arguments, formatter
from irformer.cli.progress import ProgressBars

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "restore",
        help="restore image files/folders (tiling, exact large-image path, x8 ensemble, bf16/fp16)",
        description=__doc__,
        formatter_class=formatter,
    )
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUTDIR", help="output folder")
    p.add_argument(
        "--model",
        help="weights file (.pth/.safetensors) or shipped model name (`irformer models "
        "list`); default: the shipped i-LN model of --task/--scale",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="allow --model PRESET: a preset built with untrained, random weights",
    )
    p.add_argument(
        "--scale",
        type=int,
        default=None,
        help="SR scale; without --model it picks the shipped reference checkpoint "
        "(2 or 4, default 2), with --model it must match the checkpoint's",
    )
    p.add_argument(
        "--task",
        choices=tuple(DEFAULT_TASK_WEIGHTS),
        default=None,
        help="sr (super-resolution), dn (colour denoising) or car (JPEG artifact removal); "
        "without --model it picks the shipped i-LN model of the task (default sr), with "
        "--model it must match the checkpoint's. The shipped dn/car models are blind "
        "(noise sigma 0-50, JPEG quality 10-40): no --sigma/--quality is needed",
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
    p.add_argument(
        "--max-memory",
        default="default",
        metavar="SIZE",
        help="memory budget, e.g. 8G or 500M, or 'none' (default: half the available memory)",
    )
    p.add_argument(
        "--tile-blend", choices=("mean", "ramp"), default="mean", help="how overlaps are blended"
    )
    p.add_argument("--ensemble", action="store_true", help="x8 self-ensemble (flips, rotations)")
    add_precision_arguments(p)
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
        "--alpha",
        choices=("keep", "drop"),
        default="keep",
        help="alpha channels: keep (resized with MATLAB bicubic beside the restored colour) "
        "or drop (colour only, one notice)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="skip the fp16 overflow check (an fp32 probe on a crop of the first image)",
    )
    add_fp16_unsafe_argument(p)
    p.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default=None,
        help="run the model in PyTorch or an exported .onnx file in ONNX Runtime "
        "(default: onnx for a .onnx --model, else torch)",
    )
    p.set_defaults(func=run)


def load_onnx_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
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
    if args.max_memory != "default":
        raise ValueError(
            "--max-memory plans the PyTorch model's paths; an ONNX graph has one path "
            "(the whole image): use --tile to bound its memory"
        )
    if args.autocast is not None:
        raise ValueError(
            f"--autocast {args.autocast} applies to the PyTorch model; an ONNX file runs in "
            "its own precision (export an fp16 file for fp16)"
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
    if args.task is not None and meta.get("task") not in (None, args.task):
        raise ValueError(f"--task {args.task} but {args.model} is a {meta['task']} model")
    described = (
        f"{args.model} (ONNX Runtime, {model.precision}; {meta.get('arch', 'no irformer metadata')}"
        f", norm={meta.get('norm', '?')})"
    )
    return model, described


def run(args: argparse.Namespace) -> int:
    from irformer.archs.zoo import load_model
    from irformer.engine.evaluate import resolve_device
    from irformer.engine.infer import RestoredFile, RestoreOptions, restore_files
    from irformer.engine.memory import parse_memory_size

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
        autocast=args.autocast,
    )
    if backend == "onnx":
        model, described = load_onnx_model(args)
        device = resolve_device("cpu")
    else:
        loaded = load_model(
            args.model,
            task=args.task,
            scale=args.scale,
            param_key=args.param_key,
            random_weights=args.random_weights,
        )
        device = resolve_device(args.device)
        model, described = loaded.model.to(device), loaded.description
    print(f"model: {described}; device {device}; precision {args.precision}", file=sys.stderr)
    bars = ProgressBars(disable=args.no_progress)

    def show(done: RestoredFile) -> None:
        h, w = done.output_size
        note = "" if done.report.finite else f"  WARNING {done.report.summary()}"
        bars.write(f"{done.source} -> {done.output} ({w}x{h}, {done.seconds:.2f} s){note}")

    budget = "default" if args.max_memory == "default" else parse_memory_size(args.max_memory)
    if backend == "onnx":
        budget = None  # the planner estimates PyTorch's paths (refused above when asked for)
    with bars:
        result = restore_files(
            model,
            args.inputs,
            args.out,
            options,
            overwrite=args.overwrite,
            skip_existing=args.skip_existing,
            max_memory=budget,
            ext=None if args.ext == "keep" else args.ext,
            guard=not args.no_guard,
            alpha=args.alpha,
            fp16_unsafe=args.fp16_unsafe,
            on_done=show,
            progress=bars,
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
