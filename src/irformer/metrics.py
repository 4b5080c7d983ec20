"""PSNR and SSIM following the image-restoration literature exactly.

Conventions (see NOTES.md, "Evaluation conventions"):

* Everything in float64 on the 0-255 scale; no epsilon is added to the MSE
  (identical images give ``inf`` dB).
* SSIM is the original paper's: 11x11 Gaussian window (sigma 1.5),
  ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, 'valid' filtering (the
  mean is taken only where the window fits inside the image), computed per
  channel and averaged.
* Per task (:func:`compute_metrics`): SR on the Y channel of MATLAB's
  ``rgb2ycbcr`` with ``crop_border = scale``; deraining on Y without crop;
  denoising and JPEG artefact removal in RGB without crop (as the i-LN paper
  states).

Inputs: numpy arrays ``(H, W)`` or ``(H, W, C)`` on the **0-255** scale
(``uint8`` or float; floats are used as they are, not rounded), or torch
tensors ``(C, H, W)`` / ``(1, C, H, W)`` on the **[0, 1]** scale (multiplied
by 255, not rounded). Colour channels are RGB. Quantising model outputs to
uint8 first, as the field does, is the caller's job
(:func:`irformer.data.io.quantize`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from irformer.tasks import TASKS, Task

__all__ = ["TASKS", "compute_metrics", "psnr", "rgb_to_y", "ssim"]

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5

_Y_COEFFS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def _as_float64_hwc(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Either input convention -> float64 ``(H, W, C)`` on the 0-255 scale."""
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3:
            raise ValueError(
                f"expected a (C, H, W) or (1, C, H, W) tensor in [0, 1], got {tuple(image.shape)}"
            )
        return t.to(device="cpu", dtype=torch.float64).numpy().transpose(1, 2, 0) * 255.0
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) array on 0-255, got shape {arr.shape}")
    return arr.astype(np.float64)


def rgb_to_y(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Y of MATLAB ``rgb2ycbcr`` (BT.601, range 16-235) as float64 ``(H, W)``.

    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` for R, G, B on 0-255.
    Not rounded (MATLAB rounds for uint8 input; BasicSR and the papers' Python
    evaluation do not).
    """
    x = _as_float64_hwc(image)
    if x.shape[2] != 3:
        raise ValueError(f"rgb_to_y needs 3 channels (RGB), got shape {x.shape}")
    return 16.0 + (x @ _Y_COEFFS) / 255.0


def _prepare_pair(
    img1: np.ndarray | torch.Tensor, img2: np.ndarray | torch.Tensor, crop_border: int
) -> tuple[np.ndarray, np.ndarray]:
    a = _as_float64_hwc(img1)
    b = _as_float64_hwc(img2)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        if min(a.shape[:2]) <= 2 * crop_border:
            raise ValueError(f"crop_border {crop_border} leaves nothing of an image {a.shape[:2]}")
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    return a, b


def psnr(
    img1: np.ndarray | torch.Tensor,
    img2: np.ndarray | torch.Tensor,
    *,
    crop_border: int = 0,
    data_range: float = 255.0,
) -> float:
    """PSNR in dB over all channels (one MSE), after cropping ``crop_border`` pixels per side."""
    a, b = _prepare_pair(img1, img2, crop_border)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window() -> np.ndarray:
    r = np.arange(_SSIM_WINDOW, dtype=np.float64) - (_SSIM_WINDOW - 1) / 2
    g = np.exp(-(r**2) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def _ssim_single(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """SSIM of two 2-D float64 planes, averaged over the 'valid' region."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    g = _gaussian_window()
    pad = _SSIM_WINDOW // 2
    if min(a.shape) < _SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {_SSIM_WINDOW} px per side, got {a.shape}")

    def blur(x: np.ndarray) -> np.ndarray:
        # Separable Gaussian; the border mode is irrelevant because only the
        # valid region (where the window fits) is kept.
        full = cv2.sepFilter2D(x, cv2.CV_64F, g, g, borderType=cv2.BORDER_REFLECT)
        return full[pad:-pad, pad:-pad]

    mu1, mu2 = blur(a), blur(b)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = blur(a * a) - mu1_sq
    s2 = blur(b * b) - mu2_sq
    s12 = blur(a * b) - mu12
    ssim_map = ((2 * mu12 + c1) * (2 * s12 + c2)) / ((mu1_sq + mu2_sq + c1) * (s1 + s2 + c2))
    return float(ssim_map.mean())


def ssim(
    img1: np.ndarray | torch.Tensor,
    img2: np.ndarray | torch.Tensor,
    *,
    crop_border: int = 0,
    data_range: float = 255.0,
) -> float:
    """SSIM (Gaussian 11x11, sigma 1.5, 'valid'), computed per channel and averaged."""
    a, b = _prepare_pair(img1, img2, crop_border)
    vals = [
        _ssim_single(np.ascontiguousarray(a[..., c]), np.ascontiguousarray(b[..., c]), data_range)
        for c in range(a.shape[2])
    ]
    return float(np.mean(vals))


def compute_metrics(
    output: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    *,
    task: Task | str,
    scale: int = 1,
) -> dict[str, float]:
    """``{"psnr": dB, "ssim": value}`` with the field's convention for ``task``.

    ``sr``: Y channel, ``crop_border = scale``; ``dr``: Y channel, no crop;
    ``dn``/``car``: all channels (RGB, or the single grey channel), no crop.
    Single-channel images are used as they are where Y would be taken.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    a = _as_float64_hwc(output)
    b = _as_float64_hwc(gt)
    if a.shape != b.shape:
        raise ValueError(f"output shape {a.shape} differs from ground-truth shape {b.shape}")
    crop = int(scale) if task == "sr" else 0
    if task in ("sr", "dr") and a.shape[2] == 3:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return {
        "psnr": psnr(a, b, crop_border=crop),
        "ssim": ssim(a, b, crop_border=crop),
    }
