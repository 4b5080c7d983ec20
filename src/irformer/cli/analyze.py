"""``irformer analyze``: look inside checkpoints and training runs (i-LN paper Figs. 1-9).

irformer analyze features CKPT [--images DIR]   per-block magnitude and both entropies
irformer analyze run RUN_DIR [RUN_DIR ...]      curves over training, runs overlaid
irformer analyze bias CKPT [--images DIR]       final-norm input vs its bias (Fig. 7)
irformer analyze rpe CKPT                       relative position bias per head (Fig. 9)
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from irformer.files import atomic_write

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="feature magnitude/entropy, final-norm bias and RPE analysis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    p = sub.add_parser("features", help="per-block magnitude and channel entropy of a checkpoint")
    _checkpoint_args(p)
    _image_args(p)
    p.set_defaults(func=run_features)

    p = sub.add_parser("run", help="magnitude/entropy over training of one or more runs")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--labels", help="comma-separated labels (default: folder names)")
    p.add_argument("--out", type=Path, default=Path("analysis/runs"), help="output folder")
    p.add_argument(
        "--blocks",
        nargs="?",
        const="",
        metavar="ITERS",
        help="also print every block's numbers at each run's first and last probe, or at "
        "the comma-separated probe iterations ITERS (e.g. 0,50,1500)",
    )
    p.set_defaults(func=run_runs)

    p = sub.add_parser("bias", help="features entering the final norm vs its bias (Fig. 7)")
    _checkpoint_args(p)
    _image_args(p)
    p.add_argument("--top-k", type=int, default=5, help="peak channels to compare")
    p.set_defaults(func=run_bias)

    p = sub.add_parser("rpe", help="relative position bias tables per head (Fig. 9)")
    _checkpoint_args(p)
    p.add_argument("--max-rows", type=int, default=8, help="attention modules shown (evenly)")
    p.set_defaults(func=run_rpe)


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help=".pth or .safetensors")
    p.add_argument("--param-key", help="state-dict key in a .pth (params_ema, params, ...)")
    p.add_argument("--out", type=Path, help="output folder (default: analysis/<checkpoint name>)")
    p.add_argument("--device", default="cpu")


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--images",
        type=Path,
        help="folder of model inputs (LR images for SR); default: scikit-image's bundled photos",
    )
    p.add_argument("--count", type=int, default=4, help="probe images")
    p.add_argument("--size", type=int, default=48, help="centre-crop side of each probe input")


def _load(args: argparse.Namespace) -> tuple[nn.Module, dict[str, object]]:
    from irformer.archs import load_checkpoint_model

    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    kwargs = {"param_key": args.param_key} if args.param_key else {}
    model, meta = load_checkpoint_model(args.checkpoint, **kwargs)
    return model.to(args.device).eval(), meta


def _out_dir(args: argparse.Namespace) -> Path:
    out = args.out or Path("analysis") / args.checkpoint.stem
    out.mkdir(parents=True, exist_ok=True)
    return out


def _probe_batch(args: argparse.Namespace, meta: dict[str, object]) -> Tensor:
    from irformer.analysis.probes import builtin_probe_batch, load_probe_batch

    if args.images is not None:
        return load_probe_batch(args.images, count=args.count, size=args.size)
    scale = meta.get("scale", 1)
    return builtin_probe_batch(
        count=min(args.count, 4), size=args.size, scale=scale if isinstance(scale, int) else 1
    )


def run_features(args: argparse.Namespace) -> int:
    from irformer.analysis.plots import plot_block_stats
    from irformer.analysis.probes import measure_blocks

    model, meta = _load(args)
    stats = measure_blocks(model, _probe_batch(args, meta))
    out = _out_dir(args)
    # mean x^2 is the mean square (RMS squared); "alg1 H" the paper's Algorithm 1
    # entropy (scale dependent), "balance H" its scale-invariant counterpart.
    print(
        f"{'block':<40} {'kind':<6} {'mean x^2':>11} {'max |x|':>11} {'alg1 H':>8} {'balance H':>9}"
    )
    for s in stats:
        print(
            f"{s.block:<40} {s.kind:<6} {s.sq_mean:>11.4g} {s.max_abs:>11.4g} "
            f"{s.entropy:>8.4f} {s.balance_entropy:>9.4f}"
        )
    atomic_write(
        out / "features.json",
        json.dumps(
            {
                "checkpoint": str(args.checkpoint),
                "meta": meta,
                "blocks": [s.record(0) for s in stats],
            },
            indent=1,
            default=str,
        ),
    )
    title = f"{args.checkpoint.name} (norm={meta.get('norm')})"
    png = plot_block_stats(stats, out / "blocks.png", title=title)
    print(f"wrote {out / 'features.json'} and {png}")
    return 0


def run_runs(args: argparse.Namespace) -> int:
    from irformer.analysis.plots import (
        has_metric,
        plot_per_block_curves,
        plot_run_overlay,
        reduce_over_blocks,
    )
    from irformer.analysis.probes import read_feature_records

    labels = args.labels.split(",") if args.labels else [d.name for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        raise ValueError(f"--labels has {len(labels)} names for {len(args.run_dirs)} run folders")
    if len(set(labels)) != len(labels):
        raise ValueError(f"run labels must differ, got {labels}; pass --labels")
    runs = {label: read_feature_records(d) for label, d in zip(labels, args.run_dirs)}
    out = args.out
    written = [
        plot_run_overlay(runs, out / "magnitude.png", metric="sq_mean"),
        plot_run_overlay(runs, out / "max_abs.png", metric="max_abs"),
        plot_run_overlay(runs, out / "entropy.png", metric="entropy", how="mean", kind="layer"),
        plot_per_block_curves(runs, out / "magnitude_per_block.png"),
        plot_per_block_curves(runs, out / "entropy_per_block.png", metric="entropy"),
    ]
    balanced = {k: v for k, v in runs.items() if has_metric(v, "balance_entropy")}
    if balanced:
        written += [
            plot_run_overlay(
                balanced,
                out / "balance_entropy.png",
                metric="balance_entropy",
                how="mean",
                kind="layer",
            ),
            plot_per_block_curves(
                balanced, out / "balance_entropy_per_block.png", metric="balance_entropy"
            ),
        ]
    print(
        f"{'run':<20} {'last iter':>9} {'max mean x^2':>13} {'final alg1 H':>13} "
        f"{'final balance H':>16}"
    )
    for label, records in runs.items():
        it, mag = reduce_over_blocks(records, "sq_mean", "max")
        _, ent = reduce_over_blocks(records, "entropy", "mean", kind="layer")
        _, bal = reduce_over_blocks(records, "balance_entropy", "mean", kind="layer")
        balance = f"{bal[-1]:>16.4f}" if bal.size else f"{'(not recorded)':>16}"
        print(f"{label:<20} {int(it[-1]):>9} {mag.max():>13.4g} {ent[-1]:>13.4f} {balance}")
    if args.blocks is not None:
        wanted = [int(t) for t in args.blocks.split(",") if t.strip()]
        for label, records in runs.items():
            _print_block_table(label, records, wanted)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _print_block_table(label: str, records: list[dict[str, Any]], wanted: list[int]) -> None:
    """Per block at the ``wanted`` probes (default first and last): mean square, both
    entropies and the effective channel count ``exp(balance entropy)``."""
    import math

    iters = sorted({int(r["iter"]) for r in records})
    missing = sorted(set(wanted) - set(iters))
    if missing:
        raise ValueError(f"{label}: no probe at iterations {missing}; probes at {iters}")
    for at in wanted or dict.fromkeys((iters[0], iters[-1])):
        print(f"\n{label} @ iter {at}")
        print(
            f"  {'block':<40} {'kind':<6} {'mean x^2':>10} {'alg1 H':>7} {'balance H':>9} "
            f"{'eff. ch':>7}"
        )
        for r in records:
            if int(r["iter"]) != at:
                continue
            bal = float(r.get("balance_entropy", math.nan))
            print(
                f"  {r['block']!s:<40} {r.get('kind', '')!s:<6} {float(r['sq_mean']):>10.4g} "
                f"{float(r['entropy']):>7.3f} {bal:>9.3f} {math.exp(bal):>7.1f}"
            )


def run_bias(args: argparse.Namespace) -> int:
    from irformer.analysis.plots import plot_bias_alignment
    from irformer.analysis.probes import final_norm_alignment

    model, meta = _load(args)
    result = final_norm_alignment(model, _probe_batch(args, meta), top_k=args.top_k)
    out = _out_dir(args)
    summary = result.summary()
    atomic_write(
        out / "bias.json",
        json.dumps(
            {
                **summary,
                "checkpoint": str(args.checkpoint),
                "feature_mean": result.feature_mean.tolist(),
                "bias": result.bias.tolist(),
            },
            indent=1,
        ),
    )
    png = plot_bias_alignment(
        result, out / "bias.png", title=f"{args.checkpoint.name} (norm={meta.get('norm')})"
    )
    print(
        f"final norm {summary['norm']!r}, {summary['channels']} channels: "
        f"pearson(mean, bias) = {summary['pearson']:.3f}, "
        f"pearson(|mean|, |bias|) = {summary['pearson_abs']:.3f}"
    )
    print(
        f"feature peaks {summary['feature_peaks']}, bias peaks {summary['bias_peaks']}, "
        f"overlap {summary['peak_overlap']:.2f}"
    )
    print(
        f"max |feature mean| = {summary['max_abs_feature_mean']:.4g}, "
        f"max |bias| = {summary['max_abs_bias']:.4g}"
    )
    print(f"wrote {out / 'bias.json'} and {png}")
    return 0


def run_rpe(args: argparse.Namespace) -> int:
    from irformer.analysis.plots import plot_rpe
    from irformer.analysis.probes import rpe_smoothness, rpe_tables

    model, _meta = _load(args)
    tables = rpe_tables(model)
    if not tables:
        raise ValueError(f"{args.checkpoint}: the model has no relative position bias tables")
    out = _out_dir(args)
    rows = []
    print(f"{'attention module':<48} {'heads':>5} {'smoothness (mean)':>18}")
    for name, images in tables:
        smooth = rpe_smoothness(images)
        rows.append({"module": name, "smoothness": smooth.tolist()})
        print(f"{name:<48} {images.shape[0]:>5} {smooth.mean().item():>18.3f}")
    atomic_write(
        out / "rpe.json", json.dumps({"checkpoint": str(args.checkpoint), "tables": rows}, indent=1)
    )
    png = plot_rpe(tables, out / "rpe.png", max_rows=args.max_rows)
    print(f"wrote {out / 'rpe.json'} and {png}")
    return 0
