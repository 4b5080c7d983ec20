"""Norm and scale studies end to end: tiny SwinIR, a few iterations, synthetic images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from irformer.analysis.probes import read_feature_records
from irformer.engine.config import config_from_dict
from irformer.experiments.norm_study import (
    RunResult,
    entropy_reading,
    norm_variants,
    run_study,
    scale_variants,
    write_study_report,
)

ITERS = 4


def _write_images(folder: Path, count: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        # smooth gradients + texture so that SR has something to learn
        base = np.stack([(xx * (i + 1) + yy) % 256, (yy * 2 + i * 30) % 256, xx], -1)
        noise = rng.integers(0, 40, size=(size, size, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    _write_images(root / "train", 4, 40, 0)
    _write_images(root / "sr" / "Set5" / "HR", 2, 24, 1)
    return root


def _base(data_root: Path, out: Path):
    return config_from_dict(
        {
            "name": "tiny",
            "model": {
                "arch": "swinir",
                "scale": 2,
                "overrides": {
                    "embed_dim": 8,
                    "depths": [2],
                    "num_heads": [2],
                    "window_size": 4,
                    "img_size": 8,
                    "mlp_ratio": 2.0,
                    "upsampler": "pixelshuffledirect",
                },
            },
            "data": {
                "train": [str(data_root / "train")],
                "patch_size": 16,
                "batch_size": 2,
                "workers": 0,
            },
            "train": {"iters": 100, "lr": 1e-3, "seed": 3},
            "val": {"root": str(data_root), "benchmarks": ["Set5"]},
            "log": {"out_dir": str(out / "unused"), "every": 1},
        }
    )


def test_norm_study_end_to_end(data_root, tmp_path) -> None:
    out = tmp_path / "study"
    runs = norm_variants(
        _base(data_root, tmp_path),
        ["ln", "bn", "iln"],
        iters=ITERS,
        out_dir=out,
        probe_interval=2,
    )
    assert [r.label for r in runs] == ["ln", "bn", "iln"]
    assert runs[1].config.model.norm == "bn" and runs[1].config.train.ema == 0.0
    results = run_study(runs, out_dir=out, benchmarks=["Set5"], probe_count=2)
    for r in results:
        assert not r.diverged and r.iters_done == ITERS
        assert 5.0 < r.metrics["Set5/psnr"] < 60.0 and 0 < r.metrics["Set5/ssim"] <= 1
        assert r.max_sq_mean >= r.final_sq_mean > 0
        assert 0 < r.final_entropy <= math.log(8) + 1e-6
        assert 0 < r.final_balance_entropy <= math.log(8) + 1e-6
        assert r.probe_calls == 1 + ITERS // 2  # iteration 0 + every 2nd
        assert 0 < r.probe_overhead < 1
        records = read_feature_records(out / r.label)
        assert sorted({rec["iter"] for rec in records}) == [0, 2, 4]
        # one RSTB group + its two Swin blocks per probe
        assert len(records) == 3 * 3
    bn = results[1]
    assert bn.metrics_batch_stats is not None and results[0].metrics_batch_stats is None
    assert bn.metrics_batch_stats["Set5/psnr"] != bn.metrics["Set5/psnr"]

    paths = write_study_report(
        results, out, benchmarks=["Set5"], title="tiny norm study", command="irformer study norms"
    )
    table, reading = paths["table.md"].read_text().split("Channel entropies at the last probe")
    assert "| bn (eval) |" in table and "| bn (train-mode stats) |" in table
    assert table.count("\n| ") == 1 + 4  # header + ln, bn x2, iln
    assert "| max \\|x\\| |" in table  # escaped: one Markdown column
    # the entropy reading against iln: one row per run, gaps from the same numbers
    ln, iln = results[0], results[2]
    assert reading.count("\n| ") == 1 + 3 and "| iln |" in reading and "(reference)" in reading
    alg_gap, bal_gap = (
        iln.final_entropy - ln.final_entropy,
        iln.final_balance_entropy - ln.final_balance_entropy,
    )
    assert f"| {alg_gap:+.3f} | {bal_gap:+.3f} |" in reading
    assert "maximum log 8 = 2.079" in reading and "balance entropy is" in reading
    summary = json.loads(paths["summary.json"].read_text())
    assert [r["label"] for r in summary["runs"]] == ["ln", "bn", "iln"]
    for name in ("magnitude.png", "entropy.png", "magnitude_per_block.png", "final_entropy.png"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"

    # an existing study folder is not overwritten silently; resume reuses finished runs
    with pytest.raises(FileExistsError, match="--resume"):
        run_study(runs, out_dir=out, benchmarks=["Set5"], probe_count=2)
    again = run_study(runs, out_dir=out, benchmarks=["Set5"], probe_count=2, resume=True)
    assert [r.metrics for r in again] == [r.metrics for r in results]
    # a result.json written before the balance entropy existed still resumes (NaN)
    done = out / "ln" / "result.json"
    data = json.loads(done.read_text())
    del data["final_balance_entropy"]
    done.write_text(json.dumps(data))
    (old,) = run_study(runs[:1], out_dir=out, benchmarks=["Set5"], probe_count=2, resume=True)
    assert math.isnan(old.final_balance_entropy)
    assert (
        "| — |"
        in write_study_report([old], out, benchmarks=["Set5"], title="t")["table.md"].read_text()
    )


def test_divergence_is_reported(data_root, tmp_path, monkeypatch) -> None:
    from irformer.engine import train as train_module

    def exploding(cfg, **kwargs):
        raise train_module.NonFiniteLossError("non-finite loss (nan) at iteration 3")

    monkeypatch.setattr(train_module, "train", exploding)
    out = tmp_path / "study"
    runs = norm_variants(
        _base(data_root, tmp_path), ["none"], iters=ITERS, out_dir=out, probe_interval=2
    )
    (result,) = run_study(runs, out_dir=out, benchmarks=["Set5"], probe_count=2)
    assert result.diverged and "iteration 3" in result.divergence
    assert result.metrics == {}
    table = write_study_report([result], out, benchmarks=["Set5"], title="t")["table.md"]
    text = table.read_text()
    assert "| yes |" in text and "| — |" in text and "iteration 3" in text


def test_scale_variants_labels_and_overrides(data_root, tmp_path) -> None:
    runs = scale_variants(
        _base(data_root, tmp_path),
        depths=[1, 2],
        widths=[8, 16],
        norms=["ln", "iln"],
        iters=3,
        out_dir=tmp_path / "s",
        probe_interval=1,
    )
    assert [r.label for r in runs][:4] == ["ln-d1-w8", "ln-d1-w16", "ln-d2-w8", "ln-d2-w16"]
    assert len(runs) == 8
    cfg = runs[3].config
    assert cfg.model.overrides["depths"] == [2] and cfg.model.overrides["embed_dim"] == 16
    assert cfg.model.norm == "ln" and runs[-1].config.model.norm == "iln"
    assert runs[3].params == {"norm": "ln", "depth": 2, "width": 16}
    with pytest.raises(ValueError, match="unknown norm"):
        norm_variants(
            _base(data_root, tmp_path),
            ["ln", "layernorm"],
            iters=1,
            out_dir=tmp_path,
            probe_interval=1,
        )


def _fake_result(tmp_path: Path, label: str, norm: str, layers: list[tuple], **kw) -> RunResult:
    """A finished run whose last probe has the given (sq_mean, entropy, balance) layers."""
    run_dir = tmp_path / label
    run_dir.mkdir()
    records = [
        {"iter": 10, "block": f"b{i}", "kind": "layer", "sq_mean": sq, "max_abs": 1.0,
         "entropy": h, "balance_entropy": bal}
        for i, (sq, h, bal) in enumerate(layers)
    ]  # fmt: skip
    (run_dir / "features.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fields = {
        "label": label, "norm": norm, "run_dir": str(run_dir), "params": {"norm": norm},
        "num_parameters": 1, "iters_planned": 10, "iters_done": 10, "diverged": False,
        "divergence": "", "final_loss": 0.1, "train_seconds": 1.0, "probe_seconds": 0.1,
        "probe_calls": 2, "max_sq_mean": 1.0, "max_abs": 1.0, "final_sq_mean": 1.0,
        "final_entropy": math.nan, "metrics": {},
    }  # fmt: skip
    return RunResult(**(fields | kw))


def test_entropy_reading_words_each_run_against_iln(tmp_path: Path) -> None:
    """The study report's reading: numbers from each run's features.jsonl, the gap to iln
    and which story the scale-free balance tells; nothing without an iln run."""
    iln = _fake_result(tmp_path, "iln", "iln", [(0.02, 3.87, 3.78), (0.01, 3.87, 3.76)])
    ln = _fake_result(tmp_path, "ln", "ln", [(1.0, 3.70, 3.74), (3.0, 3.40, 3.70)])
    rs = _fake_result(tmp_path, "ln_rs", "ln_rs", [(0.02, 3.87, 3.775), (0.01, 3.87, 3.76)])
    star = _fake_result(tmp_path, "ln_star", "ln_star", [(2.0, 3.5, 3.3), (2.0, 3.5, 3.3)])
    bad = _fake_result(tmp_path, "none", "none", [(1.0, 3.0, 3.0)], diverged=True)
    lines = entropy_reading([ln, rs, star, bad, iln])
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert rows["ln"] == ("| ln | 3 | 3.550 | 3.720 | 41.3 | +0.320 | +0.050 | mostly the scale |")
    assert rows["ln_rs"].endswith("| same on both |")
    assert rows["ln_star"].endswith("| balance confirms Alg. 1 |")
    assert rows["none"].endswith("| diverged |")
    assert rows["iln"].endswith("| — | — | (reference) |")
    assert not any("maximum log" in line for line in lines)  # no config.yaml: C unknown
    assert entropy_reading([ln, star]) == []
