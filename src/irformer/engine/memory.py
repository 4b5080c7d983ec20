"""How much memory restoring an image will take, and which path fits a budget.

``irformer restore`` of a 4000x4000 image used to run until the machine ran
out of memory. Before running, :func:`plan_restore` estimates the peak of each
execution path from the model's sizes and the image size
(:func:`estimate_peak_bytes`) and picks, within ``max_memory`` (default: half
of the memory available when the command starts):

* the plain forward pass when it fits;
* else the exact chunked path (same output, a few feature maps of memory);
* else, for models whose norms use per-token statistics only (LN and the
  like), tiling with the largest tile that fits (tiles see the image through
  their own window, but per-token norms do not change with the tile);
* else nothing: :class:`MemoryBudgetError` names the estimate of every path
  and the options that would fit (``--max-memory``, ``--tile``).

Models that normalise with whole-image statistics (i-LN, LN*) are never tiled
automatically: a tile's statistics differ from the image's, so the output
would differ from the model's (the user may still ask for ``--tile``).

The estimate is linear in the number of pixels: bytes per input pixel (from
the embedding width, MLP width, window, output channels and scale) times the
pixels, plus the weights; its coefficients were fitted to measured peaks
(``benchmarks/bench_memory.py``; BENCHMARKS.md has the table of measured vs
estimated). It is an estimate, not a bound: the planner leaves headroom.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Literal

from torch import nn

from irformer.errors import IrformerError

logger = logging.getLogger(__name__)

Path_ = Literal["plain", "exact", "tiled"]

DEFAULT_BUDGET_FRACTION = 0.5
"""``max_memory`` default: this fraction of ``MemAvailable`` when the command starts."""
MIN_TILE = 64
"""Smallest tile :func:`plan_restore` picks (smaller tiles are mostly overlap)."""
TILE_OVERLAP = 32

# The per-pixel model, in elements (x the element size), fitted to peaks measured in
# fresh processes (benchmarks/bench_memory.py; BENCHMARKS.md "Memory of restore"):
# SwinIR-light x2/x4 (C = 60) at 192^2 and 384^2 grow by 1.5-2.1 kB per input pixel,
# a C = 12 model by ~1.0 kB, which fixes both the C-proportional part (feature maps
# alive at the peak: the residual stream, the normalised tokens, the attention
# output and the long skip) and a part independent of C (input copies, masks,
# the output's fp32 copies and checks). The plain pass grows faster on large images:
# 2.7 kB per pixel between 1024^2 and 1536^2 (x2), and `irformer restore` of a 2000^2
# image peaked at 10.7 GB; its coefficient is fitted there (the sizes the planner
# decides on), so small images are over-estimated (measured/estimated ~0.75 at 384^2).
_BODY_MAPS = {"plain": 6.7, "exact": 2.5}
_MLP_MAPS = {"plain": 0.5, "exact": 0.5}
_FIXED_PER_PIXEL = 150.0
CONSTANT_BYTES = 160 * 2**20
"""First-call allocations independent of the image (thread pools, caches, the kernels)."""


class MemoryBudgetError(IrformerError, MemoryError):
    """No execution path fits the memory budget; the message lists the estimates."""


@dataclass(frozen=True)
class MemoryEstimate:
    """An execution path's estimated peak for one image."""

    path: Path_
    total: int
    """Bytes: weights plus the per-pixel working memory."""
    tile: int | None = None

    def describe(self) -> str:
        tile = f" (tile {self.tile})" if self.tile else ""
        return f"{self.path}{tile}: ~{_gb(self.total)}"


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def parse_memory_size(text: str) -> int | None:
    """``"8G"``, ``"500M"``, ``"2048K"`` or plain bytes -> bytes; ``"none"`` -> no limit."""
    value = text.strip().upper()
    if value in ("NONE", "0", "INF", "UNLIMITED"):
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    factor = units.get(value[-1:], 1)
    number = value[:-1] if value[-1:] in units else value
    try:
        size = float(number.removesuffix("B") if factor == 1 else number) * factor
    except ValueError:
        raise ValueError(
            f"memory size {text!r}: expected a number with K/M/G/T (e.g. 8G) or 'none'"
        ) from None
    if size <= 0 or not math.isfinite(size):
        raise ValueError(f"memory size {text!r} must be positive")
    return int(size)


