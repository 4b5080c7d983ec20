"""Degradations: MATLAB-exact bicubic resize, Gaussian noise, JPEG compression.

The SR benchmarks' LR images were made with MATLAB ``imresize(hr, 1/s,
'bicubic')``; OpenCV's and torch's bicubic differ from it by about 1 dB, so
:func:`matlab_imresize` reimplements MATLAB's algorithm: cubic kernel with
``a = -0.5``, the kernel stretched by ``1/scale`` when downscaling
(antialiasing), symmetric border padding, one separable pass per dimension
(the dimension shrinking most first) in float64. Integer images are rounded
(half away from zero) and clipped after *each* pass, as MATLAB's MEX does;
that intermediate rounding is what makes the result bit-identical to the
published ``LR_bicubic`` files.

Each pass gathers the ``taps`` source rows (or columns) of every output
pixel and sums them tap by tap, as MATLAB does: ``O(out * taps)`` work, no
per-pixel Python.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import cv2
import numpy as np
import torch

from irformer.data.io import to_float32

__all__ = [
    "BicubicDownsample",
    "BlindGaussianNoise",
    "BlindJpegCompression",
    "Degradation",
    "GaussianNoise",
    "JpegCompression",
    "add_gaussian_noise",
    "derive_seed",
    "jpeg_compress",
    "make_degradation",
    "matlab_imresize",
    "mod_crop",
]


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * (
        (ax > 1) & (ax <= 2)
    )


@lru_cache(maxsize=256)
def _resize_taps(
    in_len: int, out_len: int, scale: float, antialias: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Weights and source indices ``(out_len, taps)`` of one MATLAB bicubic pass.

    Follows ``imresize``'s ``contributions``: output pixel ``x`` (1-based) maps
    to ``u = x / scale + 0.5 (1 - 1 / scale)``; taps outside the image are
    mirrored (symmetric padding) and tap columns whose weights are all zero
    are dropped.
    """
    kernel_width = 4.0
    stretch = scale < 1 and antialias
    if stretch:
        kernel_width /= scale
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = math.ceil(kernel_width) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    dist = u[:, None] - idx
    w = scale * _cubic(scale * dist) if stretch else _cubic(dist)
    w /= w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    keep = np.any(w != 0, axis=0)
    w, src = np.ascontiguousarray(w[:, keep]), np.ascontiguousarray(src[:, keep])
    w.flags.writeable = False
    src.flags.writeable = False
    return w, src


def _output_length(in_len: int, scale: float) -> int:
    n = in_len * scale
    # Snap values within float noise of an integer (e.g. 255 * (1/3)), which
    # a plain ceil would push one pixel too far.
    return max(1, round(n) if abs(n - round(n)) < 1e-9 else math.ceil(n))


def _plan(
    in_hw: tuple[int, int], scale: float | None, size: tuple[int, int] | None
) -> list[tuple[int, int, float]]:
    """Per-dimension ``(axis, out_len, scale)``, in MATLAB's processing order."""
    if (scale is None) == (size is None):
        raise ValueError("matlab_imresize needs exactly one of scale= or size=")
    if size is not None:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (height, width) of positive ints, got {size}")
        scales = (size[0] / in_hw[0], size[1] / in_hw[1])
        outs = (int(size[0]), int(size[1]))
    else:
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        scales = (float(scale), float(scale))
        outs = (_output_length(in_hw[0], scale), _output_length(in_hw[1], scale))
    # MATLAB resizes the dimension with the smallest scale first (stable for ties).
    order = sorted(range(2), key=lambda d: scales[d])
    return [(d, outs[d], scales[d]) for d in order]


def _resize_rows_np(x: np.ndarray, w: np.ndarray, src: np.ndarray) -> np.ndarray:
    """One pass on a contiguous ``(in, M)`` array: ``out[i] = sum_k w[i, k] x[src[i, k]]``.

    Summed tap by tap in MATLAB's order; gathering whole rows keeps every
    step a contiguous copy.
    """
    out = np.take(x, src[:, 0], axis=0)
    out *= w[:, :1]
    tmp = np.empty_like(out)
    for k in range(1, w.shape[1]):
        np.take(x, src[:, k], axis=0, out=tmp)
        tmp *= w[:, k : k + 1]
        out += tmp
    return out


