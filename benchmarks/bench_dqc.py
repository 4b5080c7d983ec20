"""Speed of DQC (bound distillation) on SwinIR-light x4: eager quantisers vs the fused kernel.

Issue 17: 1,000 DQC iterations of one configuration must take well under an
hour on a 2-core CPU. For each method (2DQuant and CompSRT at W2A2 by default)
and each DQC batch shape, one calibrated quantised model is distilled with

* ``eager+recompute``: PyTorch ops for every quantiser, residual groups
  recomputed in backward (the default before the fused kernel);
* ``eager``: PyTorch ops, every activation kept for backward;
* ``fused``: the fused fake-quantisation kernel (:mod:`irformer.compress.fused`),
  activations kept (``irformer compress run --dqc-keep-activations``; the run's
  default recomputes the residual groups, which bounds the memory at large batches);

each for ``--warmup`` + ``--iters`` iterations of
:func:`irformer.compress.methods.base.distill_bounds`. Reported per iteration:
CPU seconds of this process (``time.process_time``: what an otherwise idle core
would take; the shared machine's wall time is printed beside it), the FP
teacher's share in fp32 and under bf16 autocast, and the projected CPU time of
1,000 iterations. Then a trajectory check: ``--trajectory-iters`` iterations
fused vs eager from the same calibration, beside the eager path against
itself with every initial bound nudged by 1e-7 (how far float rounding alone
moves a run of a quantised network).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dqc.py --iters 3
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "irformer" / "weights"

VARIANTS: dict[str, tuple[bool, bool]] = {
    # name: (fused kernel, recompute residual groups)
    "eager+recompute": (False, True),
    "eager": (False, False),
    "fused": (True, False),
}


def batches(batch: int, patch: int, seed: int = 1):
    """Random LR patches (speed does not depend on content)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.rand(batch, 3, patch, patch, generator=gen)


def calibrated(model: torch.nn.Module, method: str, bits: int, iters: int, calib: torch.Tensor):
    from irformer.compress.methods import method_config
    from irformer.compress.methods.base import calibrate, prepare_quantized_copy

    cfg = method_config(method, wbits=bits, abits=bits, dqc_iters=iters)
    qmodel = prepare_quantized_copy(model, cfg)
    calibrate(qmodel, calib, cfg)
    return qmodel, cfg


def time_variant(model, qmodel, cfg, shape, fused: bool, recompute: bool, warmup: int):
    from irformer.compress.methods.base import distill_bounds

    cpu: list[float] = []
    wall: list[float] = []
    marks = [(time.process_time(), time.perf_counter())]

    def on_step(step: int, loss: float) -> None:
        marks.append((time.process_time(), time.perf_counter()))

    distill_bounds(
        qmodel, model, batches(*shape), cfg, recompute=recompute, fused=fused, on_step=on_step
    )
    for (c0, w0), (c1, w1) in list(itertools.pairwise(marks))[warmup:]:
        cpu.append(c1 - c0)
        wall.append(w1 - w0)
    return statistics.median(cpu), statistics.median(wall)


def teacher_seconds(model, shape, repeats: int = 3) -> tuple[float, float]:
    x = next(batches(*shape))
    out = []
    for bf16 in (False, True):
        times = []
        for _ in range(repeats + 1):
            start = time.process_time()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x)
            times.append(time.process_time() - start)
        out.append(statistics.median(times[1:]))
    return out[0], out[1]


