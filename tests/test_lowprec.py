"""Low precision: fp16 overflow reported with its first layer; the guard; the Table 4 report."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from irformer.analysis.magnitudes import (
    FP16_MAX,
    Fp16OverflowWarning,
    check_fp16_overflow,
    feature_magnitudes,
    fp16_overflow_risks,
    load_recorded_magnitudes,
)
from irformer.archs import build_model, save_model_weights
from irformer.cli import main as cli_main
from irformer.engine.infer import forward_plain, run_with_precision
from irformer.experiments.lowprec import format_lowprec_table, lowprec_report

TINY = {
    "img_size": 16,
    "embed_dim": 12,
    "depths": (2, 2),
    "num_heads": (2, 2),
    "window_size": 4,
    "mlp_ratio": 2.0,
    "upscale": 2,
    "upsampler": "pixelshuffledirect",
}
HOT = "layers.0.residual_group.blocks.1.mlp.fc2"
"""The Linear whose output exceeds fp16's range in :func:`overflowing_model`."""


def tiny(norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("swinir", **TINY, norm=norm).eval()


def overflowing_model(norm: str = "ln") -> torch.nn.Module:
    """A second-block MLP whose output reaches ~1e5, like the LN models' outlier
    channels (i-LN paper, Fig. 10), while every earlier layer stays small."""
    model = tiny(norm)
    with torch.no_grad():
        model.get_submodule(HOT).weight.mul_(1e7)
    return model


def test_fp16_overflow_report_names_first_layer() -> None:
    model = overflowing_model()
    x = torch.rand(1, 3, 16, 16)
    mags = feature_magnitudes(model, x)
    assert mags[HOT] > FP16_MAX  # beyond fp16 in an exact fp32 pass
    assert all(v < 100 for k, v in mags.items() if k.startswith("layers.0.residual_group.blocks.0"))

    out, report = run_with_precision(copy.deepcopy(model), x, "fp16")
    assert report.first_layer == HOT and report.first_layer_type == "Linear"
    assert report.total_pixels == 32 * 32
    assert report.nonfinite_pixels == report.total_pixels  # the residual carries it everywhere
    assert report.nonfinite_values == 3 * 32 * 32
    assert not report.finite and HOT in report.summary()
    assert bool(torch.isfinite(out).all())  # sanitised: NaN -> 0 (black dots)

    raw, _ = run_with_precision(copy.deepcopy(model), x, "fp16", sanitize=False)
    assert not bool(torch.isfinite(raw).all())

    # bf16 has fp32's exponent range: the same model stays finite.
    _, rep_bf16 = run_with_precision(copy.deepcopy(model), x, "bf16")
    assert rep_bf16.finite and rep_bf16.first_layer is None


def test_normal_model_fp16_is_finite_and_close() -> None:
    model = tiny("iln")
    x = torch.rand(1, 3, 16, 16)
    out, report = run_with_precision(copy.deepcopy(model), x, "fp16")
    assert report.finite and report.nonfinite_pixels == 0
    assert float((out - forward_plain(model, x)).abs().max()) < 5e-3


def test_guard_warns_from_probe_and_records(tmp_path: Path) -> None:
    x = torch.rand(1, 3, 16, 16)
    with pytest.warns(Fp16OverflowWarning, match="will overflow.*" + HOT.replace(".", r"\.")):
        risks = check_fp16_overflow(model=overflowing_model(), probe=x)
    assert risks[0].name == HOT and risks[0].overflows
    assert risks[0].threshold == pytest.approx(FP16_MAX / 4)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a normal model
        assert check_fp16_overflow(model=tiny("ln"), probe=x) == []

    # Recorded magnitudes: `irformer analyze features` JSON, FeatureProbe JSONL, plain map.
    blocks = [
        {
            "iter": 0,
            "block": "layers.0",
            "kind": "group",
            "sq_mean": 1.0,
            "max_abs": 2e4,
            "entropy": 1.0,
        },
        {
            "iter": 0,
            "block": "layers.1",
            "kind": "group",
            "sq_mean": 1.0,
            "max_abs": 10.0,
            "entropy": 1.0,
        },
    ]
    (tmp_path / "features.json").write_text(json.dumps({"checkpoint": "x", "blocks": blocks}))
    jsonl = [dict(b, iter=100, max_abs=b["max_abs"] * 10) for b in blocks]
    (tmp_path / "features.jsonl").write_text(
        "\n".join(json.dumps(r) for r in blocks + jsonl) + "\n"
    )
    (tmp_path / "map.json").write_text(json.dumps({"a": 1.0, "b": 70000.0}))
    assert load_recorded_magnitudes(tmp_path / "features.json") == {
        "layers.0": 2e4,
        "layers.1": 10.0,
    }
    assert load_recorded_magnitudes(tmp_path / "features.jsonl") == {
        "layers.0": 2e5,
        "layers.1": 100.0,
    }  # latest iteration
    mags = load_recorded_magnitudes(tmp_path / "map.json")
    assert [r.name for r in fp16_overflow_risks(mags)] == ["b"]
    assert [r.name for r in fp16_overflow_risks(mags, safety=1e5)] == ["b", "a"]
    with pytest.warns(Fp16OverflowWarning, match="close to overflowing"):
        check_fp16_overflow(load_recorded_magnitudes(tmp_path / "features.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"blocks": [{"name": "x"}]}))
    with pytest.raises(ValueError, match="max_abs"):
        load_recorded_magnitudes(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="safety"):
        fp16_overflow_risks(mags, safety=0.5)


@pytest.fixture
def report_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two tiny checkpoints (LN that overflows fp16, i-LN that does not) and a 2-image Set5."""
    import skimage.data

    hr = tmp_path / "data" / "Set5" / "HR"
    hr.mkdir(parents=True)
    photo = skimage.data.astronaut()
    cv2.imwrite(str(hr / "a.png"), np.ascontiguousarray(photo[100:148, 100:148, ::-1]))
    cv2.imwrite(str(hr / "b.png"), np.ascontiguousarray(photo[200:240, 250:300, ::-1]))
    ln, iln = tmp_path / "ln.safetensors", tmp_path / "iln.safetensors"
    save_model_weights(ln, overflowing_model("ln"))
    save_model_weights(iln, tiny("iln"))
    return ln, iln, tmp_path / "data"


def test_lowprec_report_table(report_inputs: tuple[Path, Path, Path]) -> None:
    ln, iln, root = report_inputs
    with pytest.warns(Fp16OverflowWarning):
        report = lowprec_report(
            ln, iln, benchmarks=["Set5"], data_root=root, settings=("fp32", "fp16", "int8")
        )
    assert (report.task, report.scale, report.benchmarks) == ("sr", 2, ("Set5",))
    assert len(report.rows) == 6
    ln16 = report.row("LN", "fp16", "Set5")
    assert ln16.nonfinite_pixels == ln16.total_pixels == 48 * 48 + 40 * 50
    assert ln16.nonfinite_images == 2 and ln16.first_nonfinite_layer == HOT
    assert ln16.psnr < report.row("LN", "fp32", "Set5").psnr - 1.0
    iln32, iln16 = report.row("i-LN", "fp32", "Set5"), report.row("i-LN", "fp16", "Set5")
    assert iln16.nonfinite_pixels == 0 and abs(iln16.psnr - iln32.psnr) < 0.01
    int8 = report.row("i-LN", "int8", "Set5")
    assert int8.quantization == "W" and abs(int8.psnr - iln32.psnr) < 0.1
    table = format_lowprec_table(report)
    lines = table.splitlines()
    assert lines[0].startswith("Idx | Backbone") and "Set5 PSNR/SSIM" in lines[0]
    assert len(lines) == 2 + 6 + 1
    assert "LN" in lines[4] and "fp16" in lines[4] and "(100.0%)" in lines[4] and HOT in lines[4]


def test_lowprec_cli(report_inputs: tuple[Path, Path, Path], tmp_path: Path, capsys) -> None:
    ln, iln, root = report_inputs
    out = tmp_path / "report.json"
    args = ["lowprec", "report", str(ln), str(iln), "--data-root", str(root)]
    args += ["--settings", "fp32,bf16", "--json", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "bf16" in printed and "W+F" in printed
    data = json.loads(out.read_text())
    assert [r["setting"] for r in data["rows"]] == ["fp32", "fp32", "bf16", "bf16"]
    assert (
        cli_main(
            ["lowprec", "report", str(ln), str(iln), "--data-root", str(root), "--settings", "fp64"]
        )
        == 2
    )
    assert "unknown settings" in capsys.readouterr().err


def test_guard_cli(report_inputs: tuple[Path, Path, Path], tmp_path: Path, capsys) -> None:
    ln, iln, _ = report_inputs
    (tmp_path / "map.json").write_text(json.dumps({"layers.0": 12.0, "layers.1": 9e4}))
    assert cli_main(["lowprec", "guard", str(ln), "--records", str(tmp_path / "map.json")]) == 1
    out = capsys.readouterr().out
    assert "layers.1" in out and "(overflows)" in out and "layers.0 " not in out
    # Probing the checkpoints themselves on the built-in photos.
    assert cli_main(["lowprec", "guard", str(ln), "--size", "16", "--count", "1"]) == 1
    assert HOT in capsys.readouterr().out
    assert cli_main(["lowprec", "guard", str(iln), "--size", "16", "--count", "1"]) == 0
    assert "fp16 looks safe" in capsys.readouterr().out


def test_lowprec_report_at_several_noise_levels(
    report_inputs: tuple[Path, Path, Path], tmp_path: Path, capsys
) -> None:
    # Denoisers (scale 1) evaluated at two sigmas: one column per level, named by it; the
    # CLI takes the same comma list as eval.
    _, _, root = report_inputs
    ckpts = []
    for norm in ("ln", "iln"):
        torch.manual_seed(0)
        model = build_model("swinir", **{**TINY, "upscale": 1, "upsampler": ""}, norm=norm)
        ckpts.append(tmp_path / f"dn_{norm}.safetensors")
        save_model_weights(ckpts[-1], model.eval())
    report = lowprec_report(
        *ckpts,
        benchmarks=[f"mine={root}/Set5/HR"],
        data_root=None,
        task="dn",
        sigma=[15, 50],
        settings=["fp32"],
    )
    assert report.benchmarks == ("mine sigma15", "mine sigma50")
    noisy, noisier = (
        report.row("LN", "fp32", "mine sigma15"),
        report.row("LN", "fp32", "mine sigma50"),
    )
    assert noisy.psnr != noisier.psnr
    args = [
        "lowprec",
        "report",
        *map(str, ckpts),
        "--bench",
        f"mine={root}/Set5/HR",
        "--task",
        "dn",
    ]
    assert cli_main([*args, "--sigma", "15,50", "--settings", "fp32"]) == 0
    assert "mine sigma50 PSNR/SSIM" in capsys.readouterr().out
    assert cli_main([*args, "--sigma", "15,x"]) == 2
    assert "--sigma '15,x': 'x' is not a number" in capsys.readouterr().err
