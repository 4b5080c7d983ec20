"""Is fp16 safe for this model? A measured answer, the refusal, and the bf16 fallback.

fp16's largest finite value is 65504. LN-based restoration Transformers grow
feature magnitudes far beyond it (the i-LN paper, Sec. 3.4), and an fp16 run,
cast or under CUDA autocast, then fills the output with NaN/inf "black dots";
i-LN keeps features bounded. This module measures ``max |x|`` over every
module's output on a probe batch in fp32
(:func:`irformer.analysis.magnitudes.feature_magnitudes`) and calls the model
fp16-safe when the largest stays below ``65504 / safety`` (default safety 4:
the probe need not hold the image with the largest features).

* :func:`measure_fp16_safety` -> :class:`Fp16Safety` (``fp16_safe``, the
  measured max and the layer that reached it): what exported files and model
  cards record (:meth:`Fp16Safety.record`).
* :func:`default_fp16_probe`: the probe used when none is given -- centre crops
  of three photos bundled with scikit-image, so the record of a shipped file
  can be re-measured anywhere without the benchmark data.
* :func:`resolve_fp16_precision`: what an fp16 run does with an unsafe model:
  refuse (:class:`Fp16UnsafeError`, naming the layer) or fall back to bf16
  (same exponent range as fp32) with a warning naming the layer;
  :func:`resolve_fp16_options` applies it to a ``(precision, autocast)`` pair
  (:mod:`irformer.engine.precision`): fp16 weights and fp16 autocast -- the
  usual CUDA path -- overflow alike, so both are checked.

(The magnitude functions live in :mod:`irformer.analysis.magnitudes`.)
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from irformer.analysis.magnitudes import (
    DEFAULT_SAFETY,
    FP16_MAX,
    Fp16OverflowWarning,
    feature_magnitudes,
)
from irformer.errors import IrformerError

__all__ = [
    "FP16_UNSAFE_ACTIONS",
    "PROBE_DESCRIPTION",
    "Fp16Safety",
    "Fp16UnsafeError",
    "default_fp16_probe",
    "measure_fp16_safety",
    "resolve_fp16_options",
    "resolve_fp16_precision",
]

logger = logging.getLogger(__name__)

Fp16UnsafeAction = Literal["refuse", "bf16", "run"]
FP16_UNSAFE_ACTIONS: tuple[str, ...] = ("refuse", "bf16", "run")
"""What an fp16 request does with an unsafe model: refuse, run in bf16, or run in
fp16 anyway after a warning (to measure the overflow itself)."""

PROBE_PHOTOS: tuple[str, ...] = ("astronaut", "coffee", "chelsea")
"""scikit-image's bundled photos (no download) that make the default probe."""
PROBE_SIZE = 96
"""Side of the centre crop of each probe photo (model input pixels)."""
PROBE_DESCRIPTION = (
    f"fp32 forward pass on {PROBE_SIZE}x{PROBE_SIZE} centre crops of scikit-image's "
    f"{', '.join(PROBE_PHOTOS)} photos (grey models: their mean over RGB); "
    "max |output| over every module"
)


class Fp16UnsafeError(IrformerError, ValueError):
    """fp16 was asked for a model whose measured features would overflow it."""


@dataclass(frozen=True)
class Fp16Safety:
    """The measured fp16 verdict of one model."""

    safe: bool
    max_abs: float
    """Largest ``max |output|`` of any module on the probe (fp32)."""
    layer: str
    """Module that reached it (``<model output>`` for the model's own output)."""
    first_unsafe_layer: str | None
    """First module, in execution order, whose output exceeds ``threshold``: where
    fp16 would start to overflow (None when safe)."""
    threshold: float
    """``65504 / safety``: the margin the verdict used."""
    probe: str
    """How the probe batch was made."""

    def record(self) -> dict[str, object]:
        """The fields exported files and model cards carry."""
        return {
            "fp16_safe": self.safe,
            "fp16_max_abs": float(f"{self.max_abs:.6g}"),
            "fp16_max_layer": self.layer,
            "fp16_first_unsafe_layer": self.first_unsafe_layer,
            "fp16_threshold": float(f"{self.threshold:.6g}"),
            "fp16_probe": self.probe,
        }

    def describe(self) -> str:
        verdict = "safe" if self.safe else "UNSAFE"
        return (
            f"fp16 {verdict}: max |x| {self.max_abs:.4g} at {self.layer} "
            f"(limit 65504 / {FP16_MAX / self.threshold:g} = {self.threshold:.0f})"
        )


