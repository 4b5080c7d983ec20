"""The shipped reference checkpoints: metadata that names what they are, and the
committed evaluation numbers (docs/reference/eval_*.json) reproduced from the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from irformer.archs import load_checkpoint_model, read_state_dict
from irformer.data.benchmarks import load_benchmark
from irformer.engine.evaluate import evaluate_benchmark

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = sorted((ROOT / "src" / "irformer" / "weights").glob("*.safetensors"))


def test_the_four_reference_models_ship() -> None:
    assert [p.stem for p in WEIGHTS] == [
        f"swinir_light_x{s}_{n}" for s in (2, 4) for n in ("iln", "ln")
    ]


@pytest.mark.parametrize("path", WEIGHTS, ids=lambda p: p.stem)
def test_metadata_and_eval_record(path: Path, shared_data: Path) -> None:
    _, meta = read_state_dict(path)
    scale, norm = int(path.stem.split("_x")[1][0]), path.stem.rsplit("_", 1)[1]
    assert (meta["preset"], meta["norm"], meta["scale"], meta["task"]) == (
        f"swinir_light_x{scale}",
        norm,
        scale,
        "sr",
    )
    record = json.loads((ROOT / "docs" / "reference" / f"eval_{path.stem}.json").read_text())
    assert record["scale"] == scale and record["precision"] == "fp32"
    set5 = next(b for b in record["benchmarks"] if b["benchmark"] == "Set5")
    first = set5["images"][0]
    model, _ = load_checkpoint_model(path)
    bench = load_benchmark("Set5", shared_data, task="sr", scale=scale).first(1)
    assert bench.names == [first["name"]]
    result = evaluate_benchmark(model.eval(), bench, device=torch.device("cpu"))
    assert result.psnr == pytest.approx(first["psnr"], abs=1e-4)
    assert result.ssim == pytest.approx(first["ssim"], abs=1e-6)
