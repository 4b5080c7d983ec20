"""Fused window attention for CPU inference: one C++ kernel, built on first use.

Why: for SwinIR-light's 64-token windows with head dim 10 the eager path is
memory-bound — splitting qkv into heads, adding bias and mask, the softmax, its
dtype casts and merging the heads are each a pass over tensors far larger than
the arithmetic needs, and bf16 speeds none of them up. The kernel
(``csrc/window_attention.cpp``) reads the qkv projection once, works on each
(window, head) in fp32 in cache (AVX-512 micro-kernel for 64- and 256-token
windows, a portable loop otherwise) and writes the merged heads once.

In bf16 it multiplies with AVX512-BF16 dot products (exact bf16 products, fp32
sums), so bf16 attention runs ~2x faster than fp32 attention, as the GEMMs do.
Whole SwinIR-light / HAT models in fp32 stay within ~1e-6 of the eager path
(the checkpoint-parity tests against the official implementations pass either
way).

Which dtypes use it is a policy, ``IRFORMER_FUSED_ATTENTION``:

- ``all`` (default): bf16 and fp32 inference.
- ``bf16``: bf16 only; fp32 runs PyTorch's kernels.
- ``off``: never (the eager path, e.g. for comparisons).

The kernel is compiled with :mod:`torch.utils.cpp_extension` (a C++ compiler
and the ``ninja`` package; about 30 s on first use, cached under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, in a folder
named after this CPU's feature flags because it is built with
``-march=native``). If the build fails, one warning names the reason and the
eager path runs.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

POLICIES = ("all", "bf16", "off")
MAX_TOKENS = 256
MAX_HEAD_DIM = 64
SOURCE = Path(__file__).with_name("csrc") / "window_attention.cpp"

_lock = threading.Lock()
_kernel: ModuleType | None = None
_failure: str | None = None


def fused_attention_policy() -> str:
    """The ``IRFORMER_FUSED_ATTENTION`` policy; an unknown value is an error naming it."""
    policy = os.environ.get("IRFORMER_FUSED_ATTENTION", "all").strip().lower()
    if policy not in POLICIES:
        raise ValueError(f"IRFORMER_FUSED_ATTENTION={policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def _cpu_tag() -> str:
    """Short hash of this CPU's feature flags: a -march=native build is only
    loaded on a CPU with the same flags (a shared home directory on a cluster
    must not hand an AVX-512 build to an older node)."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    flags += " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    try:  # the ninja wheel's binary; cpp_extension looks for it on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    return cpp_extension.load(
        name=f"irformer_window_attention_{_cpu_tag()}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def load_kernel() -> ModuleType | None:
    """The compiled kernel, building it on first use; None (after one warning) if
    it cannot be built on this machine."""
    global _kernel, _failure
    if _kernel is not None or _failure is not None:
        return _kernel
    with _lock:
        if _kernel is None and _failure is None:
            try:
                _kernel = _build()
            except Exception as exc:  # any build failure means "use the eager path"
                _failure = f"{type(exc).__name__}: {exc}".strip()[:500]
                warnings.warn(
                    f"irformer: the fused window-attention kernel could not be built "
                    f"({_failure}); using the eager attention path",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _kernel


def use_fused_attention(x: Tensor, tokens: int, head_dim: int) -> bool:
    """Whether :func:`fused_window_attention` serves attention on ``x`` (the
    tokens fed to the qkv projection): CPU inference without autograd, a dtype
    the policy selects, a window and head size the kernel supports, and a
    kernel that builds."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    policy = fused_attention_policy()
    if policy == "off" or x.dtype not in (torch.bfloat16, torch.float32):
        return False
    if x.dtype == torch.float32 and policy != "all":
        return False
    if tokens > MAX_TOKENS or head_dim > MAX_HEAD_DIM:
        return False
    return load_kernel() is not None


def fused_window_attention(
    qkv: Tensor,
    bias: Tensor,
    mask: Tensor | None,
    masked: Tensor | None,
    heads: int,
    scale: float,
    *,
    window: int = 0,
    shift: int = 0,
) -> Tensor:
    """Window attention from the qkv projection to merged heads, in fp32.

    qkv: (windows, N, 3C), or with ``window`` > 0 the (B, H, W, 3C) map whose
    windows are taken after a cyclic shift up/left by ``shift`` (the output is
    shifted back: no roll or partition copies). bias: (heads, N, N); mask: None
    or (mask_windows, N, N) additive, window ``w`` taking ``mask[w %
    mask_windows]``; masked: uint8 (mask_windows,), 1 where that mask is not all
    zero (the others are skipped). Returns qkv's layout with C channels and
    dtype: ``softmax(scale q k^T + bias + mask) v`` per head.
    """
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError(f"the fused window-attention kernel is unavailable: {_failure}")
    if mask is not None:
        mask = mask.float().contiguous()
    return kernel.window_attention(
        qkv.contiguous(),
        bias.float().contiguous(),
        mask,
        masked,
        heads,
        float(scale),
        window,
        shift,
    )
