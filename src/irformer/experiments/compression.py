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
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from irformer.archs import load_checkpoint_model, read_state_dict
from irformer.archs.zoo import weights_path
from irformer.compress.calibration import calibration_batch, patch_stream
from irformer.compress.fused import fused_fake_quant
from irformer.compress.methods import QuantResult, method_config, quantize_model
from irformer.compress.methods.base import (
    DistillCheckpoint,
    DqcLoss,
    QkvInputs,
    QuantConfig,
    quantizer_drift,
    quantizer_snapshot,
)
from irformer.compress.pack import load_packed, save_packed, storage_report
from irformer.compress.prune import PruneMode, megabytes
from irformer.compress.sensitivity import (
    level_usage,
    quantizer_groups,
    sensitivity,
    sensitivity_table,
    usage_table,
)
from irformer.compress.stats import (
    EPS_SWEEP,
    PairedTest,
    StatsReport,
    activation_tensors,
    compare_pre_post,
    paired_test,
    weight_tensors,
)
from irformer.data.benchmarks import (
    benchmark_present,
    resolve_benchmarks,
    split_benchmark_list,
)
from irformer.engine.evaluate import evaluate_benchmark
from irformer.files import atomic_write
from irformer.progress import Progress
from irformer.progress import report as report_progress

__all__ = [
    "BASELINES",
    "PAPER_BENCHMARKS",
    "ROWS_FILE",
    "CompressionRow",
    "CompressionSettings",
    "Evaluator",
    "SignificanceRow",
    "benchmark_evaluator",
    "budget_table",
    "calibration_batches",
    "check_resumed_configs",
    "checkpoint_scale",
    "complexity_table",
    "drop_table",
    "final_rows",
    "measure_latency",
    "merge_runs",
    "quality_table",
    "quantize_with_settings",
    "read_rows",
    "resolve_benchmark_names",
    "row_method",
    "run_compression",
    "run_experiment",
    "sensitivity_experiment",
    "settings_config",
    "significance",
    "significance_experiment",
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
    prune_mode: PruneMode = "magnitude"
    qkv_inputs: QkvInputs = "shared"
    """``split``: three input quantisers on a fused qkv (2DQuant's/CompSRT's code)."""
    calib_batch: int = 32
    calib_patch: int = 64
    dqc_iters: int | None = None
    """None = each method's default (4000 for 2DQuant/CompSRT)."""
    dqc_checkpoints: tuple[int, ...] = ()
    """Iteration counts at which the distilled model is scored (a budget curve from
    one run; see :func:`irformer.compress.methods.base.distill_bounds`); the
    largest is the run's length. Empty: score once, after ``dqc_iters``."""
    dqc_batch: int = 16
    dqc_patch: int | None = None
    """LR patch side of the DQC stream and the held-out batch (None: ``calib_patch``)."""
    dqc_lr: float | dict[int, float] | None = None
    """DQC learning rate: one value, or one per weight width (``{4: 1e-3, 2: 1e-2}``;
    a width not named keeps the method's default). None: the default (1e-2)."""
    dqc_scalar_lr: float | dict[int, float] | None = None
    """CompSRT's alpha/beta learning rate, like ``dqc_lr`` (None: ``dqc_lr``)."""
    dqc_loss: DqcLoss = "mean"
    """DQC loss scaling (``QuantConfig.dqc_loss``): ``mean`` or the reference code's
    ``official``."""
    dqc_recompute: bool = True
    """Checkpoint residual groups during DQC (memory; see ``distill_bounds``)."""
    dqc_fused: bool = True
    """Distil with the fused CPU fake-quantisation kernel (:mod:`irformer.compress.fused`;
    PyTorch ops where it does not apply or does not build)."""
    eval_fused: bool = False
    """Score quantised models with the fused kernel too (same values up to float
    rounding; BENCHMARKS.md measures the PSNR difference)."""
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
    resume: bool = False
    """Keep the rows already in the output folder, skip what they cover and continue
    interrupted distillations from their saved state (``dqc_state/``)."""

    def __post_init__(self) -> None:
        if self.save_packed and self.prune and self.prune_mode == "official":
            raise ValueError(
                "prune mode 'official' cannot be saved packed: its pruned weights are "
                "quantised back to non-zeros and its mask changes on every forward"
            )
        if self.dqc_checkpoints:
            marks = sorted(set(self.dqc_checkpoints))
            if marks[0] < 0:
                raise ValueError(f"DQC checkpoints must be >= 0, got {self.dqc_checkpoints}")
            if self.dqc_iters is not None and self.dqc_iters != marks[-1]:
                raise ValueError(
                    f"dqc_iters {self.dqc_iters} must be the largest DQC checkpoint "
                    f"{marks[-1]} (or None)"
                )

    @property
    def distill_patch(self) -> int:
        return self.calib_patch if self.dqc_patch is None else self.dqc_patch


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
    """The DQC iteration whose bounds were scored (the lowest held-out loss)."""
    packed_file_bytes: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dqc_checkpoint: int | None = None
    """Budget-curve rows: the iterations done when this row was scored."""
    dqc_kept: bool = True
    """False: a budget-curve row scoring the last iterate's bounds where the
    held-out selection keeps an earlier step's (the protocol's row has True)."""
    dqc_val_loss: float | None = None
    """Held-out L1 to the FP output of the scored bounds."""
    drift: dict[str, float] = field(default_factory=dict)
    """How far DQC moved the bounds and alpha/beta, in initial grid steps
    (:func:`irformer.compress.methods.base.quantizer_drift`)."""

    def key(self) -> tuple[str, str, int, int, float, int | None, bool]:
        """What identifies a row within a run (resume and merge use it)."""
        return (
            self.model,
            self.method,
            self.wbits,
            self.abits,
            self.prune,
            self.dqc_checkpoint,
            self.dqc_kept,
        )


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
    ``repeats = 0`` skips the measurement (NaN).
    """
    if repeats <= 0:
        return math.nan
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


def row_method(cfg: QuantConfig) -> str:
    """The method as rows name it: ``cfg.method``, plus the deviations from its
    default that change what is measured (``compsrt (official pruning)``), so a
    run folder and its tables never mix them up."""
    parts = []
    if cfg.prune and cfg.prune_mode != "magnitude":
        parts.append(f"{cfg.prune_mode} pruning")
    if cfg.qkv_inputs != "shared":
        parts.append(f"{cfg.qkv_inputs} qkv inputs")
    if cfg.dqc_iters and cfg.dqc_loss != "mean":
        parts.append(f"{cfg.dqc_loss} DQC loss")
    return f"{cfg.method} ({', '.join(parts)})" if parts else cfg.method


def _overrides(settings: CompressionSettings, method: str, wbits: int) -> dict[str, Any]:
    over: dict[str, Any] = {}
    if settings.prune:
        over["prune"] = settings.prune
        over["prune_mode"] = settings.prune_mode
    if settings.qkv_inputs != "shared":
        over["qkv_inputs"] = settings.qkv_inputs
    default = method_config(method, wbits=4, abits=4)
    iters = max(settings.dqc_checkpoints) if settings.dqc_checkpoints else settings.dqc_iters
    if iters is not None and default.dqc_iters:  # the methods that distil (2DQuant, CompSRT)
        over["dqc_iters"] = iters
    for key in ("dqc_lr", "dqc_scalar_lr"):
        lr = getattr(settings, key)
        if isinstance(lr, dict):  # one per weight width
            lr = lr.get(wbits)
        if lr is not None and (key == "dqc_lr" or default.scalar_decomposition):
            over[key] = lr
    if settings.dqc_loss != "mean":
        over["dqc_loss"] = settings.dqc_loss
    if settings.rotation is not None and default.rotation is not None:
        over["rotation"] = settings.rotation
    if settings.rotation_skip and default.rotation is not None:
        over["rotation_skip"] = tuple(settings.rotation_skip)
    return over


def settings_config(
    settings: CompressionSettings, method: str, wbits: int, abits: int
) -> QuantConfig:
    """The method's defaults at these widths with the settings' overrides: what one
    row of a run measures (and what a resumed row must have been measured with)."""
    return method_config(method, wbits=wbits, abits=abits, **_overrides(settings, method, wbits))


def calibration_batches(settings: CompressionSettings) -> tuple[Tensor, Tensor]:
    """The calibration batch and the held-out batch (DQC's bound selection), fixed
    by the settings' seed so every method of a run sees the same patches."""
    calib = calibration_batch(
        settings.calib_dir,
        scale=settings.scale,
        patch=settings.calib_patch,
        batch=settings.calib_batch,
        seed=settings.seed,
    )
    held_out = calibration_batch(
        settings.calib_dir,
        scale=settings.scale,
        patch=settings.distill_patch,
        batch=settings.val_batch,
        seed=settings.seed + 10_000,
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
    on_checkpoint: Callable[[DistillCheckpoint], None] | None = None,
    on_calibrated: Callable[[nn.Module], None] | None = None,
    state_path: Path | None = None,
) -> QuantResult:
    """One quantised copy of ``model``: the method's defaults with the settings'
    overrides, calibrated on ``calib`` and (2DQuant/CompSRT) distilled on a patch
    stream from the settings' folder (``on_checkpoint`` at the settings' DQC
    checkpoints; resumable from ``state_path``)."""
    cfg = settings_config(settings, method, wbits, abits)
    stream = patch_stream(
        settings.calib_dir,
        scale=settings.scale,
        batch=settings.dqc_batch,
        patch=settings.distill_patch,
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
        fused=settings.dqc_fused,
        checkpoints=settings.dqc_checkpoints if cfg.dqc_iters else (),
        on_checkpoint=on_checkpoint,
        on_calibrated=on_calibrated,
        state_path=state_path if cfg.dqc_iters else None,
    )


RowKey = tuple[str, str, int, int, float, int | None, bool]


def run_compression(
    model: nn.Module,
    settings: CompressionSettings,
    evaluator: Evaluator,
    *,
    device: torch.device,
    out_dir: str | Path | None = None,
    on_row: Callable[[CompressionRow], None] | None = None,
    label: str = "model",
    done: Collection[RowKey] = (),
) -> list[CompressionRow]:
    """FP row first, then one row per (method, bits); see the module docstring.

    ``label`` names the model in the rows (several models share one table).
    With ``settings.dqc_checkpoints`` a distilling method gives one row per
    checkpoint (and a last-iterate row where the held-out selection kept an
    earlier step), scored during the one run. Rows whose :meth:`CompressionRow.key`
    is in ``done`` are not measured again (resume); with ``out_dir`` and
    ``settings.resume`` the distillation state is kept in ``out_dir/dqc_state``.
    """
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    lat_shape = (1, getattr(model, "in_chans", 3), settings.latency_size, settings.latency_size)
    rows: list[CompressionRow] = []

    def emit(row: CompressionRow) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    def score(qmodel: nn.Module) -> dict[str, tuple[float, float]]:
        with fused_fake_quant(settings.eval_fused):
            return evaluator(qmodel)

    if (label, "fp32", 32, 32, 0.0, None, True) not in done:
        fp_report = storage_report(model)
        emit(
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
        )
    if settings.int8_kernel and (label, "int8_dynamic", 8, 8, 0.0, None, True) not in done:
        emit(_int8_row(model, evaluator, lat_shape, settings.latency_repeats, label))
    calib: Tensor | None = None
    held_out: Tensor | None = None
    for method in settings.methods:
        for wbits, abits in settings.bits:
            cfg = settings_config(settings, method, wbits, abits)
            marks = sorted(set(settings.dqc_checkpoints)) if cfg.dqc_iters else []
            name = row_method(cfg)
            final: RowKey = (
                label,
                name,
                wbits,
                abits,
                cfg.prune,
                marks[-1] if marks else None,
                True,
            )
            if final in done:
                logger.info("%s %s W%dA%d: already measured, skipped", label, name, wbits, abits)
                continue
            if calib is None or held_out is None:
                calib, held_out = calibration_batches(settings)
            state_path = None
            if out_dir is not None and settings.resume and cfg.dqc_iters:
                state_path = (
                    Path(out_dir)
                    / "dqc_state"
                    / f"{_slug(label)}_{_slug(name)}_w{wbits}a{abits}_p{cfg.prune:g}.pt"
                )
            curve = _BudgetCurve(
                (label, name, wbits, abits, cfg.prune),
                marks[-1] if marks else None,
                score,
                done,
                emit,
                cfg.to_dict(),
            )
            start = time.perf_counter()
            result = quantize_with_settings(
                model,
                settings,
                method,
                wbits,
                abits,
                calib,
                held_out,
                device=device,
                on_checkpoint=curve.checkpoint if marks else None,
                on_calibrated=curve.calibrated,
                state_path=state_path,
            )
            elapsed = time.perf_counter() - start - curve.scoring_seconds
            qmodel = result.model.eval()
            report = storage_report(qmodel)
            log = result.distill
            row = curve.final_row or CompressionRow(
                model=label,
                method=name,
                wbits=wbits,
                abits=abits,
                prune=cfg.prune,
                scores=score(qmodel),
                megabytes=0.0,
                bits_per_param=0.0,
                nominal_bits_per_param=0.0,
                latency_ms=math.nan,
                seconds_to_quantize=0.0,
                dqc_iters_done=len(log.loss) if log else 0,
                dqc_best_step=log.best_step if log else None,
                drift=quantizer_drift(qmodel, curve.snapshot) if log else {},
            )
            row.megabytes = report.megabytes
            row.bits_per_param = report.bits_per_quantized_param
            row.nominal_bits_per_param = report.nominal_bits_per_param
            row.latency_ms = measure_latency(
                qmodel, lat_shape, device=device, repeats=settings.latency_repeats
            )
            row.seconds_to_quantize = elapsed
            row.config = cfg.to_dict()
            if settings.save_packed and out_dir is not None:
                row.packed_file_bytes = _save_and_check(
                    qmodel, cfg, model, Path(out_dir) / "packed" / _slug(label), lat_shape
                )
            emit(row)
            del qmodel, result
    return rows


class _BudgetCurve:
    """Scores the model at each DQC checkpoint of one (method, bits) run."""

    def __init__(
        self,
        what: tuple[str, str, int, int, float],
        final_mark: int | None,
        score: Evaluator,
        done: Collection[RowKey],
        emit: Callable[[CompressionRow], None],
        config: dict[str, Any],
    ) -> None:
        self.label, self.method, self.wbits, self.abits, self.prune = what
        self.final_mark = final_mark
        self.score, self.done, self.emit = score, done, emit
        self.config = config
        self.model: nn.Module | None = None
        self.snapshot: dict[str, dict[str, Tensor]] = {}
        self.scoring_seconds = 0.0
        self.final_row: CompressionRow | None = None

    def calibrated(self, qmodel: nn.Module) -> None:
        self.model = qmodel
        self.snapshot = quantizer_snapshot(qmodel)

    def checkpoint(self, ck: DistillCheckpoint) -> None:
        assert self.model is not None
        log = ck.log
        kept = ck.selected_step == (ck.step if log.best_step is None else log.best_step)
        key: RowKey = (self.label, self.method, self.wbits, self.abits, self.prune, ck.step, kept)
        if key in self.done:
            return
        start = time.perf_counter()
        val = dict(zip(log.val_steps, log.val_loss, strict=True)).get(ck.selected_step)
        row = CompressionRow(
            model=self.label,
            method=self.method,
            wbits=self.wbits,
            abits=self.abits,
            prune=self.prune,
            scores=self.score(self.model.eval()),
            megabytes=0.0,
            bits_per_param=0.0,
            nominal_bits_per_param=0.0,
            latency_ms=math.nan,
            seconds_to_quantize=0.0,
            dqc_iters_done=ck.step,
            dqc_best_step=ck.selected_step,
            dqc_checkpoint=ck.step,
            dqc_kept=kept,
            dqc_val_loss=val,
            drift=quantizer_drift(self.model, self.snapshot),
            config=self.config,
        )
        self.scoring_seconds += time.perf_counter() - start
        logger.info(
            "%s %s W%dA%d DQC checkpoint %d (bounds of step %d%s): %s",
            self.label,
            self.method,
            self.wbits,
            self.abits,
            ck.step,
            ck.selected_step,
            "" if kept else ", last iterate",
            row.scores,
        )
        if kept and ck.step == self.final_mark:
            self.final_row = row  # completed (size, latency, packed file) after the run
        else:
            self.emit(row)


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
    """Markdown: size, bits per quantised weight and measured latency (Table 4).

    MB is the storage model's count; where a run saved packed files (``--save-packed``)
    a column gives each file's size on disk, which adds the file format's headers."""
    packed = any(r.packed_file_bytes is not None for r in rows)
    lines = [
        "| Model | Method | W/A | Prune | MB | bits/param (stored) | bits/param (nominal) "
        + ("| packed file MB " if packed else "")
        + f"| latency ms ({device}) |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if packed else ""),
    ]
    for r in rows:
        on_disk = ""
        if packed:
            size = r.packed_file_bytes
            on_disk = f"{megabytes(size):.4f} | " if size is not None else "- | "
        lines.append(
            f"| {r.model} | {r.method} | {_bits(r)} | {r.prune:g} | {r.megabytes:.4f} | "
            f"{r.bits_per_param:.3f} | {r.nominal_bits_per_param:.2f} | {on_disk}"
            f"{r.latency_ms:.2f} |"
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


PAPER_BENCHMARKS: tuple[str, ...] = ("Set5", "Set14", "B100", "Urban100?", "Manga109?")
"""``--bench paper``: CompSRT's Table 2 sets; Urban100 and Manga109 where present."""


def resolve_benchmark_names(names: str | Sequence[str], data_root: Path | None) -> list[str]:
    """Expand ``paper`` (:data:`PAPER_BENCHMARKS`) and drop the optional names (a
    trailing ``?``) that have no folder under ``data_root``; the others must exist
    (checked by :func:`irformer.data.benchmarks.resolve_benchmarks`)."""
    out: list[str] = []
    for raw in split_benchmark_list(names):
        name = raw.strip()
        if name.lower() == "paper":
            out += resolve_benchmark_names(PAPER_BENCHMARKS, data_root)
            continue
        if not name.endswith("?"):
            out.append(name)
            continue
        name = name[:-1]
        if not benchmark_present(name, data_root, "sr"):
            logger.info("optional benchmark %s is not under %s: skipped", name, data_root)
            continue
        out.append(name)
    return out


def benchmark_evaluator(
    names: str | Sequence[str], data_root: Path | None, scale: int, device: torch.device
) -> tuple[Evaluator, list[str]]:
    """Benchmarks resolved once; each call scores a model on all of them (PSNR, SSIM).
    ``names`` may use ``paper`` and optional ``NAME?`` (:func:`resolve_benchmark_names`)."""
    benches = resolve_benchmarks(
        resolve_benchmark_names(names, data_root), data_root, task="sr", scale=scale
    )

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


def final_rows(rows: Sequence[CompressionRow]) -> list[CompressionRow]:
    """The rows of the run's result: budget-curve rows only at each configuration's
    largest checkpoint with the kept (held-out selected) bounds."""
    last: dict[tuple[str, str, int, int, float], int] = {}
    for r in rows:
        if r.dqc_checkpoint is not None:
            k = r.key()[:5]
            last[k] = max(last.get(k, -1), r.dqc_checkpoint)  # type: ignore[index]
    return [
        r
        for r in rows
        if r.dqc_checkpoint is None or (r.dqc_kept and r.dqc_checkpoint == last[r.key()[:5]])
    ]


DRIFT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("w_lower_shift_mean", "W dl"),
    ("w_upper_shift_mean", "W du"),
    ("w_alpha_mean", "W |alpha|"),
    ("w_beta_mean", "W |beta|"),
    ("a_lower_shift_mean", "A dl"),
    ("a_upper_shift_mean", "A du"),
    ("a_alpha_mean", "A |alpha|"),
    ("a_beta_mean", "A |beta|"),
)
"""Budget-table columns: mean over quantisers, in initial grid steps."""


def budget_table(rows: Sequence[CompressionRow], benchmarks: Sequence[str]) -> str:
    """Markdown: PSNR after each DQC budget (one run per configuration, scored at its
    checkpoints), then every scored bound set with its held-out loss and drift."""
    curve = [r for r in rows if r.dqc_checkpoint is not None]
    if not curve:
        return ""
    marks = sorted({r.dqc_checkpoint for r in curve})  # type: ignore[type-var]
    fp = {r.model: r.scores for r in rows if r.method == "fp32"}
    configs = list(dict.fromkeys(r.key()[:5] for r in curve))
    kept = {(r.key()[:5], r.dqc_checkpoint): r for r in curve if r.dqc_kept}
    bench = " / ".join(benchmarks)
    head = "| Model | Method | W/A | FP | " + " | ".join(f"{k} it" for k in marks) + " |"
    lines = [
        f"PSNR ({bench}) of the kept bounds after each number of DQC iterations "
        "(in brackets: the step the held-out selection kept, where earlier):",
        "",
        head,
        "|" + "---|" * (4 + len(marks)),
    ]
    for cfg in configs:
        model, method, wbits, abits, _ = cfg
        ref = fp.get(model, {})
        cells = [" / ".join(_fmt(ref.get(b, (math.nan,))[0], 2) for b in benchmarks) or "-"]
        for k in marks:
            row = kept.get((cfg, k))
            if row is None:
                cells.append("-")
                continue
            text = " / ".join(_fmt(row.scores.get(b, (math.nan,))[0], 2) for b in benchmarks)
            if row.dqc_best_step is not None and row.dqc_best_step != k:
                text += f" ({row.dqc_best_step})"
            cells.append(text)
        lines.append(f"| {model} | {method} | {wbits}/{abits} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Every scored bound set: kept = the held-out selection's, last = the last "
        "iterate's (scored where they differ); drift = mean over quantisers of how far "
        "DQC moved each bound (dl, du) and the size of alpha/beta, in initial grid steps:",
        "",
        "| Model | Method | W/A | it | bounds of step | kept/last | held-out L1 | "
        + " | ".join(f"{b} PSNR" for b in benchmarks)
        + " | "
        + " | ".join(name for _, name in DRIFT_COLUMNS)
        + " |",
        "|" + "---|" * (7 + len(benchmarks) + len(DRIFT_COLUMNS)),
    ]
    for r in sorted(
        curve, key=lambda r: (configs.index(r.key()[:5]), r.dqc_checkpoint, not r.dqc_kept)
    ):
        val = "-" if r.dqc_val_loss is None else f"{r.dqc_val_loss:.5f}"
        psnr = [_fmt(r.scores.get(b, (math.nan,))[0], 2) for b in benchmarks]
        drift = [_fmt(r.drift.get(key, math.nan), 3) for key, _ in DRIFT_COLUMNS]
        lines.append(
            f"| {r.model} | {r.method} | {_bits(r)} | {r.dqc_checkpoint} | {r.dqc_best_step} | "
            f"{'kept' if r.dqc_kept else 'last'} | {val} | " + " | ".join(psnr + drift) + " |"
        )
    return "\n".join(lines) + "\n"


def write_tables(
    rows: Sequence[CompressionRow],
    benchmarks: Sequence[str],
    device: str,
    out: Path,
    *,
    caption: str = "",
) -> dict[str, str]:
    """``quality.md``, ``psnr_drop.md`` and ``complexity.md`` in ``out`` (of the
    :func:`final_rows`), and ``budget.md`` for budget-curve runs; returns their texts.
    ``caption`` (the protocol: DQC iterations x batch, calibration set, benchmark
    subset) opens every table file."""
    result = final_rows(rows)
    tables = {
        "quality.md": quality_table(result, benchmarks),
        "psnr_drop.md": drop_table(result, benchmarks),
        "complexity.md": complexity_table(result, device),
    }
    budget = budget_table(rows, benchmarks)
    if budget:
        tables["budget.md"] = budget
    if caption.strip():
        tables = {name: f"{caption.strip()}\n\n{text}" for name, text in tables.items()}
    for name, text in tables.items():
        atomic_write(out / name, text)
    return tables


def _rows_jsonl(rows: Sequence[CompressionRow]) -> str:
    return "".join(json.dumps(asdict(r), default=str) + "\n" for r in rows)


def check_resumed_configs(
    rows: Sequence[CompressionRow], settings: CompressionSettings, rows_file: Path
) -> None:
    """Refuse to resume a folder whose rows were measured under other settings.

    Rows are keyed by model, method, widths and pruning, not by every setting, so
    without this a resume with another learning rate or budget would keep the old
    rows beside new ones under one caption. Settings a row does not record (rows
    written before the setting existed) are not compared.
    """
    for method in settings.methods:
        for wbits, abits in settings.bits:
            cfg = settings_config(settings, method, wbits, abits)
            name = row_method(cfg)
            wanted = json.loads(json.dumps(cfg.to_dict(), default=str))
            for row in rows:
                if (row.method, row.wbits, row.abits, row.prune) != (name, wbits, abits, cfg.prune):
                    continue
                differ = sorted(
                    k for k in wanted.keys() & row.config.keys() if wanted[k] != row.config[k]
                )
                if differ:
                    changes = ", ".join(f"{k} {row.config[k]!r} -> {wanted[k]!r}" for k in differ)
                    raise ValueError(
                        f"{rows_file}: the {row.model} {name} W{wbits}A{abits} row was measured "
                        f"with other settings ({changes}); resume with the settings that wrote "
                        "the folder, or write to a new --out"
                    )


def _rows_per_config(settings: CompressionSettings, method: str) -> int:
    """Rows one (method, bits) gives: one per budget checkpoint for a distilling method."""
    if settings.dqc_checkpoints and method_config(method, wbits=4, abits=4).dqc_iters:
        return len(set(settings.dqc_checkpoints))
    return 1


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
    caption: str = "",
) -> tuple[list[CompressionRow], dict[str, str]]:
    """Every checkpoint x method x bit width into one folder; returns ``(rows, tables)``
    (``caption``: see :func:`write_tables`).

    Rows are appended to ``out_dir/rows.jsonl`` as they finish (a long run that
    dies keeps what it measured); the tables and ``results.json`` are written at
    the end. The checkpoints (weights files or shipped model names,
    :func:`irformer.archs.zoo.weights_path`) must share their scale. ``progress``
    (:mod:`irformer.progress`) counts the rows. With ``settings.resume`` the rows
    already in ``rows.jsonl`` are kept and not measured again, and interrupted
    distillations continue from ``out_dir/dqc_state``.
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
    rows: list[CompressionRow] = []
    if settings.resume and rows_file.is_file():
        rows = read_rows(out_dir, drop_truncated_last=True)
        check_resumed_configs(rows, settings, rows_file)
        atomic_write(rows_file, _rows_jsonl(rows))
        logger.info("resuming %s: %d rows already measured", out_dir, len(rows))
    else:
        atomic_write(rows_file, "")
    done = {r.key() for r in rows}
    taken: set[str] = set()
    per_model = (
        1
        + int(settings.int8_kernel)
        + len(settings.bits) * sum(_rows_per_config(settings, m) for m in settings.methods)
    )
    total = per_model * len(loaded)
    written = min(len(rows), total)
    report_progress(progress, written, total, "compress")

    def finished(row: CompressionRow) -> None:
        nonlocal written
        with rows_file.open("a") as handle:
            handle.write(json.dumps(asdict(row), default=str) + "\n")
        if on_row is not None:
            on_row(row)
        written = min(written + 1, total)  # last-iterate rows of a budget curve are extra
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
            done=done,
        )
    tables = write_tables(rows, bench_names, str(device), out_dir, caption=caption)
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


def read_rows(run_dir: Path, *, drop_truncated_last: bool = False) -> list[CompressionRow]:
    """The rows one :func:`run_experiment` wrote to ``RUN_DIR/rows.jsonl``.

    ``drop_truncated_last``: a last line that is not JSON (a run killed while
    appending) is dropped with a warning instead of being an error.
    """
    path = run_dir / ROWS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a `compress run` output folder")
    rows = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as err:
            if drop_truncated_last and n == len(lines):
                logger.warning("%s:%d: dropped a truncated last row (%s)", path, n, err)
                continue
            raise ValueError(f"{path}:{n}: not a compression row ({err})") from err
        try:
            data["scores"] = {b: tuple(v) for b, v in data["scores"].items()}
            rows.append(CompressionRow(**data))
        except (TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"{path}:{n}: not a compression row ({err})") from err
    return rows


def merge_runs(run_dirs: Sequence[Path], out_dir: Path, *, caption: str = "") -> dict[str, str]:
    """One set of tables from folders measured separately (e.g. one per model in parallel).

    Every run re-measures its FP model; identical FP rows merge, any other row
    measured twice is an error naming both folders.
    """
    rows: list[CompressionRow] = []
    seen: dict[RowKey, Path] = {}
    fp_scores: dict[str, dict[str, tuple[float, float]]] = {}
    fp_index: dict[str, int] = {}
    for run_dir in run_dirs:
        for row in read_rows(run_dir):
            key = row.key()
            if row.method == "fp32" and fp_scores.get(row.model) == row.scores:
                kept = rows[fp_index[row.model]]
                if math.isnan(kept.latency_ms) and not math.isnan(row.latency_ms):
                    rows[fp_index[row.model]] = row  # the same model, timed in this run
                continue
            if key in seen:
                raise ValueError(
                    f"{run_dir}: row {key} is also in {seen[key]}; merge runs that measured "
                    "different models or settings"
                )
            seen[key] = run_dir
            if row.method == "fp32":
                fp_scores[row.model] = row.scores
                fp_index[row.model] = len(rows)
            rows.append(row)
    benchmarks = list(dict.fromkeys(b for r in rows for b in r.scores))
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = write_tables(rows, benchmarks, "see each run", out_dir, caption=caption)
    atomic_write(out_dir / ROWS_FILE, _rows_jsonl(rows))
    return tables


BASELINES: tuple[str, ...] = ("minmax", "dquant2d", "ptq4vit", "noisyquant")
"""The methods CompSRT is tested against (the best of them per configuration)."""


@dataclass(frozen=True)
class SignificanceRow:
    """CompSRT vs the best baseline at one (model, bits, prune): CompSRT's Table 5."""

    model: str
    wbits: int
    abits: int
    prune: float
    baseline: str
    benchmarks: tuple[str, ...]
    psnr: PairedTest
    ssim: PairedTest


def significance(
    rows: Sequence[CompressionRow],
    *,
    method: str = "compsrt",
    baselines: Sequence[str] = BASELINES,
) -> list[SignificanceRow]:
    """Dataset-level paired tests of ``method`` against the best baseline.

    As CompSRT's section 4.2 (Table 5): for each configuration (model, bit
    widths, pruning) the baseline with the highest mean PSNR over the datasets
    both were scored on is "the best baseline"; the per-dataset differences
    ``method - baseline`` of PSNR and of SSIM each get a one-sided Wilcoxon
    signed-rank test (exact ties dropped) and Cohen's ``d_z = mean / sd``.
    With n datasets the smallest possible one-sided p is ``2^-n`` (0.125 for
    Set5/Set14/B100; 0.031 with Urban100 and Manga109 too).
    """
    result = final_rows(rows)
    index: dict[tuple[str, int, int, float], dict[str, CompressionRow]] = {}
    for r in result:
        index.setdefault((r.model, r.wbits, r.abits, r.prune), {})[r.method] = r
    out = []
    for (model, wbits, abits, prune), by_method in index.items():
        ours = by_method.get(method)
        others = [by_method[b] for b in baselines if b in by_method and b != method]
        if ours is None or not others:
            continue

        def common(other: CompressionRow, ours: CompressionRow = ours) -> list[str]:
            return [b for b in ours.scores if b in other.scores]

        def mean_psnr(other: CompressionRow) -> float:
            names = common(other)
            return sum(other.scores[b][0] for b in names) / max(len(names), 1)

        best = max(others, key=mean_psnr)
        names = common(best)
        diffs = [[ours.scores[b][k] - best.scores[b][k] for b in names] for k in (0, 1)]
        out.append(
            SignificanceRow(
                model=model,
                wbits=wbits,
                abits=abits,
                prune=prune,
                baseline=best.method,
                benchmarks=tuple(names),
                psnr=paired_test("dataset", "PSNR", diffs[0]),
                ssim=paired_test("dataset", "SSIM", diffs[1]),
            )
        )
    return out


def significance_markdown(tests: Sequence[SignificanceRow], method: str = "compsrt") -> str:
    """Table 5 layout: per configuration, the best baseline, n datasets and for PSNR
    and SSIM the mean difference, Cohen's d_z and the one-sided Wilcoxon p."""
    lines = [
        f"| Model | W/A | Prune | {method} vs | datasets | PSNR mean diff (dB) | PSNR d_z | "
        "PSNR p | SSIM mean diff | SSIM d_z | SSIM p |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def p_text(t: PairedTest) -> str:
        return "-" if math.isnan(t.p_value) else f"{t.p_value:.3g}"

    for t in tests:
        lines.append(
            f"| {t.model} | {t.wbits}/{t.abits} | {t.prune:g} | {t.baseline} | "
            f"{', '.join(t.benchmarks)} | {t.psnr.mean_diff:+.3f} | {_fmt(t.psnr.cohen_dz, 2)} | "
            f"{p_text(t.psnr)} | {t.ssim.mean_diff:+.4f} | {_fmt(t.ssim.cohen_dz, 2)} | "
            f"{p_text(t.ssim)} |"
        )
    return "\n".join(lines) + "\n"


def significance_experiment(
    run_dirs: Sequence[Path],
    *,
    method: str = "compsrt",
    baselines: Sequence[str] = BASELINES,
    out: Path | None = None,
) -> str:
    """``irformer compress significance``: :func:`significance` over the rows of one or
    more ``compress run`` folders, as markdown (also written to ``out``)."""
    rows: list[CompressionRow] = []
    for run_dir in run_dirs:
        rows += read_rows(run_dir)
    tests = significance(rows, method=method, baselines=baselines)
    if not tests:
        raise ValueError(
            f"no configuration in {[str(d) for d in run_dirs]} has both {method} and one of "
            f"{list(baselines)}"
        )
    text = significance_markdown(tests, method)
    if out is not None:
        atomic_write(out, text)
    return text


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
