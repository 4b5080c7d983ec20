"""Magnitude pruning and the storage arithmetic of pruned quantised weights.

CompSRT (section 3.3) prunes, per quantised weight and in the Hadamard-rotated
domain, the fraction ``p`` with the smallest magnitudes, using a threshold
estimated from a sample of at most 1e6 elements. Storage: the kept entries at
``b`` bits plus a dense 1-bit mask, i.e. ``(1 - p) b + 1`` bits per parameter
(3.4 at b = 4, p = 0.4; 2.8 at b = 3). At b = 2 pruning 40% costs more than it
saves, which is why the paper does not prune 2-bit models.

Three modes (:data:`PruneMode`):

- ``magnitude`` (default): the smallest fraction of each rotated weight,
  threshold exact up to 1e6 elements, pruned entries stay exactly zero, so the
  model evaluated is the 1-bit-mask storage model;
- ``channel``: whole output rows with the lowest mean magnitude (the paper's
  section 7.3 / Table 8): no dense mask, one bit per row;
- ``official``: what CompSRT's code does, for comparisons with its published
  numbers: rows zero-padded to a power of two *count* towards the fraction, the
  threshold is the quantile of a fresh 1e6-element sample (with replacement)
  on every forward pass, and pruned zeros are quantised like any other value
  (so they come back as small non-zeros: not storable with a 1-bit mask).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from irformer.compress.hadamard import next_power_of_two

__all__ = [
    "MAX_THRESHOLD_SAMPLE",
    "PRUNE_MODES",
    "PruneMode",
    "bits_per_param",
    "channel_mask",
    "magnitude_mask",
    "magnitude_threshold",
    "megabytes",
    "official_prune",
    "storage_bits",
]

PruneMode = Literal["magnitude", "channel", "official"]
PRUNE_MODES: tuple[str, ...] = get_args(PruneMode)

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


def channel_mask(x: Tensor, fraction: float, *, groups: int = 1) -> Tensor:
    """Boolean keep-mask of ``x`` (out, m) that prunes whole rows: in each of
    ``groups`` row blocks (q, k, v of a fused qkv) the ``round(fraction * rows)``
    rows with the smallest mean ``|x|`` (ties: the earlier row goes first)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
    if x.dim() != 2 or x.shape[0] % groups:
        raise ValueError(
            f"channel pruning needs a (rows, cols) tensor with rows divisible into {groups} "
            f"groups, got shape {tuple(x.shape)}"
        )
    rows = x.shape[0] // groups
    pruned = round(fraction * rows)
    mean_abs = x.detach().abs().float().mean(dim=1).reshape(groups, rows)
    order = mean_abs.argsort(dim=1, stable=True)  # ascending: the first ones go
    keep_rows = torch.ones(groups, rows, dtype=torch.bool, device=x.device)
    keep_rows.scatter_(1, order[:, :pruned], False)
    return keep_rows.reshape(-1, 1).expand_as(x).clone()


def official_prune(
    x: Tensor,
    fraction: float,
    *,
    groups: int = 1,
    sample: int = MAX_THRESHOLD_SAMPLE,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``x`` (out, m) with CompSRT's code's pruning applied to each row block: rows
    padded with zeros to a power of two, threshold = the ``fraction``-quantile of
    ``|v|`` over ``sample`` entries drawn with replacement, entries with
    ``|v| >= threshold`` kept (the padded zeros count towards the fraction, so
    fewer real weights are pruned)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return x
    rows = x.shape[0] // groups
    padded_rows = next_power_of_two(rows)
    out = []
    for block in x.reshape(groups, rows, -1):
        flat = F.pad(block, (0, 0, 0, padded_rows - rows)).reshape(-1)
        idx = torch.randint(flat.numel(), (sample,), generator=generator)
        thr = torch.quantile(flat.detach()[idx.to(flat.device)].abs().float(), fraction)
        out.append(block * (block.abs() >= thr))
    return torch.cat(out).reshape(x.shape)


def bits_per_param(bits: int, prune: float = 0.0, *, mask_bits: float = 1.0) -> float:
    """Nominal storage per weight: ``b`` unpruned, ``(1 - p) b + mask_bits`` pruned
    (``mask_bits`` per weight: 1 for a dense mask, ``1 / cols`` for a row mask)."""
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
