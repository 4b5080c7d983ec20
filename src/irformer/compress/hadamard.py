"""Hadamard rotations for outlier-reducing quantisation (CompSRT section 3.1).

An orthonormal Hadamard matrix ``H`` (``H H^T = I``) rotates a tensor along its
last dimension; quantising ``x H`` instead of ``x`` spreads outliers over all
coordinates. CompSRT pads every dimension to a power of two and uses a dense
Sylvester matrix (60 -> 64, head dim 10 -> 16). Hadamard matrices also exist for
many other orders, so padding is often unnecessary: this module builds

- Sylvester matrices (orders ``2^m``), symmetric and self-inverse;
- Paley construction I (order ``q + 1`` for a prime ``q = 3 mod 4``: 4, 8, 12,
  20, 24, 32, 44, 48, 60, ...) and II (order ``2(q + 1)`` for a prime
  ``q = 1 mod 4``: 12, 28, 36, 60, ...);
- Kronecker products ``H_K (x) H_{2^m}`` of those, e.g. 120 = 60 * 2.

The fast transform is the O(n log n) Walsh-Hadamard butterfly for the
power-of-two factor followed by a small dense ``K x K`` product.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RotationMode",
    "crop_last",
    "fwht",
    "hadamard_factorization",
    "hadamard_matrix",
    "hadamard_size",
    "hadamard_transform",
    "is_power_of_two",
    "next_power_of_two",
    "pad_last",
    "paley_matrix",
    "rotate",
    "supported_orders",
    "sylvester_matrix",
    "unrotate",
]

RotationMode = Literal["pow2", "exact"]
"""How a dimension is sized for rotation: ``pow2`` zero-pads to the next power
of two (CompSRT's choice); ``exact`` uses the smallest order with a known
Hadamard matrix (60 stays 60, 10 pads to 12)."""


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
    """Smallest power of two ``>= n`` (``n >= 1``)."""
    if n < 1:
        raise ValueError(f"next_power_of_two: expected n >= 1, got {n}")
    return 1 << (n - 1).bit_length()


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _paley_base_kind(k: int) -> Literal["I", "II"] | None:
    """Which Paley construction gives a Hadamard matrix of order ``k`` (primes only)."""
    if k >= 4 and _is_prime(k - 1) and (k - 1) % 4 == 3:
        return "I"
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return "II"
    return None


def hadamard_factorization(n: int) -> tuple[int, int] | None:
    """``(K, m)`` with ``n = K * 2^m`` and a Hadamard matrix of order ``K`` known.

    ``K = 1`` for powers of two; otherwise the smallest Paley order (largest
    power-of-two factor, so most of the transform is the fast butterfly).
    Returns None when no construction here covers ``n``.
    """
    if n < 1:
        return None
    m = 0
    k = n
    candidates: list[tuple[int, int]] = []
    while True:
        if k == 1 or _paley_base_kind(k) is not None:
            candidates.append((k, m))
        if k % 2:
            break
        k //= 2
        m += 1
    if not candidates:
        return None
    return min(candidates, key=lambda km: km[0])


def supported_orders(limit: int) -> list[int]:
    """Every order ``<= limit`` for which :func:`hadamard_matrix` can build a matrix."""
    return [n for n in range(1, limit + 1) if hadamard_factorization(n) is not None]


def hadamard_size(n: int, mode: RotationMode = "pow2") -> int:
    """Size a dimension of ``n`` is padded to before rotation."""
    if mode == "pow2":
        return next_power_of_two(n)
    if mode == "exact":
        size = n
        while hadamard_factorization(size) is None:
            size += 1
        return size
    raise ValueError(f"hadamard_size: unknown mode {mode!r}; expected 'pow2' or 'exact'")


@functools.lru_cache(maxsize=64)
def _sylvester_pm1(n: int) -> np.ndarray:
    if not is_power_of_two(n):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _legendre(a: int, q: int) -> int:
    """Quadratic character of ``a`` modulo the odd prime ``q`` (0, 1 or -1)."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = chi(j - i)`` over GF(q); antisymmetric if q = 3 mod 4, symmetric if 1 mod 4."""
    chi = np.array([_legendre(a, q) for a in range(q)], dtype=np.int64)
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


@functools.lru_cache(maxsize=64)
def _paley_pm1(k: int) -> np.ndarray:
    kind = _paley_base_kind(k)
    if kind == "I":
        # S = [[0, 1^T], [-1, Q]] is antisymmetric with S S^T = q I, so H = I + S
        # satisfies H H^T = (q + 1) I.
        q = k - 1
        s = np.zeros((k, k), dtype=np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return np.eye(k, dtype=np.int64) + s
    if kind == "II":
        # S = [[0, 1^T], [1, Q]] is symmetric with S S^T = q I; each 0 becomes
        # [[1, -1], [-1, -1]] and each +-1 becomes +-[[1, 1], [1, -1]].
        q = k // 2 - 1
        s = np.zeros((q + 1, q + 1), dtype=np.int64)
        s[0, 1:] = 1
        s[1:, 0] = 1
        s[1:, 1:] = _jacobsthal(q)
        zero_block = np.array([[1, -1], [-1, -1]], dtype=np.int64)
        sign_block = np.array([[1, 1], [1, -1]], dtype=np.int64)
        return np.kron(s, sign_block) + np.kron((s == 0).astype(np.int64), zero_block)
    raise ValueError(f"no Paley construction for order {k} (needs q+1 or 2(q+1), q prime)")


def sylvester_matrix(n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal (``/ sqrt(n)``) symmetric Sylvester Hadamard matrix, ``n = 2^m``."""
    return torch.from_numpy(_sylvester_pm1(n) / math.sqrt(n)).to(dtype)


def paley_matrix(k: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal Paley Hadamard matrix of order ``k`` (raises if k is not a Paley order)."""
    return torch.from_numpy(_paley_pm1(k) / math.sqrt(k)).to(dtype)


def _unsupported(n: int) -> ValueError:
    limit = max(2 * n, 64)
    return ValueError(
        f"no Hadamard matrix of order {n} can be built here; supported orders are "
        "K * 2^m with K = 1, q + 1 (q prime, q = 3 mod 4) or 2(q + 1) (q prime, q = 1 mod 4); "
        f"up to {limit}: {supported_orders(limit)}"
    )


@functools.lru_cache(maxsize=64)
def _hadamard_pm1(n: int) -> np.ndarray:
    fact = hadamard_factorization(n)
    if fact is None:
        raise _unsupported(n)
    k, m = fact
    base = np.ones((1, 1), dtype=np.int64) if k == 1 else _paley_pm1(k)
    return np.kron(base, _sylvester_pm1(1 << m))


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Orthonormal Hadamard matrix of order ``n``: ``H @ H.T == I``.

    Index convention matches :func:`hadamard_transform`: ``H = H_K (x) H_{2^m}``
    (see :func:`hadamard_factorization`), and ``hadamard_transform(x) == x @ H.T``.
    Symmetric (hence self-inverse) when ``n`` is a power of two.
    """
    return torch.from_numpy(_hadamard_pm1(n) / math.sqrt(n)).to(dtype)


def fwht(x: Tensor) -> Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last dim (Sylvester order).

    x: (..., n) with n a power of two. O(n log n); equals ``x @ sylvester_matrix(n)``
    and is its own inverse.
    """
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"fwht: last dim must be a power of two, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, n) * (1.0 / math.sqrt(n))


@functools.lru_cache(maxsize=64)
def _cached_paley(k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return paley_matrix(k, dtype=dtype).to(device)


@functools.lru_cache(maxsize=64)
def _cached_matrix(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return hadamard_matrix(n, dtype=dtype).to(device)


def hadamard_transform(x: Tensor, *, inverse: bool = False, dense: bool = False) -> Tensor:
    """Apply the orthonormal ``H`` of order ``n = x.shape[-1]`` along the last dim.

    x: (..., n). Returns ``x @ H.T`` (``x @ H`` when ``inverse``, which undoes it).
    The default is the fast path (butterfly on the ``2^m`` factor, then the
    ``K x K`` Paley block); ``dense`` uses one cached matrix product, which is
    faster for the small orders of SR transformers on CPU.
    """
    n = x.shape[-1]
    if dense:
        h = _cached_matrix(n, x.device, x.dtype)
        return x @ h if inverse else x @ h.T
    fact = hadamard_factorization(n)
    if fact is None:
        raise _unsupported(n)
    k, m = fact
    if k == 1:
        return fwht(x)
    lead = x.shape[:-1]
    y = fwht(x.reshape(*lead, k, 1 << m))
    p = _cached_paley(k, x.device, x.dtype)
    # (H_K (x) H_M) applied to x indexed (k, m): H_K acts on the k axis.
    y = torch.matmul(p.T if inverse else p, y)
    return y.reshape(*lead, n)


def pad_last(x: Tensor, size: int) -> Tensor:
    """Zero-pad the last dim of ``x`` to ``size``."""
    n = x.shape[-1]
    if size < n:
        raise ValueError(f"pad_last: target size {size} is smaller than last dim {n}")
    return x if size == n else torch.nn.functional.pad(x, (0, size - n))


def crop_last(x: Tensor, size: int) -> Tensor:
    """Keep the first ``size`` entries of the last dim (undoes :func:`pad_last`)."""
    return x if x.shape[-1] == size else x[..., :size]


def rotate(x: Tensor, size: int, *, dense: bool = True) -> Tensor:
    """Zero-pad the last dim to ``size`` and rotate: ``pad(x) @ H_size.T``."""
    return hadamard_transform(pad_last(x, size), dense=dense)


def unrotate(y: Tensor, n: int, *, dense: bool = True) -> Tensor:
    """Inverse of :func:`rotate`: rotate back and crop to the original ``n``."""
    return crop_last(hadamard_transform(y, inverse=True, dense=dense), n)
