"""DDP: 2 CPU processes (gloo, batch 2 each) train the same model as 1 process with batch 4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from irformer.engine.checkpoint import load_checkpoint
from irformer.engine.data import StreamSampler

ITERS = 12
CONFIG = """\
name: {name}
model:
  arch: swinir_light_x2
  norm: {norm}
  scale: 2
  # no stochastic depth: per-rank drop masks cannot equal one process's draws
  overrides: {{embed_dim: 12, depths: [2], num_heads: [2], window_size: 4, img_size: 8,
              drop_path_rate: 0.0}}
data: {{train: [{data}], patch_size: 16, batch_size: {batch}, workers: 0}}
train: {{iters: {iters}, lr: 1.0e-3, ema: 0.9}}
val: {{every: 0}}
log: {{out_dir: {out}, every: 1, checkpoint_every: {half}}}
"""
LAUNCHER = "import sys\nfrom irformer.cli import main\nsys.exit(main())\n"


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_rank_slices_tile_the_global_batch() -> None:
    def take(sampler: StreamSampler, n: int) -> list[int]:
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    single = take(StreamSampler(start=8, batch_size=4), 12)
    rank0 = take(StreamSampler(start=8, batch_size=2, rank=0, world_size=2), 6)
    rank1 = take(StreamSampler(start=8, batch_size=2, rank=1, world_size=2), 6)
    stitched = [x for j in range(3) for x in rank0[2 * j : 2 * j + 2] + rank1[2 * j : 2 * j + 2]]
    assert stitched == single == list(range(8, 20))


def test_two_gloo_processes_equal_one_process_with_the_combined_batch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        small = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
        Image.fromarray(small).resize((40, 40), Image.BICUBIC).save(data / f"im{i}.png")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)

    def config(name: str, batch: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        text = CONFIG.format(
            name=name,
            norm="ln",
            data=data,
            batch=batch,
            iters=ITERS,
            half=ITERS // 2,
            out=tmp_path / name,
        )
        path.write_text(text)
        return path

    train = ["train", "--no-progress", "--device", "cpu", "--config"]
    single = subprocess.run(
        [sys.executable, str(launcher), *train, str(config("single", 4))],
        env=env(),
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(launcher),
            *train,
            str(config("ddp", 2)),
        ],
        env=env(),
        capture_output=True,
        text=True,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(a) == len(b) == ITERS  # rank 0 alone logs
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    final = f"checkpoints/iter_{ITERS:08d}.pth"
    ca, cb = load_checkpoint(tmp_path / "single" / final), load_checkpoint(tmp_path / "ddp" / final)
    assert cb["data"]["position"] == ca["data"]["position"] == ITERS * 4
    assert len(cb["rng"]) == 2  # each rank's RNG states are kept for resume
    for key in ("params", "params_ema"):
        for name, value in ca[key].items():
            torch.testing.assert_close(cb[key][name], value, rtol=1e-4, atol=1e-5)
    # Meaningful: the last 6 steps moved the weights far more than the tolerance.
    half = load_checkpoint(tmp_path / "ddp" / f"checkpoints/iter_{ITERS // 2:08d}.pth")["params"]
    moved = max((half[k] - cb["params"][k]).abs().max().item() for k in half)
    assert moved > 1e-3
