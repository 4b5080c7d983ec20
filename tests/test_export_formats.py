"""``irformer models export`` formats besides ONNX's matrix, and ``restore --backend onnx``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from irformer.archs import build_model, load_checkpoint_model, read_state_dict, save_model_weights
from irformer.cli import main
from irformer.data.io import read_image, write_image
from irformer.export import export_model, format_for_path, load_pt2

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from export_cases import EXPORT_TINY

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = EXPORT_TINY["swinir_light"][1]  # the export tests' tiny SwinIR-light


def tiny(norm: str = "iln") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("swinir", norm=norm, drop_path_rate=0.0, **TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def small_probe() -> torch.Tensor:
    return torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(3))


def test_format_from_suffix_and_checks() -> None:
    assert format_for_path("a.onnx") == "onnx"
    assert format_for_path("a.pt2") == "pt2"
    assert format_for_path("a.safetensors") == format_for_path("a.pth") == "safetensors"
    assert format_for_path("a.pth", "official") == "official"
    with pytest.raises(ValueError, match=r"needs the suffix \.onnx"):
        format_for_path("a.pth", "onnx")
    with pytest.raises(ValueError, match="cannot tell the export format"):
        format_for_path("a.bin")


def test_pt2_program_runs_at_any_size(tmp_path: Path) -> None:
    model = tiny("iln")
    path = tmp_path / "m.pt2"
    result = export_model(model, dict(model.irformer_meta), path, fp16_probe=small_probe())
    assert result.format == "pt2" and all(c.max_abs_diff < 1e-4 for c in result.checks)
    program, meta = load_pt2(path)
    assert (meta["arch"], meta["norm"], meta["scale"]) == ("swinir", "iln", 2)
    assert meta["fp16_safe"] is True and meta["dtype"] == "fp32"
    module = program.module()
    for shape in [(1, 3, 1, 1), (3, 3, 9, 6), (1, 3, 16, 16)]:
        x = torch.rand(shape)
        with torch.no_grad():
            assert (module(x) - model(x)).abs().max().item() < 1e-5, shape


def test_weights_export_records_fp16_verdict(tmp_path: Path) -> None:
    model = tiny("ln")
    path = tmp_path / "w.safetensors"
    export_model(model, dict(model.irformer_meta), path, fp16_probe=small_probe())
    _, meta = read_state_dict(path)
    assert meta["norm"] == "ln" and meta["fp16_safe"] is True
    assert meta["fp16_max_abs"] > 0 and meta["fp16_max_layer"]
    loaded, _ = load_checkpoint_model(path)
    x = torch.rand(1, 3, 7, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_export_refuses_bad_requests(tmp_path: Path) -> None:
    model = tiny("ln")
    with pytest.raises(ValueError, match="--dtype applies to onnx and pt2"):
        export_model(model, dict(model.irformer_meta), tmp_path / "w.safetensors", dtype="fp16")
    ckpt = tmp_path / "ckpt.safetensors"
    save_model_weights(ckpt, model)
    (tmp_path / "exists.onnx").write_bytes(b"")
    assert main(["models", "export", str(ckpt), str(tmp_path / "exists.onnx")]) == 2


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny LN checkpoint and its ONNX file, written by the CLI."""
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    folder = tmp_path_factory.mktemp("onnx_cli")
    ckpt = folder / "tiny_ln.safetensors"
    save_model_weights(ckpt, tiny("ln"))
    onnx_path = folder / "tiny_ln.onnx"
    assert main(["models", "export", str(ckpt), str(onnx_path)]) == 0
    return ckpt, onnx_path


def test_cli_export_reports_parity(onnx_export: tuple[Path, Path], capsys) -> None:
    from irformer.export import read_onnx_metadata

    _, onnx_path = onnx_export
    meta = read_onnx_metadata(onnx_path)
    assert meta["norm"] == "ln" and meta["fp16_safe"] is True


def test_restore_backend_onnx_matches_torch(onnx_export: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, onnx_path = onnx_export
    rng = np.random.default_rng(0)
    image = tmp_path / "in.png"
    write_image(image, (rng.random((23, 30, 3)) * 255).astype(np.uint8))
    options = ["--tile", "16", "--tile-overlap", "4", "--ensemble"]
    assert (
        main(["restore", str(image), "--model", str(ckpt), "-o", str(tmp_path / "t"), *options])
        == 0
    )
    assert (
        main(
            ["restore", str(image), "--model", str(onnx_path), "-o", str(tmp_path / "o"), *options]
        )
        == 0
    )
    torch_out = read_image(tmp_path / "t" / "in.png").astype(int)
    onnx_out = read_image(tmp_path / "o" / "in.png").astype(int)
    assert torch_out.shape == onnx_out.shape == (46, 60, 3)
    assert np.abs(torch_out - onnx_out).max() <= 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--exact-chunk", "4"], "always computes the whole image"),
        (["--precision", "bf16"], "runs in its own precision"),
        (["--scale", "4"], "restores at scale 2"),
        (["--autocast", "bf16"], "applies to the PyTorch model"),
        (["--max-memory", "1G"], "plans the PyTorch model's paths"),
        (["--task", "dn"], "is a sr model"),
    ],
)
def test_restore_backend_onnx_refusals(
    onnx_export: tuple[Path, Path], tmp_path: Path, extra: list[str], message: str, capsys
) -> None:
    _, onnx_path = onnx_export
    image = tmp_path / "in.png"
    write_image(image, np.zeros((8, 8, 3), np.uint8))
    argv = ["restore", str(image), "--model", str(onnx_path), "-o", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
