"""Training cost of every paper config, scaled from the only budget the paper reports.

The i-LN paper (Table 5 caption, Appendix B.1) reports that HAT-dagger takes
40 GPU-days for x2 SR (500K iterations) and 20 GPU-days for the x4 fine-tune
(250K), on NVIDIA RTX A6000s under BasicSR. No irformer run has used a GPU yet,
so the wall time of every other config is estimated here by its training FLOPs
(forward + backward of one sample at the config's patch, counted with
``torch.utils.flop_counter`` on a real training step, times batch x
iterations) at the effective FLOP rate that the HAT-dagger x2 budget implies.
The x4 budget checks the scaling. Small models use a GPU less efficiently than
HAT, so their estimates are lower bounds; ``benchmarks/gpu_check.py`` measures
real iterations/s.

    .venv/bin/python benchmarks/train_budget.py            # markdown table
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DAY = 86_400.0
ANCHORS = {"hat_dagger/sr_x2": 40.0, "hat_dagger/sr_x4": 20.0}
"""A6000 GPU-days the paper reports (Table 5 caption)."""
COUNT_SIDE = 64
"""Largest LR side counted directly; window attention and convs cost the same per
pixel at any multiple of the window, so larger patches are scaled by area."""


@dataclass(frozen=True)
class Cost:
    config: str
    arch: str
    scale: int
    lr_patch: int
    batch: int
    iters: int
    gflop_per_sample: float

    @property
    def pflop(self) -> float:
        return self.gflop_per_sample * self.batch * self.iters / 1e6


def paper_configs() -> list[Path]:
    folders = ("swinir_1", "hat_1", "drct_1", "srformer_1", "hat_2", "hat_dagger")
    return [p for f in folders for p in sorted((REPO / "configs" / f).glob("*_ln.yaml"))]


def training_gflop(cfg_path: Path) -> Cost:
    """fwd+bwd GFLOP of one training sample (batch 1) of a config's network."""
    from torch.utils.flop_counter import FlopCounterMode

    from irformer.engine.config import load_config
    from irformer.engine.train import build_network

    cfg = load_config(cfg_path)
    model = build_network(cfg).train()
    lr = cfg.data.patch_size // cfg.model.scale
    side = min(lr, COUNT_SIDE)
    channels = 1 if cfg.data.grayscale else 3
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.rand(1, channels, side, side)).mean().backward()
    flops = counter.get_total_flops() * (lr / side) ** 2
    rel = cfg_path.relative_to(REPO / "configs").with_suffix("").as_posix().removesuffix("_ln")
    return Cost(
        rel, cfg.model.arch, cfg.model.scale, lr, cfg.data.batch_size, cfg.train.iters, flops / 1e9
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    costs = {c.config: c for c in map(training_gflop, paper_configs())}
    anchor = costs["hat_dagger/sr_x2"]
    rate = anchor.pflop * 1e15 / (ANCHORS["hat_dagger/sr_x2"] * DAY)  # FLOP/s per A6000
    check = costs["hat_dagger/sr_x4"].pflop * 1e15 / rate / DAY
    print(
        f"Effective rate implied by HAT-dagger x2 (40 A6000-days): {rate / 1e12:.2f} TFLOP/s "
        f"per GPU; predicts {check:.1f} GPU-days for the x4 fine-tune (paper: 20).\n"
    )
    print(
        "| config | network | LR patch | batch | iterations | GFLOP / sample (fwd+bwd) | "
        "PFLOP | A6000 GPU-days | wall on 1 / 4 / 8 GPUs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c in costs.values():
        days = c.pflop * 1e15 / rate / DAY
        walls = " / ".join(_wall(days / n) for n in (1, 4, 8))
        print(
            f"| {c.config} | {c.arch} | {c.lr_patch} | {c.batch} | {c.iters // 1000}K | "
            f"{c.gflop_per_sample:.1f} | {c.pflop:,.0f} | {days:.1f} | {walls} |"
        )
    return 0


def _wall(days: float) -> str:
    hours = days * 24
    if hours < 10:
        return f"{hours:.1f} h"
    return f"{hours:.0f} h" if days < 2 else f"{days:.1f} d"


if __name__ == "__main__":
    sys.exit(main())
