"""Benchmark evaluation: a model, named test sets, PSNR/SSIM as the field reports them.

A model is any ``torch.nn.Module`` mapping ``(B, C, h, w)`` float in [0, 1] to
the restored ``(B, C, H, W)``; the built-in :class:`BicubicModel` gives the
standard bicubic baseline. Each output is clipped to [0, 1] and rounded to
uint8 before the metrics (as BasicSR's ``tensor2img`` and the papers' MATLAB
scripts do), then scored with :func:`irformer.metrics.compute_metrics`.

Evaluation is deterministic: noise is seeded per image (see
:mod:`irformer.data.benchmarks`), images run one at a time in a fixed order
under ``torch.inference_mode``.

Non-finite outputs are counted, not hidden: each image records its output
pixels with a NaN/inf channel (scored as black, like ``restore`` writes them),
each set its total, and a warning names the set; ``irformer eval`` marks such
a set in its table and exits with status 1.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from irformer.archs.zoo import load_model
from irformer.data.benchmarks import Benchmark, resolve_benchmarks
from irformer.data.degradations import matlab_imresize
from irformer.data.io import check_writable, tensor_to_image, write_image
from irformer.engine.infer import PrecisionModel, RestoreOptions, count_nonfinite
from irformer.engine.precision import (
    AutocastDtype,
    Precision,
    autocast_context,
    check_precision_options,
)
from irformer.errors import DeviceUnavailableError
from irformer.files import atomic_write
from irformer.metrics import TASKS, compute_metrics
from irformer.progress import Progress, report
from irformer.tasks import check_task, task_from_meta

__all__ = [
    "BASELINE_NAMES",
    "BenchmarkResult",
    "BicubicModel",
    "EvalModel",
    "EvaluationResult",
    "ImageResult",
    "eval_task_of",
    "evaluate",
    "evaluate_benchmark",
    "load_model_for_eval",
    "prepare_eval_model",
    "read_results_json",
    "resolve_device",
    "write_results_csv",
    "write_results_json",
]

logger = logging.getLogger(__name__)

_CHANNEL_ATTRS = ("in_chans", "in_channels", "num_in_ch")


def eval_task_of(meta: Mapping[str, object]) -> str:
    """The task (``sr``/``dn``/``car``/``dr``) of a checkpoint's metadata; files of
    irformer 0.1 used other names (``denoise``...), mapped by :func:`irformer.tasks.check_task`.
    Metadata without a task: ``sr`` when the model upscales, else an error."""
    return task_from_meta(meta)


BASELINE_NAMES: dict[str, str] = {
    "sr": "bicubic",
    "dn": "noisy input",
    "car": "JPEG input",
    "dr": "rainy input",
}
"""What :class:`BicubicModel` scores for each task, as the tables label its row: the
bicubic upscaling for SR, the degraded input itself for the scale-1 tasks."""


class BicubicModel(nn.Module):
    """MATLAB bicubic upscaling by ``scale`` in float64; the identity when ``scale == 1``.

    The standard "Bicubic" row of SR tables; for DN/CAR/DR it scores the
    degraded input itself.
    """

    def __init__(self, scale: int = 1) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        self.upscale = int(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, h, w) in [0, 1] -> (B, C, h*scale, w*scale), float64."""
        if self.upscale == 1:
            return x
        return matlab_imresize(x.to(torch.float64), float(self.upscale))

    def extra_repr(self) -> str:
        return f"upscale={self.upscale}"


def load_model_for_eval(
    spec: str | Path | nn.Module, *, scale: int = 1, random_weights: bool = False
) -> nn.Module:
    """Resolve ``--model``: a module (returned as is), ``"bicubic"``, or what
    :func:`irformer.archs.zoo.resolve_model` accepts (a weights file, a shipped model's
    name; a preset only with ``random_weights``, as its weights are untrained)."""
    if isinstance(spec, nn.Module):
        return spec
    if str(spec).lower() == "bicubic":
        return BicubicModel(scale)
    loaded = load_model(spec, random_weights=random_weights)
    if loaded.choice.kind == "preset":
        logger.warning("model %r built from its preset with untrained (random) weights", str(spec))
    return loaded.model


@dataclass(frozen=True)
class EvalModel:
    """A ``--model`` ready for :func:`evaluate`, with the protocol it is scored under."""

    model: nn.Module
    name: str
    """Its label in tables: ``bicubic`` / the degraded input, a file stem, a preset."""
    task: str
    scale: int
    """The SR scale (1 for the other tasks)."""
    is_baseline: bool = False
    """``bicubic``: the model is the baseline itself (no extra baseline rows)."""

    @property
    def baseline_name(self) -> str:
        """The label of the baseline rows of its task (``bicubic``, ``noisy input``...)."""
        return BASELINE_NAMES[self.task]


