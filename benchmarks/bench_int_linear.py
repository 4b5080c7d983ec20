"""Real low-bit speed on CPU: integer Linears vs fake quantisation vs fp32 / bf16 (issue 17).

SwinIR-light x4 (the shipped ``ln`` reference by default) is quantised with
CompSRT's quantisers (Hadamard rotation, DOBI bounds; no DQC: speed does not
depend on the bounds) at each ``--bits`` width, saved as a packed file and
reloaded, and then timed at each LR ``--sizes`` (batch 1) as

* ``fp32``: the FP model (irformer's default execution, C++ attention kernel);
* ``bf16``: the FP model in bf16 (:func:`irformer.engine.precision.prepare_model_for_precision`);
* ``fake-quant``: the packed model with PyTorch ops for every quantiser;
* ``fake-quant fused``: the same with the fused quantiser kernel;
* ``integer``: the packed model's Linears as int8 x int8 -> int32 matmuls on the
  grid indices (:mod:`irformer.compress.int_linear`, indices read from the
  packed file); attention operands through the fused quantiser kernel;
* ``torch dynamic int8``: PyTorch's dynamically quantised W8A8 Linears of the FP
  model (a different, 8-bit model: for scale only).

Latency: median CPU seconds of this process (``time.process_time``: what an
otherwise idle core would take) and wall seconds, over ``--repeats`` runs
after a warm-up. Quality: PSNR-Y on ``--bench`` of the fake-quantised and the
integer model, and their largest output difference (they must agree up to float
rounding).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_int_linear.py --bits 4,8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "irformer" / "weights"
DATA = REPO.parent / "shared" / "data"


def timed(model: torch.nn.Module, x: torch.Tensor, repeats: int, context) -> tuple[float, float]:
    cpu, wall = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):
            c0, w0 = time.process_time(), time.perf_counter()
            with context():
                model(x)
            if i:  # the first run warms up
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def psnr_on(model: torch.nn.Module, bench, scale: int, context) -> tuple[float, list]:
    from irformer.data.io import tensor_to_image
    from irformer.metrics import compute_metrics

    scores, outs = [], []
    with torch.inference_mode():
        for item in bench:
            lq = torch.from_numpy(np.ascontiguousarray(item.lq.transpose(2, 0, 1)))[None].float()
            with context():
                out = model(lq)
            outs.append(out)
            img = tensor_to_image(out)
            scores.append(compute_metrics(img, item.gt, task="sr", scale=scale)["psnr"])
    return float(np.mean(scores)), outs


def profile(variants: dict, size: int, top: int = 12) -> int:
    """Top operators (self CPU time) of one forward of every variant at ``size`` px."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for name, (m, context, dtype) in variants.items():
        with torch.inference_mode(), context():
            m(x.to(dtype))  # warm-up
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                m(x.to(dtype))
        print()
        print(f"## {name}, {size} px")
        print()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=WEIGHTS / "swinir_light_x4_ln.safetensors")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib", type=Path, default=DATA / "train" / "BSD200")
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--data-root", type=Path, default=DATA)
    parser.add_argument("--bench", default="Set5", help="benchmark for the PSNR check ('' skips)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="LR side: instead of the tables, where one forward of each model spends its CPU "
        "time (torch.profiler, top operators)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from irformer.archs import load_checkpoint_model
    from irformer.compress.calibration import calibration_batch
    from irformer.compress.fused import fused_fake_quant
    from irformer.compress.int_linear import integer_linears_
    from irformer.compress.kernels import dynamic_int8, dynamic_int8_available
    from irformer.compress.methods import method_config, quantize_model
    from irformer.compress.pack import load_packed, read_packed_indices, save_packed
    from irformer.data.benchmarks import load_benchmark
    from irformer.engine.precision import prepare_model_for_precision

    model, meta = load_checkpoint_model(args.ckpt)
    model.eval()
    scale = int(meta["scale"])
    calib = calibration_batch(args.calib, scale=scale, batch=args.calib_batch, patch=64, seed=0)
    bench = (
        load_benchmark(args.bench, args.data_root, task="sr", scale=scale) if args.bench else None
    )
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"{args.ckpt.name} (norm {meta.get('norm')}) x{scale}, torch {torch.__version__}, "
        f"{args.threads} thread(s), CPU {torch.backends.cpu.get_cpu_capability()}; median of "
        f"{args.repeats} runs after a warm-up; CPU s = process time (wall s on the shared machine)"
    )
    variants: dict[str, tuple[torch.nn.Module, object, torch.dtype]] = {
        "fp32": (model, nullcontext, torch.float32),
        "bf16": (
            prepare_model_for_precision(copy.deepcopy(model), "bf16"),
            nullcontext,
            torch.bfloat16,
        ),
    }
    if dynamic_int8_available():
        variants["torch dynamic int8 (W8A8, FP model)"] = (
            dynamic_int8(model),
            nullcontext,
            torch.float32,
        )
    quality: list[str] = []
    if args.profile:
        args.bench = ""
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (int(b) for b in args.bits.split(",")):
            cfg = method_config("compsrt", wbits=bits, abits=bits, dqc_iters=0)
            fake = quantize_model(model, cfg, calib).model.eval()
            path = Path(tmp) / f"w{bits}.safetensors"
            save_packed(fake, cfg, path)
            packed = load_packed(path, model)
            integer = copy.deepcopy(packed)
            converted = integer_linears_(integer, read_packed_indices(path))
            variants[f"W{bits}A{bits} fake-quant"] = (packed, nullcontext, torch.float32)
            variants[f"W{bits}A{bits} fake-quant fused"] = (packed, fused_fake_quant, torch.float32)
            variants[f"W{bits}A{bits} integer ({len(converted)} Linears)"] = (
                integer,
                fused_fake_quant,
                torch.float32,
            )
            if bench is not None:
                p_fake, outs_fake = psnr_on(packed, bench, scale, nullcontext)
                p_int, outs_int = psnr_on(integer, bench, scale, fused_fake_quant)
                gap = max(
                    float((a - b).abs().max()) for a, b in zip(outs_fake, outs_int, strict=True)
                )
                quality.append(
                    f"| W{bits}A{bits} | {p_fake:.4f} | {p_int:.4f} | {p_int - p_fake:+.4f} "
                    f"| {gap:.2e} |"
                )
        if args.profile:
            return profile(variants, args.profile)
        print()
        print(
            "| model | "
            + " | ".join(f"{s} px CPU s | {s} px wall s" for s in sizes)
            + " | vs fp32 (CPU, largest) |"
        )
        print("|---|" + "---|---|" * len(sizes) + "---|")
        base = None
        for name, (m, context, dtype) in variants.items():
            cells = []
            last = 0.0
            for size in sizes:
                x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
                cpu, wall = timed(m, x.to(dtype), args.repeats, context)
                cells += [f"{cpu:.3f}", f"{wall:.3f}"]
                last = cpu
            base = base or last
            print(f"| {name} | " + " | ".join(cells) + f" | {base / last:.2f}x |", flush=True)
    if quality:
        print()
        print(f"PSNR-Y on {bench.name} (x{scale}):")
        print()
        print("| W/A | fake-quant | integer | difference | max abs output difference |")
        print("|---|---|---|---|---|")
        print("\n".join(quality))
    return 0


if __name__ == "__main__":
    sys.exit(main())
