"""The low-precision report: LN vs i-LN under fp16/bf16 casts and int8/int4 weights (Table 4).

The i-LN paper's claim (Sec. 3.4): LN models grow feature magnitudes beyond
fp16's range, so half-precision inference fills the output with NaN/inf "black
dots", and they lose several dB under weight-only int8/int4 quantisation; i-LN
models keep bounded features and survive both. :func:`lowprec_report`
evaluates a pair of checkpoints in fp32, fp16, bf16 and weight-only int8/int4
on benchmarks, with PSNR/SSIM and non-finite pixel counts;
:func:`format_lowprec_table` prints it in Table 4's layout. The casts are
:mod:`irformer.engine.precision`'s, the fp16 guard
:mod:`irformer.analysis.magnitudes`'.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from irformer.analysis.magnitudes import check_fp16_overflow
from irformer.archs import load_checkpoint_model
from irformer.compress.quantizers import quantize_weights_
from irformer.data.benchmarks import resolve_benchmarks
from irformer.engine.evaluate import eval_task_of, evaluate_benchmark, resolve_device
from irformer.engine.infer import NonFiniteReport, PrecisionModel, RestoreOptions
from irformer.progress import Progress
from irformer.progress import report as report_progress

__all__ = [
    "LOWPREC_SETTINGS",
    "LowPrecReport",
    "LowPrecRow",
    "format_lowprec_table",
    "lowprec_report",
]

logger = logging.getLogger(__name__)

LOWPREC_SETTINGS: dict[str, tuple[str, str]] = {
    # name -> (Table 4 "Quantization" column, what is reduced)
    "fp32": ("W+F", "fp32"),
    "fp16": ("W+F", "fp16"),
    "bf16": ("W+F", "bf16"),
    "int8": ("W", "int8"),
    "int4": ("W", "int4"),
}
"""Settings of :func:`lowprec_report`: ``W+F`` casts weights and features,
``W`` quantises weights only (features in fp32)."""


@dataclass(frozen=True)
class LowPrecRow:
    """One (model, setting, benchmark) cell group of the report."""

    model: str
    """``LN`` or ``i-LN`` (or the caller's label)."""
    checkpoint: str
    setting: str
    quantization: str
    """Table 4's column: ``W+F`` (cast weights and features) or ``W`` (weights only)."""
    benchmark: str
    psnr: float
    ssim: float
    images: int
    nonfinite_pixels: int
    nonfinite_images: int
    total_pixels: int
    first_nonfinite_layer: str | None


@dataclass
class LowPrecReport:
    """Everything :func:`lowprec_report` measured; rows in table order."""

    task: str
    scale: int
    benchmarks: tuple[str, ...]
    weight_quant: dict[str, Any]
    rows: list[LowPrecRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "scale": self.scale,
            "benchmarks": list(self.benchmarks),
            "weight_quant": self.weight_quant,
            "rows": [asdict(r) for r in self.rows],
        }

    def row(self, model: str, setting: str, benchmark: str) -> LowPrecRow:
        for r in self.rows:
            if (r.model, r.setting, r.benchmark.lower()) == (model, setting, benchmark.lower()):
                return r
        raise KeyError(f"no row for model={model!r} setting={setting!r} benchmark={benchmark!r}")


def _setting_model(
    base: nn.Module, setting: str, *, granularity: str, symmetric: bool, linear_only: bool
) -> tuple[nn.Module, str]:
    """A copy of ``base`` prepared for ``setting``; returns it and its run precision."""
    model = copy.deepcopy(base).float().eval()
    if setting in ("fp32", "fp16", "bf16"):
        return model, setting
    bits = int(setting.removeprefix("int"))
    modules: tuple[type[nn.Module], ...] = (nn.Linear,) if linear_only else (nn.Linear, nn.Conv2d)
    quantize_weights_(model, bits, granularity, symmetric, modules=modules)  # type: ignore[arg-type]
    return model, "fp32"


def lowprec_report(
    ckpt_ln: str | os.PathLike[str] | nn.Module,
    ckpt_iln: str | os.PathLike[str] | nn.Module,
    *,
    benchmarks: str | Sequence[str] = ("Set5",),
    data_root: str | os.PathLike[str] | None,
    task: str | None = None,
    scale: int | None = None,
    sigma: float | Sequence[float] | None = None,
    quality: int | Sequence[int] | None = None,
    settings: Sequence[str] = tuple(LOWPREC_SETTINGS),
    labels: tuple[str, str] = ("LN", "i-LN"),
    granularity: str = "per_tensor",
    symmetric: bool = True,
    linear_only: bool = False,
    options: RestoreOptions | None = None,
    device: str | torch.device = "cpu",
    on_row: Callable[[LowPrecRow], None] | None = None,
    progress: Progress | None = None,
) -> LowPrecReport:
    """The i-LN paper's Table 4 for any pair of models: settings x models x benchmarks.

    ``ckpt_*`` are checkpoint paths (loaded with
    :func:`irformer.archs.load_checkpoint_model`) or modules. ``task``/``scale`` default to
    the first checkpoint's metadata. fp16/bf16 cast weights and features (``W+F``);
    int8/int4 quantise Linear and Conv2d weights (``linear_only``: Linear only) to
    ``granularity`` (``per_tensor`` or ``per_channel``) with ``symmetric`` ranges and run in
    fp32 (``W``). Non-finite outputs are counted, located, and scored as black (NaN -> 0),
    as the paper's fp16 LN rows are. ``sigma``/``quality`` may be lists (dn/car at several
    levels): each benchmark then gets one column per level, named ``NAME sigma15`` / ``NAME
    q10``. ``options`` sets tiling / exact path / ensemble. ``on_row`` receives each row as
    it is measured; ``progress`` (:mod:`irformer.progress`) counts the rows.
    """
    unknown = [s for s in settings if s not in LOWPREC_SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; valid: {', '.join(LOWPREC_SETTINGS)}")
    models: list[tuple[str, str, nn.Module, dict[str, object]]] = []
    for label, ckpt in zip(labels, (ckpt_ln, ckpt_iln), strict=True):
        model, meta = _load(ckpt)
        models.append((label, str(ckpt) if not isinstance(ckpt, nn.Module) else label, model, meta))
    meta0 = models[0][3]
    task = task or eval_task_of(meta0)
    scale = int(scale if scale is not None else meta0.get("scale", 1))  # type: ignore[arg-type]
    for label, source, _, meta in models:
        if "scale" in meta and int(meta["scale"]) != scale:  # type: ignore[arg-type]
            raise ValueError(f"{label} model {source} has scale {meta['scale']}, expected {scale}")
    dev = resolve_device(device)
    sigmas = _level_list(sigma)
    qualities = _level_list(quality)
    several = len(sigmas) * len(qualities) > 1
    columns: list[tuple[str, Any]] = []  # (column name, benchmark)
    for level_sigma in sigmas:
        for level_quality in qualities:
            for bench in resolve_benchmarks(
                benchmarks,
                data_root,
                task=task,
                scale=scale if task == "sr" else 1,
                sigma=level_sigma,
                quality=level_quality,
            ):
                name = bench.name
                if several and level_sigma is not None:
                    name += f" sigma{level_sigma:g}"
                if several and level_quality is not None:
                    name += f" q{level_quality}"
                columns.append((name, bench))
    resolved = [bench for _, bench in columns]
    base_options = options or RestoreOptions()
    report = LowPrecReport(
        task=task,
        scale=scale,
        benchmarks=tuple(name for name, _ in columns),
        weight_quant={
            "granularity": granularity,
            "symmetric": symmetric,
            "modules": "Linear" if linear_only else "Linear+Conv2d",
        },
    )
    total = len(settings) * len(models) * len(resolved)
    report_progress(progress, 0, total, "lowprec")
    for setting in settings:
        for label, source, base, _ in models:
            model, precision = _setting_model(
                base,
                setting,
                granularity=granularity,
                symmetric=symmetric,
                linear_only=linear_only,
            )
            if precision == "fp16":
                check_fp16_overflow(model=model, probe=_probe_input(resolved[0]))
            model = model.to(dev)
            run_options = RestoreOptions(
                **{**asdict(base_options), "precision": precision, "sanitize": True}
            )
            for column, bench in columns:
                wrapped = PrecisionModel(model, run_options)
                result = evaluate_benchmark(wrapped, bench, device=dev)
                rep: NonFiniteReport = wrapped.report
                row = LowPrecRow(
                    model=label,
                    checkpoint=source,
                    setting=setting,
                    quantization=LOWPREC_SETTINGS[setting][0],
                    benchmark=column,
                    psnr=result.psnr,
                    ssim=result.ssim,
                    images=result.num_images,
                    nonfinite_pixels=rep.nonfinite_pixels,
                    nonfinite_images=wrapped.nonfinite_calls,
                    total_pixels=rep.total_pixels,
                    first_nonfinite_layer=rep.first_layer,
                )
                report.rows.append(row)
                logger.info(
                    "%s %s %s: %.4f dB / %.4f, %d non-finite px",
                    label,
                    setting,
                    column,
                    row.psnr,
                    row.ssim,
                    row.nonfinite_pixels,
                )
                if on_row is not None:
                    on_row(row)
                report_progress(progress, len(report.rows), total, "lowprec")
    return report


def _level_list(level: float | Sequence[float] | None) -> list[Any]:
    """One noise level / JPEG quality, several, or none (``[None]``)."""
    if level is None:
        return [None]
    if isinstance(level, (int, float)):
        return [level]
    if not level:
        raise ValueError("an empty list of levels (give at least one sigma / quality)")
    return list(level)


def _probe_input(bench: Any) -> Tensor:
    """The first LQ image of a benchmark, (1, C, h, w), to measure magnitudes on."""
    import numpy as np

    lq = bench[0].lq
    return torch.from_numpy(np.ascontiguousarray(lq.transpose(2, 0, 1)))[None].float()


def _load(ckpt: str | os.PathLike[str] | nn.Module) -> tuple[nn.Module, dict[str, object]]:
    if isinstance(ckpt, nn.Module):
        meta = getattr(ckpt, "irformer_meta", None)
        return ckpt, dict(meta) if isinstance(meta, Mapping) else {}
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    model, meta = load_checkpoint_model(path)
    return model, dict(meta)


def format_lowprec_table(report: LowPrecReport) -> str:
    """Table 4's layout: Idx | Backbone | Quantization | Type | per benchmark PSNR / SSIM,
    plus the non-finite output pixels (the "black dots") per row."""
    benches = report.benchmarks
    head = f"{'Idx':>3} | {'Backbone':<10} | {'Quant.':<6} | {'Type':<5}"
    for b in benches:
        head += f" | {b + ' PSNR/SSIM':^18}"
    head += f" | {'non-finite px':>13} | first non-finite layer"
    lines = [head, "-" * len(head)]
    combos: list[tuple[str, str]] = []
    for r in report.rows:
        if (r.setting, r.model) not in combos:
            combos.append((r.setting, r.model))
    for idx, (setting, model) in enumerate(combos, 1):
        rows = {r.benchmark: r for r in report.rows if (r.setting, r.model) == (setting, model)}
        first = next(iter(rows.values()))
        line = f"{idx:>3} | {model:<10} | {first.quantization:<6} | {setting:<5}"
        for b in benches:
            r = rows[b]
            line += f" | {r.psnr:8.4f} / {r.ssim:.4f}"
        px = sum(r.nonfinite_pixels for r in rows.values())
        total = sum(r.total_pixels for r in rows.values())
        layer = next(
            (r.first_nonfinite_layer for r in rows.values() if r.first_nonfinite_layer), ""
        )
        frac = f"{px} ({100 * px / total:.1f}%)" if px else "0"
        line += f" | {frac:>13} | {layer or '-'}"
        lines.append(line)
    wq = report.weight_quant
    lines.append(
        f"W+F: weights and features cast; W: weight-only {wq['granularity']} "
        f"{'symmetric' if wq['symmetric'] else 'asymmetric'} ({wq['modules']}), features fp32. "
        f"{report.task} x{report.scale}; non-finite pixels scored as black."
    )
    return "\n".join(lines)
