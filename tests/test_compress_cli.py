"""``irformer compress run/stats`` end to end on a tiny model and synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from irformer.archs import build_model, save_model_weights
from irformer.cli import main
from irformer.compress.methods import method_config
from irformer.data.degradations import matlab_imresize
from irformer.data.io import write_image
from irformer.experiments.compression import row_method

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    # Smooth random colour fields: something an SR model can be scored on.
    base = rng.random((h // 8 + 1, w // 8 + 1, 3))
    up = np.kron(base, np.ones((8, 8, 1)))[:h, :w]
    return (255 * up).round().astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compress_cli")
    rng = np.random.default_rng(0)
    calib = root / "calib"
    for i in range(3):
        write_image(calib / f"c{i}.png", _image(rng, 48, 48))
    bench = root / "data" / "sr" / "Set5"
    for name in ("baby", "bird"):
        hr = _image(rng, 32, 40)
        write_image(bench / "HR" / f"{name}.png", hr)
        write_image(bench / "LR_bicubic" / "X2" / f"{name}x2.png", matlab_imresize(hr, 0.5))
    torch.manual_seed(0)
    model = build_model("swinir_light_x2", embed_dim=12, depths=(2,), num_heads=(2,))
    ckpt = root / "tiny.safetensors"
    save_model_weights(ckpt, model)
    torch.manual_seed(1)
    iln = build_model("swinir_light_x2", norm="iln", embed_dim=12, depths=(2,), num_heads=(2,))
    ckpt_iln = root / "tiny_iln.safetensors"
    save_model_weights(ckpt_iln, iln)
    return {
        "root": root,
        "calib": calib,
        "data": root / "data",
        "ckpt": ckpt,
        "ckpt_iln": ckpt_iln,
    }


def test_run_writes_tables(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = setup["root"] / "out"
    code = main(
        [
            "compress",
            "run",
            "--model",
            str(setup["ckpt"]),
            "--method",
            "minmax,compsrt",
            "--wbits",
            "8,4",
            "--calib",
            str(setup["calib"]),
            "--calib-batch",
            "2",
            "--patch",
            "16",
            "--dqc-iters",
            "2",
            "--dqc-batch",
            "2",
            "--val-every",
            "1",
            "--prune",
            "0.4",
            "--bench",
            "Set5",
            "--data-root",
            str(setup["data"]),
            "--out",
            str(out),
            "--latency-size",
            "16",
            "--device",
            "cpu",
            "--save-packed",
            "--int8-kernel",
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert [(r["method"], r["wbits"]) for r in rows] == [
        ("fp32", 32),
        ("int8_dynamic", 8),
        ("minmax", 8),
        ("minmax", 4),
        ("compsrt", 8),
        ("compsrt", 4),
    ]
    fp = rows[0]["scores"]["Set5"][0]
    assert 10 < fp < 60
    # W8 stays within 0.1 dB of FP; the pruned W4 model loses more.
    assert abs(rows[1]["scores"]["Set5"][0] - fp) < 0.1
    assert abs(rows[2]["scores"]["Set5"][0] - fp) < 0.1
    assert rows[5]["nominal_bits_per_param"] == pytest.approx(3.4, abs=0.01)
    assert rows[5]["dqc_iters_done"] == 2
    for r in rows[2:]:
        assert r["packed_file_bytes"] > 0 and r["latency_ms"] > 0
        assert r["megabytes"] < rows[0]["megabytes"]
    quality = (out / "quality.md").read_text()
    assert "| compsrt | 4/4 | 0.4 |" in quality and "Set5 PSNR" in quality
    complexity = (out / "complexity.md").read_text()
    assert "bits/param" in complexity and "| packed file MB |" in complexity
    files = sorted((out / "packed" / "tiny_ln").glob("*.safetensors"))
    assert len(files) == 4
    # The packed column is each file's size on disk (the FP/int8 rows have none).
    assert sorted(r["packed_file_bytes"] for r in rows[2:]) == sorted(
        f.stat().st_size for f in files
    )
    w4 = next(line for line in complexity.splitlines() if "| compsrt | 4/4 |" in line)
    assert f"| {rows[5]['packed_file_bytes'] / 1e6:.4f} |" in w4
    assert "| fp32 | 32/32 | 0 |" in complexity and "| 32.00 | - |" in complexity
    assert "compsrt W4A4" in capsys.readouterr().out
    assert {r["model"] for r in rows} == {"tiny (ln)"}


def test_run_two_models_share_tables(setup: dict[str, Path]) -> None:
    out = setup["root"] / "two"
    args = ["compress", "run", "--model", f"{setup['ckpt']},{setup['ckpt_iln']}"]
    args += ["--method", "minmax", "--wbits", "4", "--calib", str(setup["calib"])]
    args += ["--calib-batch", "2", "--patch", "16", "--bench", "Set5"]
    args += ["--data-root", str(setup["data"]), "--out", str(out), "--latency-size", "16"]
    assert main([*args, "--device", "cpu"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [
        ("tiny (ln)", "fp32"),
        ("tiny (ln)", "minmax"),
        ("tiny_iln (iln)", "fp32"),
        ("tiny_iln (iln)", "minmax"),
    ]
    drop = (out / "psnr_drop.md").read_text()
    assert "tiny (ln) Set5 dPSNR" in drop and "tiny_iln (iln) Set5 dPSNR" in drop
    ln_drop = rows[1]["scores"]["Set5"][0] - rows[0]["scores"]["Set5"][0]
    assert f"{ln_drop:+.2f}" in drop.splitlines()[2]


def test_report_merges_parallel_runs(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """One run per model (e.g. two processes), merged: the same tables as one joint run."""
    base = ["compress", "run", "--method", "minmax", "--wbits", "4", "--calib", str(setup["calib"])]
    base += ["--calib-batch", "2", "--patch", "16", "--bench", "Set5", "--device", "cpu"]
    base += ["--data-root", str(setup["data"]), "--latency-size", "16"]
    runs = []
    for key in ("ckpt", "ckpt_iln"):
        runs.append(setup["root"] / f"part_{key}")
        assert main([*base, "--model", str(setup[key]), "--out", str(runs[-1])]) == 0
    lines = (runs[0] / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == ["fp32", "minmax"]
    merged = setup["root"] / "merged"
    capsys.readouterr()
    assert main(["compress", "report", *map(str, runs), "--out", str(merged)]) == 0
    drop = (merged / "psnr_drop.md").read_text()
    assert "tiny (ln) Set5 dPSNR" in drop and "tiny_iln (iln) Set5 dPSNR" in drop
    rows = [json.loads(line) for line in (merged / "rows.jsonl").read_text().splitlines()]
    ln_drop = rows[1]["scores"]["Set5"][0] - rows[0]["scores"]["Set5"][0]
    assert f"{ln_drop:+.2f}" in drop.splitlines()[2]
    assert "| minmax | 4/4 | 0 |" in capsys.readouterr().out
    # The same run twice is a mistake, not a silently doubled table; a second run of
    # other methods on the same model shares its (identical) FP row.
    assert main(["compress", "report", str(runs[0]), str(runs[0]), "--out", str(merged)]) != 0
    assert "also in" in capsys.readouterr().err
    other = setup["root"] / "part_dquant"
    args = [*base, "--model", str(setup["ckpt"]), "--out", str(other), "--method", "dquant2d"]
    assert main([*args, "--dqc-iters", "0", "--latency-repeats", "0"]) == 0
    assert main(["compress", "report", str(runs[0]), str(other), "--out", str(merged)]) == 0
    rows = [json.loads(line) for line in (merged / "rows.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["fp32", "minmax", "dquant2d"]
    # The shared FP row keeps a latency whichever run timed it comes first.
    assert main(["compress", "report", str(other), str(runs[0]), "--out", str(merged)]) == 0
    rows = [json.loads(line) for line in (merged / "rows.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["fp32", "dquant2d", "minmax"]
    assert rows[0]["latency_ms"] > 0
    assert main(["compress", "report", str(setup["root"]), "--out", str(merged)]) != 0
    assert "rows.jsonl does not exist" in capsys.readouterr().err


def test_stats(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = setup["root"] / "stats"
    code = main(
        [
            "compress",
            "stats",
            str(setup["ckpt"]),
            "--calib",
            str(setup["calib"]),
            "--calib-batch",
            "2",
            "--patch",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "stats.json").read_text())
    assert len([p for p in data["pairs"] if p["kind"] == "weight"]) == 12
    assert len([p for p in data["pairs"] if p["kind"] == "activation"]) == 16
    assert "range_reduction" in capsys.readouterr().out


def test_bad_arguments(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    base = ["compress", "run", "--model", str(setup["ckpt"]), "--calib", str(setup["calib"])]
    base += ["--data-root", str(setup["data"]), "--out", str(setup["root"] / "bad")]
    assert main([*base, "--method", "gptq"]) == 2
    assert "unknown method 'gptq'" in capsys.readouterr().err
    assert main([*base, "--wbits", "4,3", "--abits", "4,3,2"]) == 2
    assert "different numbers" in capsys.readouterr().err


def test_per_width_dqc_lr(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """--dqc-lr W=LR sets each weight width's learning rate; unnamed widths keep 1e-2."""
    base = ["compress", "run", "--model", str(setup["ckpt"]), "--calib", str(setup["calib"])]
    base += ["--data-root", str(setup["data"]), "--bench", "Set5", "--device", "cpu"]
    base += ["--calib-batch", "2", "--patch", "16", "--dqc-iters", "0", "--dqc-batch", "2"]
    base += ["--latency-repeats", "0", "--method", "2dquant,compsrt", "--wbits", "3,2"]
    out = setup["root"] / "lr"
    assert main([*base, "--dqc-lr", "3=3e-3", "--dqc-scalar-lr", "1e-3", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    lrs = {
        (r["method"], r["wbits"]): (r["config"]["dqc_lr"], r["config"]["dqc_scalar_lr"])
        for r in rows
        if r["method"] != "fp32"
    }
    assert lrs == {
        ("dquant2d", 3): (3e-3, None),
        ("dquant2d", 2): (1e-2, None),
        ("compsrt", 3): (3e-3, 1e-3),
        ("compsrt", 2): (1e-2, 1e-3),
    }
    assert main([*base, "--dqc-lr", "3:1e-3", "--out", str(out / "bad")]) == 2
    assert "--dqc-lr '3:1e-3': expected a number or W=LR pairs" in capsys.readouterr().err


def test_official_compatible_modes(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """--prune-mode/--qkv-inputs: rows name the deviation, channel pruning packs."""
    out = setup["root"] / "modes"
    base = ["compress", "run", "--model", str(setup["ckpt"]), "--calib", str(setup["calib"])]
    base += ["--data-root", str(setup["data"]), "--bench", "Set5", "--device", "cpu"]
    base += ["--calib-batch", "2", "--patch", "16", "--dqc-iters", "0", "--dqc-batch", "2"]
    base += ["--latency-size", "16", "--method", "compsrt", "--wbits", "2", "--prune", "0.4"]
    code = main(
        [
            *base,
            "--prune-mode",
            "channel",
            "--qkv-inputs",
            "split",
            "--dqc-loss",
            "official",
            "--save-packed",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[1]["method"] == "compsrt (channel pruning, split qkv inputs)"
    assert rows[1]["config"]["prune_mode"] == "channel" and rows[1]["packed_file_bytes"] > 0
    # Without distillation the loss scaling changes nothing, so the name leaves it out.
    assert rows[1]["config"]["dqc_loss"] == "official"
    distilled = method_config("compsrt", wbits=2, abits=2, dqc_iters=5, dqc_loss="official")
    assert row_method(distilled) == "compsrt (official DQC loss)"
    assert (
        "| compsrt (channel pruning, split qkv inputs) | 2/2 | 0.4 |"
        in (out / "quality.md").read_text()
    )
    bad = [*base, "--prune-mode", "official", "--save-packed", "--out", str(out / "bad")]
    assert main(bad) == 2
    assert "'official' cannot be saved packed" in capsys.readouterr().err


def test_sensitivity(setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = setup["root"] / "sens"
    args = ["compress", "sensitivity", "--model", str(setup["ckpt_iln"])]
    args += ["--calib", str(setup["calib"]), "--calib-batch", "2", "--patch", "16"]
    args += ["--data-root", str(setup["data"]), "--device", "cpu"]
    assert main([*args, "--method", "minmax,dquant2d"]) == 2
    assert "one method and one bit width" in capsys.readouterr().err
    assert main([*args, "--method", "minmax", "--wbits", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "minmax W2A2, Set5 PSNR" in text and "| layers.0 |" in text
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["config"]["method"] == "minmax" and data["config"]["wbits"] == 2
    assert data["meta"]["norm"] == "iln"
    groups = {g["group"]: g for g in data["groups"]}
    assert {"W qkv", "A post-softmax", "layers.0"} <= set(groups)
    # One residual group holds every quantiser: alone it reproduces the quantised score.
    assert groups["layers.0"]["only_this_quantized"] == pytest.approx(data["quantized"])
    assert groups["layers.0"]["only_this_fp"] == pytest.approx(data["fp"], abs=1e-3)
    assert len(data["activations"]) == 16  # (4 Linear inputs + 4 attention operands) x 2 blocks
    assert (out / "sensitivity.md").read_text() == text.rstrip("\n") + "\n"


def test_budget_curve_from_one_run_and_resume(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--dqc-iters 0,2,4`` runs 4 iterations once, scoring at 0, 2 and 4 (budget.md
    with drift); a run killed after some rows resumes with ``--resume`` and measures
    only what is missing, with the same numbers as an uninterrupted run, and refuses to
    resume under other settings."""
    base = ["compress", "run", "--model", str(setup["ckpt"]), "--method", "2dquant,compsrt"]
    base += ["--wbits", "3", "--calib", str(setup["calib"]), "--calib-batch", "2"]
    base += ["--patch", "16", "--dqc-patch", "8", "--dqc-batch", "2", "--val-every", "2"]
    base += ["--dqc-iters", "0,2,4", "--dqc-lr", "0.05", "--bench", "Set5", "--device", "cpu"]
    base += ["--data-root", str(setup["data"]), "--latency-repeats", "0"]
    whole = setup["root"] / "budget"
    assert main([*base, "--out", str(whole)]) == 0
    rows = [json.loads(line) for line in (whole / "rows.jsonl").read_text().splitlines()]
    curve = [r for r in rows if r["dqc_checkpoint"] is not None]
    assert {(r["method"], r["dqc_checkpoint"]) for r in curve if r["dqc_kept"]} == {
        (m, k) for m in ("dquant2d", "compsrt") for k in (0, 2, 4)
    }
    for r in curve:
        assert r["dqc_iters_done"] == r["dqc_checkpoint"] and r["dqc_val_loss"] > 0
        assert r["dqc_best_step"] <= r["dqc_checkpoint"]
        assert r["dqc_kept"] or r["dqc_best_step"] == r["dqc_checkpoint"]
    zero = next(r for r in curve if r["dqc_checkpoint"] == 0 and r["method"] == "compsrt")
    assert zero["drift"]["a_alpha_max"] == 0.0
    last = [r for r in curve if r["dqc_checkpoint"] == 4 and r["method"] == "compsrt"]
    assert max(r["drift"]["a_upper_shift_mean"] for r in last) > 0
    budget = (whole / "budget.md").read_text()
    assert "| 0 it | 2 it | 4 it |" in budget and "A |alpha|" in budget
    # The quality table holds each configuration once: its final kept row.
    assert (whole / "quality.md").read_text().count("| compsrt | 3/3 |") == 1
    assert "DQC 2 it (bounds of" in capsys.readouterr().out

    # Killed after the FP row and 2DQuant's first two checkpoints: resume fills the rest.
    part = setup["root"] / "budget_resumed"
    part.mkdir()
    keep = [
        line
        for line in (whole / "rows.jsonl").read_text().splitlines()
        if json.loads(line)["method"] == "fp32"
        or (json.loads(line)["method"] == "dquant2d" and json.loads(line)["dqc_checkpoint"] < 4)
    ]
    (part / "rows.jsonl").write_text("\n".join(keep) + '\n{"model": "trunc')
    assert main([*base, "--out", str(part), "--resume"]) == 0
    measured = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny")]
    assert not any("fp32" in line for line in measured)
    assert [line for line in measured if "dquant2d" in line] == [
        line for line in measured if "dquant2d" in line and "DQC 4 it" in line
    ]
    resumed = [json.loads(line) for line in (part / "rows.jsonl").read_text().splitlines()]
    assert sorted(json.dumps(r["scores"]) for r in resumed) == sorted(
        json.dumps(r["scores"]) for r in rows
    )
    assert (part / "dqc_state").is_dir()
    # Resuming under another learning rate would mix two protocols in one folder: refused,
    # naming the row and the setting, and the folder is left as it was.
    before = (part / "rows.jsonl").read_text()
    lr = base.index("--dqc-lr") + 1
    other = [*base[:lr], "0.01", *base[lr + 1 :]]
    assert main([*other, "--out", str(part), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "dquant2d W3A3 row was measured with other settings (dqc_lr 0.05 -> 0.01)" in err
    assert (part / "rows.jsonl").read_text() == before


def test_paper_benchmarks_and_significance(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--bench paper`` scores every CompSRT test set present (synthetic Urban100 and
    Manga109 here; Manga109 absent from the second root), and ``compress significance``
    tests CompSRT against the best baseline over those datasets from the rows."""
    rng = np.random.default_rng(3)
    roots = {"all": setup["root"] / "paper_all", "no_manga": setup["root"] / "paper_some"}
    for key, root in roots.items():
        names = ["Set5", "Set14", "B100", "Urban100", "Manga109"]
        for name in names[:4] if key == "no_manga" else names:
            for i in range(2):
                hr = _image(rng, 32, 40)
                write_image(root / "sr" / name / "HR" / f"im{i}.png", hr)
                lr = matlab_imresize(hr, 0.5)
                write_image(root / "sr" / name / "LR_bicubic" / "X2" / f"im{i}x2.png", lr)
    base = ["compress", "run", "--model", str(setup["ckpt"]), "--calib", str(setup["calib"])]
    base += ["--calib-batch", "2", "--patch", "16", "--dqc-iters", "0", "--bench", "paper"]
    base += ["--device", "cpu", "--latency-repeats", "0", "--caption", "Protocol: test (DQC 0 it)."]
    runs = {key: setup["root"] / f"run_{key}" for key in roots}
    only = {
        "all": ["--method", "minmax,compsrt", "--wbits", "4,3"],
        "no_manga": ["--method", "minmax"],
    }
    for key, root in roots.items():
        assert main([*base, *only[key], "--data-root", str(root), "--out", str(runs[key])]) == 0
    rows = [json.loads(line) for line in (runs["all"] / "rows.jsonl").read_text().splitlines()]
    assert list(rows[0]["scores"]) == ["Set5", "Set14", "B100", "Urban100", "Manga109"]
    some = [json.loads(line) for line in (runs["no_manga"] / "rows.jsonl").read_text().splitlines()]
    assert list(some[0]["scores"]) == ["Set5", "Set14", "B100", "Urban100"]
    assert (runs["all"] / "quality.md").read_text().startswith("Protocol: test (DQC 0 it).\n")
    capsys.readouterr()
    out = setup["root"] / "significance.md"
    assert main(["compress", "significance", str(runs["all"]), "--out", str(out)]) == 0
    table = out.read_text()
    assert table == capsys.readouterr().out.rstrip("\n") + "\n"
    lines = [line for line in table.splitlines() if line.startswith("| tiny")]
    assert len(lines) == 2  # W4A4 and W3A3
    assert "Set5, Set14, B100, Urban100, Manga109" in lines[0]
    assert main(["compress", "significance", str(runs["all"]), "--baselines", "ptq4vit"]) != 0
    assert "has both compsrt and one of" in capsys.readouterr().err


def test_significance_statistics() -> None:
    """The best baseline is chosen by mean PSNR; five positive differences give the
    smallest one-sided p, 2^-5; d_z is mean / sd of the differences."""
    from irformer.experiments.compression import CompressionRow, significance

    sets = ["A", "B", "C", "D", "E"]

    def row(method: str, psnr: list[float]) -> CompressionRow:
        return CompressionRow(
            model="m",
            method=method,
            wbits=2,
            abits=2,
            prune=0.0,
            scores={s: (p, p / 100) for s, p in zip(sets, psnr, strict=True)},
            megabytes=1.0,
            bits_per_param=2.0,
            nominal_bits_per_param=2.0,
            latency_ms=1.0,
            seconds_to_quantize=0.0,
        )

    ours = [30.5, 28.4, 27.3, 25.9, 29.8]
    rows = [
        row("minmax", [20.0] * 5),
        row("dquant2d", [30.0, 28.0, 27.0, 25.0, 29.0]),
        row("compsrt", ours),
    ]
    (test,) = significance(rows)
    assert test.baseline == "dquant2d" and test.benchmarks == tuple(sets)
    d = np.array(ours) - np.array([30.0, 28.0, 27.0, 25.0, 29.0])
    assert test.psnr.p_value == pytest.approx(1 / 32)
    assert test.psnr.cohen_dz == pytest.approx(d.mean() / d.std(ddof=1))
    assert test.ssim.mean_diff == pytest.approx(d.mean() / 100)
