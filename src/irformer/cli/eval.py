"""``irformer eval``: PSNR/SSIM of a model on named benchmarks, printed as in the paper.

Example::

    irformer eval --model bicubic --task sr --scale 4 --bench Set5,Set14,B100
    irformer eval --model runs/x4/weights.safetensors --task dn --sigma 25 --out-csv dn.csv

A benchmark whose outputs held NaN/inf pixels is marked ``*`` in the table with
a note below it (the pixels are scored as black), the JSON/CSV carry the counts
(``nonfinite_pixels``), and the command exits with status 1 after writing them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from irformer.data.benchmarks import DEFAULT_BENCHMARKS, find_benchmark_dir, get_benchmark
from irformer.data.io import check_folder_writable, check_writable
from irformer.engine.evaluate import (
    EvaluationResult,
    evaluate,
    write_results_csv,
    write_results_json,
)

logger = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = Path("..") / "shared" / "data"
"""Used when ``--data-root`` is omitted and this folder exists (relative to the cwd)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model (or the bicubic baseline) on benchmarks",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model", required=True, help="checkpoint path, preset name, or 'bicubic'")
    p.add_argument(
        "--task",
        choices=("sr", "dn", "car", "dr"),
        default=None,
        help="default: the checkpoint's task (irformer metadata), else sr",
    )
    p.add_argument(
        "--scale",
        type=int,
        default=None,
        help="SR scale (2, 3, 4); default: the checkpoint's, required otherwise for sr",
    )
    p.add_argument(
        "--bench",
        default=None,
        help="comma-separated benchmarks (default: the paper's sets for the task that exist)",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"benchmark folder, task-grouped or flat (default: {DEFAULT_DATA_ROOT} if present)",
    )
    p.add_argument("--sigma", type=float, default=None, help="noise sigma on 0-255 (dn)")
    p.add_argument("--quality", type=int, default=None, help="JPEG quality 1-100 (car)")
    p.add_argument("--save-dir", type=Path, default=None, help="write outputs as PNG here")
    p.add_argument("--out-json", type=Path, default=None, help="write all results as JSON")
    p.add_argument("--out-csv", type=Path, default=None, help="write per-image results as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument(
        "--fp16-unsafe",
        choices=("refuse", "bf16", "run"),
        default="refuse",
        help="--precision fp16 with a model whose measured features would overflow fp16: "
        "refuse (default), evaluate in bf16, or run anyway (to score the overflow)",
    )
    p.add_argument("--seed", type=int, default=0, help="base seed of the synthetic noise")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _data_root(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    if DEFAULT_DATA_ROOT.is_dir():
        return DEFAULT_DATA_ROOT
    raise ValueError(f"--data-root is required ({DEFAULT_DATA_ROOT} does not exist)")


def _benchmarks(arg: str | None, task: str, root: Path) -> list[str]:
    if arg:
        names = [n.strip() for n in arg.split(",") if n.strip()]
        if not names:
            raise ValueError(f"--bench {arg!r} names no benchmark")
        return [get_benchmark(n).name for n in names]
    found = []
    for name in DEFAULT_BENCHMARKS[task]:
        try:
            find_benchmark_dir(name, root, task)
        except FileNotFoundError:
            logger.warning("skipping %s: not found under %s", name, root)
            continue
        found.append(name)
    if not found:
        raise FileNotFoundError(
            f"none of the {task} benchmarks {', '.join(DEFAULT_BENCHMARKS[task])} is under {root}"
        )
    return found


def format_table(result: EvaluationResult) -> str:
    """Rows as in the paper's Table 2: method, setting, then PSNR / SSIM per benchmark."""
    setting_name, setting = {
        "sr": ("Scale", f"x{result.scale}"),
        "dn": ("Sigma", f"{result.sigma:g}" if result.sigma is not None else "-"),
        "car": ("Q", f"{result.quality}"),
        "dr": ("", ""),
    }[result.task]
    digits = 3 if result.task == "dn" else 2  # the paper prints DN PSNR to 3 decimals
    model_w = max(len("Method"), len(result.model))
    set_w = max(15, *(len(b.benchmark) for b in result.benchmarks))
    head1 = f"{'Method':<{model_w}}  {setting_name:<5}"
    head2 = f"{'':<{model_w}}  {'':<5}"
    row = f"{result.model:<{model_w}}  {setting:<5}"
    notes = []
    for b in result.benchmarks:
        head1 += f"  {b.benchmark:<{set_w}}"
        head2 += f"  {'PSNR':<7} {'SSIM':<{set_w - 8}}"
        psnr = f"{b.psnr:.{digits}f}" + ("*" if b.nonfinite_pixels else "")
        row += f"  {psnr:<7} {b.ssim:<{set_w - 8}.4f}"
        if b.nonfinite_pixels:
            notes.append(
                f"* {b.benchmark}: {b.nonfinite_pixels} output pixels non-finite in "
                f"{b.nonfinite_images} of {b.num_images} images (scored as black)"
            )
    return "\n".join(line.rstrip() for line in (head1, head2, row, *notes))


def _defaults_from_checkpoint(args: argparse.Namespace) -> None:
    """Fill ``--task``/``--scale`` from an irformer checkpoint's metadata; an explicit
    value that contradicts it is an error (it would score the wrong protocol)."""
    path = Path(args.model)
    meta: dict[str, object] = {}
    if path.is_file():
        from irformer.archs import read_state_dict
        from irformer.engine.evaluate import eval_task_of

        meta = read_state_dict(path)[1]
        if meta:
            task, scale = eval_task_of(meta), int(meta.get("scale") or 1)  # type: ignore[call-overload]
            if args.task is not None and args.task != task:
                raise ValueError(f"--task {args.task}: {path} is a {task} model (metadata)")
            if task == "sr" and args.scale is not None and args.scale != scale:
                raise ValueError(f"--scale {args.scale}: {path} is an x{scale} model (metadata)")
            args.task = task
            if task == "sr":
                args.scale = scale
    if args.task is None:
        args.task = "sr"


def _fp16_precision(model_spec: str, on_unsafe: str) -> str:
    """fp16, or bf16 / a refusal naming the layer when the model's features measured on
    the default probe would overflow fp16 (:mod:`irformer.engine.fp16`)."""
    if model_spec == "bicubic":
        return "fp16"
    from irformer.archs import build_model, load_checkpoint_model
    from irformer.engine.fp16 import resolve_fp16_precision

    path = Path(model_spec)
    model = load_checkpoint_model(path)[0] if path.is_file() else build_model(model_spec)
    return resolve_fp16_precision(model, on_unsafe=on_unsafe)[0]  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    _defaults_from_checkpoint(args)
    if args.task == "sr" and args.scale is None:
        raise ValueError("--task sr needs --scale (2, 3 or 4)")
    if args.task == "dn" and args.sigma is None:
        raise ValueError("--task dn needs --sigma (noise level on 0-255, e.g. 15, 25, 50)")
    if args.task == "car" and args.quality is None:
        raise ValueError("--task car needs --quality (JPEG quality, e.g. 10, 20, 30, 40)")
    root = _data_root(args.data_root)
    benchmarks = _benchmarks(args.bench, args.task, root)
    for out in (args.out_json, args.out_csv):
        if out is not None:  # fail before a long run, not after it
            check_writable(out, overwrite=args.overwrite)
    if args.save_dir is not None:
        check_folder_writable(args.save_dir)
    if args.precision == "fp16":
        args.precision = _fp16_precision(args.model, args.fp16_unsafe)
    result = evaluate(
        args.model,
        task=args.task,
        benchmarks=benchmarks,
        data_root=root,
        scale=args.scale or 1,
        sigma=args.sigma,
        quality=args.quality,
        device=args.device,
        precision=args.precision,
        save_dir=args.save_dir,
        overwrite=args.overwrite,
        seed=args.seed,
        progress=not args.no_progress,
        model_name=Path(args.model).stem if Path(args.model).suffix else args.model,
    )
    print(format_table(result))
    if args.out_json is not None:
        write_results_json(result, args.out_json, overwrite=args.overwrite)
        print(f"wrote {args.out_json}")
    if args.out_csv is not None:
        write_results_csv(result, args.out_csv, overwrite=args.overwrite)
        print(f"wrote {args.out_csv}")
    broken = [b.benchmark for b in result.benchmarks if b.nonfinite_pixels]
    if broken:
        print(
            f"irformer eval: error: non-finite outputs on {', '.join(broken)}: those scores "
            "are not the model's (a diverged checkpoint, or fp16 overflow)",
            file=sys.stderr,
        )
        return 1
    return 0