def trajectory(model, method: str, bits: int, calib, shape, iters: int) -> dict[str, float]:
    from irformer.compress.methods.base import distill_bounds, learnable_quantizer_parameters

    base, cfg = calibrated(model, method, bits, iters, calib)
    runs = {}
    for name, fused, nudge in (
        ("eager", False, 0.0),
        ("fused", True, 0.0),
        ("eager+1e-7", False, 1e-7),
        ("eager-1e-7", False, -1e-7),
    ):
        qmodel = copy.deepcopy(base)
        with torch.no_grad():
            for p in learnable_quantizer_parameters(qmodel):
                p.mul_(1 + nudge)
        log = distill_bounds(qmodel, model, batches(*shape, seed=2), cfg, fused=fused)
        runs[name] = (
            log.loss,
            [p.detach().clone() for p in learnable_quantizer_parameters(qmodel)],
        )
    ref_loss, ref_bounds = runs["eager"]

    def loss_gap(loss):
        return max(abs(a - b) / abs(b) for a, b in zip(loss, ref_loss, strict=True))

    def bound_gap(bounds):
        return max(float((a - b).abs().max()) for a, b in zip(bounds, ref_bounds, strict=True))

    return {
        "fused_loss_gap": loss_gap(runs["fused"][0]),
        "fused_bound_gap": bound_gap(runs["fused"][1]),
        "nudged_loss_gap": max(loss_gap(runs[k][0]) for k in ("eager+1e-7", "eager-1e-7")),
        "nudged_bound_gap": max(bound_gap(runs[k][1]) for k in ("eager+1e-7", "eager-1e-7")),
        "first_loss": ref_loss[0],
        "last_loss": ref_loss[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=WEIGHTS / "swinir_light_x4_ln.safetensors")
    parser.add_argument("--methods", default="dquant2d,compsrt")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--shapes", default="1x64,2x32", help="DQC batch x LR patch side")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--trajectory-iters", type=int, default=20, help="0: skip the check")
    parser.add_argument("--trajectory-shape", default="2x32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from irformer.archs import load_checkpoint_model
    from irformer.compress.fused import fused_kernel_available

    if not fused_kernel_available():
        print("the fused kernel does not build here: only the eager variants can run")
    model, meta = load_checkpoint_model(args.ckpt)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    calib = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    print(
        f"{args.ckpt.name} (norm {meta.get('norm')}), W{args.bits}A{args.bits}, torch "
        f"{torch.__version__}, {args.threads} thread(s); {args.iters} timed iterations after "
        f"{args.warmup} warm-up; CPU s = process time per iteration"
    )
    print()
    print(
        "| method | batch x patch | variant | CPU s/it | wall s/it | 1,000 it (CPU min) "
        "| speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        base, cfg = calibrated(model, method, args.bits, args.warmup + args.iters, calib)
        for shape in shapes:
            first = None
            for name in variants:
                fused, recompute = VARIANTS[name]
                cpu, wall = time_variant(
                    model, copy.deepcopy(base), cfg, shape, fused, recompute, args.warmup
                )
                first = first or cpu
                print(
                    f"| {method} | {shape[0]} x {shape[1]} | {name} | {cpu:.2f} | {wall:.2f} | "
                    f"{1000 * cpu / 60:.0f} | {first / cpu:.2f}x |",
                    flush=True,
                )
    print()
    print("| batch x patch | FP teacher fp32 (CPU s) | bf16 autocast (CPU s) |")
    print("|---|---|---|")
    for shape in shapes:
        fp32, bf16 = teacher_seconds(model, shape)
        print(f"| {shape[0]} x {shape[1]} | {fp32:.3f} | {bf16:.3f} |", flush=True)
    if args.trajectory_iters:
        shape = tuple(int(v) for v in args.trajectory_shape.split("x"))
        print()
        print(
            f"Trajectory, {args.trajectory_iters} iterations of {shape[0]} x {shape[1]} "
            "(max over steps of |loss - eager loss| / eager loss; max |bound - eager bound|):"
        )
        print()
        print(
            "| method | fused vs eager: loss | bounds | eager nudged 1e-7 vs eager: loss | bounds |"
        )
        print("|---|---|---|---|---|")
        for method in args.methods.split(","):
            t = trajectory(model, method, args.bits, calib, shape, args.trajectory_iters)
            print(
                f"| {method} | {t['fused_loss_gap']:.2%} | {t['fused_bound_gap']:.2e} | "
                f"{t['nudged_loss_gap']:.2%} | {t['nudged_bound_gap']:.2e} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
