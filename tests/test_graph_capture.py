"""irformer's C++ CPU kernels never leak into a trace, an export or a compiled graph.

With the default ``IRFORMER_CPU_KERNELS=all`` the eager model runs window
attention and i-LN through the C++ extension; each capture mechanism --
``torch.jit.trace``, ``torch.onnx.export`` (dynamo and the legacy TorchScript
exporter), ``torch.export`` and ``torch.compile`` -- must record the PyTorch-op
path instead (:func:`irformer.execution.in_graph_capture`), and what it
recorded must compute what the eager model computes. Before the redesign,
``torch.onnx.export`` "succeeded" with a graph that output NaN, ``jit.trace``
gave NaN with a warning and ``torch.export`` failed.
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from irformer import cpu_kernels
from irformer.archs import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from export_cases import EXPORT_TINY

pytestmark = pytest.mark.usefixtures("one_thread")

KERNELS = ("fused_window_attention", "holistic_stats", "holistic_normalize")

MODELS: dict[str, tuple[str, dict[str, object]]] = {
    f"{name}_iln": (arch, {"norm": "iln", **kwargs})
    for name, (arch, kwargs) in ((n, EXPORT_TINY[n]) for n in ("swinir_light", "hat"))
}
"""i-LN (norm kernels), shifted windows (attention kernel with a mask) and HAT's
overlapping cross-attention (the kernel's key-window mode)."""


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the C++ kernel entry points called, in order (the real kernels run)."""
    monkeypatch.setenv("IRFORMER_CPU_KERNELS", "all")
    calls: list[str] = []
    for name in KERNELS:
        real = getattr(cpu_kernels, name)

        def spy(*args: object, _real=real, _name=name, **kwargs: object) -> object:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu_kernels, name, spy)
    yield calls


def _model_and_eager(
    name: str, calls: list[str]
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    arch, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = build_model(arch, drop_path_rate=0.0, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(2, 3, 11, 13, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(x)
    if cpu_kernels.load_kernel() is None:
        pytest.skip("irformer's C++ CPU kernels cannot be built here (no compiler?)")
    assert set(calls) == set(KERNELS), "the eager model should have used every kernel"
    calls.clear()
    return model, x, eager


@pytest.mark.parametrize("name", list(MODELS))
def test_jit_trace_records_pytorch_ops(name: str, kernel_calls: list[str]) -> None:
    model, x, eager = _model_and_eager(name, kernel_calls)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x, check_trace=False)  # its check runs eagerly
    assert kernel_calls == []
    with torch.no_grad():
        out = traced(x)
    assert torch.isfinite(out).all()
    assert (out - eager).abs().max().item() < 1e-5


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_records_pytorch_ops(dynamo: bool, kernel_calls: list[str]) -> None:
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    pytest.importorskip("onnxscript", reason="the export extra is not installed")
    model, x, eager = _model_and_eager("swinir_light_iln", kernel_calls)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (x,), None if dynamo else buffer, dynamo=dynamo, opset_version=18
        )
    assert kernel_calls == []
    data = program.model_proto.SerializeToString() if dynamo else buffer.getvalue()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert (torch.from_numpy(out) - eager).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_records_pytorch_ops(name: str, kernel_calls: list[str]) -> None:
    model, x, eager = _model_and_eager(name, kernel_calls)
    program = torch.export.export(model, (x,))
    assert kernel_calls == []
    with torch.no_grad():
        out = program.module()(x)
    assert (out - eager).abs().max().item() < 1e-5


def test_torch_compile_records_pytorch_ops(kernel_calls: list[str]) -> None:
    """fullgraph=True: no graph break anywhere; aot_eager needs no C++ compiler."""
    model, x, eager = _model_and_eager("swinir_light_iln", kernel_calls)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x)
    assert kernel_calls == []
    assert (out - eager).abs().max().item() < 1e-5
