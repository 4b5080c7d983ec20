"""Fused window attention for CPU inference: one C++ kernel, built on first use.

Why: for SwinIR-light's 64-token windows with head dim 10 the eager path is
memory-bound — splitting qkv into heads, adding bias and mask, the softmax, its
dtype casts and merging the heads are each a pass over tensors far larger than
the arithmetic needs, and bf16 speeds none of them up. The kernel
(``csrc/window_attention.cpp``) reads the qkv projection once, works on each
(window, head) in fp32 in cache (AVX-512 micro-kernel for 64- and 256-token
windows, a portable loop otherwise) and writes the merged heads once.

Which dtypes use it is a policy, ``IRFORMER_FUSED_ATTENTION``:

- ``bf16`` (default): bf16 inference only. fp32 keeps PyTorch's kernels, whose
  results equal the official implementations to float rounding (the
  checkpoint-parity tests); the fused kernel's polynomial exp differs from them
  by up to ~5e-6.
- ``all``: fp32 inference too (faster; see BENCHMARKS.md).
- ``off``: never.

The kernel is compiled with :mod:`torch.utils.cpp_extension` (a C++ compiler
and the ``ninja`` package; about 30 s once, cached under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). If the build
fails, one warning names the reason and the eager path runs.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

POLICIES = ("bf16", "all", "off")
MAX_TOKENS = 256
MAX_HEAD_DIM = 64
SOURCE = Path(__file__).with_name("csrc") / "window_attention.cpp"

_lock = threading.Lock()
_kernel: ModuleType | None = None
_failure: str | None = None


def fused_attention_policy() -> str:
    """The ``IRFORMER_FUSED_ATTENTION`` policy; an unknown value is an error naming it."""
    policy = os.environ.get("IRFORMER_FUSED_ATTENTION", "bf16").strip().lower()
    if policy not in POLICIES:
        raise ValueError(f"IRFORMER_FUSED_ATTENTION={policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    try:  # the ninja wheel's binary; cpp_extension looks for it on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    return cpp_extension.load(
        name="irformer_window_attention",
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
