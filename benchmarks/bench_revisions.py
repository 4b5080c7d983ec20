"""Forward time of one preset at two git revisions of irformer, in alternating fresh processes.

Why: a refactor that promises "speed unchanged" needs a same-machine, same-moment A/B; two
benchmark runs taken minutes apart on a shared VM differ by more than the effect. Each
revision's ``src/`` is exported with ``git archive`` into a temporary folder; each case is
timed in ``--processes`` fresh processes per revision, interleaved A, B, A, B, ...; the table
gives the medians and the median of the per-pair ratios B/A with their range.

    python benchmarks/bench_revisions.py 6bbe6e0 HEAD --model swinir_light_x4 \
        --norms ln,iln --sizes 128,256 --processes 3

Both revisions run their own default inference path (``IRFORMER_CPU_KERNELS`` unset: the C++
kernels where they apply; each revision builds its own, tagged by source hash).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
from irformer.archs import build_model
from irformer.engine.runtime import tune_cpu_allocator
tune_cpu_allocator()
name, norm = sys.argv[1:3]
size, threads, repeats = (int(a) for a in sys.argv[3:6])
torch.manual_seed(0)
torch.set_num_threads(threads)
model = build_model(name, norm=norm, drop_path_rate=0.0).eval()
x = torch.rand(1, 3, size, size)
with torch.inference_mode():
    model(x)  # warm-up (and the kernels' first-use build)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
print(json.dumps({"ms": 1000 * min(times)}))
"""


def export_source(rev: str, into: Path) -> Path:
    """``git archive REV src`` unpacked under ``into``; returns the ``src`` folder."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "src"], cwd=REPO, check=True, capture_output=True
    ).stdout
    tar_path = into / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def time_once(src: Path, args: argparse.Namespace, norm: str, size: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-c", CHILD, args.model, norm, str(size), str(args.threads)]
    out = subprocess.run(
        [*cmd, str(args.repeats)], env=env, check=True, capture_output=True, text=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["ms"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev_a", help="baseline revision (e.g. the commit before a refactor)")
    parser.add_argument("rev_b", help="revision to compare (e.g. HEAD)")
    parser.add_argument("--model", default="swinir_light_x4")
    parser.add_argument("--norms", default="ln,iln")
    parser.add_argument("--sizes", default="64,128,256", help="LR sizes in pixels")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per revision")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per process (min)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="irformer-revs-") as tmp:
        src_a = export_source(args.rev_a, Path(tmp) / "a")
        src_b = export_source(args.rev_b, Path(tmp) / "b")
        load = os.getloadavg()
        print(
            f"{args.model}, {args.threads} threads, {args.processes} processes x "
            f"{args.repeats} repeats, load {load[0]:.1f}"
        )
        print(f"| norm | LR size | {args.rev_a} ms | {args.rev_b} ms | B/A (range) |")
        print("|---|---|---|---|---|")
        for norm in args.norms.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                a_ms, b_ms = [], []
                for _ in range(args.processes):
                    a_ms.append(time_once(src_a, args, norm, size))
                    b_ms.append(time_once(src_b, args, norm, size))
                ratios = [b / a for a, b in zip(a_ms, b_ms, strict=True)]
                print(
                    f"| {norm} | {size} | {statistics.median(a_ms):.0f} | "
                    f"{statistics.median(b_ms):.0f} | {statistics.median(ratios):.2f} "
                    f"({min(ratios):.2f}-{max(ratios):.2f}) |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
