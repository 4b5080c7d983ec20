"""The training loop on a tiny in-memory model and dataset: it learns, and every option works."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irformer.archs import read_state_dict, transformer_blocks
from irformer.archs.layers import TransformerBlock
from irformer.engine.checkpoint import list_checkpoints, load_checkpoint
from irformer.engine.config import load_config
from irformer.engine.data import PositionedDataset, TensorPairs, make_loader
from irformer.engine.train import (
    NonFiniteLossError,
    TrainState,
    read_metrics,
    train,
)
from irformer.norms import build_norm, merge_residual

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyBlock(TransformerBlock):
    """A pre-norm token block with the norm1/norm2 layout of the real ones."""

    def __init__(self, dim: int, norm: str) -> None:
        super().__init__()
        self.norm1 = build_norm(norm, dim)
        self.fc1 = nn.Linear(dim, dim)
        self.norm2 = build_norm(norm, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        s = self.norm1.statistics(x)
        x = merge_residual(x, self.fc1(self.norm1.normalize(x, s)), self.norm1, s)
        s = self.norm2.statistics(x)
        return merge_residual(x, F.gelu(self.fc2(self.norm2.normalize(x, s))), self.norm2, s)


class TinySR(nn.Module):
    """conv -> 2 token blocks -> conv + pixel shuffle (x2)."""

    def __init__(self, dim: int = 8, norm: str = "ln", scale: int = 2) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, dim, 3, 1, 1)
        self.blocks = nn.ModuleList([TinyBlock(dim, norm), TinyBlock(dim, norm)])
        self.tail = nn.Sequential(
            nn.Conv2d(dim, 3 * scale * scale, 3, 1, 1), nn.PixelShuffle(scale)
        )
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        f = self.head(x)
        b, c, h, w = f.shape
        t = f.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            t = blk(t)
        f = f + t.transpose(1, 2).reshape(b, c, h, w)
        base = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return base + self.tail(f)


def smooth_pairs(n: int = 3, size: int = 16, scale: int = 2) -> list[tuple[Tensor, Tensor]]:
    """Smooth random images and their 2x average-pooled LR versions."""
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(n):
        gt = F.interpolate(
            torch.rand(1, 3, size // 4, size // 4, generator=gen),
            size=size,
            mode="bilinear",
            align_corners=False,
        )[0]
        lq = F.avg_pool2d(gt[None], scale)[0]
        pairs.append((lq, gt))
    return pairs


def tiny_config(tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            "name=tiny",
            f"log.out_dir={tmp_path / 'run'}",
            "data.patch_size=8",
            "data.batch_size=4",
            "data.workers=0",
            "train.iters=60",
            "train.lr=2e-3",
            "train.step_size=40",
            "val.every=0",
            "log.every=1",
            "log.checkpoint_every=20",
            "log.keep_last=2",
            *extra,
        ],
    )


def run_tiny(tmp_path: Path, *extra: str, **kwargs) -> TrainState:
    cfg = tiny_config(tmp_path, *extra)
    torch.manual_seed(0)
    model = kwargs.pop("model", None) or TinySR(norm=cfg.model.norm)
    data = TensorPairs(smooth_pairs(), patch_size=8, scale=2)
    return train(cfg, model=model, train_set=data, **kwargs)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_training_reduces_loss_and_writes_everything(tmp_path: Path) -> None:
    calls: list[int] = []
    state = run_tiny(tmp_path, progress=lambda s: calls.append(s.iteration))
    run = tmp_path / "run"
    curve = losses(run)
    assert sorted(curve) == list(range(1, 61))
    first, last = sum(curve[i] for i in range(1, 6)) / 5, sum(curve[i] for i in range(56, 61)) / 5
    assert last < 0.7 * first, (first, last)
    assert calls == list(range(1, 61))
    # StepLR halves the lr after 40 iterations.
    lrs = {r["iter"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    assert lrs[39] == pytest.approx(2e-3) and lrs[41] == pytest.approx(1e-3)
    # keep_last=2 of the checkpoints at 20, 40, 60.
    assert [it for it, _ in list_checkpoints(run / "checkpoints")] == [40, 60]
    ckpt = load_checkpoint(run / "checkpoints" / "iter_00000060.pth")
    assert {"params", "params_ema", "optimizer", "scheduler", "rng", "data", "iteration"} <= set(
        ckpt
    )
    assert ckpt["iteration"] == 60 and ckpt["data"]["position"] == 60 * 4
    assert ckpt["irformer"]["norm"] == "ln" and ckpt["irformer"]["task"] == "sr"
    # The EMA lags the raw weights (decay 0.999 over 60 steps).
    w, w_ema = ckpt["params"]["head.weight"], ckpt["params_ema"]["head.weight"]
    assert not torch.equal(w, w_ema)
    assert state.iteration == 60 and math.isfinite(state.loss)
    assert (run / "config.yaml").read_text().startswith("name: tiny")


def test_same_seed_same_run_other_seed_other_run(tmp_path: Path) -> None:
    a = losses(run_tiny(tmp_path / "a", "train.iters=10").run_dir)
    b = losses(run_tiny(tmp_path / "b", "train.iters=10").run_dir)
    c = losses(run_tiny(tmp_path / "c", "train.iters=10", "train.seed=1").run_dir)
    assert a == b
    assert a != c


def test_hooks_run_at_the_probe_interval_without_changing_training(tmp_path: Path) -> None:
    seen: list[int] = []

    def noisy_probe(state: TrainState) -> None:
        seen.append(state.iteration)
        torch.rand(1000)  # a probe drawing random numbers must not shift training
        state.model.eval()
        state.log({"probe": 1.0})

    plain = losses(run_tiny(tmp_path / "plain", "train.iters=20").run_dir)
    hooked_state = run_tiny(
        tmp_path / "hooked", "train.iters=20", "log.probe_interval=5", hooks=[noisy_probe]
    )
    assert seen == [5, 10, 15, 20]
    assert losses(hooked_state.run_dir) == plain
    assert sum("probe" in r for r in read_metrics(hooked_state.run_dir)) == 4


def test_data_stream_is_independent_of_workers() -> None:
    data = TensorPairs(smooth_pairs(), patch_size=8, scale=2)
    batches = []
    for workers in (0, 2):
        loader = make_loader(data, seed=3, start=12, batch_size=4, workers=workers)
        it = iter(loader)
        batches.append([next(it)["gt"] for _ in range(3)])
    for x, y in zip(*batches):
        assert torch.equal(x, y)
    # Position 12 + 4 = 16 is the second batch of a stream started at 12.
    positioned = PositionedDataset(data, seed=3)
    assert torch.equal(batches[0][1][0], positioned[16]["gt"])


def test_each_epoch_visits_every_item_once() -> None:
    data = TensorPairs(smooth_pairs(n=5), patch_size=8, scale=2)
    positioned = PositionedDataset(data, seed=0)
    epoch0 = [positioned.item_index(k) for k in range(5)]
    epoch1 = [positioned.item_index(k) for k in range(5, 10)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(5))
    assert epoch0 != epoch1 or epoch0 != list(range(5))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    class Exploding(TinySR):
        def forward(self, x: Tensor) -> Tensor:
            out = super().forward(x)
            if self.training and self.calls_left == 0:
                return out * math.inf
            self.calls_left -= 1 if self.training else 0
            return out

    model = Exploding()
    model.calls_left = 25  # iteration 26 explodes
    with pytest.raises(NonFiniteLossError) as err:
        run_tiny(tmp_path, "log.checkpoint_every=10", model=model)
    message = str(err.value)
    assert "iteration 26" in message and "iter_00000020.pth" in message
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [it for it, _ in ckpts] == [10, 20]
    params = load_checkpoint(ckpts[-1][1])["params"]
    assert all(torch.isfinite(v).all() for v in params.values())


def test_grad_clip_kl_and_bf16_options_train(tmp_path: Path) -> None:
    base = losses(run_tiny(tmp_path / "base", "train.iters=8").run_dir)
    clipped = losses(run_tiny(tmp_path / "gc", "train.iters=8", "train.grad_clip=1e-3").run_dir)
    kl = losses(run_tiny(tmp_path / "kl", "train.iters=8", "train.kl_weight=0.5").run_dir)
    bf16 = losses(run_tiny(tmp_path / "bf", "train.iters=8", "train.bf16=true").run_dir)
    assert clipped[1] == base[1] and clipped[8] != base[8]  # clipping changes the steps only
    assert kl[1] > base[1]  # the KL term adds to the loss from the first step
    assert all(math.isfinite(v) for v in bf16.values())
    assert abs(bf16[1] - base[1]) < 0.05 * base[1]  # same data, bf16 rounding only
    assert bf16[1] != base[1]


def test_kl_regulariser_sees_every_transformer_block() -> None:
    model = TinySR()
    assert [block for _, block in transformer_blocks(model)] == list(model.blocks)


def test_multistep_scheduler_and_warm_start(tmp_path: Path) -> None:
    src = run_tiny(tmp_path / "src", "train.iters=5")
    src_w = load_checkpoint(src.run_dir / "checkpoints" / "iter_00000005.pth")["params_ema"]
    state = run_tiny(
        tmp_path / "dst",
        "train.iters=6",
        "train.scheduler=multisteplr",
        "train.milestones=[2, 4]",
        f"train.warm_start={src.run_dir / 'checkpoints' / 'iter_00000005.pth'}",
        "train.lr=1e-30",  # lr must be > 0 (config check)
    )
    lrs = {r["iter"]: r["lr"] for r in read_metrics(state.run_dir)}
    assert lrs[1] == 1e-30
    # Adam's steps (about lr) are far below one ulp of the weights: the warm-started
    # weights stay exactly the source EMA weights.
    state_dict, _ = read_state_dict(state.run_dir / "checkpoints" / "iter_00000006.pth")
    assert torch.equal(state.model.state_dict()["head.weight"], src_w["head.weight"])
    assert torch.equal(state_dict["head.weight"], src_w["head.weight"])
    cfg = tiny_config(tmp_path / "x", "train.scheduler=multisteplr", "train.milestones=[2, 4]")
    lr_model = TinySR()
    from irformer.engine.train import build_scheduler

    opt = torch.optim.Adam(lr_model.parameters(), lr=1.0)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(5):
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_validation_tracks_best(tmp_path: Path) -> None:
    scores = iter([30.0, 32.0, 31.0])

    def validator(model: nn.Module) -> dict[str, float]:
        assert not model.training
        return {"Toy/psnr": next(scores), "Toy/ssim": 0.9}

    state = run_tiny(tmp_path, "train.iters=30", "val.every=10", validator=validator)
    vals = [r for r in read_metrics(state.run_dir) if "val/Toy/psnr" in r]
    assert [(r["iter"], r["val/Toy/psnr"]) for r in vals] == [(10, 30.0), (20, 32.0), (30, 31.0)]
    assert state.best == {"psnr": 32.0, "iter": 20.0}
    best = load_checkpoint(state.run_dir / "checkpoints" / "best.pth")
    assert best["iteration"] == 20 and best["val"]["Toy/psnr"] == 32.0


def test_tensorboard_logging(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    state = run_tiny(tmp_path, "train.iters=3", "log.tensorboard=true")
    events = list((state.run_dir / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_metrics_jsonl_is_valid_json(tmp_path: Path) -> None:
    state = run_tiny(tmp_path, "train.iters=4")
    for line in (state.run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert {"iter", "loss", "lr", "it_per_s"} <= set(record)


def test_time_limit_stops_with_a_checkpoint(tmp_path: Path) -> None:
    state = run_tiny(tmp_path, "train.time_limit_min=1e-9")
    assert state.iteration == 1
    assert [it for it, _ in list_checkpoints(state.run_dir / "checkpoints")] == [1]


def test_fresh_run_in_old_folder_and_resume_cut_every_jsonl(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "features.jsonl").write_text('{"iter": 5, "x": 1}\n{"iter": 50, "x": 2}\n')
    run_tiny(tmp_path, "train.iters=4")
    assert (run / "features.jsonl").read_text() == ""  # a fresh run starts clean
    (run / "features.jsonl").write_text('{"iter": 3, "x": 1}\n{"iter": 4, "x": 2}\n')
    cfg = tiny_config(tmp_path, "train.iters=6", "log.checkpoint_every=3")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iter": 5, "loss": 9.0}\n{"iter": 6, "lo')  # a killed run's tail
    state = train(
        cfg,
        resume=True,
        model=TinySR(),
        train_set=TensorPairs(smooth_pairs(), patch_size=8, scale=2),
    )
    assert state.start_iteration == 4
    assert [json.loads(x)["iter"] for x in (run / "features.jsonl").read_text().splitlines()] == [
        3,
        4,
    ]
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6] and losses(run)[5] != 9.0


def test_demo_feature_summary_and_table() -> None:
    from irformer.experiments.demo import final_features, markdown_table

    records = [
        {"iter": 10, "block": "a", "kind": "layer", "sq_mean": 1.0, "entropy": 3.0},
        {"iter": 20, "block": "a", "kind": "layer", "sq_mean": 4.0, "entropy": 2.0},
        {"iter": 20, "block": "b", "kind": "layer", "sq_mean": 9.0, "entropy": 1.0},
        {"iter": 20, "block": "g", "kind": "group", "sq_mean": 99.0, "entropy": 0.0},
    ]
    for rec, balance in zip(records, (3.3, 3.0, 2.0, 0.5), strict=True):
        rec["balance_entropy"] = balance
    assert final_features(records) == (9.0, 1.5, 2.5)
    scores = {"bicubic": {"x": (30.0, 0.9)}, "LN": {"x": (31.0, 0.91)}}
    table = markdown_table(scores, {"LN": (9.0, 1.5, 2.5)}, {"LN": 12.0})
    assert "Alg. 1 entropy | balance entropy" in table
    assert "| LN | 31.00 / 0.9100 | 31.00 | 9 | 1.500 | 2.500 | 12 |" in table
    assert "| bicubic | 30.00 / 0.9000 | 30.00 | - | - | - | - |" in table


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    from irformer.cli import main

    assert (
        main(
            ["demo", "--out", str(tmp_path), "--iters", "4", "--probe-every", "2", "--no-progress"]
        )
        == 0
    )
    for name in ("summary.md", "magnitude.png", "entropy.png", "balance_entropy.png", "loss.png",
                 "restored.png"):  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| i-LN |" in summary and "scale-invariant balance entropy is" in summary


@pytest.mark.parametrize("norm", ["ln", "iln"])
def test_x4_reference_configs_warm_start_from_the_shipped_x2_weights(norm: str) -> None:
    """The x4 reference runs start from the committed x2 files: every tensor but the
    scale-dependent pixel-shuffle conv is loaded; the config builds the same network."""
    from irformer.archs import build_model
    from irformer.engine.train import warm_start

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "reference" / f"swinir_light_x4_{norm}.yaml")
    source = root / cfg.train.warm_start
    x2, meta = read_state_dict(source)
    assert meta["norm"] == norm and meta["scale"] == 2
    torch.manual_seed(0)
    model = build_model(cfg.model.arch, norm=cfg.model.norm, **cfg.model.overrides)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    warm_start(model, source)
    kept = sorted(k for k, v in model.state_dict().items() if k not in x2 or v.shape != x2[k].shape)
    assert kept == ["upsample.0.bias", "upsample.0.weight"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh[key] if key in kept else x2[key]), key
