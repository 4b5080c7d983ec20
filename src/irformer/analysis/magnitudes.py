"""Feature magnitudes and the fp16 overflow guard (i-LN paper, Sec. 3.4).

The i-LN paper's claim: LN models grow feature magnitudes beyond fp16's largest
finite value (65504), so half-precision inference fills the output with NaN/inf
"black dots". :func:`feature_magnitudes` measures ``max |output|`` of every
module on a probe batch (fp32); :func:`load_recorded_magnitudes` reads the
records of ``irformer analyze features`` / the training
:class:`~irformer.analysis.probes.FeatureProbe`; :func:`check_fp16_overflow`
warns when any exceeds ``65504 / safety``, before an fp16 run.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from irformer.analysis.probes import read_feature_records

__all__ = [
    "DEFAULT_SAFETY",
    "FP16_MAX",
    "Fp16OverflowWarning",
    "OverflowRisk",
    "check_fp16_overflow",
    "feature_magnitudes",
    "fp16_overflow_risks",
    "load_recorded_magnitudes",
]

logger = logging.getLogger(__name__)

FP16_MAX = float(torch.finfo(torch.float16).max)
"""65504: the largest finite fp16 value."""

DEFAULT_SAFETY = 4.0
"""Headroom factor of the guard: warn above 65504 / 4 = 16376, because the probe
batch need not contain the image with the largest features."""


class Fp16OverflowWarning(UserWarning):
    """Recorded feature magnitudes are too close to fp16's range for a safe fp16 run."""


def feature_magnitudes(model: nn.Module, x: Tensor) -> dict[str, float]:
    """``max |output|`` of every module (qualified name -> value) on ``x`` (B, C, H, W).

    One fp32 pass without gradients; ``""`` is the model output. Modules called
    several times (chunked attention) report their maximum over calls.
    """
    found: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def record(module: nn.Module, inputs: object, output: object) -> None:
            t = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(t, Tensor) and t.is_floating_point() and t.numel():
                value = t.detach().abs().amax().float()
                found[name] = value if name not in found else torch.maximum(found[name], value)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), x.device)
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
            model(x.to(device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return {name: float(v) for name, v in found.items()}


def load_recorded_magnitudes(path: str | os.PathLike[str]) -> dict[str, float]:
    """Block name -> ``max_abs`` from recorded analysis output.

    Accepts ``features.json`` of ``irformer analyze features`` (``{"blocks":
    [{"block", "max_abs", ...}]}``), a training run's ``features.jsonl`` (or its
    run directory; the latest iteration is used) and a plain JSON mapping
    ``{name: max_abs}``.
    """
    path = Path(path)
    if path.is_dir() or path.suffix == ".jsonl":
        records = read_feature_records(path)
        if not records:
            raise ValueError(f"{path} holds no feature records")
        last = max(int(r["iter"]) for r in records)
        return {str(r["block"]): float(r["max_abs"]) for r in records if int(r["iter"]) == last}
    if not path.is_file():
        raise FileNotFoundError(f"feature magnitude record not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from exc
    if isinstance(data, Mapping) and isinstance(data.get("blocks"), list):
        try:
            return {str(b["block"]): float(b["max_abs"]) for b in data["blocks"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: block records need 'block' and 'max_abs' ({exc})") from exc
    if isinstance(data, Mapping) and all(isinstance(v, (int, float)) for v in data.values()):
        return {str(k): float(v) for k, v in data.items()}
    raise ValueError(
        f"{path}: expected analyze-features JSON ({{'blocks': [...]}}) or a {{name: max_abs}} map"
    )


@dataclass(frozen=True)
class OverflowRisk:
    """A module whose recorded ``max |x|`` is within ``safety`` of fp16's range."""

    name: str
    max_abs: float
    threshold: float

    @property
    def overflows(self) -> bool:
        """Already beyond 65504 on the probe: fp16 will produce inf."""
        return self.max_abs > FP16_MAX or not math.isfinite(self.max_abs)


def fp16_overflow_risks(
    magnitudes: Mapping[str, float], *, safety: float = DEFAULT_SAFETY
) -> list[OverflowRisk]:
    """Entries of ``magnitudes`` above ``65504 / safety``, largest first."""
    if safety < 1:
        raise ValueError(f"safety must be >= 1, got {safety}")
    threshold = FP16_MAX / safety
    risks = [
        OverflowRisk(name or "<model output>", value, threshold)
        for name, value in magnitudes.items()
        if not value <= threshold  # NaN counts as a risk
    ]
    return sorted(risks, key=lambda r: -r.max_abs if math.isfinite(r.max_abs) else -math.inf)


def check_fp16_overflow(
    magnitudes: Mapping[str, float] | None = None,
    *,
    model: nn.Module | None = None,
    probe: Tensor | None = None,
    safety: float = DEFAULT_SAFETY,
) -> list[OverflowRisk]:
    """Warn (:class:`Fp16OverflowWarning`) before an fp16 run that would overflow.

    Give recorded ``magnitudes`` (see :func:`load_recorded_magnitudes`) or a
    ``model`` and ``probe`` batch to measure them now (fp32 copy). Returns the
    risks found (empty: no warning).
    """
    if magnitudes is None:
        if model is None or probe is None:
            raise ValueError("check_fp16_overflow needs magnitudes, or a model and a probe batch")
        fp32 = copy.deepcopy(model).float()
        magnitudes = feature_magnitudes(fp32, probe.float())
    risks = fp16_overflow_risks(magnitudes, safety=safety)
    if risks:
        worst = risks[0]
        verdict = "will overflow" if worst.overflows else "is close to overflowing"
        message = (
            f"fp16 {verdict}: {len(risks)} module(s) reach |x| > {worst.threshold:.0f} "
            f"(65504 / safety {safety:g}); largest {worst.max_abs:.4g} at {worst.name}. "
            "Use bf16 or fp32 (or an i-LN model)."
        )
        logger.warning(message)
        warnings.warn(message, Fp16OverflowWarning, stacklevel=2)
    return risks
