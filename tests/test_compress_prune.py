"""Magnitude pruning and bits/param arithmetic."""

from __future__ import annotations

import pytest
import torch

from irformer.compress.prune import (
    bits_per_param,
    channel_mask,
    magnitude_mask,
    magnitude_threshold,
    megabytes,
    official_prune,
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


# ----------------------------------------------------------------- channel and official modes


def test_channel_mask_prunes_whole_lowest_rows_per_group() -> None:
    torch.manual_seed(2)
    x = torch.randn(12, 8) * torch.arange(1, 13, dtype=torch.float32)[:, None]
    mask = channel_mask(x, 0.5, groups=3)
    # Whole rows: every row is all kept or all pruned.
    assert torch.equal(mask.all(dim=1), mask.any(dim=1))
    rows = mask[:, 0].reshape(3, 4)
    # round(0.5 * 4) = 2 rows pruned in each of the 3 blocks (q, k, v of a qkv).
    assert rows.sum(dim=1).tolist() == [2, 2, 2]
    mean_abs = x.abs().mean(dim=1).reshape(3, 4)
    for g in range(3):
        assert mean_abs[g][~rows[g]].max() < mean_abs[g][rows[g]].min()


def test_channel_mask_rejects_indivisible_rows() -> None:
    with pytest.raises(ValueError, match=r"divisible into 3 groups.*\(10, 4\)"):
        channel_mask(torch.ones(10, 4), 0.4, groups=3)


def test_official_prune_counts_padded_rows() -> None:
    """CompSRT's code pads 60 rows to 64 before taking the quantile: the 4 zero
    rows are part of the pruned 40%, so only ~36% of the real weights go."""
    torch.manual_seed(3)
    x = torch.randn(60, 64)
    gen = torch.Generator().manual_seed(0)
    pruned = official_prune(x, 0.4, generator=gen)
    real_fraction = float((pruned == 0).float().mean())
    expected = (0.4 * 64 - 4) / 60  # 0.36
    assert real_fraction == pytest.approx(expected, abs=0.01)
    kept = pruned != 0
    assert torch.equal(pruned[kept], x[kept])
    # A fresh sample per call: the threshold moves a little between forwards.
    again = official_prune(x, 0.4, generator=gen)
    assert not torch.equal(again != 0, kept)
    assert float(((again != 0) != kept).float().mean()) < 0.02
    # A power-of-two block has no padding: the plain 40%.
    square = official_prune(torch.randn(64, 64), 0.4, generator=gen)
    assert float((square == 0).float().mean()) == pytest.approx(0.4, abs=0.01)


def test_row_mask_bits_per_param() -> None:
    # A row mask is 1 bit per row of 64 entries: 0.6 * 4 + 1/64.
    assert bits_per_param(4, 0.4, mask_bits=1 / 64) == pytest.approx(2.4 + 1 / 64)
