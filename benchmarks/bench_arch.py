"""Forward latency and peak memory: irformer ``ln`` / ``iln`` vs the reference implementation.

For each model (a registry preset) and LR input size, one process builds the
reference (spandrel's independent implementation of the official code), copies
its random weights into irformer ``ln`` and ``iln`` models (same keys), checks
that ``ln`` reproduces the reference, and times the three forwards interleaved
(``torch.inference_mode``, fp32, batch 1; the best of ``--repeats`` runs, the
one least disturbed by other processes). That is done in ``--processes`` fresh
processes and the median reported with the range of the per-process ratios:
on a 2-vCPU VM the spread between processes is larger than within one. Peak
memory is measured in a fresh process per case: the peak RSS (``VmHWM``, reset
through ``/proc/self/clear_refs``) during one forward, minus the RSS before it.
Achieved GFLOP/s uses the reference's matmul/conv FLOPs (counted once at the
smallest size, scaled by the pixel count: every op is per pixel or per
fixed-size window) against the measured fp32 matmul rate.

    .venv/bin/python benchmarks/bench_arch.py                      # full run
    .venv/bin/python benchmarks/bench_arch.py --sizes 64 --repeats 1 --processes 1  # smoke
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
IMPLS: tuple[str, ...] = ("ref", "ln", "iln")
REFERENCE_CLASSES: dict[str, tuple[str, str]] = {
    "swinir": ("SwinIR", "SwinIR"),
    "hat": ("HAT", "HAT"),
    "drct": ("DRCT", "DRCT"),
}
"""irformer arch -> (spandrel architecture package, class)."""


# --------------------------------------------------------------------------- models


def _spandrel() -> Any:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import _install_torchvision_stub  # the stub the tests use

    _install_torchvision_stub()
    import spandrel.architectures as archs

    return archs


def build_reference(preset: str) -> nn.Module:
    """spandrel's model with the preset's hyper-parameters and random weights."""
    from irformer.archs import registry

    spec, _, kwargs = registry.resolve(preset)
    if spec.name not in REFERENCE_CLASSES:
        raise ValueError(f"no reference implementation for arch {spec.name!r}")
    package, cls_name = REFERENCE_CLASSES[spec.name]
    cls = getattr(getattr(_spandrel(), package), cls_name)
    accepted = inspect.signature(cls).parameters
    ref_kwargs = {
        k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k in accepted
    }
    torch.manual_seed(0)
    return cls(**ref_kwargs).eval()


def build_ours(preset: str, norm: str, reference: nn.Module) -> nn.Module:
    from irformer.archs import build_model

    model = build_model(preset, norm=norm)
    model.load_state_dict(reference.state_dict())  # official layout: the model's load hook
    return model.eval()


def build(preset: str, impl: str) -> nn.Module:
    reference = build_reference(preset)
    return reference if impl == "ref" else build_ours(preset, impl, reference)


# --------------------------------------------------------------------------- measures


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GEMM rate (GFLOP/s) with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def reference_flops(model: nn.Module, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.rand(1, 3, size, size))
    return int(counter.get_total_flops())


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``cpu`` (process CPU time) is a steadier measure on a shared machine, with
``--threads 1`` only: with more, OpenMP's spin-waiting is counted too."""


def time_case(preset: str, size: int, repeats: int, clock: str = "wall") -> dict[str, Any]:
    """Interleaved timings of ref/ln/iln on one input, plus the ln-vs-ref max abs diff."""
    now = CLOCKS[clock]
    reference = build_reference(preset)
    models = {
        "ref": reference,
        "ln": build_ours(preset, "ln", reference),
        "iln": build_ours(preset, "iln", reference),
    }
    x = torch.rand(1, 3, size, size)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        outputs = {k: m(x) for k, m in models.items()}  # warm-up (caches, allocator)
        max_diff = (outputs["ln"] - outputs["ref"]).abs().max().item()
        del outputs
        for _ in range(repeats):
            for name, model in models.items():
                start = now()
                model(x)
                times[name].append(now() - start)
    return {"preset": preset, "size": size, "times": times, "ln_vs_ref_max_abs": max_diff}


def memory_case(preset: str, size: int, impl: str) -> dict[str, Any]:
    """Peak RSS growth (MiB) during one forward, in this fresh process."""
    model = build(preset, impl)
    x = torch.rand(1, 3, size, size)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib("VmRSS")
        with torch.inference_mode():
            model(x)
        peak = _rss_kib("VmHWM")
    except OSError:  # no clear_refs: fall back to the lifetime peak
        before = _rss_kib("VmRSS")
        with torch.inference_mode():
            model(x)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"preset": preset, "size": size, "impl": impl, "peak_mib": (peak - before) / 1024}


# --------------------------------------------------------------------------- driver


