"""The training sample stream: a pure function of (seed, global position).

Exact resume and DDP equivalence both follow from one rule: the k-th sample a
run ever draws is fully determined by the seed and k. Epoch ``k // n`` shuffles
the ``n`` training items with a permutation seeded by (seed, epoch); the random
crop, flips, noise or JPEG quality of sample k are drawn with every global RNG
temporarily seeded by (seed, k). So:

* resuming only needs the position (``iteration * global_batch``), and no
  DataLoader or worker state;
* the number of workers does not change a single pixel;
* rank r of N, with per-rank batch B, takes slice ``[r*B, (r+1)*B)`` of every
  global batch of N*B samples: exactly what one process with batch N*B sees.

The datasets themselves (folders, degradations, augmentation) come from
:mod:`irformer.data.datasets`; this module only decides *which* sample is
drawn *when*, and with which random numbers.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:
    from irformer.engine.config import Config


class ItemDataset(Protocol):
    """What the trainer needs from a dataset: indexable, sized, dict items."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def _seed_from(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (SeedSequence, not ``a * K + b``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


_PERM_TAG = 0x5045524D  # separate the permutation stream from the sample stream
_SAMPLE_TAG = 0x53414D50


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    """The order of the ``n`` items in ``epoch`` (cached: one per epoch is reused)."""
    gen = torch.Generator().manual_seed(_seed_from(seed, epoch, _PERM_TAG))
    return tuple(torch.randperm(n, generator=gen).tolist())


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed torch/numpy/python RNGs for a block, then put the previous states back.

    The dataset may draw from any of the global generators; restoring them
    afterwards keeps data loading (in the main process when ``workers=0``) from
    shifting the model's own random stream.
    """
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


class PositionedDataset(Dataset):
    """Global sample position k -> ``base[perm(epoch)[k % n]]`` drawn under seed (seed, k)."""

    def __init__(self, base: ItemDataset, seed: int) -> None:
        if len(base) == 0:
            raise ValueError("training dataset is empty: no images found in data.train")
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # nominal; the stream is endless

    def item_index(self, position: int) -> int:
        n = len(self.base)
        return epoch_permutation(self.seed, position // n, n)[position % n]

    def __getitem__(self, position: int) -> dict[str, Any]:
        with seeded_global_rng(_seed_from(self.seed, position, _SAMPLE_TAG)):
            return self.base[self.item_index(position)]


class StreamSampler(Sampler[int]):
    """Endless global positions for one rank, starting at ``start`` (a global position).

    Global batch j covers positions ``[start + j*B*W, start + (j+1)*B*W)``; rank r
    yields the sub-range ``[.. + r*B, .. + (r+1)*B)``.
    """

    def __init__(self, start: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.start = start
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        global_batch = self.batch_size * self.world_size
        first = self.start + self.rank * self.batch_size
        j = 0
        while True:
            base = first + j * global_batch
            yield from range(base, base + self.batch_size)
            j += 1


def make_loader(
    dataset: ItemDataset,
    *,
    seed: int,
    start: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless DataLoader over the positioned stream from global position ``start``."""
    positioned = PositionedDataset(dataset, seed)
    return DataLoader(
        positioned,
        batch_size=batch_size,
        sampler=StreamSampler(start, batch_size, rank, world_size),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # A private generator: creating the iterator must not consume the global
        # torch RNG (it draws the worker base seed), or resume would drift.
        generator=torch.Generator().manual_seed(seed),
    )


class TensorPairs:
    """In-memory (lq, gt) patch pairs: the smallest dataset, for tests and demos.

    Samples a random crop/flip/rotation of one of the given (LQ, GT) image pairs
    with the global RNGs (which :class:`PositionedDataset` seeds per sample).
    lq: (C, h, w), gt: (C, h*scale, w*scale), float32 in [0, 1].
    """

    def __init__(
        self,
        pairs: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        patch_size: int,
        scale: int,
        augment: bool = True,
        length: int | None = None,
    ) -> None:
        if not pairs:
            raise ValueError("TensorPairs needs at least one (lq, gt) pair")
        for i, (lq, gt) in enumerate(pairs):
            if gt.shape[-2] != lq.shape[-2] * scale or gt.shape[-1] != lq.shape[-1] * scale:
                raise ValueError(
                    f"pair {i}: gt {tuple(gt.shape)} is not lq {tuple(lq.shape)} x{scale}"
                )
            if lq.shape[-1] * scale < patch_size or lq.shape[-2] * scale < patch_size:
                raise ValueError(f"pair {i}: image smaller than patch_size {patch_size}")
        self.pairs = pairs
        self.patch_size = patch_size
        self.scale = scale
        self.augment = augment
        self.length = length or len(pairs)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        lq, gt = self.pairs[index % len(self.pairs)]
        lq_patch = self.patch_size // self.scale
        top = int(torch.randint(0, lq.shape[-2] - lq_patch + 1, ()).item())
        left = int(torch.randint(0, lq.shape[-1] - lq_patch + 1, ()).item())
        s = self.scale
        lq = lq[:, top : top + lq_patch, left : left + lq_patch]
        gt = gt[:, top * s : (top + lq_patch) * s, left * s : (left + lq_patch) * s]
        if self.augment:
            flips = torch.randint(0, 2, (3,)).tolist()
            if flips[0]:
                lq, gt = lq.flip(-1), gt.flip(-1)
            if flips[1]:
                lq, gt = lq.flip(-2), gt.flip(-2)
            if flips[2]:
                lq, gt = lq.transpose(-1, -2), gt.transpose(-1, -2)
        return {"lq": lq.contiguous(), "gt": gt.contiguous(), "name": f"{index % len(self.pairs)}"}


