"""Fused (rotated) fake quantisation on CPU: the fast path of bound distillation.

Why: profiled on SwinIR-light x4 (CompSRT W2A2, one 64 x 64 patch; BENCHMARKS.md),
one DQC step spends most of its time in the activation quantisers, not in the
model: every quantiser pads, rotates (a rows x 64 x 64 product for each
attention map), runs six elementwise passes, rotates back and crops, and
autograd does as much again in backward. ``csrc/fake_quant.cpp`` does each
row in an L1-resident buffer (a fast Walsh-Hadamard transform for the
power-of-two sizes CompSRT uses, a dense product for exact Hadamard orders) and
returns the straight-through gradients of the input, the step and the offset.

Inside :func:`fused_fake_quant` every :class:`~irformer.compress.quantizers.ActQuantizer`
in ``quant`` mode on an fp32 CPU tensor runs through it (NoisyQuant's noise,
other devices and dtypes keep the eager ops; so does every graph capture --
trace, compile, export, ONNX -- and the execution context's kernel policy
``off``, :mod:`irformer.execution`). Without
rotation the output equals the eager path bit for bit (same op sequence, no
floating-point contraction); with rotation the transform sums in another
order than a matrix product, ~1e-7 relative, which can flip a value lying
exactly on a rounding boundary. The context is explicit (a context variable,
nothing stored on modules): distillation opts in, evaluation stays eager unless
its caller opts in too.

Unlike the inference kernels of :mod:`irformer.cpu_kernels`, which never serve
autograd (they have no backward), this one is a :class:`torch.autograd.Function`
with its own backward: distillation is training, and its speed is the reason
the kernel exists. The backward is the eager path's straight-through gradient,
checked against it (``tests/test_compress_fused.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from irformer import cpu_kernels
from irformer.compress.hadamard import hadamard_matrix, is_power_of_two
from irformer.execution import current_execution, in_graph_capture

__all__ = [
    "fused_fake_quant",
    "fused_fake_quant_active",
    "fused_kernel_available",
    "rotated_fake_quantize",
    "rotated_indices",
]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "fake_quant.cpp"
MAX_ROTATED = 4096
"""Largest rotated row the kernel's per-thread buffers take (SwinIR: 128)."""

_enabled: ContextVar[bool] = ContextVar("irformer_fused_fake_quant", default=False)
# No contraction: ``t * s + z`` must round twice, like the eager ops; no trapping
# maths: lets the compiler vectorise the selects.
KERNEL = cpu_kernels.LazyExtension(
    "the fused fake-quantisation kernel",
    lambda: cpu_kernels.build_extension(
        "irformer_fake_quant", SOURCE, extra_cflags=("-ffp-contract=off", "-fno-trapping-math")
    ),
)


@contextmanager
def fused_fake_quant(enabled: bool = True) -> Iterator[None]:
    """Run activation quantisers through the fused kernel inside the block
    (where the kernel builds; otherwise one warning and the eager ops)."""
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


def fused_fake_quant_active() -> bool:
    return _enabled.get()


def _load() -> ModuleType | None:
    return KERNEL.get()


def fused_kernel_available() -> bool:
    """Whether the extension builds on this machine (builds it on first call)."""
    return _load() is not None


def use_fused(x: Tensor, rotate_size: int | None) -> bool:
    """Whether :func:`rotated_fake_quantize` serves ``x`` here and now."""
    if not _enabled.get() or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if in_graph_capture() or current_execution().kernel_policy == "off":
        return False
    if type(x) is not Tensor and not isinstance(x, torch.nn.Parameter):
        return False  # tensor subclasses (fake/functional tensors)
    size = x.shape[-1] if rotate_size is None else rotate_size
    return 0 < size <= MAX_ROTATED and _load() is not None


def _rotation(n: int, size: int | None) -> tuple[int, int, Tensor | None]:
    """(m, mode, dense matrix) for the kernel: see ``csrc/fake_quant.cpp``."""
    if size is None:
        return n, 0, None
    if is_power_of_two(size):
        return size, 1, None
    return size, 2, _dense(size)


_matrices: dict[int, Tensor] = {}


def _dense(size: int) -> Tensor:
    if size not in _matrices:
        _matrices[size] = hadamard_matrix(size).contiguous()
    return _matrices[size]


class _FusedFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        scale: Tensor,
        zero: Tensor,
        levels: int,
        size: int | None,
    ) -> Tensor:
        kernel = _load()
        assert kernel is not None  # use_fused checked it
        shape = x.shape
        rows = x.detach().contiguous().view(-1, shape[-1])
        m, mode, matrix = _rotation(shape[-1], size)
        s, z = float(scale), float(zero)
        out = kernel.forward(rows, m, mode, matrix, s, z, levels)
        ctx.save_for_backward(rows, scale, zero)
        ctx.params = (m, mode, matrix, s, z, levels, shape)  # type: ignore[attr-defined]
        return out.view(shape)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        rows, scale, zero = ctx.saved_tensors  # type: ignore[attr-defined]
        m, mode, matrix, s, z, levels, shape = ctx.params  # type: ignore[attr-defined]
        kernel = _load()
        assert kernel is not None
        g = grad.contiguous().view(-1, shape[-1])
        gx, totals = kernel.backward(
            rows, g, m, mode, matrix, s, z, levels, bool(ctx.needs_input_grad[0])
        )
        gs = gz = None
        if ctx.needs_input_grad[1]:
            gs = totals[0].to(scale.dtype).expand(scale.shape).clone()
        if ctx.needs_input_grad[2]:
            gz = totals[1].to(zero.dtype).expand(zero.shape).clone()
        return (gx.view(shape) if ctx.needs_input_grad[0] else None), gs, gz, None, None


def rotated_fake_quantize(
    x: Tensor, scale: Tensor, zero: Tensor, bits: int, rotate_size: int | None
) -> Tensor:
    """``unrotate(fake_quantize(rotate(x, rotate_size)))`` along the last dim, fused.

    x: (..., n) fp32 CPU; scale, zero: one-element tensors (per-tensor step and
    offset, differentiable); ``rotate_size``: None (no rotation) or the padded
    Hadamard order. Same values and straight-through gradients as the eager
    composition (see the module docstring for the rounding caveat).
    """
    if scale.numel() != 1 or zero.numel() != 1:
        raise ValueError(
            f"rotated_fake_quantize is per tensor; got scale {tuple(scale.shape)} and "
            f"zero {tuple(zero.shape)}"
        )
    return _FusedFakeQuant.apply(x, scale, zero, 2**bits - 1, rotate_size)


def rotated_indices(
    x: Tensor, scale: float, zero: float, bits: int, rotate_size: int | None
) -> Tensor:
    """The grid indices :func:`rotated_fake_quantize` dequantises, as int8.

    x: (rows, n) fp32 CPU. Returns (rows, m) int8 with m the rotated size:
    ``clamp(round((rotate(x) - zero) / scale), 0, 2^b - 1)``, minus 128 for 8
    bits (so they fit int8). Needs the kernel (:func:`fused_kernel_available`).
    """
    kernel = KERNEL.require()
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(
            f"rotated_indices takes (rows, n) fp32 CPU tensors, got {x.dtype} {tuple(x.shape)}"
        )
    m, mode, matrix = _rotation(x.shape[-1], rotate_size)
    offset = 128 if bits == 8 else 0
    return kernel.indices(x.contiguous(), m, mode, matrix, scale, zero, 2**bits - 1, offset)
