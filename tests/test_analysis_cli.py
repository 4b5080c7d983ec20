"""``irformer study`` and ``irformer analyze`` from the command line, on a tiny SwinIR."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from irformer.cli import main


def _images(folder: Path, count: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        arr[: size // 2] //= 2  # some structure: a darker top half
        Image.fromarray(arr).save(folder / f"img{i}.png")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """Run `irformer study norms` once with two norms and three iterations."""
    root = tmp_path_factory.mktemp("cli")
    _images(root / "train", 3, 32, 0)
    _images(root / "data" / "sr" / "Set5" / "HR", 1, 24, 1)
    config = {
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
                "upsampler": "pixelshuffledirect",
            },
        },
        "data": {"train": [str(root / "train")], "patch_size": 16, "batch_size": 2, "workers": 0},
        "train": {"lr": 1e-3},
        "val": {"root": str(root / "data"), "benchmarks": ["Set5"]},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(config))
    code = main(
        [
            "study", "norms", "--config", str(root / "base.yaml"), "--norms", "ln,iln",
            "--iters", "3", "--probe-interval", "1", "--probe-count", "2",
            "--out", str(root / "study"),
        ]
    )  # fmt: skip
    assert code == 0
    return root


def test_study_norms_cli_writes_table(study: Path) -> None:
    out = study / "study"
    table = (out / "table.md").read_text()
    assert "| ln |" in table and "| iln |" in table and "Set5 PSNR" in table
    summary = json.loads((out / "summary.json").read_text())
    assert [r["iters_done"] for r in summary["runs"]] == [3, 3]
    assert (out / "magnitude.png").is_file() and (out / "entropy.png").is_file()
    # both channel entropies, side by side
    assert "final entropy (Alg. 1)" in table and "final balance entropy" in table
    assert all(0 < r["final_balance_entropy"] <= math.log(8) + 1e-6 for r in summary["runs"])
    for name in ("balance_entropy.png", "balance_entropy_per_block.png", "final_entropies.png"):
        assert (out / name).is_file()
    # an existing study is not overwritten
    assert main(["study", "norms", "--config", str(study / "base.yaml"), "--norms", "ln",
                 "--iters", "3", "--out", str(out)]) == 2  # fmt: skip


def test_analyze_run_cli(study: Path, capsys) -> None:
    out = study / "curves"
    runs = [str(study / "study" / n) for n in ("ln", "iln")]
    assert main(["analyze", "run", *runs, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ln" in text and "iln" in text
    assert (out / "magnitude.png").is_file() and (out / "entropy_per_block.png").is_file()
    assert "final balance H" in text and (out / "balance_entropy.png").is_file()
    assert main(["analyze", "run", runs[0], "--out", str(out), "--blocks"]) == 0
    text = capsys.readouterr().out
    assert "ln @ iter 0" in text and "ln @ iter 3" in text and "eff. ch" in text
    assert main(["analyze", "run", runs[0], "--out", str(out), "--blocks", "2"]) == 0
    text = capsys.readouterr().out
    assert "ln @ iter 2" in text and "ln @ iter 0" not in text
    assert main(["analyze", "run", runs[0], "--out", str(out), "--blocks", "7"]) == 2
    assert main(["analyze", "run", *runs, "--labels", "a"]) == 2  # wrong label count
    # a run recorded before the balance entropy existed still reads and plots
    old = study / "old_run"
    old.mkdir()
    lines = (study / "study" / "ln" / "features.jsonl").read_text().splitlines()
    stripped = [json.loads(line) for line in lines]
    for rec in stripped:
        del rec["balance_entropy"]
    (old / "features.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    assert main(["analyze", "run", str(old), "--out", str(study / "old_curves")]) == 0
    assert "(not recorded)" in capsys.readouterr().out


def test_analyze_checkpoint_clis(study: Path, capsys) -> None:
    ckpt = study / "study" / "iln" / "checkpoints" / "iter_00000003.pth"
    if not ckpt.is_file():
        ckpt = next((study / "study" / "iln" / "checkpoints").glob("iter_*.pth"))
    out = study / "ana"
    assert main(["analyze", "features", str(ckpt), "--out", str(out), "--size", "16",
                 "--param-key", "params"]) == 0  # fmt: skip
    data = json.loads((out / "features.json").read_text())
    assert data["meta"]["norm"] == "iln"
    assert all(0 < b["balance_entropy"] <= math.log(8) + 1e-6 for b in data["blocks"])
    assert [b["block"] for b in data["blocks"]] == [
        "layers.0",
        "layers.0.residual_group.blocks.0",
        "layers.0.residual_group.blocks.1",
    ]
    assert (out / "blocks.png").is_file()
    # iln's final norm is a per-channel affine with a bias: Fig. 7 works
    assert main(["analyze", "bias", str(ckpt), "--out", str(out), "--size", "16",
                 "--images", str(study / "train"), "--param-key", "params"]) == 0  # fmt: skip
    bias = json.loads((out / "bias.json").read_text())
    assert len(bias["bias"]) == 8 and -1 <= bias["pearson"] <= 1
    assert main(["analyze", "rpe", str(ckpt), "--out", str(out), "--param-key", "params"]) == 0
    rpe = json.loads((out / "rpe.json").read_text())
    assert len(rpe["tables"]) == 2 and len(rpe["tables"][0]["smoothness"]) == 2
    assert (out / "rpe.png").is_file()
    capsys.readouterr()
    assert main(["analyze", "rpe", str(study / "missing.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_study_table_records_the_command(study: Path) -> None:
    table = (study / "study" / "table.md").read_text()
    assert "irformer study norms --config " in table
    assert "--norms ln,iln --iters 3 --probe-interval 1 --probe-count 2" in table
