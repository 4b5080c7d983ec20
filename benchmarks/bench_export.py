"""Export evidence (issue 15): ONNX Runtime vs PyTorch speed, ONNX parity, compile graph breaks.

Three parts, each a sub-command writing JSON (``--out``) and printing a Markdown table:

``speed``
    SwinIR-light x4 fp32 (random weights, the official hyper-parameters), batch 1,
    LR inputs of ``--sizes`` px, ``--threads`` threads everywhere: irformer's PyTorch
    model (eager, ``torch.inference_mode``, the default execution context), ONNX
    Runtime (thread spinning off, so it leaves the cores to the next runner) running
    the file ``irformer models export`` writes (one file, dynamic
    sizes), and ONNX Runtime running the *official architecture* (spandrel 0.4.2's
    copy of the original code, same weights) exported the way users of the original
    code do: ``torch.onnx.export(dynamo=False)`` at the fixed input size (its masks
    and padding are Python ints baked in; one file per size, SwinIR#145). The three
    run interleaved, ``--repeats`` times after a warm-up; the median of each is
    reported as a ratio to ONNX Runtime on the irformer file, measured in the same
    process so the load of a shared machine cancels out.
``parity``
    For each preset x norm (random weights perturbed away from the init;
    ``--groups G --blocks N`` keeps G residual groups of N blocks, the preset's
    width, heads and window otherwise, where a full export would take too long
    on a small CPU): the export's own ONNX Runtime check (batch 1 at ``2ws x 3ws``, batch 2 at
    ``(2ws+3) x (ws+5)``, not a window multiple) -- max ``|ONNX - PyTorch|``.
``compile``
    ``torch._dynamo.explain`` of each preset x norm in eval (inference) and train
    mode: graphs and graph breaks.

    .venv/bin/python benchmarks/bench_export.py speed --out speed.json
    .venv/bin/python benchmarks/bench_export.py parity --out parity.json
    .venv/bin/python benchmarks/bench_export.py compile --out compile.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

PARITY_PRESETS = ("swinir_light_x4", "hat_1_x4", "drct_1_x4", "srformer_light_x4")
"""The i-LN paper's light models of each architecture (SwinIR-light, HAT_1, DRCT_1,
SRFormer-light), x4."""


def _session(path_or_bytes: str | bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # ORT's pool threads spin after each run by default; interleaved with PyTorch on
    # a 2-core machine they would steal the cores from the next runner.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def speed(
    sizes: list[int], repeats: int, threads: int, workdir: Path, reuse: Path | None = None
) -> dict[str, Any]:
    from bench_arch import build_ours, build_reference

    from irformer.export import export_model

    torch.set_num_threads(threads)
    preset = "swinir_light_x4"
    reference = _perturbed(build_reference(preset))
    ours = build_ours(preset, "ln", reference)
    ours_file = reuse if reuse is not None else workdir / "irformer.onnx"
    start = time.perf_counter()
    if reuse is None:  # (a reused file is checked below: max_abs_vs_pytorch)
        export_model(ours, dict(ours.irformer_meta), ours_file)
    export_s = time.perf_counter() - start
    ours_session = _session(str(ours_file), threads)
    rows = []
    for size in sizes:
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        official_file = workdir / f"official_{size}.onnx"
        with torch.inference_mode():
            torch.onnx.export(
                reference, (x,), str(official_file), opset_version=17, dynamo=False,
                input_names=["input"], output_names=["output"],
            )  # fmt: skip
        official_session = _session(str(official_file), threads)
        feed = {"input": x.numpy()}

        def run_torch(x: torch.Tensor = x) -> np.ndarray:
            with torch.inference_mode():
                return ours(x).numpy()

        runners = {
            "pytorch": run_torch,
            "ort_irformer": lambda feed=feed: ours_session.run(None, feed)[0],
            "ort_official": lambda feed=feed, s=official_session: s.run(None, feed)[0],
        }
        outputs = {name: run() for name, run in runners.items()}  # warm-up
        diffs = {
            name: float(np.abs(out - outputs["pytorch"]).max()) for name, out in outputs.items()
        }
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(repeats):
            for name, run in runners.items():
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
        median = {name: statistics.median(t) for name, t in times.items()}
        base = median["ort_irformer"]
        rows.append(
            {
                "size": size,
                "median_s": median,
                "times_s": times,
                "ratio_to_ort_irformer": {k: v / base for k, v in median.items()},
                "max_abs_vs_pytorch": diffs,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"preset": preset, "threads": threads, "export_s": export_s, "rows": rows}


def speed_table(result: dict[str, Any]) -> str:
    lines = [
        "| LR px | PyTorch (irformer) | ORT, irformer file | ORT, official arch "
        "| PyTorch / ORT irformer | ORT official / ORT irformer |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        m, r = row["median_s"], row["ratio_to_ort_irformer"]
        lines.append(
            f"| {row['size']} | {m['pytorch']:.3f} s | {m['ort_irformer']:.3f} s "
            f"| {m['ort_official']:.3f} s | {r['pytorch']:.2f} | {r['ort_official']:.2f} |"
        )
    return "\n".join(lines)


def _shortened(preset: str, groups: int, blocks: int) -> dict[str, object]:
    """Constructor overrides keeping ``groups`` residual groups of at most ``blocks``
    blocks each (width, heads, window, head unchanged); {} when ``groups`` is 0."""
    if groups <= 0:
        return {}
    from irformer.archs import registry

    _, _, kwargs = registry.resolve(preset)
    depths, heads = tuple(kwargs["depths"]), tuple(kwargs["num_heads"])  # type: ignore[arg-type]
    return {
        "depths": tuple(min(d, blocks) for d in depths[:groups]),
        "num_heads": heads[:groups],
    }


def parity(
    presets: list[str],
    norms: list[str],
    threads: int,
    workdir: Path,
    groups: int = 0,
    blocks: int = 2,
) -> dict[str, Any]:
    from irformer.archs import build_model
    from irformer.export import export_model

    torch.set_num_threads(threads)
    rows = []
    for preset in presets:
        overrides = _shortened(preset, groups, blocks)
        for norm in norms:
            torch.manual_seed(0)
            model = _perturbed(build_model(preset, norm=norm, **overrides))
            path = workdir / f"{preset}_{norm}.onnx"
            start = time.perf_counter()
            result = export_model(model, dict(model.irformer_meta), path)
            rows.append(
                {
                    "preset": preset,
                    "overrides": {k: list(v) for k, v in overrides.items()},
                    "norm": norm,
                    "checks": [
                        {"shape": list(c.shape), "max_abs_diff": c.max_abs_diff}
                        for c in result.checks
                    ],
                    "tolerance": result.tolerance,
                    "export_s": time.perf_counter() - start,
                    "file_mb": path.stat().st_size / 2**20,
                    "fp16_safe": result.meta.get("fp16_safe"),
                }
            )
            path.unlink()
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"threads": threads, "rows": rows}


def parity_table(result: dict[str, Any]) -> str:
    lines = [
        "| preset | norm | input (B, C, H, W) | max abs diff | input (B, C, H, W) "
        "| max abs diff | export s | MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        cells = " | ".join(f"{tuple(c['shape'])} | {c['max_abs_diff']:.2e}" for c in row["checks"])
        depths = row.get("overrides", {}).get("depths")
        name = row["preset"] + (f" (depths {tuple(depths)})" if depths else "")
        lines.append(
            f"| {name} | {row['norm']} | {cells} | {row['export_s']:.0f} | {row['file_mb']:.1f} |"
        )
    return "\n".join(lines)


def compile_counts(presets: list[str], norms: list[str]) -> dict[str, Any]:
    from irformer.archs import build_model

    rows = []
    for preset in presets:
        for norm in norms:
            torch.manual_seed(0)
            model = build_model(preset, norm=norm, drop_path_rate=0.0)
            ws = int(model.window_size)
            x = torch.rand(1, int(model.in_chans), ws + 3, ws + 5)
            row: dict[str, Any] = {"preset": preset, "norm": norm}
            for mode in ("eval", "train"):
                torch._dynamo.reset()
                model.train(mode == "train")
                if mode == "eval":
                    with torch.no_grad():
                        explained = torch._dynamo.explain(model)(x)
                else:
                    explained = torch._dynamo.explain(model)(x)
                row[mode] = {
                    "graphs": explained.graph_count,
                    "graph_breaks": explained.graph_break_count,
                    "reasons": [str(b.reason) for b in explained.break_reasons][:5],
                }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {"rows": rows}


def compile_table(result: dict[str, Any]) -> str:
    lines = [
        "| preset | norm | graphs (inference) | graph breaks (inference) "
        "| graphs (training) | graph breaks (training) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        e, t = row["eval"], row["train"]
        lines.append(
            f"| {row['preset']} | {row['norm']} | {e['graphs']} | {e['graph_breaks']} "
            f"| {t['graphs']} | {t['graph_breaks']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("speed", "parity", "compile"))
    parser.add_argument("--sizes", default="64,128,256", help="speed: LR sides in px")
    parser.add_argument("--repeats", type=int, default=5, help="speed: timed runs per runner")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--presets", default=",".join(PARITY_PRESETS))
    parser.add_argument("--norms", default="ln,iln")
    parser.add_argument(
        "--groups",
        type=int,
        default=0,
        help="parity: keep this many residual groups of each preset (0: all)",
    )
    parser.add_argument(
        "--blocks", type=int, default=2, help="parity with --groups: blocks per group"
    )
    parser.add_argument(
        "--reuse-onnx",
        type=Path,
        default=None,
        help="speed: time this earlier export of the same seeded model instead of exporting",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here")
    args = parser.parse_args()
    presets, norms = args.presets.split(","), args.norms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        if args.part == "speed":
            sizes = [int(s) for s in args.sizes.split(",")]
            result = speed(sizes, args.repeats, args.threads, Path(tmp), args.reuse_onnx)
            table = speed_table(result)
        elif args.part == "parity":
            result = parity(presets, norms, args.threads, Path(tmp), args.groups, args.blocks)
            table = parity_table(result)
        else:
            result = compile_counts(presets, norms)
            table = compile_table(result)
    import onnxruntime

    result["environment"] = {
        "command": " ".join(["benchmarks/bench_export.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.out is not None:
        from irformer.files import atomic_write

        atomic_write(args.out, json.dumps(result, indent=1))
    print(table)


if __name__ == "__main__":
    main()
