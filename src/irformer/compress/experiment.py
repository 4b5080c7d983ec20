"""The compression experiment: methods x bit widths -> quality, size and latency tables.

:func:`run_compression` quantises one FP model with every requested method at
every bit width, scores each quantised model with a caller-supplied
``evaluator`` (the CLI passes the benchmark evaluation of
:mod:`irformer.engine.evaluate`; ``compress`` sits below ``engine`` and does
not import it), and measures storage (:func:`irformer.compress.pack.storage_report`,
optionally a real packed file that is reloaded and checked) and latency
(warm, synchronised, median of repeats).
"""

from __future__ import annotations

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

from irformer.compress.calibration import calibration_batch, patch_stream
from irformer.compress.methods import QuantResult, method_config, quantize_model
from irformer.compress.pack import load_packed, save_packed, storage_report

__all__ = [
    "CompressionRow",
    "CompressionSettings",
    "Evaluator",
    "calibration_batches",
    "complexity_table",
    "drop_table",
    "measure_latency",
    "quality_table",
    "quantize_with_settings",
    "run_compression",
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
