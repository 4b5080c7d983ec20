"""irformer's fused CPU inference kernels: one C++ extension, built on first use.

Why: at SwinIR-light's sizes the eager path is memory- and dispatch-bound.
Window attention with 64-token windows and head dim 10 spends its time in
passes over tensors far larger than the arithmetic needs — splitting qkv into
heads, adding bias and mask, the softmax and its dtype casts, merging the heads
— and bf16 speeds none of them up; i-LN's statistics and normalisation are ~9
small PyTorch ops per norm where LayerNorm is one. ``csrc/cpu_kernels.cpp``:

- :func:`fused_window_attention` reads the qkv projection once (of the feature
  map, doing the cyclic shift and window partition by address), works on each
  (window, head) in fp32 in cache (an AVX-512 micro-kernel for 64, 256 and 576
  keys, a portable loop otherwise; in bf16 AVX512-BF16 dot products: exact bf16
  products, fp32 sums, twice the fp32 rate) and writes the merged heads once;
  ``kv_window`` turns it into HAT's overlapping cross-attention (OCAB). Whole
  SwinIR-light / HAT models in fp32 stay within ~1e-6 of the eager path (the
  checkpoint-parity tests pass either way).
- :func:`holistic_stats` / :func:`holistic_normalize`: LN*/i-LN per-sample
  mean and ``sqrt(var + eps)`` (two passes, fp64 totals) and the normalisation
  with the per-channel affine, one call each.

Which tensors use them is decided by the execution context
(:func:`irformer.execution.kernels_allowed`: the ``IRFORMER_CPU_KERNELS`` policy
``all`` / ``bf16`` / ``off`` or an explicit :class:`~irformer.execution.ExecutionContext`);
this module adds what the kernels support (window, key-window and head sizes)
and whether the extension builds.

Autograd (training) always runs PyTorch's ops. The extension is compiled with
:mod:`torch.utils.cpp_extension` (a C++ compiler and the ``ninja`` package;
compiled once per machine and version, cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``, in a folder named after this CPU's feature
flags, torch and Python, because it is built with ``-march=native`` against
this torch). If the build fails, one warning names the reason and the eager
path runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from irformer.execution import kernels_allowed
from irformer.files import atomic_write

log = logging.getLogger(__name__)

MAX_TOKENS = 256
MAX_KV_TOKENS = 1024
MAX_HEAD_DIM = 64
SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"


class LazyExtension:
    """A C++ extension built on first use, once per process. A build that fails warns
    once and leaves ``module`` None for good: callers then use PyTorch ops."""

    def __init__(self, what: str, build: Callable[[], ModuleType]) -> None:
        self.what = what
        self.build = build
        self.module: ModuleType | None = None
        self.failure: str | None = None
        self._lock = threading.Lock()

    def get(self) -> ModuleType | None:
        if self.module is not None or self.failure is not None:
            return self.module
        with self._lock:
            if self.module is None and self.failure is None:
                try:
                    self.module = self.build()
                except Exception as exc:  # any build failure means "use the eager path"
                    self.failure = f"{type(exc).__name__}: {exc}".strip()[:500]
                    warnings.warn(
                        f"irformer: {self.what} could not be built ({self.failure}); "
                        "using PyTorch ops",
                        RuntimeWarning,
                        stacklevel=4,
                    )
        return self.module

    def require(self) -> ModuleType:
        module = self.get()
        if module is None:
            raise RuntimeError(f"{self.what} is unavailable: {self.failure}")
        return module


STALE_LOCK_SECONDS = 600
"""A build lock older than this is left over from a killed build (PyTorch's
lock would otherwise make every later process wait for it forever)."""


def machine_tag() -> str:
    """Short hash of this CPU's feature flags, torch and Python: what a
    ``-march=native`` build (and the exact bits of its results) depends on."""
    flags = f"{platform.machine()} torch {torch.__version__} py {platform.python_version()} "
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    flags += " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _build_tag(source: Path = SOURCE, flags: tuple[str, ...] = ()) -> str:
    """:func:`machine_tag` and the kernel source: a build is only loaded where it
    was built for (a shared home directory must not hand an older CPU or another
    torch ABI a build), and two checkouts with different kernel sources get
    different folders instead of rebuilding each other's on every switch."""
    digest = hashlib.sha1(source.read_bytes()).hexdigest()
    extra = f" {' '.join(flags)}" if flags else ""  # none: the tags of existing builds
    return hashlib.sha1(f"{machine_tag()} {digest}{extra}".encode()).hexdigest()[:10]


def _build() -> ModuleType:
    return build_extension("irformer_cpu_kernels", SOURCE)


