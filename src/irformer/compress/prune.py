"""Magnitude pruning and the storage arithmetic of pruned quantised weights.

CompSRT (section 3.3) prunes, per quantised weight and in the Hadamard-rotated
domain, the fraction ``p`` with the smallest magnitudes, using a threshold
estimated from a sample of at most 1e6 elements. Storage: the kept entries at
``b`` bits plus a dense 1-bit mask, i.e. ``(1 - p) b + 1`` bits per parameter
(3.4 at b = 4, p = 0.4; 2.8 at b = 3). At b = 2 pruning 40% costs more than it
saves, which is why the paper does not prune 2-bit models.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MAX_THRESHOLD_SAMPLE",
    "bits_per_param",
    "magnitude_mask",
    "magnitude_threshold",
    "megabytes",
    "storage_bits",
]

MAX_THRESHOLD_SAMPLE = 1_000_000
"""Tensors larger than this get their threshold from a random sample (CompSRT)."""


def magnitude_threshold(
    x: Tensor, fraction: float, *, max_sample: int = MAX_THRESHOLD_SAMPLE, seed: int = 0
) -> float:
    """The ``fraction``-quantile of ``|x|``: exact up to ``max_sample`` elements,
    estimated on a seeded uniform sample of ``max_sample`` elements beyond."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
    mags = x.detach().reshape(-1).abs().float()
    if mags.numel() > max_sample:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(mags.numel(), (max_sample,), generator=gen)
        mags = mags[idx.to(mags.device)]
    k = round(fraction * mags.numel())
    if k == 0:
        return -1.0
    return float(torch.kthvalue(mags.cpu(), k).values)


def magnitude_mask(
    x: Tensor, fraction: float, *, max_sample: int = MAX_THRESHOLD_SAMPLE, seed: int = 0
) -> Tensor:
    """Boolean keep-mask: True where ``|x|`` is above the pruning threshold.

    For tensors up to ``max_sample`` elements with distinct magnitudes exactly
    ``round(fraction * numel)`` entries are pruned.
    """
    thr = magnitude_threshold(x, fraction, max_sample=max_sample, seed=seed)
    return x.detach().abs() > thr


def bits_per_param(bits: int, prune: float = 0.0, *, mask_bits: float = 1.0) -> float:
    """Nominal storage per weight: ``b`` unpruned, ``(1 - p) b + mask_bits`` pruned."""
    if prune <= 0.0:
        return float(bits)
    return (1.0 - prune) * bits + mask_bits


def storage_bits(numel: int, bits: int, kept: int | None = None) -> int:
    """Exact bits to store ``numel`` indices (or ``kept`` of them plus a 1-bit mask)."""
    if kept is None:
        return numel * bits
    return kept * bits + numel


def megabytes(num_bytes: float) -> float:
    """Bytes -> MB (10^6, as model sizes are quoted in the papers)."""
    return num_bytes / 1e6


def packed_bytes(num_bits: int) -> int:
    """Bytes that ``num_bits`` occupy once packed into uint8."""
    return math.ceil(num_bits / 8)