def prepare_eval_model(
    spec: str | Path,
    *,
    task: str | None = None,
    scale: int | None = None,
    random_weights: bool = False,
) -> EvalModel:
    """Load ``--model`` once and settle the task and scale: given values, else the
    model's (a weights file's or shipped model's metadata, a preset's task), else ``sr``.
    A given task or scale that the model contradicts is an error naming both.
    ``bicubic`` is the baseline of ``task`` (:data:`BASELINE_NAMES`)."""
    if task is not None:
        task = check_task(task, where="--task")
    if str(spec).lower() == "bicubic":
        task = task or "sr"
        if task == "sr" and scale is None:
            raise ValueError("--task sr needs --scale (2, 3 or 4)")
        eff = (scale or 1) if task == "sr" else 1
        return EvalModel(BicubicModel(eff), BASELINE_NAMES[task], task, eff, is_baseline=True)
    loaded = load_model(
        spec,
        task=task,
        scale=scale if task in (None, "sr") else None,
        random_weights=random_weights,
    )
    if loaded.choice.kind == "preset":
        logger.warning("model %r built from its preset with untrained (random) weights", str(spec))
    task = task or loaded.task
    if task is None:
        raise ValueError(f"{loaded.description}: the metadata names no task; pass --task")
    if task == "sr" and loaded.scale < 2:
        raise ValueError(f"--task sr: {loaded.description} restores at scale {loaded.scale}")
    if task != "sr" and loaded.scale != 1:
        raise ValueError(f"--task {task}: {loaded.description} upscales by {loaded.scale}")
    return EvalModel(loaded.model, loaded.choice.name, task, loaded.scale)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {device!r} requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class ImageResult:
    """Scores of one test image; ``seconds`` is the model's forward time."""

    benchmark: str
    name: str
    psnr: float
    ssim: float
    seconds: float
    nonfinite_pixels: int = 0
    """Output pixels with a NaN/inf channel (scored as 0, i.e. black): any makes
    the scores those of a broken model, not of the model."""


@dataclass(frozen=True)
class BenchmarkResult:
    """Per-set means (of per-image PSNR and SSIM, as the papers average) and the images."""

    benchmark: str
    task: str
    scale: int
    sigma: float | None
    quality: int | None
    psnr: float
    ssim: float
    images: tuple[ImageResult, ...]

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def nonfinite_pixels(self) -> int:
        """Non-finite output pixels over the whole set (0 for a valid result)."""
        return sum(r.nonfinite_pixels for r in self.images)

    @property
    def nonfinite_images(self) -> int:
        """Images whose output held a NaN/inf."""
        return sum(r.nonfinite_pixels > 0 for r in self.images)


@dataclass(frozen=True)
class EvaluationResult:
    """Everything one evaluation run measured, serialisable with :meth:`to_dict`."""

    model: str
    task: str
    scale: int
    sigma: float | None
    quality: int | None
    precision: str
    device: str
    benchmarks: tuple[BenchmarkResult, ...] = field(default_factory=tuple)
    autocast: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for b, bench in zip(d["benchmarks"], self.benchmarks, strict=True):
            b["num_images"] = bench.num_images
            b["nonfinite_pixels"] = bench.nonfinite_pixels
        return d

    def __getitem__(self, benchmark: str) -> BenchmarkResult:
        for b in self.benchmarks:
            if b.benchmark.lower() == benchmark.lower():
                return b
        raise KeyError(f"no result for benchmark {benchmark!r}")


def _model_in_channels(model: nn.Module) -> int | None:
    for attr in _CHANNEL_ATTRS:
        value = getattr(model, attr, None)
        if isinstance(value, int):
            return value
    return None


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else fallback


