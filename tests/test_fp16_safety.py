"""fp16 safety: measured verdicts, the refusal naming the layer, the bf16 fallback.

The CUDA autocast path cannot run here; the decision it depends on is the same
function, tested on CPU with a synthetic LayerNorm model whose MLP output
exceeds fp16's range.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from irformer.analysis.magnitudes import Fp16OverflowWarning
from irformer.archs import build_model
from irformer.engine.fp16 import (
    Fp16UnsafeError,
    default_fp16_probe,
    measure_fp16_safety,
    resolve_fp16_precision,
)

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from export_cases import EXPORT_TINY

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = EXPORT_TINY["swinir_light"][1]  # the export tests' tiny SwinIR-light
HOT = "layers.0.residual_group.blocks.1.mlp.fc2"


def hot_model() -> torch.nn.Module:
    """LayerNorm SwinIR whose second block's MLP output is ~1e6: fp16 overflows there."""
    torch.manual_seed(0)
    model = build_model("swinir", norm="ln", **TINY).eval()
    with torch.no_grad():
        model.layers[0].residual_group.blocks[1].mlp.fc2.weight.mul_(1e7)
    return model


def probe() -> torch.Tensor:
    return torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def test_unsafe_model_is_measured_and_named() -> None:
    model = hot_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    verdict = measure_fp16_safety(model, probe())
    assert not verdict.safe
    assert verdict.first_unsafe_layer == HOT  # where the overflow starts, not where it peaks
    assert verdict.max_abs > 65504
    assert verdict.threshold == pytest.approx(65504 / 4)
    record = verdict.record()
    assert record["fp16_safe"] is False and record["fp16_first_unsafe_layer"] == HOT
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_safe_model_verdict() -> None:
    torch.manual_seed(0)
    verdict = measure_fp16_safety(build_model("swinir", norm="iln", **TINY), probe())
    assert verdict.safe and verdict.first_unsafe_layer is None
    assert 0 < verdict.max_abs < verdict.threshold
    assert resolve_fp16_precision(build_model("swinir", norm="iln", **TINY), probe())[0] == "fp16"


def test_refuse_fall_back_or_run() -> None:
    model = hot_model()
    with pytest.raises(Fp16UnsafeError, match=f"from {HOT.replace('.', r'.')} on"):
        resolve_fp16_precision(model, probe())
    precision, verdict = resolve_fp16_precision(model, probe(), on_unsafe="bf16")
    assert precision == "bf16" and not verdict.safe
    with pytest.warns(Fp16OverflowWarning, match="running fp16 anyway"):
        assert resolve_fp16_precision(model, probe(), on_unsafe="run")[0] == "fp16"
    with pytest.raises(ValueError, match="on_unsafe"):
        resolve_fp16_precision(model, probe(), on_unsafe="ignore")  # type: ignore[arg-type]


def test_default_probe_is_fixed_photos() -> None:
    rgb, grey = default_fp16_probe(3), default_fp16_probe(1)
    assert rgb.shape == (3, 3, 96, 96) and grey.shape == (3, 1, 96, 96)
    assert torch.equal(grey, rgb.mean(1, keepdim=True))
    assert float(rgb.min()) >= 0.0 and float(rgb.max()) <= 1.0 and rgb.std() > 0.1
    assert torch.equal(rgb, default_fp16_probe(3))


def test_precision_and_autocast_decision() -> None:
    """fp16 weights and fp16 autocast (the CUDA path) are checked alike; bf16 replaces
    whichever asked for fp16; other requests are not measured."""
    from irformer.engine.fp16 import resolve_fp16_options

    model = hot_model()
    for precision, autocast in (("fp16", None), ("fp32", "fp16")):
        with pytest.raises(Fp16UnsafeError, match=f"from {HOT.replace('.', r'.')} on"):
            resolve_fp16_options(model, precision, autocast, probe=probe())
    assert resolve_fp16_options(model, "fp16", None, probe=probe(), on_unsafe="bf16") == (
        "bf16",
        None,
    )
    assert resolve_fp16_options(model, "fp32", "fp16", probe=probe(), on_unsafe="bf16") == (
        "fp32",
        "bf16",
    )
    assert resolve_fp16_options(model, "bf16", None) == ("bf16", None)  # nothing measured
    torch.manual_seed(0)
    safe = build_model("swinir", norm="iln", **TINY)
    assert resolve_fp16_options(safe, "fp32", "fp16", probe=probe()) == ("fp32", "fp16")


def test_eval_refuses_unsafe_fp16(tmp_path, capsys) -> None:
    import numpy as np

    from irformer.archs import save_model_weights
    from irformer.cli import main
    from irformer.data.io import write_image

    path = tmp_path / "hot.safetensors"
    save_model_weights(path, hot_model())
    (tmp_path / "HR").mkdir()
    write_image(tmp_path / "HR" / "a.png", np.full((16, 16, 3), 128, np.uint8))
    bench = "mine=" + str(tmp_path / "HR")
    argv = ["eval", "--model", str(path), "--bench", bench, "--precision", "fp16"]
    assert main(argv) == 2
    assert "fp16 would overflow from " + HOT in capsys.readouterr().err
