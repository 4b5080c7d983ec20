"""Post-training quantisation methods and the one entry point, :func:`quantize_model`.

========== ===========================================================
minmax     bounds = calibration min/max
dquant2d   2DQuant: DOBI bound search + DQC bound distillation
compsrt    CompSRT: dquant2d + Hadamard rotation + scalar decomposition
           (+ magnitude pruning with ``prune``)
ptq4vit    PTQ4ViT: twin-uniform post-softmax/post-GELU, range search
noisyquant NoisyQuant: fixed noisy bias before activation quantisation
========== ===========================================================

CompSRT's ablations are methods too (``2dquant_had_w``, ...:
:data:`irformer.compress.methods.compsrt.ABLATIONS`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from irformer.compress.methods import compsrt, dquant2d, minmax, noisyquant, ptq4vit
from irformer.compress.methods.base import (
    DistillCheckpoint,
    DistillLog,
    QuantConfig,
    attach_quantizers,
    calibrate,
    distill_bounds,
    prepare_quantized_copy,
)

__all__ = [
    "METHODS",
    "QuantConfig",
    "QuantResult",
    "attach_for_config",
    "method_config",
    "method_names",
    "quantize_model",
]

logger = logging.getLogger(__name__)

METHODS: dict[str, ModuleType] = {
    "minmax": minmax,
    "dquant2d": dquant2d,
    "compsrt": compsrt,
    "ptq4vit": ptq4vit,
    "noisyquant": noisyquant,
}
"""Method name -> module with ``default_config(wbits, abits)`` and optionally
``act_factory`` and ``calibrate``."""

METHOD_ALIASES: dict[str, str] = {"2dquant": "dquant2d"}


def method_names() -> list[str]:
    """Every method name :func:`method_config` accepts (aliases and ablations included)."""
    return [*METHODS, *METHOD_ALIASES, *compsrt.ABLATIONS]


def _method(name: str) -> ModuleType:
    key = METHOD_ALIASES.get(name, name)
    if key in compsrt.ABLATIONS:
        return compsrt
    if key not in METHODS:
        raise ValueError(
            f"unknown quantisation method {name!r}; valid: {', '.join(method_names())}"
        )
    return METHODS[key]


def method_config(name: str, *, wbits: int, abits: int, **overrides: Any) -> QuantConfig:
    """The method's published defaults at the given bit widths, with overrides
    (any :class:`QuantConfig` field, e.g. ``prune=0.4``, ``dqc_iters=500``); CompSRT's
    ablations (:data:`irformer.compress.methods.compsrt.ABLATIONS`) by name too."""
    if name in compsrt.ABLATIONS:
        cfg = compsrt.ablation_config(name, wbits, abits)
    else:
        cfg = _method(name).default_config(wbits, abits)
    return cfg.with_overrides(**overrides) if overrides else cfg


def attach_for_config(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Attach, in place, the quantisers ``cfg`` describes (no calibration): the
    skeleton a packed or saved quantised model loads into."""
    factory = getattr(_method(cfg.method), "act_factory", None)
    return attach_quantizers(model, cfg, act_factory=factory)


@dataclass
class QuantResult:
    model: nn.Module
    config: QuantConfig
    distill: DistillLog | None


def quantize_model(
    model: nn.Module,
    cfg: QuantConfig,
    calib: Tensor,
    train_batches: Iterable[Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    val_batch: Tensor | None = None,
    val_every: int = 100,
    recompute: bool = True,
    fused: bool = False,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Callable[[DistillCheckpoint], None] | None = None,
    on_calibrated: Callable[[nn.Module], None] | None = None,
    state_path: str | Path | None = None,
) -> QuantResult:
    """Quantise a copy of ``model``: attach, calibrate on ``calib`` (B, C, h, w),
    then (if ``cfg.dqc_iters``) distil the bounds on ``train_batches``, keeping
    the bounds with the lowest L1 on ``val_batch`` when one is given;
    ``recompute`` trades one extra forward per DQC step for a fraction of the
    memory; ``fused``, ``checkpoints``/``on_checkpoint`` and ``state_path``
    (resumable state) are :func:`distill_bounds`'s. ``on_calibrated(qmodel)``
    runs between calibration and distillation (e.g. to snapshot the bounds).

    ``model`` itself is left untouched and serves as the FP teacher.
    """
    method = _method(cfg.method)
    factory = getattr(method, "act_factory", None)
    qmodel = prepare_quantized_copy(model, cfg, act_factory=factory)
    if device is not None:
        qmodel = qmodel.to(device)
        calib = calib.to(device)
    calibrate_fn = getattr(method, "calibrate", calibrate)
    calibrate_fn(qmodel, calib, cfg)
    if on_calibrated is not None:
        on_calibrated(qmodel)
    log = None
    if cfg.dqc_iters > 0:
        if train_batches is None:
            raise ValueError(
                f"method {cfg.method} distils bounds for {cfg.dqc_iters} iterations but no "
                "training batches were given (pass train_batches or set dqc_iters=0)"
            )
        log = distill_bounds(
            qmodel,
            model,
            train_batches,
            cfg,
            device=device,
            on_step=on_step,
            val_batch=val_batch,
            val_every=val_every,
            recompute=recompute,
            fused=fused,
            checkpoints=checkpoints,
            on_checkpoint=on_checkpoint,
            state_path=state_path,
        )
        if log.loss:
            logger.info(
                "DQC: %d iterations, loss %.4g -> %.4g", len(log.loss), log.loss[0], log.loss[-1]
            )
    return QuantResult(model=qmodel, config=cfg, distill=log)
