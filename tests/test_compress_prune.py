"""Magnitude pruning and bits/param arithmetic."""

from __future__ import annotations

import pytest
import torch

from irformer.compress.prune import (
    bits_per_param,
    magnitude_mask,
    magnitude_threshold,
    megabytes,
    packed_bytes,
    storage_bits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.4, 0.9])
def test_exact_fraction_small_tensor(fraction: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(60, 64)
    mask = magnitude_mask(x, fraction)
    assert int((~mask).sum()) == round(fraction * x.numel())
    if fraction > 0:
        # Everything pruned is smaller in magnitude than everything kept.
        assert x[~mask].abs().max() < x[mask].abs().min()


def test_large_tensor_uses_sample() -> None:
    torch.manual_seed(1)
    x = torch.randn(3_000_000)
    thr = magnitude_threshold(x, 0.4, max_sample=1_000_000, seed=0)
    # Gaussian |x| 40% quantile = 0.5244; the 1e6-sample estimate is within 0.5%.
    assert thr == pytest.approx(0.5244, rel=5e-3)
    frac = float((~magnitude_mask(x, 0.4)).float().mean())
    assert frac == pytest.approx(0.4, abs=2e-3)
    # Deterministic for a fixed seed.
    assert magnitude_threshold(x, 0.4, seed=0) == thr


def test_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\).*1.0"):
        magnitude_mask(torch.ones(3), 1.0)


def test_bits_per_param_paper_numbers() -> None:
    assert bits_per_param(4, 0.4) == pytest.approx(3.4)
    assert bits_per_param(3, 0.4) == pytest.approx(2.8)
    assert bits_per_param(4) == 4.0
    # At 2 bits, pruning 40% with a 1-bit mask saves nothing (the paper skips it).
    assert bits_per_param(2, 0.4) == pytest.approx(2.2)
    # 15% and 6.67% fewer bits than unpruned 4 and 3 bits, as the paper claims.
    assert 1 - bits_per_param(4, 0.4) / 4 == pytest.approx(0.15)
    assert 1 - bits_per_param(3, 0.4) / 3 == pytest.approx(0.0667, abs=1e-4)


def test_storage_bits_and_bytes() -> None:
    assert storage_bits(1000, 4) == 4000
    assert storage_bits(1000, 4, kept=600) == 600 * 4 + 1000
    assert packed_bytes(3401) == 426
    assert megabytes(3_500_000) == 3.5
