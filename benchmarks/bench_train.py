"""Training throughput: irformer's trainer vs a minimal loop around the reference SwinIR.

Issue 4's benchmark: SwinIR-light x4, batch 4, 48x48 LR patches. The same
process alternates rounds of

* ``plain``: Adam + L1 around spandrel's SwinIR (the official code's layout)
  on pre-cropped in-memory batches (no data loading, no EMA, no logging);
* ``irformer``: :func:`irformer.engine.train.train` with irformer's SwinIR,
  its sample stream (crop/flip per sample, collate), EMA, logging;

and prints iterations/s of each and their ratio (target >= 1.0), plus the
data pipeline's batches/s alone (it must far exceed the training rate).

    .venv/bin/python benchmarks/bench_train.py --iters 20 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_arch import add_malloc_flag, apply_malloc_flag  # noqa: E402

PRESET = "swinir_light_x4"
SCALE, LR_SIZE, BATCH = 4, 48, 4


def make_pairs(n: int = 6, lr_side: int = 96) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random LR/HR image pairs to crop patches from (content does not matter for speed)."""
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(n):
        hr = torch.rand(3, lr_side * SCALE, lr_side * SCALE, generator=gen)
        pairs.append((F.avg_pool2d(hr[None], SCALE)[0], hr))
    return pairs


def plain_rate(iters: int, warmup: int) -> float:
    from bench_arch import build_reference

    model = build_reference(PRESET).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.rand(BATCH, 3, LR_SIZE, LR_SIZE, generator=gen),
            torch.rand(BATCH, 3, LR_SIZE * SCALE, LR_SIZE * SCALE, generator=gen),
        )
        for _ in range(4)
    ]
    start = 0.0
    for i in range(warmup + iters):
        if i == warmup:
            start = time.perf_counter()
        lq, gt = batches[i % len(batches)]
        loss = F.l1_loss(model(lq), gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return iters / (time.perf_counter() - start)


def irformer_rate(iters: int, warmup: int) -> float:
    from irformer.engine.config import config_from_dict
    from irformer.engine.data import TensorPairs
    from irformer.engine.train import TrainState, train

    stamps: dict[int, float] = {}

    def progress(state: TrainState) -> None:
        stamps[state.iteration] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(
            {
                "model": {"arch": PRESET, "norm": "ln", "scale": SCALE},
                "data": {"patch_size": LR_SIZE * SCALE, "batch_size": BATCH, "workers": 0},
                "train": {"iters": warmup + iters},
                "val": {"every": 0},
                "log": {"out_dir": tmp, "every": 10, "checkpoint_every": 10**9},
            }
        )
        data = TensorPairs(make_pairs(), patch_size=LR_SIZE * SCALE, scale=SCALE)
        train(cfg, train_set=data, progress=progress)
    return iters / (stamps[warmup + iters] - stamps[warmup])


def data_rate(batches: int) -> float:
    from irformer.engine.data import TensorPairs, make_loader

    data = TensorPairs(make_pairs(), patch_size=LR_SIZE * SCALE, scale=SCALE)
    it = iter(make_loader(data, seed=0, start=0, batch_size=BATCH))
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_malloc_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    malloc = apply_malloc_flag(args)
    print(
        f"{PRESET}, batch {BATCH}, LR {LR_SIZE}x{LR_SIZE}, {args.threads} thread(s), "
        f"malloc {malloc}, {args.rounds} alternating rounds of {args.iters} iterations"
    )
    plain, ours = [], []
    for r in range(args.rounds):
        plain.append(plain_rate(args.iters, args.warmup))
        ours.append(irformer_rate(args.iters, args.warmup))
        print(f"round {r + 1}: plain {plain[-1]:.3f} it/s, irformer {ours[-1]:.3f} it/s")
    ratios = [o / p for o, p in zip(ours, plain)]
    print(
        f"median: plain {statistics.median(plain):.3f} it/s, irformer "
        f"{statistics.median(ours):.3f} it/s, ratio {statistics.median(ratios):.2f}x "
        f"(target >= 1.0x)"
    )
    print(f"data pipeline alone: {data_rate(50):.1f} batches/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
