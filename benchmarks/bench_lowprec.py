"""bf16 vs fp32 inference on this CPU: latency and PSNR change in one run (issue 6).

For each model (SwinIR-light and HAT_1 by default) every Set5 LR image runs in
fp32 and in bf16 alternately (``--repeats`` times, best time kept, so load from
other processes hits both alike); the outputs are scored (PSNR-Y / SSIM, the
paper's protocol) and compared. bf16 uses
:func:`irformer.engine.precision.prepare_model_for_precision` (weights and features
in bf16, channels-last convolutions, i-LN statistics in fp32). Each precision
runs with window attention and i-LN in the fused CPU kernels
(:mod:`irformer.cpu_kernels`, ``+kernel``) and in PyTorch ops (no suffix),
whatever the default policy, so every ratio is in the table.
Target: bf16 >= 2x faster than fp32 at <= 0.05 dB loss with the reference
checkpoints.

Without checkpoints (``--ckpt-swinir`` / ``--ckpt-hat`` or the shipped
``irformer/weights/swinir_light_x2_iln.safetensors``) models are randomly
initialised, and the output says so: latency is meaningful, the PSNR is not.

    .venv/bin/python benchmarks/bench_lowprec.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_arch import add_malloc_flag, apply_malloc_flag  # noqa: E402

WEIGHTS = REPO / "src" / "irformer" / "weights"
PRESETS = {"swinir_light": "swinir_light_x{s}", "hat_1": "hat_1_x{s}"}


def load(kind: str, ckpt: Path | None, scale: int) -> tuple[torch.nn.Module, int, str]:
    from irformer.archs import build_model, load_checkpoint_model

    if ckpt is None and kind == "swinir_light":
        default = WEIGHTS / f"swinir_light_x{scale}_iln.safetensors"
        ckpt = default if default.is_file() else None
    if ckpt is not None:
        model, meta = load_checkpoint_model(ckpt)
        return model.eval(), int(meta["scale"]), f"{ckpt.name} (norm={meta['norm']})"
    torch.manual_seed(0)
    model = build_model(PRESETS[kind].format(s=scale), norm="iln", stdnorm=True).eval()
    return model, scale, "RANDOM weights (no checkpoint): PSNR not meaningful"


def bench_model(kind: str, args: argparse.Namespace) -> None:
    from irformer.data.benchmarks import load_benchmark
    from irformer.data.io import tensor_to_image
    from irformer.engine.precision import prepare_model_for_precision
    from irformer.metrics import compute_metrics

    model, scale, source = load(kind, getattr(args, f"ckpt_{kind.split('_')[0]}"), args.scale)
    bench = load_benchmark(args.bench, args.data_root, task="sr", scale=scale)
    fp32 = prepare_model_for_precision(copy.deepcopy(model), "fp32")
    bf16 = prepare_model_for_precision(copy.deepcopy(model), "bf16")
    runs = {"fp32": fp32, "fp32+kernel": fp32, "bf16": bf16, "bf16+kernel": bf16}
    policy = {"fp32": "off", "fp32+kernel": "all", "bf16": "off", "bf16+kernel": "all"}
    if args.compile:
        # Compilation happens in the untimed warm-up call, once per image size.
        for name in ("fp32", "bf16"):
            runs[f"{name}+compile"] = torch.compile(runs[name], dynamic=False)
            policy[f"{name}+compile"] = "off"
    times = {k: 0.0 for k in runs}
    psnr = {k: [] for k in runs}
    ssim = {k: [] for k in runs}
    gap = {k: [] for k in runs}
    with torch.inference_mode():
        for item in bench:
            lq = torch.from_numpy(np.ascontiguousarray(item.lq.transpose(2, 0, 1)))[None].float()
            outs: dict[str, torch.Tensor] = {}
            best = {k: float("inf") for k in runs}
            for name, m in runs.items():  # warm-up (and compile) outside the timing
                os.environ["IRFORMER_CPU_KERNELS"] = policy[name]
                dtype = torch.bfloat16 if name.startswith("bf16") else torch.float32
                outs[name] = m(lq.to(dtype)).float()
            for _ in range(args.repeats):
                for name, m in runs.items():
                    os.environ["IRFORMER_CPU_KERNELS"] = policy[name]
                    dtype = torch.bfloat16 if name.startswith("bf16") else torch.float32
                    x = lq.to(dtype)
                    t0 = time.perf_counter()
                    m(x)
                    best[name] = min(best[name], time.perf_counter() - t0)
            ref = tensor_to_image(outs["fp32"])
            for name, out in outs.items():
                times[name] += best[name]
                img = tensor_to_image(out)
                scores = compute_metrics(img, item.gt, task="sr", scale=scale)
                psnr[name].append(scores["psnr"])
                ssim[name].append(scores["ssim"])
                gap[name].append(float(np.abs(img.astype(int) - ref.astype(int)).max()))
    print(
        f"{kind} x{scale} ({source}); {bench.name}, {len(bench)} images, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}:"
    )
    base_t, base_p = times["fp32"], float(np.mean(psnr["fp32"]))
    for name in runs:
        p = float(np.mean(psnr[name]))
        print(
            f"  {name:<13} {times[name]:7.3f} s  vs fp32 {base_t / times[name]:4.2f}x  "
            f"vs fp32+kernel {times['fp32+kernel'] / times[name]:4.2f}x  "
            f"PSNR-Y {p:.4f} dB (delta {p - base_p:+.4f})  SSIM {np.mean(ssim[name]):.4f}  "
            f"max |out - fp32 out| {max(gap[name]):.0f} grey levels",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="swinir_light,hat_1")
    parser.add_argument("--ckpt-swinir", type=Path, help="SwinIR-light checkpoint")
    parser.add_argument("--ckpt-hat", type=Path, help="HAT_1 checkpoint")
    parser.add_argument("--scale", type=int, default=2, help="scale of random-weight models")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--bench", default="Set5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    add_malloc_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    malloc = apply_malloc_flag(args)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"1-min load average {load_avg:.1f}, malloc {malloc}"
    )
    for kind in args.models.split(","):
        bench_model(kind.strip(), args)


if __name__ == "__main__":
    main()
