"""``irformer compress``: post-training quantisation (CompSRT and baselines), statistics.

Examples::

    irformer compress run --model ckpt.safetensors --method minmax,dquant2d,compsrt \\
        --wbits 4,3,2 --abits 4,3,2 --calib DF2K/HR --bench Set5,Set14,B100 \\
        --data-root ../shared/data --out results/compress_x4
    irformer compress run --model ckpt.safetensors --method compsrt --wbits 4 --abits 4 \\
        --prune 0.4 --calib DF2K/HR --bench Set5 --out results/prune --save-packed
    irformer compress run --model ckpt.safetensors --method 2dquant,compsrt --wbits 2,4 \\
        --dqc-iters 0,50,200,1000 --val-every 50 --calib DF2K/HR --bench Set5,Set14 \\
        --out results/budget --resume            # one run per config, scored at each budget
    irformer compress report results/ln results/iln --out results/both
    irformer compress significance results/ln results/iln --out results/significance.md
    irformer compress stats ckpt.safetensors --calib DF2K/HR --out results/stats
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from irformer.cli.progress import ProgressBars
from irformer.compress.methods import METHODS, method_names
from irformer.compress.methods.base import QKV_INPUTS
from irformer.compress.methods.compsrt import ABLATIONS
from irformer.compress.prune import PRUNE_MODES
from irformer.data.benchmarks import DEFAULT_DATA_ROOT, default_data_root
from irformer.experiments.compression import (
    CompressionRow,
    CompressionSettings,
    checkpoint_scale,
    merge_runs,
    run_experiment,
    sensitivity_experiment,
    significance_experiment,
    statistics_experiment,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compress",
        help="quantise a model (minmax, 2DQuant, CompSRT, PTQ4ViT, NoisyQuant) or test its "
        "pre/post-Hadamard statistics",
        description=__doc__.splitlines()[0],
    )
    sub = p.add_subparsers(dest="compress_command", metavar="ACTION", required=True)

    r = sub.add_parser("run", help="quantise with methods x bit widths; write quality/size tables")
    r.add_argument(
        "--model",
        required=True,
        help="FP weights file (irformer or official) or shipped model name; several, "
        "comma-separated, share the tables (e.g. an LN and an i-LN model)",
    )
    _add_quantization_args(r)
    r.add_argument(
        "--bench",
        default="Set5,Set14,B100",
        help="comma-separated test sets: names or NAME=HR_DIR[,LR_DIR]; NAME? is scored "
        "only where its folder exists; 'paper' = Set5,Set14,B100,Urban100?,Manga109? "
        "(CompSRT's Table 2)",
    )
    _add_data_root(r)
    r.add_argument("--out", required=True, type=Path, help="output folder for tables and JSON")
    r.add_argument(
        "--caption",
        default="",
        help="first line of every table file: the protocol (DQC iterations x batch, "
        "calibration set, benchmark subset)",
    )
    r.add_argument("--save-packed", action="store_true", help="write and verify packed models")
    r.add_argument("--latency-size", type=int, default=128, help="LR side for latency")
    r.add_argument(
        "--latency-repeats", type=int, default=10, help="timed runs per model (0: no latency)"
    )
    r.add_argument(
        "--int8-kernel",
        action="store_true",
        help="add a row for PyTorch's real int8 CPU Linears (dynamic W8A8, CPU timing)",
    )
    r.add_argument(
        "--eval-kernel",
        choices=("eager", "fused"),
        default="eager",
        help="activation quantisers when scoring: PyTorch ops (default) or the fused kernel",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in --out, measure only the missing ones and continue "
        "interrupted distillations from --out/dqc_state",
    )
    r.set_defaults(func=run)

    m = sub.add_parser(
        "report",
        help="merge the rows of several `compress run` folders (e.g. one per model, run in "
        "parallel) into one set of tables",
    )
    m.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="folders with rows.jsonl")
    m.add_argument("--out", required=True, type=Path, help="folder for the merged tables")
    m.add_argument("--caption", default="", help="first line of every table file (the protocol)")
    m.set_defaults(func=report)

    g = sub.add_parser(
        "significance",
        help="CompSRT vs the best baseline per configuration: one-sided Wilcoxon signed-rank "
        "over the datasets and Cohen's d_z (CompSRT's Table 5), from `compress run` rows",
    )
    g.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="folders with rows.jsonl")
    g.add_argument("--method", default="compsrt", help="the method under test")
    g.add_argument(
        "--baselines",
        default="minmax,dquant2d,ptq4vit,noisyquant",
        help="comma-separated methods it is compared with (the best one per configuration)",
    )
    g.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    g.set_defaults(func=significance_cmd)

    s = sub.add_parser("stats", help="Shapiro-Wilk/range/eps-band tests pre vs post Hadamard")
    s.add_argument("checkpoint", metavar="CKPT", help="weights file or shipped model name")
    s.add_argument("--arch", default=None, help="preset for official files without metadata")
    s.add_argument("--calib", type=Path, default=None, help="images for activation statistics")
    s.add_argument("--calib-batch", type=int, default=32)
    s.add_argument("--patch", type=int, default=64)
    s.add_argument("--rotation", choices=("pow2", "exact"), default="pow2")
    s.add_argument(
        "--paper-padding",
        action="store_true",
        help="pad every dim to a power of two as CompSRT's code (adds exact zeros)",
    )
    s.add_argument("--out", type=Path, default=None, help="write stats.json and stats.md here")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=stats)

    v = sub.add_parser(
        "sensitivity",
        help="which quantisers cost the quality: each group of quantisers back in FP / "
        "quantised alone, and how many levels each activation quantiser uses",
    )
    v.add_argument("--model", required=True, help="FP weights file or shipped model name")
    _add_quantization_args(v)
    v.add_argument(
        "--bench",
        default="Set5",
        help="the one test set that scores each variant (a name or NAME=HR_DIR[,LR_DIR])",
    )
    _add_data_root(v)
    v.add_argument("--out", type=Path, default=None, help="write sensitivity.md/.json here")
    v.set_defaults(func=sensitivity_cmd)


def _add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help=f"folder holding the benchmarks (default: {DEFAULT_DATA_ROOT} if present)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_quantization_args(p: argparse.ArgumentParser) -> None:
    """What defines a quantised model and its calibration (``run`` and ``sensitivity``)."""
    p.add_argument("--arch", default=None, help="preset for official files without metadata")
    p.add_argument(
        "--method",
        default="compsrt",
        help=f"comma-separated methods: {', '.join(METHODS)} (alias: 2dquant); CompSRT's "
        f"ablations: {', '.join(ABLATIONS)}",
    )
    p.add_argument("--wbits", default="4", help="comma-separated weight bits (2, 3, 4, 8)")
    p.add_argument("--abits", default=None, help="comma-separated activation bits (default: wbits)")
    p.add_argument("--prune", type=float, default=0.0, help="fraction of each weight to prune")
    p.add_argument(
        "--prune-mode",
        choices=PRUNE_MODES,
        default="magnitude",
        help="magnitude: smallest entries, exact zeros (1-bit mask); channel: whole output "
        "rows (paper section 7.3); official: CompSRT's code (sampled threshold each forward, "
        "padded rows counted, pruned zeros quantised; not packable)",
    )
    p.add_argument(
        "--qkv-inputs",
        choices=QKV_INPUTS,
        default="shared",
        help="input quantisers of a fused qkv: one (shared) or one per q/k/v as "
        "2DQuant's and CompSRT's code (split)",
    )
    p.add_argument("--calib", required=True, type=Path, help="folder of clean training images")
    p.add_argument("--calib-batch", type=int, default=32, help="calibration patches (2DQuant: 32)")
    p.add_argument("--patch", type=int, default=64, help="LR patch side (2DQuant: 64)")
    p.add_argument(
        "--dqc-iters",
        default=None,
        help="distillation iterations (default: 4000); a comma-separated list (e.g. "
        "0,50,200,1000) runs the largest once and scores the model at each (a budget curve)",
    )
    p.add_argument("--dqc-batch", type=int, default=16, help="distillation batch (default: 16)")
    p.add_argument(
        "--dqc-patch", type=int, default=None, help="LR patch side for DQC (default: --patch)"
    )
    p.add_argument(
        "--dqc-kernel",
        choices=("fused", "eager"),
        default="fused",
        help="activation quantisers during DQC: the fused CPU kernel (default; several times "
        "faster, same values up to float rounding) or PyTorch ops",
    )
    p.add_argument(
        "--dqc-lr",
        default=None,
        help="DQC learning rate (default 1e-2): one value, or one per weight width as "
        "W=LR pairs, e.g. 4=1e-3,3=1e-3,2=1e-2 (widths not named keep 1e-2)",
    )
    p.add_argument(
        "--dqc-scalar-lr",
        default=None,
        help="learning rate of CompSRT's alpha/beta, like --dqc-lr (default: --dqc-lr, one "
        "Adam group as the reference code)",
    )
    p.add_argument(
        "--dqc-loss",
        choices=("mean", "official"),
        default="mean",
        help="DQC loss scaling: mean L1 + mean MSE (default), or the 2DQuant/CompSRT code's "
        "division by element counts, under which Adam's eps damps small bound gradients",
    )
    p.add_argument(
        "--dqc-keep-activations",
        action="store_true",
        help="keep every activation for DQC's backward (faster; several times the memory: "
        "SwinIR-light at batch 16 exceeds 24 GB) instead of recomputing per group",
    )
    p.add_argument("--val-every", type=int, default=200, help="held-out check interval")
    p.add_argument("--rotation", choices=("pow2", "exact"), default=None, help="CompSRT sizing")
    p.add_argument(
        "--rotation-skip",
        default="",
        help="comma-separated activation roles CompSRT leaves unrotated "
        "(q, k, v, post_softmax, linear_input, post_gelu); default: none, as the paper",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=0, help="data loader workers for DQC")
    p.add_argument("--seed", type=int, default=0)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from exc


def _bit_pairs(wbits: str, abits: str | None) -> list[tuple[int, int]]:
    w = _ints(wbits, "--wbits")
    a = _ints(abits, "--abits") if abits else list(w)
    if len(a) == 1 and len(w) > 1:
        a = a * len(w)
    if len(w) == 1 and len(a) > 1:
        w = w * len(a)
    if len(w) != len(a):
        raise ValueError(f"--wbits {wbits} and --abits {abits} list different numbers of widths")
    return list(zip(w, a, strict=True))


def _methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        if m not in method_names():
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(method_names())}")
    return names


def _row_line(row: CompressionRow) -> str:
    scores = ", ".join(f"{b} {p:.2f}/{s:.4f}" for b, (p, s) in row.scores.items())
    budget = ""
    if row.dqc_checkpoint is not None:
        budget = f" DQC {row.dqc_checkpoint} it (bounds of {row.dqc_best_step}"
        budget += ")" if row.dqc_kept else ", last iterate)"
    return (
        f"{row.model}: {row.method:>10} W{row.wbits}A{row.abits} prune {row.prune:g}{budget}: "
        f"{scores} | "
        f"{row.megabytes:.3f} MB, {row.bits_per_param:.2f} bits/param, "
        f"{row.latency_ms:.1f} ms"
    )


def _data_root(args: argparse.Namespace) -> Path | None:
    data_root = default_data_root(args.data_root)
    if data_root is not None and not data_root.is_dir():
        raise FileNotFoundError(f"benchmark root {data_root} does not exist (--data-root)")
    return data_root


def _dqc_iters(text: str | None) -> tuple[int | None, tuple[int, ...]]:
    """``--dqc-iters``: one count, or a comma-separated budget curve."""
    if text is None:
        return None, ()
    counts = _ints(str(text), "--dqc-iters")
    if not counts or min(counts) < 0:
        raise ValueError(f"--dqc-iters {text!r}: expected counts >= 0")
    if len(counts) == 1:
        return counts[0], ()
    return max(counts), tuple(sorted(set(counts)))


def _dqc_lr(text: str | None, flag: str = "--dqc-lr") -> float | dict[int, float] | None:
    """``--dqc-lr``: one learning rate, or ``W=LR`` pairs keyed by weight bits."""
    if text is None:
        return None
    try:
        if "=" not in text:
            lrs: float | dict[int, float] = float(text)
        else:
            lrs = {int(w): float(lr) for w, lr in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise ValueError(
            f"{flag} {text!r}: expected a number or W=LR pairs such as 4=1e-3,2=1e-2"
        ) from None
    values = lrs.values() if isinstance(lrs, dict) else [lrs]
    if any(not lr > 0 for lr in values):
        raise ValueError(f"{flag} {text!r}: learning rates must be > 0")
    return lrs


def _settings(args: argparse.Namespace, scale: int, **extra: Any) -> CompressionSettings:
    """The parsed :func:`_add_quantization_args`; ``extra``: further settings (``run``'s)."""
    iters, checkpoints = _dqc_iters(args.dqc_iters)
    return CompressionSettings(
        methods=tuple(_methods(args.method)),
        bits=tuple(_bit_pairs(args.wbits, args.abits)),
        calib_dir=str(args.calib),
        scale=scale,
        prune=args.prune,
        prune_mode=args.prune_mode,
        qkv_inputs=args.qkv_inputs,
        calib_batch=args.calib_batch,
        calib_patch=args.patch,
        dqc_iters=iters,
        dqc_checkpoints=checkpoints,
        dqc_batch=args.dqc_batch,
        dqc_patch=args.dqc_patch,
        dqc_lr=_dqc_lr(args.dqc_lr),
        dqc_scalar_lr=_dqc_lr(args.dqc_scalar_lr, "--dqc-scalar-lr"),
        dqc_loss=args.dqc_loss,
        dqc_recompute=not args.dqc_keep_activations,
        dqc_fused=args.dqc_kernel == "fused",
        val_every=args.val_every,
        rotation=args.rotation,
        rotation_skip=tuple(r.strip() for r in args.rotation_skip.split(",") if r.strip()),
        seed=args.seed,
        workers=args.workers,
        **extra,
    )


def _device(text: str):
    from irformer.engine.evaluate import resolve_device

    return resolve_device(text)


def run(args: argparse.Namespace) -> int:
    paths = [p.strip() for p in str(args.model).split(",") if p.strip()]
    if not paths:
        raise ValueError("--model: no checkpoint given")
    scale = checkpoint_scale(paths[0], args.arch)
    if scale < 2:
        raise ValueError(f"compress run evaluates SR models; {paths[0]} has scale {scale}")
    settings = _settings(
        args,
        scale,
        latency_size=args.latency_size,
        latency_repeats=args.latency_repeats,
        save_packed=args.save_packed,
        int8_kernel=args.int8_kernel,
        eval_fused=args.eval_kernel == "fused",
        resume=args.resume,
    )
    with ProgressBars(unit="row", disable=args.no_progress) as bars:
        _, tables = run_experiment(
            paths,
            settings,
            benchmarks=args.bench,
            data_root=_data_root(args),
            device=_device(args.device),
            out_dir=args.out,
            arch=args.arch,
            on_row=lambda row: bars.write(_row_line(row)),
            progress=bars,
            caption=args.caption,
        )
    print()
    for text in tables.values():
        print(text)
    return 0


def report(args: argparse.Namespace) -> int:
    for text in merge_runs(args.runs, args.out, caption=args.caption).values():
        print(text)
    return 0


def significance_cmd(args: argparse.Namespace) -> int:
    baselines = [m.strip() for m in args.baselines.split(",") if m.strip()]
    print(significance_experiment(args.runs, method=args.method, baselines=baselines, out=args.out))
    return 0


def stats(args: argparse.Namespace) -> int:
    text = statistics_experiment(
        args.checkpoint,
        arch=args.arch,
        calib=args.calib,
        calib_batch=args.calib_batch,
        patch=args.patch,
        rotation=args.rotation,
        paper_padding=args.paper_padding,
        seed=args.seed,
        out_dir=args.out,
    )
    print(text)
    return 0


def sensitivity_cmd(args: argparse.Namespace) -> int:
    with ProgressBars(unit="pass", disable=args.no_progress) as bars:
        text = sensitivity_experiment(
            args.model,
            _settings(args, checkpoint_scale(args.model, args.arch)),
            benchmark=args.bench,
            data_root=_data_root(args),
            device=_device(args.device),
            arch=args.arch,
            out_dir=args.out,
            progress=bars,
        )
    print(text)
    return 0
