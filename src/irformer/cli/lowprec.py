"""``irformer lowprec``: low-precision inference, LN vs i-LN (i-LN paper, Table 4).

irformer lowprec report CKPT_LN CKPT_ILN --bench Set5 --data-root DIR
    fp32 / fp16 / bf16 (weights and features) and weight-only int8 / int4:
    PSNR/SSIM and non-finite ("black dot") pixels per model, in Table 4's layout
irformer lowprec guard CKPT [--images DIR | --records FILE]
    fp16 overflow risk from feature magnitudes (measured now or recorded by
    ``irformer analyze features`` / a training run's features.jsonl)
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from irformer.archs.zoo import weights_path
from irformer.cli.options import parse_levels
from irformer.cli.progress import ProgressBars
from irformer.data.benchmarks import DEFAULT_DATA_ROOT, default_data_root
from irformer.files import atomic_write


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lowprec",
        help="fp16/bf16/int8/int4 inference report (LN vs i-LN) and fp16 overflow guard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="lowprec", metavar="ACTION", required=True)

    p = sub.add_parser("report", help="Table 4: LN vs i-LN under reduced precision")
    p.add_argument("ckpt_ln", metavar="CKPT_LN", help="weights file or shipped model name")
    p.add_argument("ckpt_iln", metavar="CKPT_ILN", help="weights file or shipped model name")
    p.add_argument(
        "--bench",
        default="Set5",
        help="comma-separated test sets: names or NAME=HR_DIR[,LR_DIR]",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"folder holding the benchmarks (default: {DEFAULT_DATA_ROOT} if present)",
    )
    p.add_argument("--task", choices=("sr", "dn", "car", "dr"), help="default: from CKPT_LN")
    p.add_argument("--scale", type=int, help="default: from CKPT_LN")
    p.add_argument("--sigma", help="noise level(s) on 0-255 for dn, comma-separated: 15,25,50")
    p.add_argument("--quality", help="JPEG quality level(s) for car, comma-separated: 10,20,30,40")
    p.add_argument(
        "--settings",
        default="fp32,fp16,bf16,int8,int4",
        help="comma-separated subset of fp32,fp16,bf16,int8,int4",
    )
    p.add_argument(
        "--granularity",
        choices=("per_tensor", "per_channel"),
        default="per_tensor",
        help="weight-only quantisation granularity",
    )
    p.add_argument("--asymmetric", action="store_true", help="asymmetric weight ranges")
    p.add_argument("--linear-only", action="store_true", help="quantise Linear weights only")
    p.add_argument("--labels", default="LN,i-LN", help="row labels of the two models")
    p.add_argument("--exact-chunk", type=int, metavar="K", help="exact bounded-memory path")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_report)

    p = sub.add_parser("guard", help="fp16 overflow risk of a checkpoint")
    p.add_argument("checkpoint", metavar="CKPT", help="weights file or shipped model name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, help="folder of model inputs to probe with")
    src.add_argument(
        "--records", type=Path, help="features.json / features.jsonl / run dir with magnitudes"
    )
    p.add_argument("--size", type=int, default=64, help="probe crop size")
    p.add_argument("--count", type=int, default=4, help="probe images")
    p.add_argument("--safety", type=float, default=4.0, help="warn above 65504 / safety")
    p.set_defaults(func=run_guard)


def run_report(args: argparse.Namespace) -> int:
    from irformer.engine.infer import RestoreOptions
    from irformer.experiments.lowprec import LowPrecRow, format_lowprec_table, lowprec_report

    labels = tuple(s.strip() for s in args.labels.split(","))
    if len(labels) != 2:
        raise ValueError(f"--labels needs two comma-separated names, got {args.labels!r}")

    bars = ProgressBars(unit="row", disable=args.no_progress)

    def show(row: LowPrecRow) -> None:
        bars.write(
            f"  {row.model:<6} {row.setting:<5} {row.benchmark:<9} {row.psnr:8.4f} dB "
            f"{row.ssim:.4f}  non-finite px {row.nonfinite_pixels}",
            file=sys.stderr,
        )

    with bars:
        report = lowprec_report(
            weights_path(args.ckpt_ln),
            weights_path(args.ckpt_iln),
            benchmarks=args.bench,
            data_root=default_data_root(args.data_root),
            task=args.task,
            scale=args.scale,
            sigma=parse_levels(args.sigma, float, "--sigma"),
            quality=parse_levels(args.quality, int, "--quality"),
            settings=[s.strip() for s in args.settings.split(",") if s.strip()],
            labels=labels,  # type: ignore[arg-type]
            granularity=args.granularity,
            symmetric=not args.asymmetric,
            linear_only=args.linear_only,
            options=RestoreOptions(chunk_windows=args.exact_chunk),
            device=args.device,
            on_row=show,
            progress=bars,
        )
    print(format_lowprec_table(report))
    if args.json is not None:
        from irformer.data.io import check_writable

        check_writable(args.json, overwrite=True)
        atomic_write(args.json, json.dumps(report.to_dict(), indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def run_guard(args: argparse.Namespace) -> int:
    """Exit status 0: fp16 looks safe; 1: risk found (printed)."""
    from irformer.analysis.magnitudes import (
        feature_magnitudes,
        fp16_overflow_risks,
        load_recorded_magnitudes,
    )

    if args.records is not None:
        magnitudes = load_recorded_magnitudes(args.records)
        source = str(args.records)
    else:
        from irformer.analysis.probes import load_probe_batch
        from irformer.archs import load_checkpoint_model

        model, meta = load_checkpoint_model(weights_path(args.checkpoint))
        if args.images is not None:
            batch = load_probe_batch(args.images, count=args.count, size=args.size)
        else:
            from irformer.analysis.probes import builtin_probe_batch

            scale = meta.get("scale", 1)
            batch = builtin_probe_batch(
                count=min(args.count, 4),
                size=args.size,
                scale=scale if isinstance(scale, int) else 1,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            magnitudes = feature_magnitudes(model.float(), batch)
        source = f"probe of {args.checkpoint}"
    risks = fp16_overflow_risks(magnitudes, safety=args.safety)
    peak = max(magnitudes.values(), default=0.0)
    print(f"{source}: {len(magnitudes)} entries, largest |x| = {peak:.4g} (fp16 max 65504)")
    if not risks:
        print(f"fp16 looks safe (all below 65504 / {args.safety:g})")
        return 0
    print(f"fp16 overflow risk in {len(risks)} module(s):")
    for r in risks[:20]:
        print(f"  {r.name:<50} {r.max_abs:>12.4g}{'  (overflows)' if r.overflows else ''}")
    return 1