def build_extension(prefix: str, source: Path, *, extra_cflags: tuple[str, ...] = ()) -> ModuleType:
    """Compile (or load the cached build of) the C++ extension ``source``, named
    ``prefix`` + :func:`_build_tag` (of the source and the extra flags); raises
    whatever the build raises."""
    from torch.utils import cpp_extension

    name = f"{prefix}_{_build_tag(source, extra_cflags)}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path.home() / ".cache" / "torch_extensions"
    )
    build_dir = Path(root) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        warnings.warn(f"irformer: removing a stale build lock {lock}", RuntimeWarning, stacklevel=2)
        lock.unlink(missing_ok=True)

    try:  # the ninja wheel's binary; cpp_extension looks for it on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    # Build from a copy inside the build folder: ninja records the source path, so
    # checkouts at different paths (git worktrees) sharing one tagged folder would
    # otherwise rebuild each other's identical extension on every switch.
    local = build_dir / source.name
    content = source.read_bytes()
    if not local.is_file() or local.read_bytes() != content:
        atomic_write(local, content)
    if (build_dir / f"{name}.so").exists():
        log.debug("loading irformer's CPU kernels from %s", build_dir)
    else:
        log.info("compiling %s (once per machine and version: ~30 s)", source.name)
    return cpp_extension.load(
        name=name,
        build_directory=str(build_dir),
        sources=[str(local)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", *extra_cflags],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


KERNELS = LazyExtension("the fused CPU kernels", lambda: _build())
"""irformer's inference kernels (``_build`` looked up at build time, so tests can swap it)."""


def load_kernel() -> ModuleType | None:
    """The compiled kernel, building it on first use; None (after one warning) if
    it cannot be built on this machine."""
    return KERNELS.get()


def use_fused_attention(x: Tensor, tokens: int, head_dim: int, kv_tokens: int = 0) -> bool:
    """Whether :func:`fused_window_attention` serves attention on ``x`` (the
    tokens fed to the qkv projection): the execution context allows it, the
    kernel supports the window, key window and head sizes, and the extension builds."""
    if not kernels_allowed(x) or tokens > MAX_TOKENS or head_dim > MAX_HEAD_DIM:
        return False
    if kv_tokens > MAX_KV_TOKENS or kv_tokens % 2:
        return False
    return load_kernel() is not None


def use_norm_kernels(x: Tensor) -> bool:
    """Whether :func:`holistic_stats` / :func:`holistic_normalize` serve ``x``
    (B, L, C): the execution context allows it, contiguous, and an extension that builds."""
    return kernels_allowed(x) and x.dim() == 3 and x.is_contiguous() and load_kernel() is not None


def holistic_stats(x: Tensor, eps: float) -> Tensor:
    """(B, 2, 1) fp32: per-sample mean and ``sqrt(var + eps)`` (biased) of x (B, L, C)."""
    return _extension().holistic_stats(x, float(eps)).unsqueeze(-1)


def holistic_normalize(x: Tensor, stats: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``(x - mean) / std * weight + bias`` per sample; stats from :func:`holistic_stats`."""
    return _extension().holistic_normalize(
        x,
        stats.reshape(x.shape[0], 2).float().contiguous(),
        weight.float().contiguous(),
        None if bias is None else bias.float().contiguous(),
    )


def _extension() -> ModuleType:
    return KERNELS.require()


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
    kv_window: int = 0,
) -> Tensor:
    """Window attention from the qkv projection to merged heads, in fp32.

    qkv: (windows, N, 3C), or with ``window`` > 0 the (B, H, W, 3C) map whose
    windows are taken after a cyclic shift up/left by ``shift`` (the output is
    shifted back: no roll or partition copies). With ``kv_window`` > 0 (map
    layout, no shift, no mask) each window attends to the co-centred
    ``kv_window``-sized window of keys/values, zeros outside the map (HAT's
    OCAB, whose unfold pads the projections with zeros); bias is then (heads,
    N, kv_window**2). bias: (heads, N, N); mask: None
    or (mask_windows, N, N) additive, window ``w`` taking ``mask[w %
    mask_windows]``; masked: uint8 (mask_windows,), 1 where that mask is not all
    zero (the others are skipped). Returns qkv's layout with C channels and
    dtype: ``softmax(scale q k^T + bias + mask) v`` per head.
    """
    if mask is not None:
        mask = mask.float().contiguous()
    return _extension().window_attention(
        qkv.contiguous(),
        bias.float().contiguous(),
        mask,
        masked,
        heads,
        float(scale),
        window,
        shift,
        kv_window,
    )
