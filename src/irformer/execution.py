"""How models run, chosen in one explicit place: the execution context.

A model file says *what* is computed; this context says *how* for the current
call: whether irformer's C++ CPU kernels may serve eager inference, and whether
window attention and MLPs run whole or in chunks (the exact bounded-memory path
for large images). The blocks never carry execution settings themselves; they
ask :func:`current_execution` (through :mod:`irformer.archs.attention` and
:mod:`irformer.norms`).

    with execution_context(windows_per_chunk=256):
        y = model(x)                     # exact path, bounded memory

    with execution_context(cpu_kernels="off"):
        y = model(x)                     # PyTorch ops only

Defaults: no chunking; the kernel policy comes from the ``IRFORMER_CPU_KERNELS``
environment variable (``all`` when unset). Whatever the context says, the
kernels never serve autograd, non-CPU tensors, tensor subclasses (fake and
functional tensors of ``torch.export``) or a trace, compile or ONNX export: a
custom kernel is an optimisation of eager inference, never part of a graph.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

KernelPolicy = Literal["all", "bf16", "off"]
"""Which dtypes the C++ CPU kernels serve: bf16 and fp32 (``all``), bf16 only, none."""
KERNEL_POLICIES: tuple[str, ...] = get_args(KernelPolicy)
KERNEL_ENV = "IRFORMER_CPU_KERNELS"


def env_kernel_policy() -> KernelPolicy:
    """``IRFORMER_CPU_KERNELS`` (default ``all``); an unknown value is an error naming it."""
    policy = os.environ.get(KERNEL_ENV, "all").strip().lower()
    if policy not in KERNEL_POLICIES:
        raise ValueError(f"{KERNEL_ENV}={policy!r} is not one of {', '.join(KERNEL_POLICIES)}")
    return policy  # type: ignore[return-value]


@dataclass(frozen=True)
class ExecutionContext:
    """How the blocks of every model run within one :func:`execution_context`."""

    cpu_kernels: KernelPolicy | None = None
    """C++ CPU kernel policy; None: ``IRFORMER_CPU_KERNELS``."""
    windows_per_chunk: int | None = None
    """Exact bounded-memory path: attention over at most this many windows at a
    time (whole rows of windows per chunk); None runs every window at once."""
    tokens_per_chunk: int | None = None
    """MLPs over at most this many tokens per image at a time; None: with
    ``windows_per_chunk`` set, ``windows_per_chunk * window_size**2``, else all."""

    def __post_init__(self) -> None:
        if self.cpu_kernels is not None and self.cpu_kernels not in KERNEL_POLICIES:
            raise ValueError(
                f"cpu_kernels={self.cpu_kernels!r} is not one of {', '.join(KERNEL_POLICIES)}"
            )
        for name in ("windows_per_chunk", "tokens_per_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def kernel_policy(self) -> KernelPolicy:
        return env_kernel_policy() if self.cpu_kernels is None else self.cpu_kernels

    @property
    def chunked(self) -> bool:
        """Whether the exact chunked path is on."""
        return self.windows_per_chunk is not None

    def mlp_tokens(self, window_size: int) -> int | None:
        """Tokens per MLP chunk for blocks with ``window_size`` windows (None: all)."""
        if self.tokens_per_chunk is not None:
            return self.tokens_per_chunk
        if self.windows_per_chunk is not None:
            return self.windows_per_chunk * window_size * window_size
        return None


DEFAULT = ExecutionContext()
GRAPH = ExecutionContext(cpu_kernels="off")
"""What traced, compiled and exported graphs always get: PyTorch ops, no chunking."""

_current: ContextVar[ExecutionContext] = ContextVar("irformer_execution", default=DEFAULT)


def in_graph_capture() -> bool:
    """Whether a trace, ``torch.compile``/``torch.export`` or ONNX export is recording."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is None:
        return False
    if compiler.is_compiling():
        return True
    is_exporting = getattr(compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def current_execution() -> ExecutionContext:
    """The context of the running call (:data:`GRAPH` while a graph is captured)."""
    if in_graph_capture():
        return GRAPH
    return _current.get()


@contextmanager
def execution_context(
    context: ExecutionContext | None = None, **changes: object
) -> Iterator[ExecutionContext]:
    """Run the enclosed calls under ``context`` (default: the current one) with ``changes``.

    Nested contexts start from the enclosing one, so
    ``execution_context(cpu_kernels="off")`` inside an exact-path block keeps chunking.
    """
    base = _current.get() if context is None else context
    new = dataclasses.replace(base, **changes) if changes else base  # type: ignore[arg-type]
    token = _current.set(new)
    try:
        yield new
    finally:
        _current.reset(token)


def kernels_allowed(x: Tensor) -> bool:
    """Whether the current context lets the C++ CPU kernels serve ``x``.

    Eager CPU inference without autograd or autocast, on a plain tensor, in a
    dtype the policy selects (bf16 always unless ``off``; fp32 with ``all``). Sizes and
    the availability of the compiled extension are :mod:`irformer.cpu_kernels`'
    business.
    """
    if x.device.type != "cpu" or torch.is_grad_enabled() or type(x) is not Tensor:
        return False
    if x.dtype not in (torch.bfloat16, torch.float32) or in_graph_capture():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False  # the projections would hand the kernel fp16/bf16 it was not asked for
    policy = _current.get().kernel_policy
    if policy == "off":
        return False
    return x.dtype == torch.bfloat16 or policy == "all"
