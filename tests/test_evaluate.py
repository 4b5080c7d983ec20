"""Benchmark evaluation: bicubic baseline numbers, outputs, errors and the eval CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from irformer.cli import main
from irformer.data.io import OutputExistsError, read_image, write_image
from irformer.engine.evaluate import (
    BicubicModel,
    evaluate,
    load_model_for_eval,
    resolve_device,
    write_results_csv,
    write_results_json,
)
from irformer.metrics import compute_metrics


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / (5 + seed)) * np.cos(yy / 7)
    img = base[..., None] + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def flat_root(tmp_path: Path) -> Path:
    """A flat data root: Set5/HR (LR made on the fly), CBSD68, classic5 (grey)."""
    root = tmp_path / "data"
    for i, name in enumerate(("a", "b")):
        write_image(root / "Set5" / "HR" / f"{name}.png", _smooth(48, 40 + 4 * i, i))
        write_image(root / "CBSD68" / f"{name}.png", _smooth(32, 36, 10 + i))
        write_image(root / "classic5" / f"{name}.png", _smooth(32, 32, 20 + i)[..., :1])
    return root


class Identity3(nn.Module):
    """A 3-channel 'restorer' that returns its input (declares in_chans like the archs)."""

    in_chans = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        nn.init.dirac_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# Measured with this code (Set5, the standard LR_bicubic files, uint8 outputs,
# Y channel, crop = scale): x2 33.6780 dB / 0.93042, x4 28.4305 dB / 0.81126.
MEASURED = {2: (33.6780, 0.93042), 4: (28.4305, 0.81126)}
LITERATURE = {2: (33.66, 0.9299), 4: (28.42, 0.8104)}


@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_set5_matches_literature(shared_data: Path, scale: int) -> None:
    """``irformer eval --model bicubic`` on Set5 against the published Bicubic row.

    The published row (SRCNN/VDSR era) resized the rounded Y channel in double
    without quantising the LR; evaluating on the distributed RGB uint8 LR files
    with today's protocol (BasicSR/MATLAB: bicubic-upscale RGB, round to uint8,
    float Y, crop = scale) lands 0.018 dB / 0.0005 above at x2 and 0.011 dB /
    0.0009 above at x4. tests/test_metrics.py reproduces the published
    protocol exactly (33.66/0.9299, 30.39/0.8682, 28.42/0.8104).
    """
    result = evaluate("bicubic", task="sr", scale=scale, benchmarks=["Set5"], data_root=shared_data)
    set5 = result["Set5"]
    assert set5.num_images == 5
    assert [r.name for r in set5.images] == ["baby", "bird", "butterfly", "head", "woman"]
    lit_psnr, lit_ssim = LITERATURE[scale]
    assert abs(set5.psnr - lit_psnr) <= 0.02
    assert abs(set5.ssim - lit_ssim) <= 0.001
    got_psnr, got_ssim = MEASURED[scale]
    assert set5.psnr == pytest.approx(got_psnr, abs=1e-4)
    assert set5.ssim == pytest.approx(got_ssim, abs=1e-5)


def test_jpeg_classic5_input_matches_literature(shared_data: Path) -> None:
    # The "JPEG" row of CAR tables (ARCNN, DnCNN, SwinIR): classic5 at q10 scores
    # 27.82 dB / 0.7595 (greyscale, no crop). The identity model scores the JPEG input.
    result = evaluate(
        "bicubic", task="car", quality=10, benchmarks=["classic5"], data_root=shared_data
    )
    assert result["classic5"].psnr == pytest.approx(27.82, abs=0.005)
    assert result["classic5"].ssim == pytest.approx(0.7595, abs=0.0005)


def test_outputs_csv_json_and_saved_images(flat_root: Path, tmp_path: Path) -> None:
    save = tmp_path / "out"
    result = evaluate(
        TinyConv(),
        task="dn",
        sigma=15,
        benchmarks=["CBSD68"],
        data_root=flat_root,
        save_dir=save,
        model_name="tiny",
    )
    bench = result["CBSD68"]
    assert bench.num_images == 2 and result.sigma == 15 and result.scale == 1
    saved = read_image(save / "CBSD68" / "a.png")
    gt = read_image(flat_root / "CBSD68" / "a.png")
    m = compute_metrics(saved, gt, task="dn")
    assert m["psnr"] == pytest.approx(bench.images[0].psnr, abs=1e-12)
    assert bench.psnr == pytest.approx(np.mean([r.psnr for r in bench.images]), abs=1e-12)
    assert 20 < bench.psnr < 30  # sigma 15 noise: ~24.6 dB

    csv_path = write_results_csv(result, tmp_path / "r" / "per_image.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["name"] for r in rows] == ["a", "b"]
    assert float(rows[0]["psnr"]) == bench.images[0].psnr  # full precision
    assert rows[0]["sigma"] == "15" and rows[0]["model"] == "tiny"
    js = json.loads(write_results_json(result, tmp_path / "r" / "all.json").read_text())
    assert js["benchmarks"][0]["num_images"] == 2
    assert js["benchmarks"][0]["images"][1]["name"] == "b"
    with pytest.raises(OutputExistsError):
        write_results_csv(result, csv_path)
    with pytest.raises(OutputExistsError, match=r"a\.png"):  # saved outputs are not replaced
        evaluate(
            TinyConv(), task="dn", sigma=15, benchmarks=["CBSD68"], data_root=flat_root,
            save_dir=save,
        )  # fmt: skip


def test_inputs_are_never_overwritten(flat_root: Path) -> None:
    # Saving into the data root itself would put outputs on the inputs' paths.
    before = (flat_root / "CBSD68" / "a.png").read_bytes()
    with pytest.raises(OutputExistsError, match="input file"):
        evaluate(
            Identity3(), task="dn", sigma=25, benchmarks=["CBSD68"], data_root=flat_root,
            save_dir=flat_root, overwrite=True,
        )  # fmt: skip
    assert (flat_root / "CBSD68" / "a.png").read_bytes() == before


def test_evaluation_is_deterministic(flat_root: Path) -> None:
    kw = {"task": "dn", "sigma": 50, "benchmarks": ["CBSD68"], "data_root": flat_root}
    a = evaluate(Identity3(), **kw)["CBSD68"]
    b = evaluate(Identity3(), **kw)["CBSD68"]
    c = evaluate(Identity3(), seed=1, **kw)["CBSD68"]
    assert [r.psnr for r in a.images] == [r.psnr for r in b.images]
    assert [r.psnr for r in a.images] != [r.psnr for r in c.images]


def test_sr_on_the_fly_and_bicubic_identity(flat_root: Path) -> None:
    result = evaluate("bicubic", task="sr", scale=4, benchmarks=["Set5"], data_root=flat_root)
    assert result["Set5"].num_images == 2 and 20 < result["Set5"].psnr < 40
    model = BicubicModel(1)
    x = torch.rand(1, 3, 5, 6)
    assert model(x) is x
    assert BicubicModel(3)(x).shape == (1, 3, 15, 18)


def test_grey_set_with_colour_model(flat_root: Path) -> None:
    result = evaluate(
        Identity3(), task="car", quality=20, benchmarks=["classic5"], data_root=flat_root
    )
    direct = evaluate(
        "bicubic", task="car", quality=20, benchmarks=["classic5"], data_root=flat_root
    )
    # Grey -> 3 equal channels -> identity -> channel mean: exactly the 1-channel result.
    assert [r.psnr for r in result["classic5"].images] == [
        r.psnr for r in direct["classic5"].images
    ]


def test_precision_bf16_runs_close_to_fp32(flat_root: Path) -> None:
    kw = {"task": "dn", "sigma": 25, "benchmarks": ["CBSD68"], "data_root": flat_root}
    fp32 = evaluate(TinyConv(), **kw)["CBSD68"].psnr
    bf16 = evaluate(TinyConv(), precision="bf16", **kw)["CBSD68"].psnr
    assert abs(fp32 - bf16) < 0.2
    with pytest.raises(ValueError, match="precision"):
        evaluate(TinyConv(), precision="fp8", **kw)  # type: ignore[arg-type]


def test_model_errors(flat_root: Path, tmp_path: Path) -> None:
    class Shrinks(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[..., :-1, :]

    with pytest.raises(ValueError, match="does not match the ground truth"):
        evaluate(Shrinks(), task="dn", sigma=5, benchmarks=["CBSD68"], data_root=flat_root)
    wrong = BicubicModel(2)
    with pytest.raises(ValueError, match="upscales by 2"):
        evaluate(wrong, task="sr", scale=4, benchmarks=["Set5"], data_root=flat_root)
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth"):
        load_model_for_eval(tmp_path / "nothing.pth")
    with pytest.raises(ValueError, match="unknown task"):
        evaluate("bicubic", task="deblur", benchmarks=["Set5"], data_root=flat_root)
    with pytest.raises(FileNotFoundError, match="Set14 not found"):
        evaluate("bicubic", task="sr", scale=2, benchmarks=["Set14"], data_root=flat_root)


def test_checkpoint_loading_goes_through_the_registry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    seen = {}

    def load_checkpoint_model(path: Path, **kwargs: object) -> tuple[nn.Module, dict]:
        seen["path"] = path
        return TinyConv(), {"arch": "tiny"}

    import irformer.archs.zoo as zoo

    monkeypatch.setattr(zoo, "load_checkpoint_model", load_checkpoint_model)
    model = load_model_for_eval(ckpt)
    assert isinstance(model, TinyConv) and seen["path"] == ckpt
    assert isinstance(load_model_for_eval("bicubic", scale=3), BicubicModel)
    module = TinyConv()
    assert load_model_for_eval(module) is module


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


# ---------------------------------------------------------------- CLI


def test_cli_prints_the_paper_table_and_writes_files(
    flat_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_csv, out_json = tmp_path / "res.csv", tmp_path / "res.json"
    argv = ["eval", "--model", "bicubic", "--task", "sr", "--scale", "4", "--bench", "set5"]
    argv += ["--data-root", str(flat_root), "--out-csv", str(out_csv)]
    argv += ["--out-json", str(out_json), "--no-progress"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["Method", "Scale", "Set5"]
    assert lines[1].split() == ["PSNR", "SSIM"]
    cells = lines[2].split()
    assert cells[:2] == ["bicubic", "x4"]
    expected = evaluate("bicubic", task="sr", scale=4, benchmarks=["Set5"], data_root=flat_root)
    assert cells[2] == f"{expected['Set5'].psnr:.2f}" and cells[3] == f"{expected['Set5'].ssim:.4f}"
    assert len(list(csv.DictReader(out_csv.open()))) == 2
    assert json.loads(out_json.read_text())["task"] == "sr"
    assert main(argv) == 2  # outputs exist: refused before evaluating
    assert "output exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_cli_errors_and_defaults(
    flat_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["eval", "--model", "bicubic", "--data-root", str(flat_root), "--no-progress"]
    assert main([*base, "--task", "sr"]) == 2
    assert "needs --scale" in capsys.readouterr().err
    assert main([*base, "--task", "dn"]) == 2
    assert "needs --sigma" in capsys.readouterr().err
    assert main([*base, "--task", "car", "--quality", "30", "--bench", "Set99"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    # Default data root ../shared/data (relative to the cwd); default sets: those present.
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(flat_root)
    monkeypatch.chdir(work)
    assert (
        main(["eval", "--model", "bicubic", "--task", "dn", "--sigma", "25", "--no-progress"]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["Method", "Sigma", "CBSD68"]
    assert out[2].split()[:3] == ["noisy", "input", "25"]  # the baseline's name, not "bicubic"
    assert len(out[2].split()[3].split(".")[1]) == 3  # DN PSNR printed to 3 decimals
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "bicubic", "--task", "dn", "--sigma", "25"]) == 2
    assert "--data-root is required" in capsys.readouterr().err


def test_real_checkpoint_through_registry_and_cli(
    flat_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # End to end: a tiny SwinIR saved by the registry, evaluated by path.
    import irformer.archs as registry

    torch.manual_seed(0)
    model = registry.build_model(
        "swinir_light_x2", embed_dim=12, depths=(1,), num_heads=(2,), window_size=4
    )
    ckpt = registry.save_model_weights(tmp_path / "tiny.safetensors", model)
    loaded = load_model_for_eval(ckpt)
    assert type(loaded) is type(model)
    direct = evaluate(model, task="sr", scale=2, benchmarks=["Set5"], data_root=flat_root)
    argv = ["eval", "--model", str(ckpt), "--task", "sr", "--scale", "2", "--bench", "Set5"]
    assert main([*argv, "--data-root", str(flat_root), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:2] == ["bicubic", "x2"]  # the baseline row comes first
    row = lines[3].split()
    assert row[:2] == ["tiny", "x2"]
    assert row[2] == f"{direct['Set5'].psnr:.2f}"
    assert main([*argv, "--scale", "4", "--data-root", str(flat_root), "--no-progress"]) == 2
    assert "is an x2 model" in capsys.readouterr().err
    # Task and scale default to the checkpoint's metadata.
    short = ["eval", "--model", str(ckpt), "--bench", "Set5", "--data-root", str(flat_root)]
    assert main([*short, "--no-progress", "--no-baseline"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:3] == row[:3]
    assert main([*short, "--task", "dn", "--sigma", "15"]) == 2
    assert "is a sr model" in capsys.readouterr().err


def test_cli_several_levels_with_the_input_as_baseline(
    flat_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A tiny scale-1 SwinIR_1 (the dn/car reference architecture), one block per level.
    import irformer.archs as registry

    torch.manual_seed(0)
    tiny = {"embed_dim": 12, "depths": (1,), "num_heads": (2,), "window_size": 4}
    ckpt = registry.save_model_weights(
        tmp_path / "tiny_dn.safetensors", registry.build_model("swinir_1_dn", **tiny)
    )
    out_json = tmp_path / "dn.json"
    argv = [
        "eval",
        "--model",
        str(ckpt),
        "--task",
        "dn",
        "--sigma",
        "15,50",
        "--bench",
        "cbsd68[:1]",
    ]
    argv += ["--data-root", str(flat_root), "--out-json", str(out_json), "--no-progress"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["Method", "Sigma", "CBSD68[:1]"]  # a subset keeps its label
    assert [line.split()[:-2] for line in lines[2:6]] == [
        ["noisy", "input", "15"],
        ["tiny_dn", "15"],
        ["noisy", "input", "50"],
        ["tiny_dn", "50"],
    ]
    records = json.loads(out_json.read_text())
    assert [(r["model"], r["sigma"]) for r in records] == [
        ("noisy input", 15.0),
        ("tiny_dn", 15.0),
        ("noisy input", 50.0),
        ("tiny_dn", 50.0),
    ]
    noisy15, noisy50 = records[0]["benchmarks"][0]["psnr"], records[2]["benchmarks"][0]["psnr"]
    assert noisy15 > noisy50 + 5  # the baseline really is the input at each level
    direct = evaluate(Identity3(), task="dn", sigma=50, benchmarks=["CBSD68"], data_root=flat_root)
    assert noisy50 == pytest.approx(direct["CBSD68"].images[0].psnr)
    # JPEG: grey classic5 through a colour model (replicated in, channel mean out).
    car = registry.save_model_weights(
        tmp_path / "tiny_car.safetensors", registry.build_model("swinir_1_car", **tiny)
    )
    argv = ["eval", "--model", str(car), "--task", "car", "--quality", "10,40"]
    argv += ["--bench", "classic5", "--data-root", str(flat_root), "--no-progress"]
    assert main(argv) == 0
    rows = [line.split()[:-2] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [
        ["JPEG", "input", "10"],
        ["tiny_car", "10"],
        ["JPEG", "input", "40"],
        ["tiny_car", "40"],
    ]
    assert main([*argv[:6], "10,abc", *argv[7:]]) == 2
    assert "--quality '10,abc': 'abc' is not an integer" in capsys.readouterr().err


def test_cli_resume_takes_saved_sets_and_finishes(
    flat_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--resume: the JSON is saved after every set; an interrupted run started again
    measures only what is missing and ends with the uninterrupted run's record."""
    import irformer.archs as registry
    import irformer.engine.evaluate as ev

    torch.manual_seed(0)
    tiny = {"embed_dim": 12, "depths": (1,), "num_heads": (2,), "window_size": 4}
    ckpt = registry.save_model_weights(
        tmp_path / "tiny_dn.safetensors", registry.build_model("swinir_1_dn", **tiny)
    )
    write_image(flat_root / "Kodak24" / "k.png", _smooth(24, 28, 30))
    argv = ["eval", "--model", str(ckpt), "--task", "dn", "--sigma", "15,50"]
    argv += ["--bench", "CBSD68,Kodak24", "--data-root", str(flat_root), "--no-progress"]
    full = tmp_path / "full.json"
    assert main([*argv, "--out-json", str(full)]) == 0

    real = ev.evaluate_benchmark
    calls: list[tuple[str, float | None]] = []

    def flaky(model: nn.Module, bench: ev.Benchmark, **kw: object) -> ev.BenchmarkResult:
        calls.append((bench.name, bench.sigma))
        if len(calls) == 8:  # the model at sigma 50 on Kodak24 (baselines count): interrupted
            raise KeyboardInterrupt
        return real(model, bench, **kw)

    monkeypatch.setattr(ev, "evaluate_benchmark", flaky)
    part = tmp_path / "part.json"
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out-json", str(part), "--resume"])
    saved = json.loads(part.read_text())
    assert [(r["model"], r["sigma"], len(r["benchmarks"])) for r in saved] == [
        ("noisy input", 15.0, 2),
        ("tiny_dn", 15.0, 2),
        ("noisy input", 50.0, 2),
        ("tiny_dn", 50.0, 1),
    ]
    calls.clear()
    assert main([*argv, "--out-json", str(part), "--resume"]) == 0
    assert calls == [("Kodak24", 50.0)]  # only the missing set ran
    strip = lambda rs: [  # noqa: E731
        [(b["benchmark"], b["psnr"], b["ssim"]) for b in r["benchmarks"]] for r in rs
    ]
    assert strip(json.loads(part.read_text())) == strip(json.loads(full.read_text()))
    # Without --out-json there is nothing to resume from; without --resume nothing is overwritten.
    assert main([*argv, "--resume"]) == 2
    assert main([*argv, "--out-json", str(part)]) == 2
