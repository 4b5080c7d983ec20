"""``irformer compress``: post-training quantisation (CompSRT and baselines), statistics.

Examples::

    irformer compress run --model ckpt.safetensors --method minmax,dquant2d,compsrt \\
        --wbits 4,3,2 --abits 4,3,2 --calib DF2K/HR --bench Set5,Set14,B100 \\
        --data-root ../shared/data --out results/compress_x4
    irformer compress run --model ckpt.safetensors --method compsrt --wbits 4 --abits 4 \\
        --prune 0.4 --calib DF2K/HR --bench Set5 --out results/prune --save-packed
    irformer compress report results/ln results/iln --out results/both
    irformer compress stats ckpt.safetensors --calib DF2K/HR --out results/stats
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from irformer.compress.calibration import calibration_batch
from irformer.compress.experiment import (
    CompressionRow,
    CompressionSettings,
    Evaluator,
    calibration_batches,
    complexity_table,
    drop_table,
    quality_table,
    quantize_with_settings,
    rows_as_dicts,
    run_compression,
)
from irformer.compress.methods import METHOD_ALIASES, METHODS
from irformer.compress.sensitivity import (
    level_usage,
    sensitivity,
    sensitivity_table,
    usage_table,
)
from irformer.compress.stats import (
    EPS_SWEEP,
    StatsReport,
    activation_tensors,
    compare_pre_post,
    weight_tensors,
)

logger = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = Path("..") / "shared" / "data"
ROWS_FILE = "rows.jsonl"


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
        help="FP checkpoint (irformer or official); several, comma-separated, share the tables "
        "(e.g. an LN and an i-LN model)",
    )
    _add_quantization_args(r)
    r.add_argument("--bench", default="Set5,Set14,B100", help="comma-separated benchmarks")
    r.add_argument("--data-root", type=Path, default=None, help="folder holding the benchmarks")
    r.add_argument("--out", required=True, type=Path, help="output folder for tables and JSON")
    r.add_argument("--save-packed", action="store_true", help="write and verify packed models")
    r.add_argument("--latency-size", type=int, default=128, help="LR side for latency")
    r.add_argument(
        "--int8-kernel",
        action="store_true",
        help="add a row for PyTorch's real int8 CPU Linears (dynamic W8A8, CPU timing)",
    )
    r.set_defaults(func=run)

    m = sub.add_parser(
        "report",
        help="merge the rows of several `compress run` folders (e.g. one per model, run in "
        "parallel) into one set of tables",
    )
    m.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="folders with rows.jsonl")
    m.add_argument("--out", required=True, type=Path, help="folder for the merged tables")
    m.set_defaults(func=report)

    s = sub.add_parser("stats", help="Shapiro-Wilk/range/eps-band tests pre vs post Hadamard")
    s.add_argument("checkpoint", type=Path, metavar="CKPT")
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
    v.add_argument("--model", required=True, type=Path, help="FP checkpoint")
    _add_quantization_args(v)
    v.add_argument("--bench", default="Set5", help="the benchmark that scores each variant")
    v.add_argument("--data-root", type=Path, default=None, help="folder holding the benchmarks")
    v.add_argument("--out", type=Path, default=None, help="write sensitivity.md/.json here")
    v.set_defaults(func=sensitivity_cmd)


def _add_quantization_args(p: argparse.ArgumentParser) -> None:
    """What defines a quantised model and its calibration (``run`` and ``sensitivity``)."""
    p.add_argument("--arch", default=None, help="preset for official files without metadata")
    p.add_argument(
        "--method",
        default="compsrt",
        help=f"comma-separated methods: {', '.join(METHODS)} (alias: 2dquant)",
    )
    p.add_argument("--wbits", default="4", help="comma-separated weight bits (2, 3, 4, 8)")
    p.add_argument("--abits", default=None, help="comma-separated activation bits (default: wbits)")
    p.add_argument("--prune", type=float, default=0.0, help="fraction of each weight to prune")
    p.add_argument("--calib", required=True, type=Path, help="folder of clean training images")
    p.add_argument("--calib-batch", type=int, default=32, help="calibration patches (2DQuant: 32)")
    p.add_argument("--patch", type=int, default=64, help="LR patch side (2DQuant: 64)")
    p.add_argument(
        "--dqc-iters", type=int, default=None, help="distillation iterations (default: 4000)"
    )
    p.add_argument("--dqc-batch", type=int, default=16, help="distillation batch (default: 16)")
    p.add_argument("--dqc-lr", type=float, default=None, help="bound learning rate (1e-2)")
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
        if m not in METHODS and m not in METHOD_ALIASES:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    return names


def _load(path: Path, arch: str | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    from irformer.archs import load_checkpoint_model

    return load_checkpoint_model(path, arch)


def _scale(model: torch.nn.Module, meta: dict[str, Any]) -> int:
    """The SR scale: the checkpoint's metadata, else the model's ``upscale``."""
    return int(meta.get("scale") or getattr(model, "upscale", 1))


def _resolve_device(text: str) -> torch.device:
    from irformer.engine.evaluate import resolve_device

    return resolve_device(text)


def _benchmark_evaluator(
    names: list[str], data_root: Path, scale: int, device: torch.device
) -> tuple[Evaluator, list[str]]:
    """Benchmarks resolved once; each call scores a model on all of them."""
    from irformer.data.benchmarks import load_benchmark
    from irformer.engine.evaluate import evaluate_benchmark

    benches = [load_benchmark(n, data_root, task="sr", scale=scale) for n in names]

    def evaluator(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
        # The model's own device: PyTorch's int8 kernels run on CPU only.
        param = next(iter(model.parameters()), None)
        dev = param.device if param is not None else device
        out = {}
        for bench in benches:
            res = evaluate_benchmark(model.eval(), bench, device=dev)
            out[bench.name] = (res.psnr, res.ssim)
        return out

    return evaluator, [b.name for b in benches]


def _print_row(row: CompressionRow) -> None:
    scores = ", ".join(f"{b} {p:.2f}/{s:.4f}" for b, (p, s) in row.scores.items())
    print(
        f"{row.model}: {row.method:>10} W{row.wbits}A{row.abits} prune {row.prune:g}: {scores} | "
        f"{row.megabytes:.3f} MB, {row.bits_per_param:.2f} bits/param, "
        f"{row.latency_ms:.1f} ms",
        flush=True,
    )


def _label(path: Path, meta: dict[str, Any], taken: set[str]) -> str:
    label = f"{path.stem} ({meta.get('norm', '?')})"
    while label in taken:
        label += "'"
    taken.add(label)
    return label


def _data_root(args: argparse.Namespace) -> Path:
    data_root: Path = args.data_root or DEFAULT_DATA_ROOT
    if not data_root.is_dir():
        raise FileNotFoundError(f"benchmark root {data_root} does not exist (--data-root)")
    return data_root


def _settings(args: argparse.Namespace, scale: int, **extra: Any) -> CompressionSettings:
    """The parsed :func:`_add_quantization_args`; ``extra``: further settings (``run``'s)."""
    return CompressionSettings(
        methods=tuple(_methods(args.method)),
        bits=tuple(_bit_pairs(args.wbits, args.abits)),
        calib_dir=str(args.calib),
        scale=scale,
        prune=args.prune,
        calib_batch=args.calib_batch,
        calib_patch=args.patch,
        dqc_iters=args.dqc_iters,
        dqc_batch=args.dqc_batch,
        dqc_lr=args.dqc_lr,
        dqc_recompute=not args.dqc_keep_activations,
        val_every=args.val_every,
        rotation=args.rotation,
        rotation_skip=tuple(r.strip() for r in args.rotation_skip.split(",") if r.strip()),
        seed=args.seed,
        workers=args.workers,
        **extra,
    )


def run(args: argparse.Namespace) -> int:
    paths = [Path(p.strip()) for p in str(args.model).split(",") if p.strip()]
    loaded = [(p, *_load(p, args.arch)) for p in paths]
    scales = {_scale(m, meta) for _, m, meta in loaded}
    if len(scales) != 1:
        raise ValueError(f"--model checkpoints have different scales {sorted(scales)}")
    scale = scales.pop()
    if scale < 2:
        raise ValueError(f"compress run evaluates SR models; {paths[0]} has scale {scale}")
    data_root = _data_root(args)
    device = _resolve_device(args.device)
    settings = _settings(
        args,
        scale,
        latency_size=args.latency_size,
        save_packed=args.save_packed,
        int8_kernel=args.int8_kernel,
    )
    names = [n.strip() for n in args.bench.split(",") if n.strip()]
    evaluator, bench_names = _benchmark_evaluator(names, data_root, scale, device)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[CompressionRow] = []
    taken: set[str] = set()
    rows_file = args.out / ROWS_FILE
    rows_file.write_text("")

    def on_row(row: CompressionRow) -> None:
        # One JSON line per finished row: a long run that dies keeps what it measured.
        _print_row(row)
        with rows_file.open("a") as fh:
            fh.write(json.dumps(asdict(row), default=str) + "\n")

    for path, model, meta in loaded:
        rows += run_compression(
            model,
            settings,
            evaluator,
            device=device,
            out_dir=args.out,
            on_row=on_row,
            label=_label(path, meta, taken),
        )
    tables = _write_tables(rows, bench_names, str(device), args.out)
    payload = {
        "command": "irformer compress run",
        "models": {str(p): meta for p, _, meta in loaded},
        "device": str(device),
        "torch": torch.__version__,
        "settings": {**settings.__dict__, "bits": [list(b) for b in settings.bits]},
        "rows": rows_as_dicts(rows),
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    print()
    for text in tables.values():
        print(text)
    return 0


def _write_tables(
    rows: list[CompressionRow], benchmarks: list[str], device: str, out: Path
) -> dict[str, str]:
    tables = {
        "quality.md": quality_table(rows, benchmarks),
        "psnr_drop.md": drop_table(rows, benchmarks),
        "complexity.md": complexity_table(rows, device),
    }
    for name, text in tables.items():
        (out / name).write_text(text)
    return tables


def read_rows(run_dir: Path) -> list[CompressionRow]:
    """The rows one ``compress run`` wrote to ``RUN_DIR/rows.jsonl``."""
    path = run_dir / ROWS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a `compress run` output folder")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            data["scores"] = {b: tuple(v) for b, v in data["scores"].items()}
            rows.append(CompressionRow(**data))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{path}:{n}: not a compression row ({err})") from err
    return rows


def report(args: argparse.Namespace) -> int:
    rows: list[CompressionRow] = []
    seen: dict[tuple[str, str, int, int, float], Path] = {}
    fp_scores: dict[str, dict[str, tuple[float, float]]] = {}
    for run_dir in args.runs:
        for row in read_rows(run_dir):
            key = (row.model, row.method, row.wbits, row.abits, row.prune)
            if row.method == "fp32" and fp_scores.get(row.model) == row.scores:
                continue  # every run re-measures its FP model; identical rows merge
            if key in seen:
                raise ValueError(
                    f"{run_dir}: row {key} is also in {seen[key]}; merge runs that measured "
                    "different models or settings"
                )
            seen[key] = run_dir
            if row.method == "fp32":
                fp_scores[row.model] = row.scores
            rows.append(row)
    benchmarks = list(dict.fromkeys(b for r in rows for b in r.scores))
    args.out.mkdir(parents=True, exist_ok=True)
    tables = _write_tables(rows, benchmarks, "see each run", args.out)
    (args.out / ROWS_FILE).write_text(
        "".join(json.dumps(asdict(r), default=str) + "\n" for r in rows)
    )
    for text in tables.values():
        print(text)
    return 0


def _stats_markdown(report: StatsReport) -> str:
    lines = [
        "| Tensors | Test (one-sided) | n | mean diff | Cohen d_z | Wilcoxon p | Shapiro p of d |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in report.tests:
        p = "-" if math.isnan(t.p_value) else f"{t.p_value:.3g}"
        lines.append(
            f"| {t.kind} | {t.metric} | {t.n} | {t.mean_diff:.4g} | {t.cohen_dz:.3f} | {p} | "
            f"{t.diff_shapiro_p:.3g} |"
        )
    zeros = sum(p.padding_zeros for p in report.pairs)
    lines.append("")
    lines.append(f"Exact zeros introduced by padding (in the post tensors): {zeros}")
    return "\n".join(lines) + "\n"


def stats(args: argparse.Namespace) -> int:
    model, meta = _load(args.checkpoint, args.arch)
    tensors = weight_tensors(model)
    if args.calib is not None:
        scale = _scale(model, meta)
        batch = calibration_batch(
            args.calib, scale=scale, batch=args.calib_batch, patch=args.patch, seed=args.seed
        )
        tensors += activation_tensors(model, batch)
    report = compare_pre_post(
        tensors, rotation=args.rotation, eps=EPS_SWEEP, paper_padding=args.paper_padding
    )
    text = _stats_markdown(report)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "stats.md").write_text(text)
        (args.out / "stats.json").write_text(json.dumps(report.as_dict(), indent=1))
    return 0


def sensitivity_cmd(args: argparse.Namespace) -> int:
    from irformer.data.benchmarks import load_benchmark
    from irformer.engine.evaluate import evaluate_benchmark

    model, meta = _load(args.model, args.arch)
    scale = _scale(model, meta)
    if scale < 2:
        raise ValueError(f"compress sensitivity scores SR models; {args.model} has scale {scale}")
    settings = _settings(args, scale)
    if len(settings.methods) != 1 or len(settings.bits) != 1:
        raise ValueError(
            f"compress sensitivity takes one method and one bit width, got --method "
            f"{args.method} --wbits {args.wbits} --abits {args.abits}"
        )
    device = _resolve_device(args.device)
    bench = load_benchmark(args.bench, _data_root(args), task="sr", scale=scale)
    model = model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    calib, held_out = calibration_batches(settings)
    (wbits, abits), method = settings.bits[0], settings.methods[0]
    result = quantize_with_settings(
        model, settings, method, wbits, abits, calib, held_out, device=device
    )
    qmodel = result.model.eval()

    def psnr(m: torch.nn.Module) -> float:
        return evaluate_benchmark(m, bench, device=device).psnr

    scores: list[float] = []
    usage = level_usage(qmodel, lambda m: scores.append(psnr(m)))  # the all-quantised pass
    quantized, fp, rows = sensitivity(qmodel, psnr, quantized=scores[0])
    title = f"{args.model} ({meta.get('norm', '?')}), {method} W{wbits}A{abits}, {bench.name} PSNR"
    text = (
        f"# Quantisation sensitivity: {title}\n\n"
        + sensitivity_table(quantized, fp, rows)
        + "\nActivation quantisers, fewest used levels first (all quantised, "
        + f"{bench.name}):\n\n"
        + usage_table(usage)
    )
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sensitivity.md").write_text(text)
        payload = {
            "model": str(args.model),
            "meta": meta,
            "config": result.config.to_dict(),
            "benchmark": bench.name,
            "quantized": quantized,
            "fp": fp,
            "groups": [asdict(r) for r in rows],
            "activations": [asdict(u) for u in usage],
        }
        (args.out / "sensitivity.json").write_text(json.dumps(payload, indent=1, default=str))
    return 0