def _worker(args: list[str], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--threads", str(threads), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    presets: list[str],
    sizes: list[int],
    repeats: int,
    threads: int,
    clock: str = "wall",
    processes: int = 3,
) -> dict[str, Any]:
    from irformer.archs import list_presets

    available = set(list_presets())
    skipped = [p for p in presets if p not in available]
    presets = [p for p in presets if p in available]
    rate = matmul_gflops()
    rows = []
    for preset in presets:
        flops64 = reference_flops(build_reference(preset), min(sizes))
        for size in sizes:
            # Fresh processes: run-to-run spread on this VM is mostly between
            # processes (up to ~30% at 2 threads), not between repeats in one.
            timings = [
                _worker(
                    ["--time", preset, str(size), "--repeats", str(repeats), "--clock", clock],
                    threads,
                )
                for _ in range(processes)
            ]
            memory = {
                impl: _worker(["--memory", preset, str(size), impl], threads)["peak_mib"]
                for impl in IMPLS
            }
            flops = flops64 * (size / min(sizes)) ** 2
            # Within a process the fastest repeat is the least disturbed one; across
            # processes the median (of times and of the per-process ratios) is reported.
            best = [{k: min(v) for k, v in t["times"].items()} for t in timings]
            med = {k: statistics.median(b[k] for b in best) for k in best[0]}
            ln_ref = [b["ln"] / b["ref"] for b in best]
            iln_ln = [b["iln"] / b["ln"] for b in best]
            rows.append(
                {
                    "preset": preset,
                    "size": size,
                    "ms": {k: 1e3 * v for k, v in med.items()},
                    "peak_mib": memory,
                    "gflop": flops / 1e9,
                    "gflops_per_s": {k: flops / v / 1e9 for k, v in med.items()},
                    "ln_vs_ref": statistics.median(ln_ref),
                    "ln_vs_ref_range": (min(ln_ref), max(ln_ref)),
                    "iln_vs_ln": statistics.median(iln_ln),
                    "iln_vs_ln_range": (min(iln_ln), max(iln_ln)),
                    "ln_vs_ref_max_abs": max(t["ln_vs_ref_max_abs"] for t in timings),
                    "times": [t["times"] for t in timings],
                }
            )
            print(_row_markdown(rows[-1], rate), flush=True)
    return {
        "machine": {
            "cpu": _cpu_name(),
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
            "clock": clock,
        },
        "matmul_gflops": rate,
        "repeats": repeats,
        "processes": processes,
        "skipped": skipped,
        "rows": rows,
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


HEADER = (
    "| model | LR size | ref ms | ln ms | iln ms | ln/ref (range) | iln/ln (range) | GFLOP | "
    "ln GFLOP/s (% of GEMM) | peak MiB ref / ln / iln | max abs ln-ref |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _span(bounds: tuple[float, float]) -> str:
    return f"{bounds[0]:.2f}-{bounds[1]:.2f}"


def _row_markdown(row: dict[str, Any], rate: float) -> str:
    ms, mem = row["ms"], row["peak_mib"]
    ln_rate = row["gflops_per_s"]["ln"]
    return (
        f"| {row['preset']} | {row['size']} | {ms['ref']:.0f} | {ms['ln']:.0f} | "
        f"{ms['iln']:.0f} | {row['ln_vs_ref']:.2f} ({_span(row['ln_vs_ref_range'])}) | "
        f"{row['iln_vs_ln']:.2f} ({_span(row['iln_vs_ln_range'])}) | "
        f"{row['gflop']:.1f} | {ln_rate:.0f} ({100 * ln_rate / rate:.0f}%) | "
        f"{mem['ref']:.0f} / {mem['ln']:.0f} / {mem['iln']:.0f} | "
        f"{row['ln_vs_ref_max_abs']:.1e} |"
    )


def add_malloc_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="glibc thresholds as the irformer CLI sets them (irformer.engine.runtime), or "
        "glibc's defaults; applies to both implementations and to child processes",
    )


def apply_malloc_flag(args: argparse.Namespace) -> str:
    """Set the allocator for this process and its children; returns what was applied."""
    from irformer.engine.runtime import tune_cpu_allocator

    os.environ["IRFORMER_MALLOC_TUNE"] = "1" if args.malloc == "tuned" else "0"
    return "tuned" if tune_cpu_allocator() else "glibc default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_malloc_flag(parser)
    parser.add_argument("--models", default="swinir_light_x4,hat_1_x4")
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--processes", type=int, default=3, help="fresh timing processes per case (median)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine; with --threads 1)",
    )
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--time", nargs=2, metavar=("PRESET", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=3, metavar=("P", "S", "I"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc = apply_malloc_flag(args)
    if args.time:
        print(json.dumps(time_case(args.time[0], int(args.time[1]), args.repeats, args.clock)))
        return 0
    if args.memory:
        print(json.dumps(memory_case(args.memory[0], int(args.memory[1]), args.memory[2])))
        return 0
    presets = args.models.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"threads={args.threads} repeats={args.repeats} clock={args.clock} ", end="")
    print(f"malloc={malloc} ", end="")
    print(f"load={os.getloadavg()}")
    print(HEADER, flush=True)
    result = run(presets, sizes, args.repeats, args.threads, args.clock, args.processes)
    print(f"fp32 GEMM (2048^3): {result['matmul_gflops']:.0f} GFLOP/s; CPU: {result['machine']}")
    for preset in result["skipped"]:
        print(f"skipped {preset}: not a registry preset (module missing?)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
