"""``irformer eval``: PSNR/SSIM of a model on named benchmarks, printed as in the paper.

Example::

    irformer eval --model bicubic --task sr --scale 4 --bench Set5,Set14,B100
    irformer eval --model swinir_light_x4_iln --bench Set5,mine=my/HR,my/LR
    irformer eval --model runs/x4/weights.safetensors --task dn --sigma 25 --out-csv dn.csv
    irformer eval --model swinir_1_dn_iln.safetensors --task dn --sigma 15,25,50 \
        --bench CBSD68,Kodak24,McMaster

``--model`` is a weights file, a shipped model's name (``irformer models list``; its
task and scale are the file's), ``bicubic``, or a preset with ``--random-weights``.
``--bench`` takes registered names (``B100[:20]``: the first 20 images) and your own
paired folders ``NAME=HR_DIR[,LR_DIR]`` (without LR_DIR the inputs are made as for the
registered sets: MATLAB bicubic, or the seeded noise / JPEG of ``--sigma`` / ``--quality``).

Every noise level / JPEG quality of a comma list is one block of rows; each block
starts with the baseline the field compares against (``bicubic`` for SR, the
``noisy input`` / ``JPEG input`` / ``rainy input`` itself for DN / CAR / DR) unless
``--no-baseline``.

A benchmark whose outputs held NaN/inf pixels is marked ``*`` in the table with
a note below it (the pixels are scored as black), the JSON/CSV carry the counts
(``nonfinite_pixels``), and the command exits with status 1 after writing them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from irformer.cli.options import add_fp16_unsafe_argument, add_precision_arguments, parse_levels
from irformer.cli.progress import ProgressBars
from irformer.data.benchmarks import DEFAULT_DATA_ROOT, benchmark_names, default_data_root
from irformer.data.io import check_folder_writable, check_writable
from irformer.engine.evaluate import (
    BicubicModel,
    EvaluationResult,
    evaluate,
    prepare_eval_model,
    read_results_json,
    write_results_csv,
    write_results_json,
)
from irformer.engine.fp16 import resolve_fp16_options

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model (or the bicubic baseline) on benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="weights file, shipped model name (`irformer models list`, e.g. "
        "swinir_light_x4_iln), 'bicubic', or a preset with --random-weights",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="allow --model PRESET: a preset built with untrained, random weights",
    )
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
        help="comma-separated test sets: names (B100[:20] = the first 20 images) or your "
        "own folders NAME=HR_DIR[,LR_DIR] (LR made with MATLAB bicubic, or the task's "
        "noise/JPEG, when absent) (default: the paper's sets for the task that exist)",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"benchmark folder, task-grouped or flat (default: {DEFAULT_DATA_ROOT} if present)",
    )
    p.add_argument(
        "--sigma",
        default=None,
        help="noise sigma(s) on 0-255 (dn), comma-separated, e.g. 15,25,50",
    )
    p.add_argument(
        "--quality",
        default=None,
        help="JPEG quality(ies) 1-100 (car), comma-separated, e.g. 10,20,30,40",
    )
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="omit the baseline rows (bicubic / the noisy, JPEG or rainy input itself)",
    )
    p.add_argument("--save-dir", type=Path, default=None, help="write outputs as PNG here")
    p.add_argument(
        "--out-json",
        type=Path,
        default=None,
        help="write all results as JSON (one object, or a list when there are several "
        "levels or a baseline)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --out-json: save it after every benchmark and, when it exists, take the "
        "sets it already holds for the same model and settings instead of running them again "
        "(for long CPU evaluations that may be interrupted)",
    )
    p.add_argument("--out-csv", type=Path, default=None, help="write per-image results as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_precision_arguments(p)
    add_fp16_unsafe_argument(p, fallback="evaluate in bf16", anyway="to score the overflow")
    p.add_argument("--seed", type=int, default=0, help="base seed of the synthetic noise")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _setting(result: EvaluationResult) -> tuple[str, str]:
    return {
        "sr": ("Scale", f"x{result.scale}"),
        "dn": ("Sigma", f"{result.sigma:g}" if result.sigma is not None else "-"),
        "car": ("Q", f"{result.quality}"),
        "dr": ("", ""),
    }[result.task]


def format_table(results: EvaluationResult | Sequence[EvaluationResult]) -> str:
    """Rows as in the paper's Table 2: method, setting, then PSNR / SSIM per benchmark
    (one row per result, in the order given; the benchmarks are the first result's)."""
    rows = [results] if isinstance(results, EvaluationResult) else list(results)
    if not rows:
        raise ValueError("no results to format")
    first = rows[0]
    setting_name = _setting(first)[0]
    digits = 3 if first.task == "dn" else 2  # the paper prints DN PSNR to 3 decimals
    model_w = max(len("Method"), *(len(r.model) for r in rows))
    set_w = max(15, *(len(b.benchmark) for b in first.benchmarks))
    head1 = f"{'Method':<{model_w}}  {setting_name:<5}"
    head2 = f"{'':<{model_w}}  {'':<5}"
    for b in first.benchmarks:
        head1 += f"  {b.benchmark:<{set_w}}"
        head2 += f"  {'PSNR':<7} {'SSIM':<{set_w - 8}}"
    lines = [head1, head2]
    notes = []
    for result in rows:
        row = f"{result.model:<{model_w}}  {_setting(result)[1]:<5}"
        for b in result.benchmarks:
            psnr = f"{b.psnr:.{digits}f}" + ("*" if b.nonfinite_pixels else "")
            row += f"  {psnr:<7} {b.ssim:<{set_w - 8}.4f}"
            if b.nonfinite_pixels:
                where = b.benchmark if len(rows) == 1 else f"{result.model} {b.benchmark}"
                notes.append(
                    f"* {where}: {b.nonfinite_pixels} output pixels non-finite in "
                    f"{b.nonfinite_images} of {b.num_images} images (scored as black)"
                )
        lines.append(row)
    return "\n".join(line.rstrip() for line in (*lines, *notes))


def _save_dir(
    save_dir: Path | None, sigma: float | None, quality: int | None, several: bool
) -> Path | None:
    """Where the model's outputs go (never the baseline's): ``--save-dir``, with one
    ``sigma15`` / ``q10`` sub-folder per level when several levels are evaluated."""
    if save_dir is None or not several:
        return save_dir
    return save_dir / (f"sigma{sigma:g}" if sigma is not None else f"q{quality}")


def _result_key(
    model: str, task: str, sigma: float | None, quality: int | None, precision: str, autocast: Any
) -> tuple:
    """What an earlier result must match to be reused (the level as results store it)."""
    return (
        model,
        task,
        sigma if task == "dn" else None,
        quality if task == "car" else None,
        precision,
        autocast,
    )


def _earlier_results(path: Path) -> dict[tuple, dict[str, Any]]:
    """``--resume``: the sets an earlier run saved to ``path``, by settings and set name."""
    if not path.exists():
        return {}
    found: dict[tuple, dict[str, Any]] = {}
    for r in read_results_json(path):
        key = _result_key(r.model, r.task, r.sigma, r.quality, r.precision, r.autocast)
        found.setdefault(key, {}).update({b.benchmark: b for b in r.benchmarks})
    logger.info("--resume: %d earlier sets in %s", sum(map(len, found.values())), path)
    return found


def run(args: argparse.Namespace) -> int:
    prepared = prepare_eval_model(
        args.model, task=args.task, scale=args.scale, random_weights=args.random_weights
    )
    task, scale = prepared.task, prepared.scale
    if task == "dn" and args.sigma is None:
        raise ValueError("--task dn needs --sigma (noise level on 0-255, e.g. 15, 25, 50)")
    if task == "car" and args.quality is None:
        raise ValueError("--task car needs --quality (JPEG quality, e.g. 10, 20, 30, 40)")
    sigmas = parse_levels(args.sigma if task == "dn" else None, float, "--sigma")
    qualities = parse_levels(args.quality if task == "car" else None, int, "--quality")
    root = default_data_root(args.data_root)
    benchmarks = benchmark_names(args.bench, task, root)
    if args.resume and args.out_json is None:
        raise ValueError("--resume needs --out-json (the file it saves to and resumes from)")
    earlier = _earlier_results(args.out_json) if args.resume else {}
    for out in (args.out_json, args.out_csv):
        if out is not None and not (args.resume and out == args.out_json):
            check_writable(out, overwrite=args.overwrite)  # fail before a long run
    if args.save_dir is not None:
        check_folder_writable(args.save_dir)
    precision, autocast = args.precision, args.autocast
    if not prepared.is_baseline:  # the model's measured features decide what fp16 runs as
        precision, autocast = resolve_fp16_options(
            prepared.model, precision, autocast, on_unsafe=args.fp16_unsafe
        )
    with_baseline = not (prepared.is_baseline or args.no_baseline)
    baseline = BicubicModel(scale)
    several = len(sigmas) * len(qualities) > 1

    results: list[EvaluationResult] = []
    with ProgressBars(disable=args.no_progress) as bars:
        for sigma in sigmas:
            for quality in qualities:
                runs = [(baseline, prepared.baseline_name)] if with_baseline else []
                for net, label in [*runs, (prepared.model, prepared.name)]:
                    key = _result_key(label, task, sigma, quality, precision, autocast)

                    def save_partial(so_far: EvaluationResult) -> None:
                        write_results_json([*results, so_far], args.out_json, overwrite=True)

                    results.append(
                        evaluate(
                            net,
                            task=task,
                            benchmarks=benchmarks,
                            data_root=root,
                            scale=scale,
                            sigma=sigma,
                            quality=quality,
                            device=args.device,
                            precision=precision,
                            autocast=autocast,
                            save_dir=_save_dir(args.save_dir, sigma, quality, several)
                            if net is prepared.model
                            else None,
                            overwrite=args.overwrite,
                            seed=args.seed,
                            progress=bars,
                            model_name=label,
                            reuse=earlier.get(key),
                            on_benchmark=save_partial if args.resume else None,
                        )
                    )
    print(format_table(results))
    written = results[0] if len(results) == 1 else results
    if args.out_json is not None:
        write_results_json(written, args.out_json, overwrite=args.overwrite or args.resume)
        print(f"wrote {args.out_json}")
    if args.out_csv is not None:
        write_results_csv(written, args.out_csv, overwrite=args.overwrite)
        print(f"wrote {args.out_csv}")
    broken = [
        b.benchmark if len(results) == 1 else f"{r.model} {b.benchmark}"
        for r in results
        for b in r.benchmarks
        if b.nonfinite_pixels
    ]
    if broken:
        print(
            f"irformer eval: error: non-finite outputs on {', '.join(broken)}: those scores "
            "are not the model's (a diverged checkpoint, or fp16 overflow)",
            file=sys.stderr,
        )
        return 1
    return 0
