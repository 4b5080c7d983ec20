"""Calibration and distillation patches: random crops from a folder of clean images.

2DQuant calibrates on one batch of 32 LR patches (64 x 64) and distils the
bounds on random training crops; here both come from one folder of clean
images (e.g. DF2K HR), cropped at ``patch * scale`` and degraded on the fly
(MATLAB bicubic for SR) by :class:`irformer.data.datasets.DegradedImageDataset`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from irformer.data.datasets import DegradedImageDataset
from irformer.data.degradations import Degradation, make_degradation

__all__ = ["calibration_batch", "patch_dataset", "patch_stream"]

CALIB_BATCH = 32
"""2DQuant's calibration batch (LR patches)."""
CALIB_PATCH = 64
"""LR patch side for calibration and distillation (2DQuant: GT 128 at x2)."""


def patch_dataset(
    folder: str | Path,
    *,
    scale: int,
    patch: int = CALIB_PATCH,
    degradation: Degradation | None = None,
) -> DegradedImageDataset:
    """Dataset of random ``patch``-sized LQ crops (GT crops ``patch * scale``) with flips."""
    deg = degradation if degradation is not None else make_degradation("sr", scale=scale)
    return DegradedImageDataset(folder, deg, patch_size=patch * deg.scale, augment=True)


def calibration_batch(
    folder: str | Path,
    *,
    scale: int,
    batch: int = CALIB_BATCH,
    patch: int = CALIB_PATCH,
    seed: int = 0,
    degradation: Degradation | None = None,
) -> Tensor:
    """One seeded batch of LQ patches, (batch, C, patch, patch), for bound search.

    Images are drawn with replacement; the global torch RNG is left untouched.
    """
    ds = patch_dataset(folder, scale=scale, patch=patch, degradation=degradation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        order = torch.randint(len(ds), (batch,)).tolist()
        items = [ds[i]["lq"] for i in order]
    return torch.stack(items)  # type: ignore[arg-type]


def patch_stream(
    folder: str | Path,
    *,
    scale: int,
    batch: int = 16,
    patch: int = CALIB_PATCH,
    seed: int = 1,
    workers: int = 0,
    degradation: Degradation | None = None,
) -> Iterator[Tensor]:
    """Endless stream of LQ patch batches for bound distillation (DQC).

    Reproducible for a given seed: with ``workers > 0`` DataLoader seeds its
    workers from ``seed``; with ``workers = 0`` crops use torch's global
    generator, which is seeded here once.
    """
    ds = patch_dataset(folder, scale=scale, patch=patch, degradation=degradation)
    gen = torch.Generator().manual_seed(seed)
    if workers == 0:
        torch.manual_seed(seed)
    sampler = RandomSampler(ds, replacement=True, num_samples=1 << 40, generator=gen)
    loader = DataLoader(
        ds, batch_size=batch, sampler=sampler, num_workers=workers, generator=gen, drop_last=True
    )
    for item in loader:
        yield item["lq"]