def build_train_dataset(cfg: Config) -> ItemDataset:
    """The training set a config describes, from :mod:`irformer.data.datasets`.

    ``data.train`` folders are degraded on the fly (``sr``/``dn``/``car``), or
    paired one to one with ``data.train_lq`` folders, or (``dr`` without
    ``train_lq``) read as ``rain``/``norain`` pair folders. An entry may also be
    a ``.irpack`` file (:mod:`irformer.data.packed`, made by ``irformer data
    prepare --pack``): paired with a ``train_lq`` pack, or degraded on the fly.
    Several entries are concatenated in the order given.
    """
    from torch.utils.data import ConcatDataset

    from irformer.data.datasets import DegradedImageDataset, PairedImageDataset, RainPairDataset
    from irformer.data.degradations import make_degradation

    d, scale = cfg.data, cfg.model.scale
    channels = "grey" if d.grayscale else "rgb"
    parts: list[Dataset] = []
    for i, folder in enumerate(d.train):
        if _is_pack(folder) or (d.train_lq and _is_pack(d.train_lq[i])):
            parts.append(_packed_dataset(cfg, i))
            continue
        if not Path(folder).is_dir():
            raise FileNotFoundError(
                f"data.train[{i}]: folder {folder} not found (set data.train to your "
                "DF2K-style HR folder, e.g. --set data.train=[path/to/DF2K/HR])"
            )
        if d.train_lq:
            parts.append(
                PairedImageDataset(
                    folder,
                    d.train_lq[i],
                    scale=scale,
                    patch_size=d.patch_size,
                    augment=True,
                    channels=channels,
                )
            )
        elif d.task == "dr":
            parts.append(RainPairDataset(folder, patch_size=d.patch_size, augment=True))
        else:
            degradation = make_degradation(
                d.task,
                scale=scale,
                sigma=d.sigma,
                quality=d.quality,
                sigma_range=d.sigma_range,
                quality_range=d.quality_range,
            )
            parts.append(
                DegradedImageDataset(
                    folder, degradation, patch_size=d.patch_size, augment=True, channels=channels
                )
            )
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _is_pack(path: str) -> bool:
    from irformer.data.packed import PACK_SUFFIX

    return Path(path).suffix == PACK_SUFFIX


def _packed_dataset(cfg: Config, i: int) -> Dataset:
    """``data.train[i]`` (and ``train_lq[i]``) as packs: paired, or degraded on the fly."""
    from irformer.data.degradations import make_degradation
    from irformer.data.packed import PackedDegradedDataset, PackedPairDataset

    d, scale = cfg.data, cfg.model.scale
    channels = "grey" if d.grayscale else "rgb"
    gt = d.train[i]
    if d.train_lq:
        lq = d.train_lq[i]
        if not (_is_pack(gt) and _is_pack(lq)):
            raise ValueError(
                f"data.train[{i}] = {gt} and data.train_lq[{i}] = {lq}: pair a pack with a "
                "pack (both .irpack) or a folder with a folder"
            )
        return PackedPairDataset(
            gt, lq, scale=scale, patch_size=d.patch_size, augment=True, channels=channels
        )
    if d.task == "dr":
        raise ValueError(f"data.train[{i}] = {gt}: deraining from a pack needs data.train_lq")
    degradation = make_degradation(d.task, scale=scale, sigma=d.sigma, quality=d.quality)
    return PackedDegradedDataset(
        gt, degradation, patch_size=d.patch_size, augment=True, channels=channels
    )


PROBE_SEED_TAG = 7919
"""Offset of the probe stream's seed from the training seed (a stream of its own)."""


def probe_batch_for(cfg: Config, *, count: int = 4) -> torch.Tensor:
    """``count`` training-like LQ patches: positions ``0..count-1`` of a separate sample
    stream (the fixed batch the analysis probes measure during training)."""
    stream = PositionedDataset(build_train_dataset(cfg), cfg.train.seed + PROBE_SEED_TAG)
    return torch.stack([stream[k]["lq"] for k in range(count)])
