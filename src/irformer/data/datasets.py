"""Training and validation datasets.

Every dataset returns ``{"lq": (C, h, w), "gt": (C, H, W), "name": str}`` with
float32 tensors in [0, 1] (``lq`` of denoising is unclipped noisy data), so the
training loop never needs to know the task. Three sources:

* :class:`PairedImageDataset`: GT and LQ folders matched by file stem; an LQ
  stem may carry the scale suffix (``babyx4.png`` pairs with ``baby.png``).
* :class:`DegradedImageDataset`: one folder of clean images degraded on the
  fly (bicubic, noise or JPEG; see :mod:`irformer.data.degradations`).
* :class:`RainPairDataset`: ``rain``/``norain`` (or ``input``/``target``) folders.

With ``patch_size`` set (the GT patch size, a multiple of the scale), each item
is a random crop; ``augment=True`` adds random horizontal/vertical flips and a
90-degree rotation (transpose), the only augmentations the i-LN paper uses.
Randomness is drawn from torch's global generator, which ``DataLoader`` seeds
per worker, so a seeded run is reproducible.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from irformer.data.degradations import Degradation, derive_seed, mod_crop
from irformer.data.io import ChannelMode, image_size, image_to_tensor, list_images, read_image

__all__ = [
    "DegradedImageDataset",
    "PairedImageDataset",
    "RainPairDataset",
    "augment_pair",
    "check_pair_sizes",
    "match_pairs",
    "rain_pair_dirs",
    "random_crop_pair",
]

RAIN_FOLDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("rain", "norain"),
    ("input", "target"),
    ("rainy", "gt"),
    ("LQ", "GT"),
    ("lq", "gt"),
)
"""(degraded, clean) sub-folder names recognised by :func:`rain_pair_dirs`."""

_RAIN_PREFIX = re.compile(r"^(?:no)?rain[-_]", re.IGNORECASE)
_MAX_LISTED = 5


def _listing(paths: Sequence[Path]) -> str:
    names = ", ".join(p.name for p in paths[:_MAX_LISTED])
    return names + (f", ... ({len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else "")


def _pair_key(stem: str, scale: int, *, is_lq: bool) -> str:
    # Rain100H-style names ("rain-001" / "norain-001") pair by their number.
    key = _RAIN_PREFIX.sub("", stem)
    if is_lq and scale > 1:
        key = re.sub(rf"[_-]?[xX]{scale}$", "", key)
    return key


def _index(paths: Sequence[Path], scale: int, *, is_lq: bool, role: str) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for p in paths:
        key = _pair_key(p.stem, scale, is_lq=is_lq)
        if key in index:
            raise ValueError(
                f"two {role} images map to the same name {key!r}: {index[key]} and {p}"
            )
        index[key] = p
    return index


def match_pairs(
    gt_paths: Sequence[Path], lq_paths: Sequence[Path], *, scale: int = 1
) -> list[tuple[Path, Path]]:
    """Pair GT and LQ files by stem; returns ``[(gt, lq), ...]`` in GT order.

    An LQ stem may end in the scale suffix (``x4``, ``_x4``); ``rain-``/``norain-``
    prefixes are ignored. Any file without a partner, on either side, is an
    error naming the files and their folders.
    """
    gt_index = _index(gt_paths, scale, is_lq=False, role="ground-truth")
    lq_index = _index(lq_paths, scale, is_lq=True, role="low-quality")
    missing_lq = [p for k, p in gt_index.items() if k not in lq_index]
    missing_gt = [p for k, p in lq_index.items() if k not in gt_index]
    if missing_lq or missing_gt:
        parts = []
        if missing_lq:
            folder = lq_paths[0].parent if lq_paths else "the LQ folder"
            parts.append(
                f"{len(missing_lq)} ground-truth image(s) have no partner in {folder}: "
                f"{_listing(missing_lq)}"
            )
        if missing_gt:
            folder = gt_paths[0].parent if gt_paths else "the GT folder"
            parts.append(
                f"{len(missing_gt)} low-quality image(s) have no partner in {folder}: "
                f"{_listing(missing_gt)}"
            )
        hint = f" (LQ names may add the suffix x{scale})" if scale > 1 else ""
        raise ValueError("unmatched image pairs: " + "; ".join(parts) + hint)
    return [(gt, lq_index[k]) for k, gt in gt_index.items()]


def check_pair_sizes(gt: Path, lq: Path, scale: int) -> tuple[int, int]:
    """LQ ``(h, w)`` after checking the GT is ``scale`` times it (GT may exceed by < scale).

    The allowance lets un-mod-cropped HR files pair with their LR files;
    the GT is cropped to ``scale * (h, w)`` when read.
    """
    gh, gw = image_size(gt)
    lh, lw = image_size(lq)
    if gh // scale != lh or gw // scale != lw:
        raise ValueError(
            f"size mismatch: ground truth {gt} is {gh}x{gw} but low-quality {lq} is {lh}x{lw}; "
            f"expected the GT to be {scale}x the LQ size ({lh * scale}x{lw * scale})"
        )
    return lh, lw


def random_crop_pair(
    lq: np.ndarray, gt: np.ndarray, gt_patch: int, scale: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Aligned random crops: ``gt_patch`` pixels of GT, ``gt_patch // scale`` of LQ."""
    lq_patch = gt_patch // scale
    h, w = lq.shape[:2]
    if h < lq_patch or w < lq_patch:
        raise ValueError(f"LQ image {h}x{w} is smaller than the LQ patch {lq_patch}")
    top = int(rng.integers(0, h - lq_patch + 1))
    left = int(rng.integers(0, w - lq_patch + 1))
    lq = lq[top : top + lq_patch, left : left + lq_patch]
    gt = gt[top * scale : (top + lq_patch) * scale, left * scale : (left + lq_patch) * scale]
    return lq, gt


