"""PSNR/SSIM/Y against closed forms, scikit-image and the literature's bicubic numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from irformer.data.degradations import matlab_imresize, mod_crop
from irformer.data.io import read_image
from irformer.metrics import compute_metrics, psnr, rgb_to_y, ssim

SKIMAGE_SSIM = {
    "gaussian_weights": True,
    "sigma": 1.5,
    "use_sample_covariance": False,
    "data_range": 255,
}
"""scikit-image settings equal to the original SSIM. skimage filters the whole
image (reflect padding) but averages only ``crop(S, (win_size - 1) // 2)``;
with sigma 1.5 and its truncate 3.5 the window is 11x11 and the crop is 5
pixels: exactly the 'valid' region, so the numbers compare apples to apples
(checked explicitly in ``test_skimage_mean_is_the_valid_region``)."""


def _pair(shape: tuple[int, ...], seed: int, noise: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape).astype(np.float64)
    # Smooth the reference a little so SSIM is not near zero.
    a = (a + np.roll(a, 1, 0) + np.roll(a, 1, 1)) / 3
    b = np.clip(a + rng.normal(0, noise, shape), 0, 255)
    return a, b


def test_rgb_to_y_known_values() -> None:
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], float)
    y = rgb_to_y(px)
    np.testing.assert_allclose(y[0], [16.0, 235.0, 81.481, 144.553, 40.966], atol=1e-12)
    assert y.dtype == np.float64 and y.shape == (1, 5)
    t = torch.from_numpy(px.transpose(2, 0, 1) / 255.0)
    np.testing.assert_allclose(rgb_to_y(t), y, atol=1e-12)
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_y(np.zeros((4, 4, 1)))


def test_psnr_closed_form_and_no_epsilon() -> None:
    a = np.full((16, 16, 3), 100.0)
    assert psnr(a, a + 1) == pytest.approx(10 * math.log10(255**2), abs=1e-12)
    assert psnr(a, a) == math.inf  # no epsilon: identical images are infinitely good
    b = a.copy()
    b[0, 0, 0] += 0.01  # MSE = 1e-4 / 768: an epsilon of 1e-8 would show at 1e-4 dB
    mse = 1e-4 / 768
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)


@pytest.mark.parametrize("shape", [(48, 64), (40, 57, 3), (23, 31, 1)])
def test_psnr_matches_skimage(shape: tuple[int, ...]) -> None:
    a, b = _pair(shape, seed=sum(shape))
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-10)


@pytest.mark.parametrize("shape", [(48, 64), (40, 57, 3), (23, 31, 1)])
@pytest.mark.parametrize("noise", [5.0, 40.0])
def test_ssim_matches_skimage(shape: tuple[int, ...], noise: float) -> None:
    a, b = _pair(shape, seed=len(shape) + int(noise), noise=noise)
    if len(shape) == 3:
        ref = structural_similarity(a, b, channel_axis=-1, **SKIMAGE_SSIM)
    else:
        ref = structural_similarity(a, b, **SKIMAGE_SSIM)
    assert abs(ssim(a, b) - ref) < 1e-6
    assert abs(ssim(a, b) - ref) < 1e-12  # measured: agreement to rounding error


def test_skimage_mean_is_the_valid_region() -> None:
    # Average skimage's full SSIM map over the 'valid' region by hand: same number.
    a, b = _pair((50, 60), seed=3)
    _, full = structural_similarity(a, b, full=True, **SKIMAGE_SSIM)
    assert abs(ssim(a, b) - full[5:-5, 5:-5].mean()) < 1e-12
    assert abs(ssim(a, b) - full.mean()) > 1e-5  # a padded-border average would differ


def test_crop_border_matches_skimage_on_cropped_images() -> None:
    a, b = _pair((60, 70, 3), seed=4)
    c = 4
    ours_p = psnr(a, b, crop_border=c)
    ours_s = ssim(a, b, crop_border=c)
    ac, bc = a[c:-c, c:-c], b[c:-c, c:-c]
    assert ours_p == pytest.approx(peak_signal_noise_ratio(ac, bc, data_range=255), abs=1e-10)
    ref = structural_similarity(ac, bc, channel_axis=-1, **SKIMAGE_SSIM)
    assert abs(ours_s - ref) < 1e-12


def test_ssim_is_per_channel_mean() -> None:
    a, b = _pair((40, 40, 3), seed=5)
    per_channel = [ssim(a[..., c], b[..., c]) for c in range(3)]
    assert ssim(a, b) == pytest.approx(np.mean(per_channel), abs=1e-15)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-15)


def test_real_image_against_skimage(shared_data: Path) -> None:
    # A real pair (Set5 baby, x4 bicubic round trip) on the Y channel with crop 4.
    hr = mod_crop(read_image(shared_data / "sr/Set5/HR/baby.png"), 4)
    lr = read_image(shared_data / "sr/Set5/LR_bicubic/X4/babyx4.png")
    sr = matlab_imresize(lr, 4)
    y_sr, y_hr = rgb_to_y(sr)[4:-4, 4:-4], rgb_to_y(hr)[4:-4, 4:-4]
    ours = compute_metrics(sr, hr, task="sr", scale=4)
    assert ours["psnr"] == pytest.approx(
        peak_signal_noise_ratio(y_hr, y_sr, data_range=255), abs=1e-6
    )
    assert abs(ours["ssim"] - structural_similarity(y_hr, y_sr, **SKIMAGE_SSIM)) < 1e-6
    assert ours["psnr"] == pytest.approx(31.7842, abs=1e-4)  # measured (uint8 round trip)


def test_compute_metrics_conventions() -> None:
    a, b = _pair((40, 44, 3), seed=6)
    sr = compute_metrics(a, b, task="sr", scale=3)
    ya, yb = rgb_to_y(a), rgb_to_y(b)
    assert sr["psnr"] == psnr(ya, yb, crop_border=3)
    assert sr["ssim"] == ssim(ya, yb, crop_border=3)
    dr = compute_metrics(a, b, task="dr")
    assert dr["psnr"] == psnr(ya, yb) and dr["ssim"] == ssim(ya, yb)
    for task in ("dn", "car"):
        m = compute_metrics(a, b, task=task, scale=4)  # scale is ignored: no crop
        assert m["psnr"] == psnr(a, b) and m["ssim"] == ssim(a, b)
    grey = compute_metrics(a[..., :1], b[..., :1], task="car")
    assert grey["psnr"] == psnr(a[..., 0], b[..., 0])


def test_torch_inputs_are_scaled_from_unit_range() -> None:
    a, b = _pair((32, 36, 3), seed=7)
    ta = torch.from_numpy(a.transpose(2, 0, 1) / 255.0)[None]
    tb = torch.from_numpy(b.transpose(2, 0, 1) / 255.0)
    m_np = compute_metrics(a, b, task="sr", scale=2)
    m_t = compute_metrics(ta, tb, task="sr", scale=2)
    assert m_t["psnr"] == pytest.approx(m_np["psnr"], abs=1e-9)
    assert m_t["ssim"] == pytest.approx(m_np["ssim"], abs=1e-12)
    mixed = compute_metrics(ta, b.astype(np.uint8), task="dn")
    assert mixed["psnr"] == pytest.approx(psnr(a, b.astype(np.uint8)), abs=1e-9)


def test_metric_errors() -> None:
    a = np.zeros((20, 20, 3))
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(a, np.zeros((20, 21, 3)), task="dn")
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics(a, a, task="deblur")
    with pytest.raises(ValueError, match="at least 11"):
        ssim(np.zeros((10, 30)), np.zeros((10, 30)))
    with pytest.raises(ValueError, match="crop_border"):
        psnr(a, a, crop_border=10)


@pytest.mark.parametrize(
    ("scale", "lit_psnr", "lit_ssim"),
    [(2, 33.66, 0.9299), (3, 30.39, 0.8682), (4, 28.42, 0.8104)],
)
def test_literature_bicubic_protocol_reproduces_published_numbers(
    shared_data: Path, scale: int, lit_psnr: float, lit_ssim: float
) -> None:
    """The published Set5 "Bicubic" row (SRCNN/VDSR tables, copied by every SR paper).

    Its protocol: Y of MATLAB ``rgb2ycbcr`` on uint8 (rounded), downscale and
    upscale that Y in double (no quantised LR), round the result, shave
    ``scale`` pixels. Reproducing it to the printed precision checks
    ``matlab_imresize``, ``rgb_to_y``, ``psnr`` and ``ssim`` together.
    Measured: 33.6614/0.92988, 30.3922/0.86821, 28.4207/0.81037.
    """
    psnrs, ssims = [], []
    for name in ("baby", "bird", "butterfly", "head", "woman"):
        hr = mod_crop(read_image(shared_data / f"sr/Set5/HR/{name}.png"), scale)
        y = np.floor(rgb_to_y(hr) + 0.5)  # MATLAB rgb2ycbcr(uint8) rounds
        lr = matlab_imresize(y / 255.0, 1 / scale)
        up = np.floor(np.clip(matlab_imresize(lr, float(scale)), 0, 1) * 255 + 0.5)
        psnrs.append(psnr(up, y, crop_border=scale))
        ssims.append(ssim(up, y, crop_border=scale))
    assert abs(np.mean(psnrs) - lit_psnr) <= 0.005  # the table's rounding
    assert abs(np.mean(ssims) - lit_ssim) <= 0.00005
