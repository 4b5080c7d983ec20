"""Exact resume: SIGKILL a real `irformer train` process, resume it, get the same losses.

The uninterrupted run and the killed-then-resumed run must log bit-identical
losses for every iteration and end with bit-identical weights (CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from irformer.engine.checkpoint import list_checkpoints, load_checkpoint

ITERS = 60
CONFIG = """\
name: {name}
model:
  arch: swinir_light_x2
  norm: iln
  scale: 2
  # a high drop-path rate: the resumed run must also continue the models' random draws
  overrides: {{embed_dim: 12, depths: [2], num_heads: [2], window_size: 4, img_size: 8,
              drop_path_rate: 0.6}}
data: {{train: [{data}], patch_size: 16, batch_size: 2, workers: {workers}}}
train: {{iters: {iters}, lr: 1.0e-3, step_size: 25, ema: 0.99}}
val: {{every: 0}}
log: {{out_dir: {out}, every: 1, checkpoint_every: 10, keep_last: 2}}
"""


def make_images(folder: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        small = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
        Image.fromarray(small).resize((40, 40), Image.BICUBIC).save(folder / f"im{i}.png")


CLI = "import sys; from irformer.cli import main; sys.exit(main())"


def command(config: Path, *extra: str) -> list[str]:
    # --device cpu: this is the CPU guarantee (tests/test_cuda.py has the GPU's, which
    # needs --deterministic); on a GPU machine "auto" would train on CUDA.
    cmd = [sys.executable, "-c", CLI, "train", "--config", str(config), "--no-progress"]
    return [*cmd, "--device", "cpu", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_config(tmp_path: Path, name: str, workers: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        CONFIG.format(
            name=name, data=tmp_path / "data", out=tmp_path / name, iters=ITERS, workers=workers
        )
    )
    return path


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out: dict[int, float] = {}
    for r in records:
        assert r["iter"] not in out, f"iteration {r['iter']} logged twice"
        out[r["iter"]] = r["loss"]
    return out


def kill_after_first_checkpoints(config: Path, run_dir: Path) -> int:
    """Start training, SIGKILL it after it checkpointed and ran on; returns iterations logged."""
    proc = subprocess.Popen(
        command(config), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if done >= 15 or proc.poll() is not None:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"training ended on its own before the kill: {proc.stderr.read().decode()[-2000:]}"
    )
    return len(metrics.read_text().splitlines())


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path: Path) -> None:
    # The reference loads data in the main process, the killed run with 2 workers:
    # the sample stream must not depend on that either.
    make_images(tmp_path / "data")
    ref_cfg = write_config(tmp_path, "ref", workers=0)
    subprocess.run(command(ref_cfg), env=env(), check=True, capture_output=True)
    reference = losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, ITERS + 1))

    cfg = write_config(tmp_path, "killed", workers=2)
    run_dir = tmp_path / "killed"
    logged_at_kill = kill_after_first_checkpoints(cfg, run_dir)
    saved = [it for it, _ in list_checkpoints(run_dir / "checkpoints")]
    assert saved and saved[-1] < ITERS
    assert logged_at_kill > saved[-1] or logged_at_kill == saved[-1]  # killed at any point
    subprocess.run(command(cfg, "--resume"), env=env(), check=True, capture_output=True)

    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, ITERS + 1))
    mismatched = [it for it in reference if reference[it] != resumed[it]]
    assert not mismatched, f"losses differ at iterations {mismatched[:10]} (resumed at {saved[-1]})"
    final = f"checkpoints/iter_{ITERS:08d}.pth"
    a = load_checkpoint(tmp_path / "ref" / final)
    b = load_checkpoint(run_dir / final)
    for key in ("params", "params_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"
    assert a["scheduler"]["_last_lr"] == b["scheduler"]["_last_lr"] == [2.5e-4]
