"""``irformer restore``: restore image files and folders with a model.

irformer restore IMG_OR_DIR... -o OUTDIR [--model CKPT_OR_PRESET | --scale 2|4 | --task dn|car]
    [--tile N [--tile-overlap M] [--tile-blend mean|ramp] | --exact-chunk K]
    [--ensemble] [--precision fp32|bf16|fp16] [--autocast bf16|fp16] [--device auto|cpu|cuda]
    [--overwrite | --skip-existing]

Without --model, the shipped i-LN reference model of the task runs: x2 or x4
super-resolution (``--scale``), colour denoising (``--task dn``) or JPEG artifact
removal (``--task car``). The dn and car models are blind (trained on noise sigma
0-50 and JPEG quality 10-40), so they take no noise level or quality.

Greyscale images (and RGB files whose three channels are equal) given to a colour
model are replicated to three channels and the output's channel mean is written:
grey in, grey out.

Large images: ``--tile`` splits the input into overlapping tiles (fine for LN
models; i-LN models normalise with whole-image statistics, so tiles disagree);
``--exact-chunk K`` runs the whole image with attention in chunks of K windows,
in bounded memory, with the same result as an unlimited-memory pass.

Memory: before each image, the peak of each path is estimated and the run
keeps within ``--max-memory`` (default: half of the memory available at
start): the plain pass if it fits, else the exact path, else (LN-type models
only) tiles; a model with whole-image statistics (i-LN) is never tiled
unasked. An image no path fits is refused, naming the estimates and what
would fit. With ``--tile``/``--exact-chunk`` the path is yours, still checked.

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

from irformer.cli.options import add_precision_arguments

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
"""Reference checkpoints shipped with the package (``irformer/weights``)."""

DEFAULT_WEIGHTS_STEM = "swinir_light_x{scale}_iln"
"""Preferred default (formatted with the scale) when the weights folder holds several."""

DEFAULT_TASK_WEIGHTS: dict[str, str] = {
    "sr": DEFAULT_WEIGHTS_STEM,
    "dn": "swinir_1_dn_iln",
    "car": "swinir_1_car_iln",
}
"""The shipped model ``irformer restore --task T`` runs without ``--model`` (file stem;
``{scale}`` filled in for SR): the i-LN one of each task."""


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
    p.add_argument("--tile-blend", choices=("mean", "ramp"), default="mean")
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
        "--no-guard",
        action="store_true",
        help="skip the fp16 overflow check (an fp32 probe on a crop of the first image)",
    )
    p.set_defaults(func=run)


def default_checkpoint(
    weights_dir: Path = WEIGHTS_DIR, *, scale: int = 2, task: str = "sr"
) -> Path | None:
    """The shipped reference checkpoint of ``task`` (and ``scale`` for SR): the stem in
    :data:`DEFAULT_TASK_WEIGHTS`, or the folder's only checkpoint (its task and scale are
    checked when it is loaded)."""
    if task not in DEFAULT_TASK_WEIGHTS:
        raise ValueError(
            f"no shipped model for task {task!r}; expected one of {', '.join(DEFAULT_TASK_WEIGHTS)}"
        )
    if not weights_dir.is_dir():
        return None
    files = sorted(
        p for p in weights_dir.iterdir() if p.suffix in (".safetensors", ".pth") and p.is_file()
    )
    for p in files:
        if p.stem == DEFAULT_TASK_WEIGHTS[task].format(scale=scale):
            return p
    return files[0] if len(files) == 1 else None


def load_model(
    spec: str | None,
    *,
    param_key: str | None = None,
    scale: int | None = None,
    task: str | None = None,
) -> tuple[nn.Module, str]:
    """``(model in eval mode, description)`` for ``--model`` (or the default checkpoint
    for ``task`` and ``scale``); a model whose scale or task differs from a given
    ``scale`` / ``task`` is an error."""
    from irformer.archs import build_model, load_checkpoint_model
    from irformer.engine.evaluate import eval_task_of

    if task is not None and task != "sr" and scale not in (None, 1):
        raise ValueError(f"--scale {scale}: task {task!r} restores at scale 1")
    if spec is None:
        wanted = task or "sr"
        default_scale = (scale or 2) if wanted == "sr" else 1
        path = default_checkpoint(scale=default_scale, task=wanted)
        if path is None:
            what = f"scale {default_scale}" if wanted == "sr" else f"task {wanted}"
            raise ValueError(
                f"no reference checkpoint for {what} in {WEIGHTS_DIR} to default "
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
        meta = getattr(model, "irformer_meta", {})
        logger.warning("model %r built from its preset with untrained (random) weights", spec)
        described = f"preset {spec} (untrained)"
    own = int(getattr(model, "upscale", 1))
    if scale is not None and own != scale:
        raise ValueError(f"--scale {scale} but {described} restores at scale {own}")
    if task is not None and meta.get("task") is not None:
        own_task = eval_task_of(meta)
        if own_task in ("sr", "dn", "car", "dr") and own_task != task:
            raise ValueError(f"--task {task} but {described} is a {own_task} model (metadata)")
    return model.eval(), described


def run(args: argparse.Namespace) -> int:
    from irformer.engine.evaluate import resolve_device
    from irformer.engine.infer import RestoredFile, RestoreOptions, restore_files
    from irformer.engine.memory import parse_memory_size

    options = RestoreOptions(
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        tile_blend=args.tile_blend,
        chunk_windows=args.exact_chunk,
        ensemble=args.ensemble,
        precision=args.precision,
        autocast=args.autocast,
    )
    model, described = load_model(
        args.model, param_key=args.param_key, scale=args.scale, task=args.task
    )
    device = resolve_device(args.device)
    model = model.to(device)
    print(f"model: {described}; device {device}; precision {args.precision}", file=sys.stderr)

    def show(done: RestoredFile) -> None:
        h, w = done.output_size
        note = "" if done.report.finite else f"  WARNING {done.report.summary()}"
        print(f"{done.source} -> {done.output} ({w}x{h}, {done.seconds:.2f} s){note}")

    budget = "default" if args.max_memory == "default" else parse_memory_size(args.max_memory)
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
        on_done=show,
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
