"""Gradient accumulation and the one-process DDP group (what ``torchrun --nproc_per_node 1`` runs).

k micro-batches of B per step must train the model one batch of k*B trains, and
a one-process gloo group (DDP wrapper, collectives) the model no group trains.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from test_train import TinySR, losses, run_tiny, tiny_config

from irformer.engine.checkpoint import load_checkpoint
from irformer.engine.config import ConfigError
from irformer.engine.distributed import DistInfo, cleanup_distributed, init_distributed
from irformer.engine.train import samples_per_iteration

pytestmark = pytest.mark.usefixtures("one_thread")

ITERS = 8


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / f"iter_{ITERS:08d}.pth")["params"]


def test_k_micro_batches_equal_one_batch_k_times_larger(tmp_path: Path) -> None:
    common = (f"train.iters={ITERS}", "log.checkpoint_every=4", "train.ema=0.9")
    big = run_tiny(tmp_path / "big", "data.batch_size=4", *common)
    accum = run_tiny(tmp_path / "accum", "data.batch_size=1", "train.grad_accum=4", *common)
    a, b = losses(big.run_dir), losses(accum.run_dir)
    assert sorted(a) == sorted(b) == list(range(1, ITERS + 1))
    torch.testing.assert_close(
        torch.tensor([b[i] for i in sorted(b)]),
        torch.tensor([a[i] for i in sorted(a)]),
        rtol=1e-5,
        atol=1e-6,
    )
    pa, pb = final_params(big.run_dir), final_params(accum.run_dir)
    for name, value in pa.items():
        torch.testing.assert_close(pb[name], value, rtol=1e-4, atol=1e-5)
    ckpt = load_checkpoint(accum.run_dir / "checkpoints" / f"iter_{ITERS:08d}.pth")
    assert ckpt["data"]["position"] == ITERS * 4  # the stream advanced by the global batch

    # Meaningful: a run with the micro-batch alone (no accumulation) differs.
    small = run_tiny(tmp_path / "small", "data.batch_size=1", *common)
    moved = max((final_params(small.run_dir)[k] - pa[k]).abs().max().item() for k in pa)
    assert moved > 1e-3


def test_global_batch_counts_ranks_and_micro_batches(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "data.batch_size=3", "train.grad_accum=5")
    assert samples_per_iteration(cfg, DistInfo(world_size=2)) == 30
    with pytest.raises(ConfigError, match=r"train\.grad_accum"):
        tiny_config(tmp_path, "train.grad_accum=0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_one_process_group_trains_like_no_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = (f"train.iters={ITERS}", "log.checkpoint_every=4", "train.grad_accum=2")
    plain = run_tiny(tmp_path / "plain", *common)
    for name, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }.items():
        monkeypatch.setenv(name, value)
    info = init_distributed("cpu")
    try:
        assert info.process_group and info.distributed and info.world_size == 1
        seen: list[type] = []
        cfg = tiny_config(tmp_path / "ddp", *common)
        torch.manual_seed(0)
        model = TinySR(norm=cfg.model.norm)
        original_forward = torch.nn.parallel.DistributedDataParallel.forward

        def spy(self, *args, **kwargs):  # the loop really ran through the DDP wrapper
            seen.append(type(self))
            return original_forward(self, *args, **kwargs)

        monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "forward", spy)
        ddp = run_tiny(tmp_path / "ddp", *common, model=model, dist_info=info)
    finally:
        cleanup_distributed()
    assert len(seen) == ITERS * 2
    assert losses(ddp.run_dir) == pytest.approx(losses(plain.run_dir), rel=1e-6, abs=1e-7)
    pa, pb = final_params(plain.run_dir), final_params(ddp.run_dir)
    for name, value in pa.items():
        torch.testing.assert_close(pb[name], value, rtol=1e-5, atol=1e-6)


def test_no_group_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert not info.process_group and not info.distributed
