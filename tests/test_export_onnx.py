"""ONNX export of every architecture x norm: dynamic sizes, plain ops, metadata, ORT parity.

Each case writes the file with :func:`irformer.export.export_model` (which
itself refuses to write unless ONNX Runtime matches PyTorch within 1e-4 on a
batch-1 window-multiple input and a batch-2 input that is not a window
multiple), then runs it again through :class:`OnnxRuntimeModel` at sizes the
graph was never captured at (1x1, odd sides, batch 3), and reads the graph:
opset, dynamic input dims, MatMul/Softmax attention, no custom-domain ops.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime) is not installed")
pytest.importorskip("onnxruntime", reason="the export extra is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from export_cases import CASES, tiny_model  # noqa: E402

from irformer.export import ExportParityError, export_model, read_onnx_metadata  # noqa: E402
from irformer.export.onnx_file import PARITY_TOLERANCE  # noqa: E402
from irformer.export.onnx_runtime import OnnxRuntimeModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def small_probe(model: torch.nn.Module) -> torch.Tensor:
    return torch.rand(1, int(model.in_chans), 12, 12, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_onnx_export_matches_pytorch_at_any_size(name: str, norm: str, tmp_path: Path) -> None:
    model = tiny_model(name, norm)
    path = tmp_path / f"{name}_{norm}.onnx"
    result = export_model(model, dict(model.irformer_meta), path, fp16_probe=small_probe(model))
    assert path.is_file() and result.format == "onnx" and result.dtype == "fp32"
    # The export's own check: two sizes, one not a window multiple, batch 1 and 2.
    shapes = [c.shape for c in result.checks]
    ws, chans = model.window_size, model.in_chans
    assert shapes == [(1, chans, 2 * ws, 3 * ws), (2, chans, 2 * ws + 3, ws + 5)]
    assert all(c.max_abs_diff <= PARITY_TOLERANCE["fp32"] for c in result.checks)

    runtime = OnnxRuntimeModel(path, threads=1)
    assert (runtime.upscale, runtime.in_chans, runtime.window_size) == (
        model.upscale,
        chans,
        ws,
    )
    gen = torch.Generator().manual_seed(11)
    for shape in [(1, chans, 1, 1), (1, chans, 5, 3), (3, chans, ws + 1, 2 * ws - 1)]:
        x = torch.rand(shape, generator=gen)
        with torch.no_grad():
            want = model(x)
        got = runtime(x)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4, shape

    graph = onnx.load(str(path))
    assert graph.opset_import[0].version >= 17
    assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}
    ops = {n.op_type for n in graph.graph.node}
    assert {"MatMul", "Softmax"} <= ops
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1] == chans
    assert all(dims[i].dim_param for i in (0, 2, 3))  # batch, height, width symbolic

    meta = read_onnx_metadata(path)
    expected = model.irformer_meta
    for key in ("arch", "preset", "norm", "scale", "task", "version"):
        assert meta[key] == expected[key], key
    assert meta["irformer_version"] and meta["dtype"] == "fp32" and meta["opset"] >= 17
    assert meta["fp16_safe"] is True and meta["fp16_max_abs"] > 0
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["norm"] == norm and props["arch"] == expected["arch"]


def test_onnx_parity_failure_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    """A file whose ORT output differs from PyTorch beyond 1e-4 is never written."""
    from irformer.export import onnx_file

    model = tiny_model("swinir_light", "iln")
    monkeypatch.setitem(onnx_file.PARITY_TOLERANCE, "fp32", 0.0)
    path = tmp_path / "strict.onnx"
    with pytest.raises(ExportParityError, match="file not written"):
        export_model(model, dict(model.irformer_meta), path, fp16_probe=small_probe(model))
    assert not path.exists() and not list(tmp_path.iterdir())


def test_onnx_fp16_only_for_fp16_safe_models(tmp_path: Path) -> None:
    model = tiny_model("swinir_light", "ln")
    with torch.no_grad():
        model.layers[0].residual_group.blocks[1].mlp.fc2.weight.mul_(1e7)
    with pytest.raises(ValueError, match=r"not marked fp16-safe.*blocks\.1\.mlp\.fc2"):
        export_model(
            model,
            dict(model.irformer_meta),
            tmp_path / "hot.onnx",
            dtype="fp16",
            fp16_probe=small_probe(model),
        )
    with pytest.raises(ValueError, match="bf16 Conv needs opset 22"):
        export_model(model, dict(model.irformer_meta), tmp_path / "b.onnx", dtype="bf16")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_onnx_fp16_file_of_a_safe_model(tmp_path: Path) -> None:
    """fp16 ONNX of an fp16-safe model runs in ORT CPU and matches PyTorch's fp16."""
    model = tiny_model("swinir_light", "iln")
    path = tmp_path / "half.onnx"
    result = export_model(
        model, dict(model.irformer_meta), path, dtype="fp16", fp16_probe=small_probe(model)
    )
    assert result.meta["dtype"] == "fp16" and result.meta["fp16_safe"] is True
    assert all(c.max_abs_diff <= PARITY_TOLERANCE["fp16"] for c in result.checks)
    runtime = OnnxRuntimeModel(path, threads=1)
    assert runtime.precision == "fp16"
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        assert (runtime(x) - model(x)).abs().max().item() < 2e-2