def _resize_rows_torch(x: torch.Tensor, w: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """:func:`_resize_rows_np` for a contiguous ``(in, M)`` tensor on any device."""
    out = x.index_select(0, src[:, 0]).mul_(w[:, :1])
    for k in range(1, w.shape[1]):
        out.add_(x.index_select(0, src[:, k]).mul_(w[:, k : k + 1]))
    return out


def matlab_imresize(
    image: np.ndarray | torch.Tensor,
    scale: float | None = None,
    *,
    size: tuple[int, int] | None = None,
    antialias: bool = True,
) -> np.ndarray | torch.Tensor:
    """MATLAB ``imresize(image, scale, 'bicubic')``, bit-exact for uint8 input.

    Args:
        image: numpy ``(H, W)`` or ``(H, W, C)``, or a torch tensor ``(..., H, W)``
            (channels first, any leading batch dims, any device).
        scale: resize factor (``1/4`` to downscale by 4, ``4`` to upscale);
            output size is ``ceil(scale * size)`` as in MATLAB.
        size: ``(height, width)`` of the output instead of ``scale``.
        antialias: widen the kernel when downscaling (MATLAB's default).

    Returns:
        Same container and dtype as the input. Computation is float64;
        integer inputs are rounded half away from zero and clipped after each
        pass (MATLAB semantics), float inputs are neither rounded nor clipped.
    """
    is_torch = isinstance(image, torch.Tensor)
    if is_torch:
        if image.ndim < 2:
            raise ValueError(f"expected a tensor (..., H, W), got shape {tuple(image.shape)}")
        integer = not (image.is_floating_point() or image.is_complex())
        axes = (image.ndim - 2, image.ndim - 1)
        on_device = image.device.type != "cpu"
        # CPU tensors take the numpy path (faster row gathers than index_select).
        x = image.to(torch.float64) if on_device else image.detach().cpu().double().numpy()
    else:
        arr = np.asarray(image)
        if arr.ndim not in (2, 3):
            raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {arr.shape}")
        integer = bool(np.issubdtype(arr.dtype, np.integer))
        if not (integer or np.issubdtype(arr.dtype, np.floating)):
            raise TypeError(f"unsupported dtype {arr.dtype} for matlab_imresize")
        x = arr.astype(np.float64)
        axes = (0, 1)
        on_device = False
    dtype = image.dtype
    info = (torch.iinfo(dtype) if is_torch else np.iinfo(dtype)) if integer else None
    in_hw = (image.shape[axes[0]], image.shape[axes[1]])
    for which, out_len, s in _plan(in_hw, scale, size):
        axis = axes[which]
        w_np, src_np = _resize_taps(x.shape[axis], out_len, s, antialias)
        if on_device:
            moved = torch.movedim(x, axis, 0)
            rows = moved.reshape(moved.shape[0], -1).contiguous()
            w = torch.from_numpy(w_np.copy()).to(x.device)
            src = torch.from_numpy(src_np.copy()).to(x.device)
            out = _resize_rows_torch(rows, w, src)
            x = torch.movedim(out.reshape(out_len, *moved.shape[1:]), 0, axis)
            if info is not None:
                x = torch.floor(x.clamp(info.min, info.max) + 0.5)
        else:
            moved = np.moveaxis(x, axis, 0)
            rows = np.ascontiguousarray(moved).reshape(moved.shape[0], -1)
            out = _resize_rows_np(rows, w_np, src_np)
            x = np.moveaxis(out.reshape(out_len, *moved.shape[1:]), 0, axis)
            if info is not None:
                x = np.floor(np.clip(x, info.min, info.max) + 0.5)
    if on_device:
        return x.contiguous().to(dtype)
    x = np.ascontiguousarray(x)
    if is_torch:
        return torch.from_numpy(x).to(dtype)
    return x.astype(dtype)


def mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so height and width are multiples of ``scale`` (the SR convention)."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def derive_seed(base_seed: int, key: str) -> int:
    """A stable 32-bit seed from a base seed and a name (e.g. ``"CBSD68/0001/25"``).

    Per-image seeds make evaluation repeatable regardless of image order or
    subset, unlike one global seed consumed in sequence.
    """
    return (zlib.crc32(key.encode("utf-8")) ^ (base_seed * 0x9E3779B1)) & 0xFFFFFFFF


def add_gaussian_noise(
    image: np.ndarray, sigma: float, *, rng: np.random.Generator | int
) -> np.ndarray:
    """Additive white Gaussian noise with ``sigma`` on the 0-255 scale.

    ``image`` is uint8/uint16 or float in [0, 1]; returns float32 in [0, 1]
    *plus noise*, neither clipped nor quantised (the DN benchmark convention of
    SwinIR/Restormer: the model sees the raw noisy float image).
    """
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0 (0-255 scale), got {sigma}")
    gen = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng
    x = to_float32(image).astype(np.float64)
    noisy = x + gen.standard_normal(x.shape) * (sigma / 255.0)
    return noisy.astype(np.float32)


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode with OpenCV's JPEG codec at ``quality`` (1-100).

    ``image`` is uint8 ``(H, W)``, ``(H, W, 1)`` (greyscale JPEG) or ``(H, W, 3)``
    RGB (colour JPEG, OpenCV's default 4:2:0 chroma subsampling); the result
    has the same shape and dtype.
    """
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if image.dtype != np.uint8:
        raise TypeError(f"jpeg_compress expects uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] not in (1, 3):
        raise ValueError(f"jpeg_compress expects 1 or 3 channels, got shape {image.shape}")
    grey = image.ndim == 2 or image.shape[2] == 1
    src = image.reshape(image.shape[:2]) if grey else np.ascontiguousarray(image[..., ::-1])
    ok, buf = cv2.imencode(".jpg", src, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV JPEG encoding failed for an image of shape {image.shape}")
    out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
    return out.reshape(image.shape) if grey else np.ascontiguousarray(out[..., ::-1])


class Degradation(Protocol):
    """Maps a clean ``uint8`` image ``(H, W, C)`` to a float32 ``(h, w, C)`` input in [0, 1]."""

    scale: int

    def __call__(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray: ...


@dataclass(frozen=True)
class BicubicDownsample:
    """SR degradation: MATLAB bicubic downscaling by ``scale``, uint8 like the LR files."""

    scale: int

    def __call__(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = gt.shape[:2]
        if h % self.scale or w % self.scale:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of scale {self.scale}; mod_crop it first"
            )
        return to_float32(matlab_imresize(gt, 1.0 / self.scale))


@dataclass(frozen=True)
class GaussianNoise:
    """DN degradation: AWGN with ``sigma`` on the 0-255 scale (unclipped float)."""

    sigma: float
    scale: int = 1

    def __call__(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return add_gaussian_noise(gt, self.sigma, rng=rng)


@dataclass(frozen=True)
class JpegCompression:
    """CAR degradation: OpenCV JPEG at ``quality``."""

    quality: int
    scale: int = 1

    def __call__(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return to_float32(jpeg_compress(gt, self.quality))


@dataclass(frozen=True)
class BlindGaussianNoise:
    """Blind DN degradation: each call draws ``sigma ~ U[sigma_min, sigma_max]`` (0-255 scale).

    One model for every noise level (Restormer's and SCUNet's blind colour
    denoising train on ``U[0, 50]``). The level is drawn from the item's ``rng``
    (before the noise itself), so in training it is a function of the sample's
    position in the stream (:mod:`irformer.engine.data`), like the crop.
    """

    sigma_min: float
    sigma_max: float
    scale: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(
                f"noise sigma range must satisfy 0 <= min <= max, got "
                f"[{self.sigma_min}, {self.sigma_max}]"
            )

    def draw(self, rng: np.random.Generator) -> float:
        """The noise level of one sample."""
        return float(rng.uniform(self.sigma_min, self.sigma_max))

    def __call__(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return add_gaussian_noise(gt, self.draw(rng), rng=rng)


@dataclass(frozen=True)
class BlindJpegCompression:
    """Blind CAR degradation: each call draws an integer quality uniformly in
    ``[quality_min, quality_max]`` (both included) and applies OpenCV JPEG.

    Drawn from the item's ``rng`` like :class:`BlindGaussianNoise`.
    """

    quality_min: int
    quality_max: int
    scale: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.quality_min <= self.quality_max <= 100:
            raise ValueError(
                f"JPEG quality range must satisfy 1 <= min <= max <= 100, got "
                f"[{self.quality_min}, {self.quality_max}]"
            )

    def draw(self, rng: np.random.Generator) -> int:
        """The JPEG quality of one sample."""
        return int(rng.integers(self.quality_min, self.quality_max + 1))

    def __call__(self, gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return to_float32(jpeg_compress(gt, self.draw(rng)))


def make_degradation(
    task: str,
    *,
    scale: int = 1,
    sigma: float | None = None,
    quality: int | None = None,
    sigma_range: tuple[float, float] | None = None,
    quality_range: tuple[int, int] | None = None,
) -> Degradation:
    """The synthetic degradation of a task: ``sr`` (bicubic), ``dn`` (noise), ``car`` (JPEG).

    ``sigma_range`` / ``quality_range`` (``dn`` / ``car``) make it blind: a level
    drawn per sample instead of the fixed ``sigma`` / ``quality``.
    """
    if task == "sr":
        if scale < 2:
            raise ValueError(f"task 'sr' needs an integer scale >= 2, got {scale}")
        return BicubicDownsample(int(scale))
    if task == "dn":
        if sigma_range is not None:
            return BlindGaussianNoise(float(sigma_range[0]), float(sigma_range[1]))
        if sigma is None:
            raise ValueError("task 'dn' needs a noise sigma (0-255 scale), e.g. 15, 25 or 50")
        return GaussianNoise(float(sigma))
    if task == "car":
        if quality_range is not None:
            return BlindJpegCompression(int(quality_range[0]), int(quality_range[1]))
        if quality is None:
            raise ValueError("task 'car' needs a JPEG quality, e.g. 10, 20, 30 or 40")
        return JpegCompression(int(quality))
    raise ValueError(f"no synthetic degradation for task {task!r}; expected 'sr', 'dn' or 'car'")