def available_memory() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (the total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget() -> int:
    """Half of the memory available now (see :data:`DEFAULT_BUDGET_FRACTION`)."""
    return int(available_memory() * DEFAULT_BUDGET_FRACTION)


def _dims(model: nn.Module) -> tuple[int, int, int, int, str, int]:
    """(embed_dim, mlp hidden, in_chans, scale, upsampler, num_feat) read off the model."""
    conv_first = getattr(model, "conv_first", None)
    if not isinstance(conv_first, nn.Conv2d):
        raise ValueError(f"{type(model).__name__}: not an irformer restoration model")
    embed = conv_first.out_channels
    hidden = max(
        (m.out_features for n, m in model.named_modules() if n.endswith("mlp.fc1")),
        default=2 * embed,
    )
    before = getattr(model, "conv_before_upsample", None)
    num_feat = before[0].out_channels if isinstance(before, nn.Sequential) else 0
    return (
        embed,
        hidden,
        int(getattr(model, "in_chans", 3)),
        int(getattr(model, "upscale", 1)),
        str(getattr(model, "upsampler", "")),
        num_feat,
    )


def _head_elements(in_chans: int, scale: int, upsampler: str, num_feat: int) -> float:
    """Elements per input pixel the reconstruction head and the output keep alive."""
    s2 = scale * scale
    if upsampler == "pixelshuffle":
        return 2.5 * num_feat * s2 + 5 * in_chans * s2
    if upsampler == "nearest+conv":
        return 3.0 * num_feat * s2 + 5 * in_chans * s2
    return 5.0 * in_chans * s2 + 2 * in_chans  # direct pixel shuffle / same size


def per_pixel_bytes(model: nn.Module, path: Path_, element_size: int = 4) -> float:
    """Working memory per input pixel of ``path`` (plain or exact) for ``model``."""
    embed, hidden, in_chans, scale, upsampler, num_feat = _dims(model)
    body = _BODY_MAPS[path] * embed + _MLP_MAPS[path] * hidden + _FIXED_PER_PIXEL
    return element_size * (body + _head_elements(in_chans, scale, upsampler, num_feat))


def _weights_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def estimate_peak_bytes(
    model: nn.Module, size: tuple[int, int], options: object | None = None
) -> MemoryEstimate:
    """The estimated peak of restoring an ``H x W`` image with ``options``
    (:class:`irformer.engine.infer.RestoreOptions`; None: the plain path)."""
    h, w = size
    tile = getattr(options, "tile", None)
    chunked = getattr(options, "chunk_windows", None) is not None
    precision = getattr(options, "precision", "fp32")
    element = 2 if precision in ("bf16", "fp16") else 4
    weights = _weights_bytes(model) + CONSTANT_BYTES
    _, _, in_chans, scale, _, _ = _dims(model)
    if tile is not None:
        overlap = getattr(options, "tile_overlap", TILE_OVERLAP)
        side = min(tile, max(h, w))
        # a tile's plain pass, plus its output patch and blending weights (measured: 1.2x)
        working = 1.25 * per_pixel_bytes(model, "plain", element) * side * side
        # fp32 output and weight accumulators of the whole image (forward_tiled), the
        # normalised output and its checks
        accumulators = 4 * (3 * in_chans + 1) * scale * scale * h * w
        del overlap
        return MemoryEstimate("tiled", int(weights + working + accumulators), tile)
    path: Path_ = "exact" if chunked else "plain"
    return MemoryEstimate(path, int(weights + per_pixel_bytes(model, path, element) * h * w))


def holistic_statistics(model: nn.Module) -> bool:
    """Whether any norm of ``model`` pools statistics over the whole image (i-LN, LN*,
    IN, BN with batch statistics; :func:`irformer.norms.image_statistics_norms`): then a
    tile's output differs from the whole image's."""
    from irformer.norms import image_statistics_norms

    return bool(image_statistics_norms(model))


def plan_restore(
    model: nn.Module,
    size: tuple[int, int],
    options: object,
    *,
    max_memory: int | None = None,
    explicit: bool = False,
) -> object:
    """``options`` with the path that fits ``max_memory`` (see the module docstring).

    ``explicit``: the user chose the path (``--tile``/``--exact-chunk``); it is kept,
    and refused with the estimates when it does not fit. Returns new options
    (a :class:`irformer.engine.infer.RestoreOptions`).
    """
    budget = default_budget() if max_memory is None else max_memory
    h, w = size
    plain = dataclasses.replace(options, tile=None, chunk_windows=None)
    exact = dataclasses.replace(options, tile=None, chunk_windows=256)
    candidates = [estimate_peak_bytes(model, size, plain), estimate_peak_bytes(model, size, exact)]
    if explicit:
        chosen = estimate_peak_bytes(model, size, options)
        if chosen.total <= budget:
            return options
        smallest = _smallest_tile_estimate(model, size, options)
        raise MemoryBudgetError(
            _refusal(
                size,
                budget,
                [chosen, *candidates],
                holistic=False,
                smaller_tile_fits=chosen.path == "tiled" and smallest.total <= budget,
            )
        )
    for estimate, opts in zip(candidates, (plain, exact), strict=True):
        if estimate.total <= budget:
            if estimate.path == "exact":
                logger.info(
                    "the plain pass would need %s: exact chunked path", _gb(candidates[0].total)
                )
            return opts
    holistic = holistic_statistics(model)
    if not holistic:
        tile = _largest_tile(model, size, options, budget)
        if tile is not None:
            logger.warning(
                "a %dx%d image does not fit %s whole (%s); tiling with %d-pixel tiles",
                w,
                h,
                _gb(budget),
                candidates[1].describe(),
                tile,
            )
            return dataclasses.replace(
                options, tile=tile, tile_overlap=TILE_OVERLAP, chunk_windows=None
            )
        # Even the smallest tile does not fit: the whole-image output buffers do not.
        candidates.append(_smallest_tile_estimate(model, size, options))
    raise MemoryBudgetError(_refusal(size, budget, candidates, holistic=holistic))


def _smallest_tile_estimate(
    model: nn.Module, size: tuple[int, int], options: object
) -> MemoryEstimate:
    trial = dataclasses.replace(
        options, tile=MIN_TILE, tile_overlap=TILE_OVERLAP, chunk_windows=None
    )
    return estimate_peak_bytes(model, size, trial)


def _largest_tile(
    model: nn.Module, size: tuple[int, int], options: object, budget: int
) -> int | None:
    side = max(size)
    tile = 1 << max(6, math.ceil(math.log2(side)))
    while tile >= MIN_TILE:
        trial = dataclasses.replace(
            options, tile=tile, tile_overlap=TILE_OVERLAP, chunk_windows=None
        )
        if tile > TILE_OVERLAP and estimate_peak_bytes(model, size, trial).total <= budget:
            return tile
        tile //= 2
    return None


def _refusal(
    size: tuple[int, int],
    budget: int,
    estimates: list[MemoryEstimate],
    *,
    holistic: bool,
    smaller_tile_fits: bool = False,
) -> str:
    """The refusal: every path's estimate and the options that would fit. The suggested
    budget is the cheapest path's; a smaller tile is suggested only when one fits."""
    h, w = size
    lines = ", ".join(e.describe() for e in estimates)
    need = min(e.total for e in estimates) * 1.1
    unit, div = ("G", 2**30) if need >= 2**30 else ("M", 2**20)
    advice = f"raise --max-memory (e.g. --max-memory {math.ceil(need / div)}{unit})"
    if holistic:
        advice += (
            ", or tile anyway with --tile N (this model normalises with whole-image "
            "statistics: each tile uses its own, so the output differs from the model's)"
        )
    elif smaller_tile_fits:
        advice += ", or choose a smaller --tile"
    elif any(e.path == "tiled" for e in estimates):
        advice += " (the whole output's fp32 buffers alone exceed the budget, whatever the tile)"
    return (
        f"restoring a {w}x{h} image needs more than the memory budget {_gb(budget)} "
        f"(estimated peaks: {lines}); {advice}"
    )
