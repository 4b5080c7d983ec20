"""The compression experiment: methods x bit widths -> quality, size and latency tables.

:func:`run_compression` quantises one FP model with every requested method at
every bit width, scores each quantised model with an ``evaluator`` (by default
the benchmark evaluation of :mod:`irformer.engine.evaluate`:
:func:`benchmark_evaluator`), and measures storage
(:func:`irformer.compress.pack.storage_report`, optionally a real packed file
that is reloaded and checked) and latency (warm, synchronised, median of
repeats). :func:`run_experiment` does that for several checkpoints into one
output folder (``rows.jsonl``, the tables, ``results.json``), :func:`merge_runs`
merges folders measured in parallel, :func:`statistics_experiment` and
:func:`sensitivity_experiment` are ``irformer compress stats|sensitivity``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from irformer.archs import load_checkpoint_model, read_state_dict
from irformer.archs.zoo import weights_path
from irformer.compress.calibration import calibration_batch, patch_stream
from irformer.compress.methods import QuantResult, method_config, quantize_model
from irformer.compress.pack import load_packed, save_packed, storage_report
from irformer.compress.sensitivity import (
    level_usage,
    quantizer_groups,
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
from irformer.data.benchmarks import resolve_benchmarks
from irformer.engine.evaluate import evaluate_benchmark
from irformer.files import atomic_write
from irformer.progress import Progress
from irformer.progress import report as report_progress

__all__ = [
    "ROWS_FILE",
    "CompressionRow",
    "CompressionSettings",
    "Evaluator",
    "benchmark_evaluator",
    "calibration_batches",
    "checkpoint_scale",
    "complexity_table",
    "drop_table",
    "measure_latency",
    "merge_runs",
    "quality_table",
    "quantize_with_settings",
    "read_rows",
    "run_compression",
    "run_experiment",
    "sensitivity_experiment",
    "statistics_experiment",
]

logger = logging.getLogger(__name__)

Evaluator = Callable[[nn.Module], dict[str, tuple[float, float]]]
"""model -> {benchmark: (PSNR, SSIM)}."""


@dataclass(frozen=True)
class CompressionSettings:
    """What :func:`run_compression` runs (defaults: the papers' calibration)."""

    methods: tuple[str, ...]
    bits: tuple[tuple[int, int], ...]
    """(weight bits, activation bits) pairs."""
    calib_dir: str
    scale: int
    prune: float = 0.0
    calib_batch: int = 32
    calib_patch: int = 64
    dqc_iters: int | None = None
    """None = each method's default (4000 for 2DQuant/CompSRT)."""
    dqc_batch: int = 16
    dqc_lr: float | None = None
    dqc_recompute: bool = True
    """Checkpoint residual groups during DQC (memory; see ``distill_bounds``)."""
    val_batch: int = 16
    val_every: int = 200
    rotation: str | None = None
    """Override CompSRT's Hadamard sizing (``pow2``/``exact``)."""
    rotation_skip: tuple[str, ...] = ()
    """Activation roles CompSRT leaves unrotated (see :class:`QuantConfig`)."""
    seed: int = 0
    workers: int = 0
    latency_size: int = 128
    """LR side of the latency input (one image, batch 1)."""
    latency_repeats: int = 10
    save_packed: bool = False
    int8_kernel: bool = False
    """Add a row for PyTorch's real int8 CPU kernels (dynamic W8A8 Linears)."""


@dataclass
class CompressionRow:
    model: str
    method: str
    wbits: int
    abits: int
    prune: float
    scores: dict[str, tuple[float, float]]
    megabytes: float
    bits_per_param: float
    nominal_bits_per_param: float
    latency_ms: float
    seconds_to_quantize: float
    dqc_iters_done: int = 0
    dqc_best_step: int | None = None
    packed_file_bytes: int | None = None
    config: dict[str, Any] = field(default_factory=dict)


def measure_latency(
    model: nn.Module,
    shape: tuple[int, ...],
    *,
    device: torch.device,
    warmup: int = 2,
    repeats: int = 10,
) -> float:
    """Median wall time (ms) of one forward pass on a random input of ``shape``.

    Warm-up runs first (allocator, caches, cuDNN autotune); CUDA is synchronised
    before and after each timed run, so the time is the work, not the launch.
    """
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _overrides(settings: CompressionSettings, method: str) -> dict[str, Any]:
    over: dict[str, Any] = {}
    if settings.prune:
        over["prune"] = settings.prune
    if settings.dqc_iters is not None and method in ("dquant2d", "2dquant", "compsrt"):
        over["dqc_iters"] = settings.dqc_iters
    if settings.dqc_lr is not None:
        over["dqc_lr"] = settings.dqc_lr
    if settings.rotation is not None and method == "compsrt":
        over["rotation"] = settings.rotation
    if settings.rotation_skip and method == "compsrt":
        over["rotation_skip"] = tuple(settings.rotation_skip)
    return over


def calibration_batches(settings: CompressionSettings) -> tuple[Tensor, Tensor]:
    """The calibration batch and the held-out batch (DQC's bound selection), fixed
    by the settings' seed so every method of a run sees the same patches."""
    common = {"scale": settings.scale, "patch": settings.calib_patch}
    calib = calibration_batch(
        settings.calib_dir, batch=settings.calib_batch, seed=settings.seed, **common
    )
    held_out = calibration_batch(
        settings.calib_dir, batch=settings.val_batch, seed=settings.seed + 10_000, **common
    )
    return calib, held_out


def quantize_with_settings(
    model: nn.Module,
    settings: CompressionSettings,
    method: str,
    wbits: int,
    abits: int,
    calib: Tensor,
    held_out: Tensor,
    *,
    device: torch.device,
) -> QuantResult:
    """One quantised copy of ``model``: the method's defaults with the settings'
    overrides, calibrated on ``calib`` and (2DQuant/CompSRT) distilled on a patch
    stream from the settings' folder."""
    cfg = method_config(method, wbits=wbits, abits=abits, **_overrides(settings, method))
    stream = patch_stream(
        settings.calib_dir,
        scale=settings.scale,
        batch=settings.dqc_batch,
        patch=settings.calib_patch,
        seed=settings.seed + 1,
        workers=settings.workers,
    )
    return quantize_model(
        model,
        cfg,
        calib,
        stream if cfg.dqc_iters else None,
        device=device,
        val_batch=held_out,
        val_every=settings.val_every,
        on_step=_progress_logger(method, wbits, abits, cfg.dqc_iters),
        recompute=settings.dqc_recompute,
    )


def run_compression(
    model: nn.Module,
    settings: CompressionSettings,
    evaluator: Evaluator,
    *,
    device: torch.device,
    out_dir: str | Path | None = None,
    on_row: Callable[[CompressionRow], None] | None = None,
    label: str = "model",
) -> list[CompressionRow]:
    """FP row first, then one row per (method, bits); see the module docstring.

    ``label`` names the model in the rows (several models share one table).
    """
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    lat_shape = (1, getattr(model, "in_chans", 3), settings.latency_size, settings.latency_size)
    fp_report = storage_report(model)
    rows = [
        CompressionRow(
            model=label,
            method="fp32",
            wbits=32,
            abits=32,
            prune=0.0,
            scores=evaluator(model),
            megabytes=fp_report.megabytes,
            bits_per_param=32.0,
            nominal_bits_per_param=32.0,
            latency_ms=measure_latency(
                model, lat_shape, device=device, repeats=settings.latency_repeats
            ),
            seconds_to_quantize=0.0,
        )
    ]
    if on_row:
        on_row(rows[0])
    if settings.int8_kernel:
        rows.append(_int8_row(model, evaluator, lat_shape, settings.latency_repeats, label))
        if on_row:
            on_row(rows[-1])
    calib, held_out = calibration_batches(settings)
    for method in settings.methods:
        for wbits, abits in settings.bits:
            start = time.perf_counter()
            result = quantize_with_settings(
                model, settings, method, wbits, abits, calib, held_out, device=device
            )
            elapsed = time.perf_counter() - start
            cfg = result.config
            qmodel = result.model.eval()
            report = storage_report(qmodel)
            row = CompressionRow(
                model=label,
                method=cfg.method,
                wbits=wbits,
                abits=abits,
                prune=cfg.prune,
                scores=evaluator(qmodel),
                megabytes=report.megabytes,
                bits_per_param=report.bits_per_quantized_param,
                nominal_bits_per_param=report.nominal_bits_per_param,
                latency_ms=measure_latency(
                    qmodel, lat_shape, device=device, repeats=settings.latency_repeats
                ),
                seconds_to_quantize=elapsed,
                dqc_iters_done=len(result.distill.loss) if result.distill else 0,
                dqc_best_step=result.distill.best_step if result.distill else None,
                config=cfg.to_dict(),
            )
            if settings.save_packed and out_dir is not None:
                row.packed_file_bytes = _save_and_check(
                    qmodel, cfg, model, Path(out_dir) / "packed" / _slug(label), lat_shape
                )
            rows.append(row)
            if on_row:
                on_row(row)
            del qmodel, result
    return rows


def _int8_row(
    model: nn.Module, evaluator: Evaluator, shape: tuple[int, ...], repeats: int, label: str
) -> CompressionRow:
    """PyTorch's dynamic int8 Linears on CPU: quality, size (int8 weights + a
    scale/zero point per layer + fp32 rest) and latency."""
    from irformer.compress.kernels import dynamic_int8

    start = time.perf_counter()
    qmodel = dynamic_int8(model)
    elapsed = time.perf_counter() - start
    linear_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    n_linear = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    other = sum(p.numel() for p in model.parameters()) - linear_w
    total = linear_w + 8 * n_linear + 4 * other
    return CompressionRow(
        model=label,
        method="int8_dynamic",
        wbits=8,
        abits=8,
        prune=0.0,
        scores=evaluator(qmodel),
        megabytes=total / 1e6,
        bits_per_param=8.0 + 64 * n_linear / max(linear_w, 1),
        nominal_bits_per_param=8.0,
        latency_ms=measure_latency(qmodel, shape, device=torch.device("cpu"), repeats=repeats),
        seconds_to_quantize=elapsed,
    )


def _progress_logger(
    method: str, wbits: int, abits: int, iters: int
) -> Callable[[int, float], None]:
    every = max(iters // 20, 1)

    def log(step: int, loss: float) -> None:
        if (step + 1) % every == 0:
            logger.info(
                "%s W%dA%d DQC %d/%d loss %.5g", method, wbits, abits, step + 1, iters, loss
            )

    return log


def _save_and_check(
    qmodel: nn.Module, cfg: Any, skeleton: nn.Module, out_dir: str | Path, shape: tuple[int, ...]
) -> int:
    """Write the packed file, reload it and insist on identical outputs."""
    path = (
        Path(out_dir) / f"{cfg.method}_w{cfg.wbits}a{cfg.abits}"
        f"{'_p' + str(cfg.prune) if cfg.prune else ''}.safetensors"
    )
    device = next(qmodel.parameters()).device
    save_packed(qmodel, cfg, path)
    loaded = load_packed(path, skeleton)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        same = torch.equal(qmodel(x), loaded(x))
    if not same:
        raise RuntimeError(f"{path}: reloaded packed model does not reproduce the outputs")
    return path.stat().st_size


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _fmt(v: float, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _bits(r: CompressionRow) -> str:
    return "32/32" if r.method == "fp32" else f"{r.wbits}/{r.abits}"


def quality_table(rows: Sequence[CompressionRow], benchmarks: Sequence[str]) -> str:
    """Markdown: model x method x bits rows, PSNR/SSIM per benchmark (the papers' Table 2)."""
    head = (
        "| Model | Method | W/A | Prune | "
        + " | ".join(f"{b} PSNR | {b} SSIM" for b in benchmarks)
        + " |"
    )
    lines = [head, "|" + "---|" * (4 + 2 * len(benchmarks))]
    for r in rows:
        cells = []
        for b in benchmarks:
            psnr, ssim = r.scores.get(b, (math.nan, math.nan))
            cells += [_fmt(psnr, 2), _fmt(ssim, 4)]
        lines.append(
            f"| {r.model} | {r.method} | {_bits(r)} | {r.prune:g} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def drop_table(rows: Sequence[CompressionRow], benchmarks: Sequence[str]) -> str:
    """Markdown: PSNR lost against each model's own FP row, one column per model,
    so models (e.g. LN vs i-LN) compare under the same quantisation."""
    models = list(dict.fromkeys(r.model for r in rows))
    fp = {r.model: r.scores for r in rows if r.method == "fp32"}
    keys = list(dict.fromkeys((r.method, _bits(r), r.prune) for r in rows if r.method != "fp32"))
    head = "| Method | W/A | Prune | " + " | ".join(
        f"{m} {b} dPSNR" for m in models for b in benchmarks
    )
    lines = [head + " |", "|" + "---|" * (3 + len(models) * len(benchmarks))]
    index = {(r.model, r.method, _bits(r), r.prune): r for r in rows}
    for method, bits, prune in keys:
        cells = []
        for m in models:
            row = index.get((m, method, bits, prune))
            for b in benchmarks:
                if row is None or m not in fp or b not in fp[m] or b not in row.scores:
                    cells.append("-")
                else:
                    cells.append(f"{row.scores[b][0] - fp[m][b][0]:+.2f}")
        lines.append(f"| {method} | {bits} | {prune:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def complexity_table(rows: Sequence[CompressionRow], device: str) -> str:
    """Markdown: size, bits per quantised weight and measured latency (Table 4)."""
    lines = [
        "| Model | Method | W/A | Prune | MB | bits/param (stored) | bits/param (nominal) "
        f"| latency ms ({device}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.method} | {_bits(r)} | {r.prune:g} | {r.megabytes:.4f} | "
            f"{r.bits_per_param:.3f} | {r.nominal_bits_per_param:.2f} | {r.latency_ms:.2f} |"
        )
    if any(r.method == "int8_dynamic" for r in rows):
        lines.append("")
        lines.append("int8_dynamic (PyTorch's int8 Linear kernels) runs and is timed on CPU.")
    return "\n".join(lines) + "\n"


def rows_as_dicts(rows: Sequence[CompressionRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


# --------------------------------------------------------------------------- experiments

ROWS_FILE = "rows.jsonl"


def model_scale(model: nn.Module, meta: dict[str, Any]) -> int:
    """The SR scale: the checkpoint's metadata, else the model's ``upscale``."""
    return int(meta.get("scale") or getattr(model, "upscale", 1))


def checkpoint_scale(path: str | Path, arch: str | None = None) -> int:
    """The SR scale of a checkpoint (a weights file or shipped model name): its irformer
    metadata, else its model's ``upscale``."""
    path = weights_path(path)
    _, meta = read_state_dict(path)
    if meta.get("scale"):
        return int(meta["scale"])  # type: ignore[call-overload]
    model, meta = load_checkpoint_model(path, arch)
    return model_scale(model, meta)


def benchmark_evaluator(
    names: str | Sequence[str], data_root: Path | None, scale: int, device: torch.device
) -> tuple[Evaluator, list[str]]:
    """Benchmarks resolved once; each call scores a model on all of them (PSNR, SSIM)."""
    benches = resolve_benchmarks(names, data_root, task="sr", scale=scale)

    def evaluator(model: nn.Module) -> dict[str, tuple[float, float]]:
        # The model's own device: PyTorch's int8 kernels run on CPU only.
        param = next(iter(model.parameters()), None)
        dev = param.device if param is not None else device
        out = {}
        for bench in benches:
            res = evaluate_benchmark(model.eval(), bench, device=dev)
            out[bench.name] = (res.psnr, res.ssim)
        return out

    return evaluator, [b.name for b in benches]


def _label(path: Path, meta: dict[str, Any], taken: set[str]) -> str:
    label = f"{path.stem} ({meta.get('norm', '?')})"
    while label in taken:
        label += "'"
    taken.add(label)
    return label


def write_tables(
    rows: Sequence[CompressionRow], benchmarks: Sequence[str], device: str, out: Path
) -> dict[str, str]:
    """``quality.md``, ``psnr_drop.md`` and ``complexity.md`` in ``out``; returns their texts."""
    tables = {
        "quality.md": quality_table(rows, benchmarks),
        "psnr_drop.md": drop_table(rows, benchmarks),
        "complexity.md": complexity_table(rows, device),
    }
    for name, text in tables.items():
        atomic_write(out / name, text)
    return tables


def _rows_jsonl(rows: Sequence[CompressionRow]) -> str:
    return "".join(json.dumps(asdict(r), default=str) + "\n" for r in rows)


def run_experiment(
    checkpoints: Sequence[str | Path],
    settings: CompressionSettings,
    *,
    benchmarks: Sequence[str],
    data_root: Path | None,
    device: torch.device,
    out_dir: Path,
    arch: str | None = None,
    on_row: Callable[[CompressionRow], None] | None = None,
    progress: Progress | None = None,
) -> tuple[list[CompressionRow], dict[str, str]]:
    """Every checkpoint x method x bit width into one folder; returns ``(rows, tables)``.

    Rows are appended to ``out_dir/rows.jsonl`` as they finish (a long run that
    dies keeps what it measured); the tables and ``results.json`` are written at
    the end. The checkpoints (weights files or shipped model names,
    :func:`irformer.archs.zoo.weights_path`) must share their scale. ``progress``
    (:mod:`irformer.progress`) counts the rows.
    """
    checkpoints = [weights_path(p) for p in checkpoints]
    loaded = [(p, *load_checkpoint_model(p, arch)) for p in checkpoints]
    scales = {model_scale(m, meta) for _, m, meta in loaded}
    if len(scales) != 1:
        raise ValueError(f"checkpoints {list(map(str, checkpoints))} have scales {sorted(scales)}")
    if settings.scale not in scales:
        raise ValueError(f"settings.scale {settings.scale} but the checkpoints are x{scales}")
    evaluator, bench_names = benchmark_evaluator(benchmarks, data_root, settings.scale, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_file = out_dir / ROWS_FILE
    atomic_write(rows_file, "")
    rows: list[CompressionRow] = []
    taken: set[str] = set()
    per_model = 1 + int(settings.int8_kernel) + len(settings.methods) * len(settings.bits)
    total, written = per_model * len(loaded), 0
    report_progress(progress, 0, total, "compress")

    def finished(row: CompressionRow) -> None:
        nonlocal written
        with rows_file.open("a") as handle:
            handle.write(json.dumps(asdict(row), default=str) + "\n")
        if on_row is not None:
            on_row(row)
        written += 1
        report_progress(progress, written, total, "compress")

    for path, model, meta in loaded:
        rows += run_compression(
            model,
            settings,
            evaluator,
            device=device,
            out_dir=out_dir,
            on_row=finished,
            label=_label(path, meta, taken),
        )
    tables = write_tables(rows, bench_names, str(device), out_dir)
    payload = {
        "command": "irformer compress run",
        "models": {str(p): meta for p, _, meta in loaded},
        "device": str(device),
        "torch": torch.__version__,
        "settings": {**settings.__dict__, "bits": [list(b) for b in settings.bits]},
        "rows": rows_as_dicts(rows),
    }
    atomic_write(out_dir / "results.json", json.dumps(payload, indent=1, default=str))
    return rows, tables


def read_rows(run_dir: Path) -> list[CompressionRow]:
    """The rows one :func:`run_experiment` wrote to ``RUN_DIR/rows.jsonl``."""
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


def merge_runs(run_dirs: Sequence[Path], out_dir: Path) -> dict[str, str]:
    """One set of tables from folders measured separately (e.g. one per model in parallel).

    Every run re-measures its FP model; identical FP rows merge, any other row
    measured twice is an error naming both folders.
    """
    rows: list[CompressionRow] = []
    seen: dict[tuple[str, str, int, int, float], Path] = {}
    fp_scores: dict[str, dict[str, tuple[float, float]]] = {}
    for run_dir in run_dirs:
        for row in read_rows(run_dir):
            key = (row.model, row.method, row.wbits, row.abits, row.prune)
            if row.method == "fp32" and fp_scores.get(row.model) == row.scores:
                continue
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
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = write_tables(rows, benchmarks, "see each run", out_dir)
    atomic_write(out_dir / ROWS_FILE, _rows_jsonl(rows))
    return tables


def stats_markdown(report: StatsReport) -> str:
    """The pre vs post-Hadamard tests as a markdown table (CompSRT's Table 5 layout)."""
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


def statistics_experiment(
    checkpoint: str | Path,
    *,
    arch: str | None = None,
    calib: Path | None = None,
    calib_batch: int = 32,
    patch: int = 64,
    rotation: str = "pow2",
    paper_padding: bool = False,
    seed: int = 0,
    out_dir: Path | None = None,
) -> str:
    """Weights (and, with ``calib``, activations) before vs after the Hadamard rotation:
    the statistical tests as markdown (also ``stats.md``/``stats.json`` in ``out_dir``)."""
    model, meta = load_checkpoint_model(weights_path(checkpoint), arch)
    tensors = weight_tensors(model)
    if calib is not None:
        batch = calibration_batch(
            calib, scale=model_scale(model, meta), batch=calib_batch, patch=patch, seed=seed
        )
        tensors += activation_tensors(model, batch)
    report = compare_pre_post(
        tensors, rotation=rotation, eps=EPS_SWEEP, paper_padding=paper_padding
    )
    text = stats_markdown(report)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "stats.md", text)
        atomic_write(out_dir / "stats.json", json.dumps(report.as_dict(), indent=1))
    return text


def sensitivity_experiment(
    checkpoint: str | Path,
    settings: CompressionSettings,
    *,
    benchmark: str,
    data_root: Path | None,
    device: torch.device,
    arch: str | None = None,
    out_dir: Path | None = None,
    progress: Progress | None = None,
) -> str:
    """Which quantisers cost the quality: quantise once with one method and width, then
    re-score with each group FP / quantised alone (and report each activation
    quantiser's level usage). Returns the markdown report (also written to ``out_dir``);
    ``progress`` (:mod:`irformer.progress`) counts the scoring passes."""
    checkpoint = weights_path(checkpoint)
    model, meta = load_checkpoint_model(checkpoint, arch)
    scale = model_scale(model, meta)
    if scale < 2:
        raise ValueError(f"compress sensitivity scores SR models; {checkpoint} has scale {scale}")
    if len(settings.methods) != 1 or len(settings.bits) != 1:
        raise ValueError(
            f"compress sensitivity takes one method and one bit width, got methods "
            f"{settings.methods} and bits {settings.bits}"
        )
    benches = resolve_benchmarks(benchmark, data_root, task="sr", scale=scale)
    if len(benches) != 1:
        raise ValueError(f"compress sensitivity scores one benchmark, got {benchmark!r}")
    bench = benches[0]
    model = model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    calib, held_out = calibration_batches(settings)
    (wbits, abits), method = settings.bits[0], settings.methods[0]
    result = quantize_with_settings(
        model, settings, method, wbits, abits, calib, held_out, device=device
    )
    qmodel = result.model.eval()

    passes = 2 + 2 * len(quantizer_groups(qmodel))  # all quantised, FP, two per group
    scored = 0
    report_progress(progress, 0, passes, "sensitivity")

    def psnr(m: nn.Module) -> float:
        nonlocal scored
        value = evaluate_benchmark(m, bench, device=device).psnr
        scored += 1
        report_progress(progress, scored, passes, "sensitivity")
        return value

    scores: list[float] = []
    usage = level_usage(qmodel, lambda m: scores.append(psnr(m)))  # the all-quantised pass
    quantized, fp, rows = sensitivity(qmodel, psnr, quantized=scores[0])
    title = f"{checkpoint} ({meta.get('norm', '?')}), {method} W{wbits}A{abits}, {bench.name} PSNR"
    text = (
        f"# Quantisation sensitivity: {title}\n\n"
        + sensitivity_table(quantized, fp, rows)
        + "\nActivation quantisers, fewest used levels first (all quantised, "
        + f"{bench.name}):\n\n"
        + usage_table(usage)
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "sensitivity.md", text)
        payload = {
            "model": str(checkpoint),
            "meta": meta,
            "config": result.config.to_dict(),
            "benchmark": bench.name,
            "quantized": quantized,
            "fp": fp,
            "groups": [asdict(r) for r in rows],
            "activations": [asdict(u) for u in usage],
        }
        atomic_write(out_dir / "sensitivity.json", json.dumps(payload, indent=1, default=str))
    return text