def default_fp16_probe(in_chans: int = 3) -> Tensor:
    """(3, in_chans, 96, 96) float32 in [0, 1]: centre crops of scikit-image's photos."""
    from skimage import data

    crops = []
    for name in PROBE_PHOTOS:
        image = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
        h, w = image.shape[:2]
        top, left = (h - PROBE_SIZE) // 2, (w - PROBE_SIZE) // 2
        crop = torch.from_numpy(image[top : top + PROBE_SIZE, left : left + PROBE_SIZE].copy())
        crop = crop.permute(2, 0, 1)
        crops.append(crop.mean(0, keepdim=True) if in_chans == 1 else crop)
    return torch.stack(crops)


def measure_fp16_safety(
    model: nn.Module,
    probe: Tensor | None = None,
    *,
    safety: float = DEFAULT_SAFETY,
    probe_description: str | None = None,
) -> Fp16Safety:
    """Measure ``max |x|`` of every module on ``probe`` (fp32 copy of ``model``).

    probe: (B, C, H, W) in [0, 1]; default :func:`default_fp16_probe`. The
    model itself is not changed (a float32 deep copy runs the probe).
    """
    if safety < 1:
        raise ValueError(f"safety must be >= 1, got {safety}")
    if probe is None:
        probe = default_fp16_probe(int(getattr(model, "in_chans", 3)))
        probe_description = probe_description or PROBE_DESCRIPTION
    fp32 = copy.deepcopy(model).float().eval()
    magnitudes = feature_magnitudes(fp32, probe.float())
    if not magnitudes:
        raise ValueError("the probe pass recorded no module outputs")
    name, value = max(
        magnitudes.items(), key=lambda kv: math.inf if not math.isfinite(kv[1]) else kv[1]
    )
    threshold = FP16_MAX / safety
    # Hooks record modules as their forward returns (innermost first), so the
    # first entry over the threshold is where fp16 would begin to overflow.
    first = next((n for n, v in magnitudes.items() if not v <= threshold), None)
    return Fp16Safety(
        safe=first is None,  # NaN is not safe
        max_abs=float(value),
        layer=name or "<model output>",
        first_unsafe_layer=None if first is None else first or "<model output>",
        threshold=threshold,
        probe=probe_description or f"probe batch of shape {tuple(probe.shape)}",
    )


def resolve_fp16_precision(
    model: nn.Module,
    probe: Tensor | None = None,
    *,
    on_unsafe: Fp16UnsafeAction = "refuse",
    safety: float = DEFAULT_SAFETY,
) -> tuple[str, Fp16Safety]:
    """The precision an fp16 request should run in: ``("fp16", verdict)`` when safe.

    An unsafe model raises :class:`Fp16UnsafeError` (``on_unsafe="refuse"``),
    returns ``("bf16", verdict)`` after a warning (``"bf16"``) or ``("fp16",
    verdict)`` after an :class:`~irformer.analysis.magnitudes.Fp16OverflowWarning`
    (``"run"``); each names the layer where the margin is first exceeded.
    """
    if on_unsafe not in FP16_UNSAFE_ACTIONS:
        raise ValueError(f"on_unsafe={on_unsafe!r} is not one of {', '.join(FP16_UNSAFE_ACTIONS)}")
    verdict = measure_fp16_safety(model, probe, safety=safety)
    if verdict.safe:
        return "fp16", verdict
    detail = (
        f"fp16 would overflow from {verdict.first_unsafe_layer} on: its output exceeds the "
        f"safe margin 65504 / {safety:g} = {verdict.threshold:.0f} on the probe (largest "
        f"|x| = {verdict.max_abs:.4g}, at {verdict.layer})"
    )
    if on_unsafe == "refuse":
        raise Fp16UnsafeError(f"{detail}; run in bf16 or fp32 (or fall back to bf16 automatically)")
    if on_unsafe == "run":
        warnings.warn(f"{detail}; running fp16 anyway", Fp16OverflowWarning, stacklevel=2)
        logger.warning("%s; running fp16 anyway", detail)
        return "fp16", verdict
    logger.warning("%s; running in bf16 instead (same range as fp32)", detail)
    return "bf16", verdict


def resolve_fp16_options(
    model: nn.Module,
    precision: str,
    autocast: str | None,
    *,
    probe: Tensor | None = None,
    on_unsafe: Fp16UnsafeAction = "refuse",
    safety: float = DEFAULT_SAFETY,
) -> tuple[str, str | None]:
    """``(precision, autocast)`` to run with: unchanged unless one of them is fp16.

    Then the model is measured (:func:`resolve_fp16_precision`): safe models keep
    fp16; unsafe ones raise :class:`Fp16UnsafeError`, or run the same option in
    bf16 (``on_unsafe="bf16"``), or in fp16 after a warning (``"run"``).
    """
    if "fp16" not in (precision, autocast):
        return precision, autocast
    chosen, _ = resolve_fp16_precision(model, probe, on_unsafe=on_unsafe, safety=safety)
    if chosen == "fp16":
        return precision, autocast
    return ("bf16", autocast) if precision == "fp16" else (precision, "bf16")
