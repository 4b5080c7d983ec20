"""Large-image inference: peak memory/time of the exact path, and tiled vs full PSNR.

Two measurements (issue 3, "Large images, exactly"):

1. ``memory``: peak RSS and wall time of SwinIR-light x4 on a 1024x1024 LR input
   (a 4096x4096 output) through the exact chunked path, each run in a fresh
   subprocess so the peak belongs to that run alone. Target: <= 4 GB. The plain
   forward pass at a smaller size shows how its memory grows.
2. ``tiling``: on Set5 LR images, PSNR of tiled inference against the full
   (exact) output and against the ground truth, for an ``ln`` and an ``iln``
   model, plus the max difference between the exact chunked path and the plain
   pass. Uses the reference checkpoints when given (or shipped in
   ``irformer/weights``), otherwise randomly initialised models (said so in the
   output: their PSNR against GT is meaningless, their tiled-vs-full gap is not).

    .venv/bin/python benchmarks/bench_infer.py memory --size 1024
    .venv/bin/python benchmarks/bench_infer.py tiling --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "src" / "irformer" / "weights"
TARGET_RSS_GB = 4.0


def peak_rss_gb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_one(mode: str, size: int, chunk: int, threads: int) -> dict[str, object]:
    """Child process body: one forward pass, report time and peak RSS as JSON."""
    from irformer.archs import build_model
    from irformer.engine.infer import forward_exact, forward_plain

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("swinir_light_x4").eval()
    x = torch.rand(1, 3, size, size)
    base = peak_rss_gb()
    start = time.perf_counter()
    if mode == "exact":
        out = forward_exact(model, x, windows_per_chunk=chunk)
    else:
        out = forward_plain(model, x)
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "size": size,
        "chunk": chunk if mode == "exact" else None,
        "output": list(out.shape),
        "seconds": round(seconds, 2),
        "peak_rss_gb": round(peak_rss_gb(), 3),
        "rss_before_forward_gb": round(base, 3),
    }


def memory(args: argparse.Namespace) -> None:
    runs = [("exact", args.size)] + [("plain", s) for s in args.plain_sizes]
    runs += [("exact", s) for s in args.plain_sizes]
    results = []
    for mode, size in runs:
        cmd = [
            sys.executable,
            __file__,
            "_child",
            mode,
            str(size),
            str(args.chunk),
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{mode} {size}: failed\n{proc.stderr[-2000:]}")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        ok = (
            ""
            if mode != "exact" or size != args.size
            else (
                "  (target <= 4 GB: "
                + ("met" if res["peak_rss_gb"] <= TARGET_RSS_GB else "MISSED")
                + ")"
            )
        )
        print(
            f"swinir_light_x4 {mode:<5} LR {size}x{size} -> {res['output'][2]}x{res['output'][3]}: "
            f"{res['seconds']:8.1f} s, peak RSS {res['peak_rss_gb']:.2f} GB "
            f"(process before forward {res['rss_before_forward_gb']:.2f} GB){ok}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _default_ckpt(norm: str) -> Path | None:
    path = WEIGHTS / f"swinir_light_x2_{norm}.safetensors"
    return path if path.is_file() else None


def tiling(args: argparse.Namespace) -> None:
    from irformer.archs import build_model, load_checkpoint_model
    from irformer.data.benchmarks import load_benchmark
    from irformer.data.io import tensor_to_image
    from irformer.engine.infer import forward_exact, forward_plain, forward_tiled
    from irformer.metrics import compute_metrics

    torch.set_num_threads(args.threads)
    for norm in ("ln", "iln"):
        ckpt = getattr(args, f"ckpt_{norm}") or _default_ckpt(norm)
        if ckpt is not None:
            model, meta = load_checkpoint_model(ckpt)
            scale = int(meta["scale"])
            source = f"checkpoint {ckpt}"
        else:
            torch.manual_seed(0)
            scale = args.scale
            model = build_model(f"swinir_light_x{scale}", norm=norm).eval()
            source = "RANDOM weights (no checkpoint): PSNR vs GT is meaningless"
        bench = load_benchmark(args.bench, args.data_root, task="sr", scale=scale)
        rows = []
        for item in bench:
            lq = torch.from_numpy(np.ascontiguousarray(item.lq.transpose(2, 0, 1)))[None].float()
            full = forward_plain(model, lq)
            exact = forward_exact(model, lq, windows_per_chunk=args.chunk)
            tiled = forward_tiled(model, lq, tile=args.tile, overlap=args.overlap, blend=args.blend)
            full_img, tiled_img = tensor_to_image(full), tensor_to_image(tiled)
            rows.append(
                {
                    "name": item.name,
                    "exact_max_abs": float((exact - full).abs().max()),
                    "psnr_full": compute_metrics(full_img, item.gt, task="sr", scale=scale)["psnr"],
                    "psnr_tiled": compute_metrics(tiled_img, item.gt, task="sr", scale=scale)[
                        "psnr"
                    ],
                    "tiled_vs_full": _psnr_rgb(tiled_img, full_img),
                }
            )
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "name"}
        print(
            f"{norm:>3} ({source}); {bench.name} x{scale}, tile {args.tile} overlap "
            f"{args.overlap} ({args.blend}):\n"
            f"    PSNR-Y vs GT: full {mean['psnr_full']:.3f} dB, tiled {mean['psnr_tiled']:.3f} dB "
            f"(delta {mean['psnr_tiled'] - mean['psnr_full']:+.3f} dB); "
            f"tiled vs full output {mean['tiled_vs_full']:.2f} dB RGB; "
            f"exact path vs plain max |diff| {max(r['exact_max_abs'] for r in rows):.2e}",
            flush=True,
        )


def _psnr_rgb(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        mode, size, chunk, threads = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(run_one(mode, size, chunk, threads)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("memory")
    p.add_argument("--size", type=int, default=1024, help="LR side for the exact path")
    p.add_argument("--plain-sizes", type=int, nargs="*", default=[256], help="LR sides, plain")
    p.add_argument("--chunk", type=int, default=256, help="windows per chunk")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=memory)
    p = sub.add_parser("tiling")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--bench", default="Set5")
    p.add_argument("--scale", type=int, default=2, help="scale of the random-weight models")
    p.add_argument("--ckpt-ln", type=Path)
    p.add_argument("--ckpt-iln", type=Path)
    p.add_argument("--tile", type=int, default=48)
    p.add_argument("--overlap", type=int, default=16)
    p.add_argument("--blend", choices=("mean", "ramp"), default="mean")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=tiling)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
