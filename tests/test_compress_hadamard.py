"""Hadamard matrices and transforms: orthogonality, self-inverse, fast == dense."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from irformer.compress.hadamard import (
    crop_last,
    fwht,
    hadamard_factorization,
    hadamard_matrix,
    hadamard_size,
    hadamard_transform,
    next_power_of_two,
    pad_last,
    paley_matrix,
    rotate,
    supported_orders,
    sylvester_matrix,
    unrotate,
)

pytestmark = pytest.mark.usefixtures("one_thread")


ORDERS = [1, 2, 4, 8, 12, 16, 20, 24, 28, 36, 40, 44, 60, 64, 120, 128, 240]


@pytest.mark.parametrize("n", ORDERS)
def test_orthonormal(n: int) -> None:
    h = hadamard_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    # Entries are +-1/sqrt(n): a genuine Hadamard matrix, not just any rotation.
    np.testing.assert_allclose(np.abs(h.numpy()) * np.sqrt(n), 1.0, atol=1e-12)


@pytest.mark.parametrize("k", [12, 20, 28, 36, 44, 60])
def test_paley_integer_identity(k: int) -> None:
    """H H^T = k I exactly in integers for the Paley constructions (12, 20: type I; 28, 36: II)."""
    h = np.rint(paley_matrix(k, dtype=torch.float64).numpy() * np.sqrt(k)).astype(np.int64)
    assert set(np.unique(h)) == {-1, 1}
    np.testing.assert_array_equal(h @ h.T, k * np.eye(k, dtype=np.int64))


@pytest.mark.parametrize("n", [2, 8, 64, 256])
def test_sylvester_symmetric_self_inverse_matches_scipy(n: int) -> None:
    h = sylvester_matrix(n, dtype=torch.float64)
    torch.testing.assert_close(h, h.T)
    torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    ref = torch.from_numpy(scipy.linalg.hadamard(n) / np.sqrt(n))
    torch.testing.assert_close(h, ref)
    x = torch.randn(3, 7, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(fwht(x)), x)


@pytest.mark.parametrize("n", ORDERS)
def test_fast_equals_dense_and_inverts(n: int) -> None:
    torch.manual_seed(n)
    x = torch.randn(2, 3, 5, n, dtype=torch.float64)
    h = hadamard_matrix(n, dtype=torch.float64)
    y = hadamard_transform(x)
    torch.testing.assert_close(y, x @ h.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(hadamard_transform(x, dense=True), y, atol=1e-12, rtol=0)
    torch.testing.assert_close(hadamard_transform(y, inverse=True), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(hadamard_transform(y, inverse=True, dense=True), x)
    # Orthogonal: norms are preserved.
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_fwht_float32_and_grad() -> None:
    x = torch.randn(4, 64, requires_grad=True)
    y = fwht(x)
    y.pow(2).sum().backward()
    # d/dx |Hx|^2 = 2 H^T H x = 2x for orthonormal H.
    torch.testing.assert_close(x.grad, 2 * x.detach(), atol=1e-5, rtol=1e-5)


def test_factorization_and_sizes() -> None:
    assert hadamard_factorization(60) == (60, 0)
    assert hadamard_factorization(120) == (60, 1)
    assert hadamard_factorization(48) == (12, 2)
    assert hadamard_factorization(64) == (1, 6)
    assert hadamard_factorization(10) is None
    assert hadamard_size(60, "pow2") == 64
    assert hadamard_size(60, "exact") == 60
    assert hadamard_size(10, "pow2") == 16
    assert hadamard_size(10, "exact") == 12
    assert hadamard_size(180, "exact") == 180
    assert next_power_of_two(1) == 1 and next_power_of_two(65) == 128
    assert supported_orders(20) == [1, 2, 4, 8, 12, 16, 20]
    with pytest.raises(ValueError, match="mode"):
        hadamard_size(10, "bogus")  # type: ignore[arg-type]


def test_unsupported_order_lists_supported() -> None:
    with pytest.raises(ValueError, match=r"order 10 .*\[1, 2, 4, 8, 12, 16, 20"):
        hadamard_matrix(10)
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(3, 12))


def test_pad_rotate_roundtrip() -> None:
    x = torch.randn(6, 10, dtype=torch.float64)
    for size in (12, 16):
        y = rotate(x, size)
        assert y.shape == (6, size)
        torch.testing.assert_close(unrotate(y, 10), x)
    assert pad_last(x, 16)[:, 10:].abs().sum() == 0
    torch.testing.assert_close(crop_last(pad_last(x, 16), 10), x)
    with pytest.raises(ValueError, match="smaller"):
        pad_last(x, 8)


def test_rotation_reduces_range_of_outlier_vector() -> None:
    """The point of the rotation: a spike spreads evenly over all coordinates."""
    x = torch.zeros(64)
    x[3] = 8.0
    y = hadamard_transform(x)
    torch.testing.assert_close(y.abs(), torch.full((64,), 1.0))
