"""Peak memory of restoring one image, measured vs irformer's estimate (engine/memory.py).

Each measurement runs in a fresh process: build the model, read the peak RSS
(``ru_maxrss``), run one forward pass on a random ``size x size`` input through
one path (plain, exact, tiled), read the peak again; the difference is the
forward's extra memory. The same process prints irformer's estimate for that
model, size and path, so the table holds the ratio measured / estimated.

    python benchmarks/bench_memory.py --models swinir_light_x2,swinir_light_x4 \
        --sizes 256,512 --paths plain,exact,tiled --out docs/memory.json

``--restore`` instead runs ``irformer restore`` (default settings: the memory
planner picks the path) on a generated ``size x size`` PNG and reports its peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20


def _child(model_name: str, size: int, path: str, precision: str, threads: int) -> dict:
    import torch

    from irformer.archs import build_model
    from irformer.engine.infer import RestoreOptions, restore_tensor
    from irformer.engine.memory import estimate_peak_bytes
    from irformer.engine.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(threads)
    model = build_model(model_name, drop_path_rate=0.0).eval()
    options = RestoreOptions(
        precision=precision,  # type: ignore[arg-type]
        chunk_windows=256 if path == "exact" else None,
        tile=256 if path == "tiled" else None,
        tile_overlap=32,
    )
    estimate = estimate_peak_bytes(model, (size, size), options)
    x = torch.rand(1, model.in_chans, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    restore_tensor(model, x, options)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": model_name,
        "size": size,
        "path": path,
        "precision": precision,
        "measured_mb": (after - before) / MB,
        "estimated_mb": estimate.total / MB,
        "seconds": seconds,
    }


def _run_child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _restore_child(size: int, scale: int, extra: list[str]) -> dict:
    import numpy as np

    from irformer.data.io import write_image

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "big.png"
        rng = np.random.default_rng(0)
        write_image(src, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        cmd = [sys.executable, "-m", "irformer", "restore", str(src), "-o", str(Path(tmp) / "o")]
        cmd += ["--scale", str(scale), *extra]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, status, rusage = os.wait4(proc.pid, 0)
        out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
        return {
            "size": size,
            "scale": scale,
            "args": extra,
            "returncode": os.waitstatus_to_exitcode(status),
            "peak_mb": rusage.ru_maxrss / 1024,
            "seconds": time.perf_counter() - start,
            "stderr": err.strip().splitlines()[-6:],
            "stdout": out.strip().splitlines()[-2:],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=5, metavar=("MODEL", "SIZE", "PATH", "PREC", "THREADS"))
    parser.add_argument("--models", default="swinir_light_x2,swinir_light_x4")
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--paths", default="plain,exact,tiled")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--restore", default=None, help="SIZE:SCALE[,SIZE:SCALE] via the CLI")
    parser.add_argument("--restore-args", default="", help="extra restore flags (space-separated)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.child:
        model, size, path, precision, threads = args.child
        print(json.dumps(_child(model, int(size), path, precision, int(threads))))
        return
    rows = []
    if args.restore:
        for item in args.restore.split(","):
            size, scale = (int(v) for v in item.split(":"))
            row = _restore_child(size, scale, args.restore_args.split())
            print(json.dumps(row), flush=True)
            rows.append(row)
    else:
        for model in args.models.split(","):
            for size in args.sizes.split(","):
                for path in args.paths.split(","):
                    row = _run_child([model, size, path, args.precision, str(args.threads)])
                    ratio = row["measured_mb"] / row["estimated_mb"]
                    print(
                        f"{model:<22} {size:>5} {path:<6} measured {row['measured_mb']:8.0f} MB"
                        f"  estimated {row['estimated_mb']:8.0f} MB  ratio {ratio:.2f}"
                        f"  ({row['seconds']:.1f} s)",
                        flush=True,
                    )
                    rows.append(row)
    if args.out is not None:
        from irformer.files import atomic_write

        atomic_write(args.out, json.dumps({"command": sys.argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