def augment_pair(
    lq: np.ndarray, gt: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The same random h-flip, v-flip and transpose (with the flips: all 8 dihedral views)."""
    hflip, vflip, transpose = rng.random(3) < 0.5
    for flag, op in (
        (hflip, lambda x: x[:, ::-1]),
        (vflip, lambda x: x[::-1]),
        (transpose, lambda x: x.transpose(1, 0, 2)),
    ):
        if flag:
            lq, gt = op(lq), op(gt)
    return lq, gt


def _item_rng() -> np.random.Generator:
    # Drawn from torch's generator so DataLoader worker seeding applies.
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


def _check_patch(patch_size: int | None, scale: int) -> None:
    if patch_size is not None and (patch_size < scale or patch_size % scale):
        raise ValueError(f"patch_size {patch_size} must be a positive multiple of scale {scale}")


def _to_item(lq: np.ndarray, gt: np.ndarray, name: str) -> dict[str, torch.Tensor | str]:
    return {"lq": image_to_tensor(lq), "gt": image_to_tensor(gt), "name": name}


class PairedImageDataset(Dataset):
    """GT/LQ folder pairs (SR with pre-made LR, deraining, any pre-degraded data).

    Args:
        gt_dir: folder of ground-truth images.
        lq_dir: folder of degraded images, matched by stem (see :func:`match_pairs`).
        scale: GT size / LQ size (1 for restoration tasks).
        patch_size: GT patch side for random crops (training); ``None`` = whole images.
        augment: random flips and 90-degree rotation.
        channels: channel conversion on reading (see :func:`irformer.data.io.read_image`).
    """

    def __init__(
        self,
        gt_dir: str | Path,
        lq_dir: str | Path,
        *,
        scale: int = 1,
        patch_size: int | None = None,
        augment: bool = False,
        channels: ChannelMode = "rgb",
    ) -> None:
        _check_patch(patch_size, scale)
        self.scale = scale
        self.patch_size = patch_size
        self.augment = augment
        self.channels = channels
        self.pairs = match_pairs(list_images(gt_dir), list_images(lq_dir), scale=scale)
        for gt, lq in self.pairs:
            lh, lw = check_pair_sizes(gt, lq, scale)
            if patch_size is not None and min(lh, lw) < patch_size // scale:
                raise ValueError(
                    f"image {lq} ({lh}x{lw}) is smaller than the LQ patch {patch_size // scale} "
                    f"(patch_size {patch_size} / scale {scale})"
                )

    def __len__(self) -> int:
        return len(self.pairs)

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Whole ``(lq, gt)`` images as read (GT cropped to ``scale`` x LQ)."""
        gt_path, lq_path = self.pairs[index]
        lq = read_image(lq_path, channels=self.channels)
        gt = read_image(gt_path, channels=self.channels)
        h, w = lq.shape[:2]
        return lq, gt[: h * self.scale, : w * self.scale]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        lq, gt = self.read_pair(index)
        if self.patch_size is not None or self.augment:
            rng = _item_rng()
            if self.patch_size is not None:
                lq, gt = random_crop_pair(lq, gt, self.patch_size, self.scale, rng)
            if self.augment:
                lq, gt = augment_pair(lq, gt, rng)
        return _to_item(lq, gt, self.pairs[index][0].stem)


class DegradedImageDataset(Dataset):
    """Clean images degraded on the fly (HR-only folders such as DF2K or ``train/T91``).

    In training (``patch_size`` set) a GT patch is cropped and augmented first
    and then degraded, so bicubic LR patches are computed from the patch alone
    (its border pixels differ from cropping a whole-image LR; the usual
    on-the-fly compromise). Without ``patch_size`` the image is mod-cropped and
    degraded whole. ``seed=None`` draws fresh noise every access (training);
    an integer seed fixes the degradation per image name (validation).
    """

    def __init__(
        self,
        gt_dir: str | Path,
        degradation: Degradation,
        *,
        patch_size: int | None = None,
        augment: bool = False,
        channels: ChannelMode = "rgb",
        seed: int | None = None,
    ) -> None:
        _check_patch(patch_size, degradation.scale)
        self.degradation = degradation
        self.patch_size = patch_size
        self.augment = augment
        self.channels = channels
        self.seed = seed
        self.paths = list_images(gt_dir)
        for p in self.paths:
            h, w = image_size(p)
            if patch_size is not None and min(h, w) < patch_size:
                raise ValueError(f"image {p} ({h}x{w}) is smaller than the patch {patch_size}")
            if min(h, w) < degradation.scale:
                raise ValueError(f"image {p} ({h}x{w}) is smaller than scale {degradation.scale}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        path = self.paths[index]
        scale = self.degradation.scale
        gt = mod_crop(read_image(path, channels=self.channels), scale)
        rng = (
            _item_rng()
            if self.seed is None
            else np.random.default_rng(derive_seed(self.seed, path.stem))
        )
        if self.patch_size is not None:
            _, gt = random_crop_pair(gt, gt, self.patch_size, 1, rng)
        if self.augment:
            _, gt = augment_pair(gt, gt, rng)
        gt = np.ascontiguousarray(gt)
        return _to_item(self.degradation(gt, rng), gt, path.stem)


def rain_pair_dirs(root: str | Path) -> tuple[Path, Path]:
    """``(rain_dir, clean_dir)`` inside ``root`` (names from :data:`RAIN_FOLDER_PAIRS`)."""
    root = Path(root)
    for lq_name, gt_name in RAIN_FOLDER_PAIRS:
        if (root / lq_name).is_dir() and (root / gt_name).is_dir():
            return root / lq_name, root / gt_name
    expected = ", ".join(f"{a}/+{b}/" for a, b in RAIN_FOLDER_PAIRS)
    raise FileNotFoundError(f"no rain/clean sub-folders in {root}; expected one of {expected}")


class RainPairDataset(PairedImageDataset):
    """Deraining pairs under ``root``: ``rain/N.png`` with ``norain/N.png`` (or input/target)."""

    def __init__(
        self, root: str | Path, *, patch_size: int | None = None, augment: bool = False
    ) -> None:
        lq_dir, gt_dir = rain_pair_dirs(root)
        super().__init__(gt_dir, lq_dir, scale=1, patch_size=patch_size, augment=augment)
