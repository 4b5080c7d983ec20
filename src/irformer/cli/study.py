"""``irformer study``: train one config under several settings and tabulate (i-LN Table 1, Fig. 2).

    irformer study norms --config BASE --norms ln,layerscale,rms,rezero,none,in,bn,ln_star,iln \\
        --iters N
    irformer study norms --config BASE --norms ln,ln_rs,ln_star,iln --iters N   # Table 3
    irformer study scale --config BASE --depths 2,4,6 --widths 30,60 --norms ln,iln --iters N

Every run uses the same seed, data stream and budget; a probe records per-block
magnitude (mean square) and both channel entropies (Algorithm 1 and the
scale-free balance) during training; final weights are scored on the
benchmarks (BN twice: running and batch statistics). Writes ``table.md``,
``table.csv``, ``summary.json`` and overlaid figures into ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Any

from irformer.cli.options import DeprecatedAlias, add_set_argument
from irformer.data.benchmarks import split_benchmark_list

logger = logging.getLogger(__name__)

ALL_NORMS = "ln,layerscale,rms,rezero,none,in,bn,ln_star,iln"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study",
        help="norm / scale studies: same model, several settings, one table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="study", metavar="STUDY", required=True)

    p = sub.add_parser("norms", help="one run per normalisation (Table 1, Fig. 4)")
    _common_args(p)
    p.add_argument(
        "--norms",
        default=ALL_NORMS,
        help=f"comma-separated (default {ALL_NORMS}, Table 1; Table 3: ln,ln_rs,ln_star,iln)",
    )
    p.set_defaults(func=run_norms)

    p = sub.add_parser("scale", help="runs over depth x width x norm (Fig. 2a-b)")
    _common_args(p)
    p.add_argument("--depths", default="", help="Transformer blocks per group, e.g. 2,4,6")
    p.add_argument("--widths", default="", help="embed_dim values, e.g. 30,60")
    p.add_argument("--norms", default="ln", help="comma-separated (default ln)")
    p.set_defaults(func=run_scale)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="base training config (YAML)")
    add_set_argument(p)
    p.add_argument("--iters", type=int, required=True, help="training iterations per run")
    p.add_argument(
        "--probe-interval",
        type=int,
        help="probe every N iterations (default: iters // 40, at least 1)",
    )
    p.add_argument("--probe-count", type=int, default=4, help="patches in the probe batch")
    p.add_argument(
        "--bench",
        help="comma-separated test sets: names or NAME=HR_DIR[,LR_DIR] "
        "(default: the config's val.benchmarks)",
    )
    p.add_argument("--benchmarks", dest="bench", action=DeprecatedAlias, new="--bench")
    p.add_argument("--data-root", help="benchmark data root (default: the config's val.root)")
    p.add_argument("--out", type=Path, help="study folder (default: runs/study-<kind>-<config>)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs, redo the others")
    p.add_argument(
        "--eval-ema",
        action="store_true",
        help="keep the config's EMA and score EMA weights (default: EMA off, raw weights)",
    )
    p.add_argument("--device", help="cpu / cuda (default: cuda when available)")


def _split(text: str, cast: Any = str) -> list[Any]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError as exc:
        raise ValueError(f"cannot read {text!r} as a comma-separated list: {exc}") from exc


def _prepare(args: argparse.Namespace, kind: str) -> tuple[Any, Path, int, list[str]]:
    from irformer.engine.config import load_config

    if args.iters < 1:
        raise ValueError(f"--iters must be >= 1, got {args.iters}")
    base = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / f"study-{kind}-{args.config.stem}"
    interval = args.probe_interval or max(1, args.iters // 40)
    benchmarks = split_benchmark_list(args.bench if args.bench else base.val.benchmarks)
    return base, out, interval, benchmarks


def _progress() -> Any:
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(state: Any) -> None:
        name = state.config.name
        bar = bars.get(name)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[name] = tqdm(total=state.config.train.iters, desc=name, unit="it")
        bar.update(state.iteration - bar.n)
        bar.set_postfix(loss=f"{state.loss:.4f}", refresh=False)

    return update


def _command_line(args: argparse.Namespace) -> str:
    """The study's command, rebuilt from the parsed arguments (for the table header)."""
    parts = ["irformer", "study", args.study, "--config", str(args.config)]
    for text in args.overrides:
        parts += ["--set", text]
    for flag in (
        "norms",
        "depths",
        "widths",
        "iters",
        "probe_interval",
        "probe_count",
        "bench",
        "data_root",
        "out",
        "device",
    ):
        value = getattr(args, flag, None)
        if value not in (None, ""):
            parts += ["--" + flag.replace("_", "-"), str(value)]
    for flag in ("resume", "eval_ema"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    return " ".join(shlex.quote(p) for p in parts)


def _finish(
    args: argparse.Namespace, runs: list[Any], out: Path, benchmarks: list[str], title: str
) -> int:
    from irformer.experiments.norm_study import run_study, write_study_report

    results = run_study(
        runs,
        out_dir=out,
        benchmarks=benchmarks,
        data_root=args.data_root,
        probe_count=args.probe_count,
        resume=args.resume,
        device=args.device,
        progress=_progress(),
    )
    command = _command_line(args)
    paths = write_study_report(results, out, benchmarks=benchmarks, title=title, command=command)
    print(paths["table.md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run_norms(args: argparse.Namespace) -> int:
    from irformer.experiments.norm_study import norm_variants

    base, out, interval, benchmarks = _prepare(args, "norms")
    runs = norm_variants(
        base,
        _split(args.norms),
        iters=args.iters,
        out_dir=out,
        probe_interval=interval,
        eval_ema=args.eval_ema,
    )
    title = (
        f"Norm study: {base.model.arch} x{base.model.scale}, {args.iters} iterations, "
        f"seed {base.train.seed}"
    )
    return _finish(args, runs, out, benchmarks, title)


def run_scale(args: argparse.Namespace) -> int:
    from irformer.experiments.norm_study import scale_variants

    base, out, interval, benchmarks = _prepare(args, "scale")
    depths, widths = _split(args.depths, int), _split(args.widths, int)
    if not depths and not widths:
        raise ValueError("study scale needs --depths and/or --widths")
    runs = scale_variants(
        base,
        depths=depths,
        widths=widths,
        norms=_split(args.norms),
        iters=args.iters,
        out_dir=out,
        probe_interval=interval,
        eval_ema=args.eval_ema,
    )
    title = (
        f"Scale study: {base.model.arch} x{base.model.scale}, {args.iters} iterations, "
        f"seed {base.train.seed}"
    )
    return _finish(args, runs, out, benchmarks, title)
