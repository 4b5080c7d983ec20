"""Process-level runtime settings: keep freed tensor memory mapped; deterministic kernels.

glibc returns every freed block above its mmap threshold (at most 32 MB) to the
kernel and trims the heap top eagerly, so a multi-MB activation allocated again
on the next layer page-faults on every 4 KB page it touches, which can cost
more than the arithmetic of a large elementwise op (i-LN's normalisation of a
feature map is the measured case, BENCHMARKS.md) in inference, training and
fake quantisation alike. PyTorch's documentation
suggests swapping the allocator (jemalloc/tcmalloc via ``LD_PRELOAD``); raising
glibc's thresholds with ``mallopt`` gets the same effect without a dependency.

The cost is that the process keeps its peak heap instead of giving it back,
which is what a training or benchmark process wants. The CLI and benchmarks
call :func:`tune_cpu_allocator`; a library user opts in by calling it.
``IRFORMER_MALLOC_TUNE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

__all__ = ["CUBLAS_WORKSPACE", "enable_determinism", "tune_cpu_allocator"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's largest accepted mmap threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``)."""
TRIM_THRESHOLD = 2**31 - 1
"""Trim the heap top back to the kernel only beyond 2 GB free (``mallopt`` takes an int)."""


@functools.cache
def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds once per process (Linux/glibc only).

    Returns whether the settings were applied; a no-op elsewhere, when
    ``IRFORMER_MALLOC_TUNE=0``, or if the C library refuses them.
    """
    if os.environ.get("IRFORMER_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not ok:
        logger.debug("mallopt refused the allocator thresholds; keeping glibc's defaults")
    return ok


CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS workspace setting that makes its GEMMs deterministic (CUDA >= 10.2; see
PyTorch's reproducibility notes)."""


def enable_determinism() -> None:
    """Make CUDA training bit-reproducible: deterministic kernels, no cuDNN autotuning.

    On the CPU the trainer is deterministic already; on a GPU some backward
    kernels add with atomics in a varying order, so an exact resume (same losses
    bit for bit) needs this. Call it before the first CUDA operation (the cuBLAS
    workspace variable is read when its handle is created). An op without a
    deterministic CUDA kernel then raises instead of drifting silently: HAT's
    channel attention (``adaptive_avg_pool2d`` backward) is one, in torch 2.x.
    """
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
