"""Checkpoint I/O: atomic writes, weights_only loading, RNG round trips, pruning, export."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from irformer.engine import checkpoint as ck
from irformer.errors import CheckpointReadError


def draws() -> tuple[list[float], list[float], float, float]:
    return (
        torch.rand(4).tolist(),
        np.random.rand(4).tolist(),
        random.random(),
        random.gauss(0, 1),
    )


def test_rng_states_round_trip_through_weights_only_file(tmp_path: Path) -> None:
    random.gauss(0, 1)  # leave a cached gaussian in python's generator
    np.random.randn()
    saved = ck.rng_state()
    expected = draws()
    ck.save_checkpoint(tmp_path / "c.pth", {"rng": saved})
    loaded = ck.load_checkpoint(tmp_path / "c.pth")  # weights_only=True inside
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    ck.set_rng_state(loaded["rng"])
    assert draws() == expected


def test_preserve_rng_leaves_streams_untouched() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    expected = draws()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    with ck.preserve_rng():
        torch.rand(100)
        np.random.rand(100)
        random.random()
    assert draws() == expected


def test_optimizer_and_scheduler_states_load_weights_only(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5)
    for _ in range(3):
        model(torch.ones(3)).sum().backward()
        opt.step()
        sched.step()
    ck.save_checkpoint(
        tmp_path / "c.pth",
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "iteration": 3},
    )
    state = ck.load_checkpoint(tmp_path / "c.pth")
    opt2 = torch.optim.Adam(nn.Linear(3, 2).parameters())
    opt2.load_state_dict(state["optimizer"])
    sched2 = torch.optim.lr_scheduler.MultiStepLR(opt2, milestones=[9], gamma=0.1)
    sched2.load_state_dict(state["scheduler"])
    assert sched2.get_last_lr() == pytest.approx([5e-4])
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_failed_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "iter_00000010.pth"
    ck.save_checkpoint(path, {"iteration": 10})

    def broken_save(obj: object, handle: object) -> None:
        handle.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, {"iteration": 20})
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["iteration"] == 10
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    ck.save_checkpoint(path, {"params": {"w": torch.ones(1000)}})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointReadError, match="unreadable or truncated"):
        ck.load_checkpoint(path)


def test_keep_last_and_latest(tmp_path: Path) -> None:
    for it in (5, 10, 15, 20):
        ck.save_checkpoint(tmp_path / ck.checkpoint_name(it), {"iteration": it})
    (tmp_path / "best.pth").write_bytes(b"x")
    deleted = ck.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["iter_00000005.pth", "iter_00000010.pth"]
    assert [it for it, _ in ck.list_checkpoints(tmp_path)] == [15, 20]
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "iter_00000020.pth"
    assert (tmp_path / "best.pth").exists()  # never pruned
    assert ck.latest_checkpoint(tmp_path / "missing") is None


def tiny_swinir(norm: str = "iln") -> nn.Module:
    from irformer.archs import build_model

    torch.manual_seed(0)
    return build_model(
        "swinir_light_x2", norm=norm, embed_dim=12, depths=[1], num_heads=[2], window_size=4
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_round_trip(tmp_path: Path, suffix: str) -> None:
    from irformer.archs import load_checkpoint_model, read_state_dict

    model = tiny_swinir()
    path = ck.export_weights(tmp_path / f"w{suffix}", model)
    state, meta = read_state_dict(path)
    assert meta["norm"] == "iln" and meta["scale"] == 2 and meta["arch"] == "swinir"
    assert meta["model_kwargs"]["embed_dim"] == 12
    assert set(state) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["irformer"])["norm"] == "iln"
    else:
        raw = torch.load(path, weights_only=True)
        assert set(raw) == {"params", "irformer"}
    rebuilt, _ = load_checkpoint_model(path)
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))


def test_export_checkpoint_takes_the_ema_weights(tmp_path: Path) -> None:
    from irformer.archs import model_meta, read_state_dict

    model, ema = tiny_swinir(), tiny_swinir()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    ckpt = tmp_path / "iter_00000001.pth"
    ck.save_checkpoint(
        ckpt,
        {
            "params": model.state_dict(),
            "params_ema": ema.state_dict(),
            "irformer": model_meta(model),
        },
    )
    out = ck.export_checkpoint(ckpt, tmp_path / "w.safetensors")
    state, meta = read_state_dict(out)
    assert meta["norm"] == "iln"
    assert torch.equal(state["conv_first.weight"], ema.state_dict()["conv_first.weight"])


def test_export_rejects_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.safetensors or \.pth"):
        ck.export_weights(tmp_path / "w.bin", tiny_swinir())
