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
    table = paths["table.md"].read_text()
    assert "| bn (eval) |" in table and "| bn (train-mode stats) |" in table
    assert table.count("\n| ") == 1 + 4  # header + ln, bn x2, iln
    summary = json.loads(paths["summary.json"].read_text())
    assert [r["label"] for r in summary["runs"]] == ["ln", "bn", "iln"]
    for name in ("magnitude.png", "entropy.png", "magnitude_per_block.png", "final_entropy.png"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"

    # an existing study folder is not overwritten silently; resume reuses finished runs
    with pytest.raises(FileExistsError, match="--resume"):
        run_study(runs, out_dir=out, benchmarks=["Set5"], probe_count=2)
    again = run_study(runs, out_dir=out, benchmarks=["Set5"], probe_count=2, resume=True)
    assert [r.metrics for r in again] == [r.metrics for r in results]


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