def _run_model(
    model: nn.Module, lq: torch.Tensor, device: torch.device, autocast: AutocastDtype | None
) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with autocast_context(device, autocast):
        out = model(lq)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def evaluate_benchmark(
    model: nn.Module,
    benchmark: Benchmark,
    *,
    device: torch.device,
    autocast: AutocastDtype | None = None,
    save_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BenchmarkResult:
    """Run ``model`` over one resolved benchmark and score every image.

    Greyscale sets meet a 3-channel model as replicated channels and are
    scored on the channel mean of its output; ``model`` must already be on
    ``device``, in eval mode and in the precision wanted (see :func:`evaluate`).
    Runs under ``torch.inference_mode`` (and ``torch.autocast`` with ``autocast``);
    ``progress`` hears of every image (:mod:`irformer.progress`).
    """
    want_c = _model_in_channels(model)
    task, scale = benchmark.task, benchmark.scale
    images: list[ImageResult] = []
    report(progress, 0, len(benchmark), benchmark.name)
    for index in range(len(benchmark)):
        item = benchmark[index]
        lq = torch.from_numpy(np.ascontiguousarray(item.lq.transpose(2, 0, 1)))[None]
        data_c = lq.shape[1]
        if want_c is not None and want_c != data_c:
            if data_c == 1:
                lq = lq.expand(-1, want_c, -1, -1)
            else:
                raise ValueError(
                    f"{benchmark.name}/{item.name} has {data_c} channels but the model takes "
                    f"{want_c}; evaluate colour models on colour sets"
                )
        with torch.inference_mode():
            out, seconds = _run_model(model, lq.contiguous().to(device), device, autocast)
        if out.ndim != 4 or out.shape[0] != 1:
            raise ValueError(f"model output must be (1, C, H, W), got {tuple(out.shape)}")
        nonfinite = count_nonfinite(out).nonfinite_pixels
        if out.shape[1] != data_c and data_c == 1:
            out = out.to(torch.float64).mean(dim=1, keepdim=True)
        restored = tensor_to_image(out)
        if restored.shape != item.gt.shape:
            raise ValueError(
                f"{benchmark.name}/{item.name}: model output {restored.shape} (H, W, C) does not "
                f"match the ground truth {item.gt.shape}"
            )
        scores = compute_metrics(restored, item.gt, task=task, scale=scale)
        images.append(
            ImageResult(
                benchmark.name, item.name, scores["psnr"], scores["ssim"], seconds, nonfinite
            )
        )
        if save_dir is not None:
            write_image(
                Path(save_dir) / benchmark.name / f"{item.name}.png",
                restored,
                overwrite=overwrite,
                protected=benchmark.source_paths(index),
            )
        report(progress, index + 1, len(benchmark), benchmark.name)
    result = BenchmarkResult(
        benchmark=benchmark.name,
        task=task,
        scale=scale,
        sigma=benchmark.sigma,
        quality=benchmark.quality,
        psnr=float(np.mean([r.psnr for r in images])) if images else math.nan,
        ssim=float(np.mean([r.ssim for r in images])) if images else math.nan,
        images=tuple(images),
    )
    if result.nonfinite_pixels:
        logger.warning(
            "%s: %d output pixels non-finite in %d of %d images (scored as black): the "
            "scores are those of a broken model",
            benchmark.name,
            result.nonfinite_pixels,
            result.nonfinite_images,
            result.num_images,
        )
    return result


def evaluate(
    model: nn.Module | str | Path,
    *,
    task: str,
    benchmarks: str | Sequence[str],
    data_root: str | Path | None,
    scale: int = 1,
    sigma: float | None = None,
    quality: int | None = None,
    device: str | torch.device = "auto",
    precision: Precision = "fp32",
    autocast: AutocastDtype | None = None,
    save_dir: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
    model_name: str | None = None,
    random_weights: bool = False,
    reuse: Mapping[str, BenchmarkResult] | None = None,
    on_benchmark: Callable[[EvaluationResult], None] | None = None,
) -> EvaluationResult:
    """Evaluate ``model`` on named ``benchmarks`` for ``task`` (``sr``/``dn``/``car``/``dr``).

    ``model`` is a module or a ``--model`` spec (see :func:`load_model_for_eval`);
    a module is moved to ``device`` and put in eval mode. All benchmarks are
    resolved (and their folders validated) before the first image runs.
    ``save_dir`` receives ``<benchmark>/<name>.png`` of the uint8 outputs.
    ``precision`` casts the model's weights and features (a module passed in is
    cast in place), ``autocast`` runs fp32 weights under ``torch.autocast``
    (:mod:`irformer.engine.precision`); non-finite outputs are counted per image.
    ``reuse`` maps set names to results of an earlier, interrupted run of the same
    settings, which are taken instead of measured again; ``on_benchmark`` is called
    after each newly measured set with the result so far (e.g. to save it).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    check_precision_options(precision, autocast)
    if not benchmarks:
        raise ValueError("no benchmarks given")
    eff_scale = scale if task == "sr" else 1
    name = model_name or (str(model) if isinstance(model, (str, Path)) else type(model).__name__)
    net = load_model_for_eval(model, scale=eff_scale, random_weights=random_weights)
    dev = resolve_device(device)
    net = net.to(dev).eval()
    model_scale = getattr(net, "upscale", None)
    if isinstance(model_scale, int) and model_scale != eff_scale:
        raise ValueError(
            f"model {name} upscales by {model_scale} but task {task!r} at scale {eff_scale} "
            f"needs {eff_scale}"
        )
    resolved = resolve_benchmarks(
        benchmarks,
        data_root,
        task=task,
        scale=eff_scale,
        sigma=sigma,
        quality=quality,
        seed=seed,
    )
    if precision != "fp32":
        cast = RestoreOptions(precision=precision, sanitize=False, locate_nonfinite=False)
        net = PrecisionModel(net, cast)
    so_far = EvaluationResult(
        model=name,
        task=task,
        scale=eff_scale,
        sigma=sigma if task == "dn" else None,
        quality=quality if task == "car" else None,
        precision=precision,
        autocast=autocast,
        device=str(dev),
    )
    results: list[BenchmarkResult] = []
    for bench in resolved:
        if reuse is not None and bench.name in reuse:
            logger.info("%s %s: taken from the earlier run", name, bench.name)
            results.append(reuse[bench.name])
            continue
        res = evaluate_benchmark(
            net,
            bench,
            device=_model_device(net, dev),
            autocast=autocast,
            save_dir=save_dir,
            overwrite=overwrite,
            progress=progress,
        )
        logger.info(
            "%s %s: PSNR %.4f dB, SSIM %.5f over %d images",
            name,
            bench.name,
            res.psnr,
            res.ssim,
            res.num_images,
        )
        results.append(res)
        if on_benchmark is not None:
            on_benchmark(dataclasses.replace(so_far, benchmarks=tuple(results)))
    return dataclasses.replace(so_far, benchmarks=tuple(results))


CSV_COLUMNS: tuple[str, ...] = (
    "model",
    "task",
    "scale",
    "sigma",
    "quality",
    "benchmark",
    "name",
    "psnr",
    "ssim",
    "seconds",
    "nonfinite_pixels",
)


def _as_results(
    results: EvaluationResult | Sequence[EvaluationResult],
) -> tuple[EvaluationResult, ...]:
    return (results,) if isinstance(results, EvaluationResult) else tuple(results)


def write_results_csv(
    result: EvaluationResult | Sequence[EvaluationResult],
    path: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """One row per image (columns :data:`CSV_COLUMNS`); PSNR/SSIM at full precision.

    Several results (noise levels, a baseline) go into one file, one after another;
    the ``model``/``sigma``/``quality`` columns tell their rows apart.
    """
    path = check_writable(path, overwrite=overwrite)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for res in _as_results(result):
        for bench in res.benchmarks:
            for img in bench.images:
                writer.writerow(
                    {
                        "model": res.model,
                        "task": res.task,
                        "scale": res.scale,
                        "sigma": "" if res.sigma is None else res.sigma,
                        "quality": "" if res.quality is None else res.quality,
                        "benchmark": img.benchmark,
                        "name": img.name,
                        "psnr": repr(img.psnr),
                        "ssim": repr(img.ssim),
                        "seconds": f"{img.seconds:.6f}",
                        "nonfinite_pixels": img.nonfinite_pixels,
                    }
                )
    atomic_write(path, buf.getvalue())
    return path


def read_results_json(path: str | Path) -> list[EvaluationResult]:
    """The results in a file :func:`write_results_json` wrote (one object or a list)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read evaluation results from {path}: {exc}") from exc

    def number(v: Any) -> Any:
        return float(v) if isinstance(v, str) and v in ("inf", "-inf") else v

    out = []
    for d in data if isinstance(data, list) else [data]:
        try:
            benches = tuple(
                BenchmarkResult(
                    **{
                        **{k: number(v) for k, v in b.items() if k not in _DERIVED},
                        "images": tuple(
                            ImageResult(**{k: number(v) for k, v in i.items()}) for i in b["images"]
                        ),
                    }
                )
                for b in d["benchmarks"]
            )
            out.append(EvaluationResult(**{**d, "benchmarks": benches}))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not an irformer evaluation record: {exc}") from exc
    return out


_DERIVED = ("num_images", "nonfinite_pixels")
"""Keys :meth:`EvaluationResult.to_dict` adds to each set (properties, not fields)."""


def write_results_json(
    result: EvaluationResult | Sequence[EvaluationResult],
    path: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """The whole result (settings, per-set means, per-image scores) as JSON.

    One result is one JSON object; a sequence (several noise levels or JPEG
    qualities, a baseline) is a JSON list of such objects. Infinite PSNR
    (identical images) is written as the string ``"inf"``.
    """
    path = check_writable(path, overwrite=overwrite)

    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [clean(v) for v in obj]
        return obj

    if isinstance(result, EvaluationResult):
        data: Any = result.to_dict()
    else:
        data = [r.to_dict() for r in result]
    atomic_write(path, json.dumps(clean(data), indent=2) + "\n")
    return path
