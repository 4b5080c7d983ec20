"""One-command GPU check: CUDA tests, forward/training speed vs the reference, a smoke run.

    python benchmarks/gpu_check.py                        # on a CUDA machine: <= 8 min on one H100
    python benchmarks/gpu_check.py --device cpu --smoke   # self-check of this script (tiny sizes)

Four sections, each time-boxed (what does not fit is skipped with a note, and
the total stays within ``--budget`` seconds):

1. ``tests``: ``pytest -m cuda`` (tests/test_cuda.py): every architecture x
   {ln, iln} on CUDA equals the CPU (fp32, TF32 off), i-LN statistics stay fp32
   under bf16/fp16, exact resume is bit-identical with deterministic kernels,
   DDP with NCCL and one process equals the single process, the exact
   large-image path and tiling on CUDA.
2. ``forward``: latency and peak memory of irformer (``ln``, and ``iln`` with the
   same weights) against the reference implementation (spandrel 0.4.2, the
   official code's layout) for SwinIR-light x4 and HAT-S x4 on a 480x640 LR
   input, in fp32 / bf16 / fp16, eager and ``torch.compile``. CUDA-event timing
   after warm-up, median of interleaved repeats; peak memory is the CUDA
   allocator's peak during one forward above what was allocated before it.
3. ``train``: iterations/s and images/s of irformer's trainer (sample stream,
   EMA, logging; bf16 autocast) against a plain loop (Adam + L1 around the
   reference model on pre-made batches) at the paper's batch/patch
   (configs/swinir_1/sr_x4_ln.yaml, configs/hat_1/sr_x4_ln.yaml).
4. ``smoke``: ~2 minutes of configs/swinir_1/sr_x2_iln.yaml on scikit-image's
   bundled photos with the feature probes on: the loss must fall and the
   probes must record.

Targets, reported as ratios: forward <= 0.7x the reference time in bf16 at
480x640; training >= 1.2x the reference loop; peak memory <= the reference.
The report (JSON + markdown) goes to ``docs/gpu/gpu_check_<device>.{json,md}``.
Exit status: 0 when every section that ran passed (targets are reported, not
enforced), 1 when a test or a check failed, 2 when the device is unusable.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_arch import REFERENCE_CLASSES, _spandrel  # noqa: E402

SECTIONS: tuple[str, ...] = ("tests", "forward", "train", "smoke")
PLANNED_S = {"tests": 120.0, "forward": 150.0, "train": 80.0, "smoke": 115.0}
"""Seconds per section on one H100 (unused time rolls over to the next section)."""
SMOKE_PLANNED_S = {"tests": 150.0, "forward": 150.0, "train": 60.0, "smoke": 60.0}
"""Caps, not estimates (the smoke sections take ~20/25/3/12 s): a busy CI machine must not
turn a self-check into a time-box failure."""
DEFAULT_BUDGET_S = 475.0
FORWARD_MODELS = ("swinir_light_x4", "hat_s_x4")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_CONFIGS = {
    "swinir_light_x4": "configs/swinir_1/sr_x4_ln.yaml",
    "hat_1_x4": "configs/hat_1/sr_x4_ln.yaml",
}
SMOKE_CONFIG = "configs/swinir_1/sr_x2_iln.yaml"
TINY = {
    "swinir": {"embed_dim": 12, "depths": (1, 1), "num_heads": (2, 2), "window_size": 4},
    "hat": {
        "embed_dim": 16,
        "depths": (1, 1),
        "num_heads": (2, 2),
        "window_size": 4,
        "compress_ratio": 2,
        "squeeze_factor": 4,
    },
}
"""Architecture overrides of the ``--smoke`` mode (tiny models, same code paths)."""
TARGETS = {"forward_bf16": 0.7, "train": 1.2, "memory": 1.0}


class DeviceUnavailable(RuntimeError):
    """The requested device cannot run this check."""


# --------------------------------------------------------------------------- time boxing


@dataclass
class Clock:
    """Global and per-section deadlines: section i may run until the sum of the planned
    shares of sections 0..i (so time a section leaves unused rolls over), never past
    the global budget."""

    budget_s: float
    planned: dict[str, float]
    start: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def section_deadline(self, name: str) -> float:
        shares = 0.0
        for section in SECTIONS:
            shares += self.planned[section]
            if section == name:
                break
        scale = min(1.0, self.budget_s / sum(self.planned.values()))
        return self.start + min(self.budget_s, shares * scale)

    def left(self, name: str) -> float:
        return self.section_deadline(name) - time.monotonic()


# --------------------------------------------------------------------------- device


def describe_device(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_nvidia_smi("driver_version"),
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
        )
    else:
        info["name"] = "cpu"
    return info


def _git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _nvidia_smi(query: str) -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None


def device_slug(info: dict[str, Any], smoke: bool) -> str:
    """File-name part naming the device: ``nvidia-h100-80gb-hbm3``, ``cpu-smoke``."""
    name = re.sub(r"[^a-z0-9]+", "-", str(info.get("name", "device")).lower()).strip("-")
    return f"{name}-smoke" if smoke else name


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call: CUDA events around it on a GPU, wall clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it (MiB): the
    caching allocator's peak, so weights, input and other resident models do not
    count. None on the CPU (the smoke mode measures nothing)."""
    if device.type != "cuda":
        fn()
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# --------------------------------------------------------------------------- section 1


# Never give pytest less than this: its start-up alone (importing torch) takes seconds.
MIN_TESTS_BOX_S = 10.0


def run_tests(device: torch.device, clock: Clock, smoke: bool, work: Path) -> dict[str, Any]:
    """``pytest -m cuda`` in a subprocess on ``device``, read back from its JUnit XML."""
    timeout = max(MIN_TESTS_BOX_S, clock.left("tests"))
    junit = work / "pytest.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    cmd += ["--junitxml", str(junit), "-o", "junit_family=xunit1"]
    if smoke:
        # The script's path only (the tests' own CPU self-check is a slow test).
        cmd += ["tests/test_cuda.py", "-k", "equals_the_cpu and swinir_light_x2"]
    else:
        cmd += ["tests"]
    env = {**os.environ, "IRFORMER_TEST_DEVICE": device.type}
    if device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    log = work / "pytest.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        note = ""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGINT: pytest stops, reports what ran and still writes the JUnit file.
            note = f"pytest interrupted at its {timeout:.3g} s time box"
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result = parse_junit(junit) if junit.is_file() else {"cases": []}
    counts = {
        k: sum(c["outcome"] == k for c in result["cases"]) for k in ("passed", "failed", "skipped")
    }
    ok = proc.returncode == 0 and counts["failed"] == 0 and counts["passed"] > 0 and not note
    return {
        "status": "ok" if ok else "failed",
        "note": note,
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        **counts,
        "cases": result["cases"],
        "output_tail": "" if ok else log.read_text()[-3000:],
    }


def parse_junit(path: Path) -> dict[str, Any]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "")[:500]
            elif child.tag == "skipped":
                outcome, message = "skipped", (child.get("message") or "")[:300]
        cases.append(
            {
                "name": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "seconds": float(case.get("time", 0) or 0),
                "message": message,
            }
        )
    return {"cases": cases}


# --------------------------------------------------------------------------- models


def build_pair(preset: str, overrides: dict[str, Any]) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The reference (spandrel) model and irformer ``ln``/``iln`` models with its weights."""
    import inspect

    from irformer.archs import build_model, load_state_into, registry

    spec, _, kwargs = registry.resolve(preset)
    kwargs = {**kwargs, **overrides}
    package, cls_name = REFERENCE_CLASSES[spec.name]
    cls = getattr(getattr(_spandrel(), package), cls_name)
    accepted = inspect.signature(cls).parameters
    ref_kwargs = {
        k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k in accepted
    }
    torch.manual_seed(0)
    reference = cls(**ref_kwargs)
    ours = {}
    for norm in ("ln", "iln"):
        model = build_model(preset, norm=norm, **overrides)
        load_state_into(model, reference.state_dict(), source=f"reference {preset}")
        ours[norm] = model
    return reference, ours


def arch_overrides(preset: str, smoke: bool) -> dict[str, Any]:
    if not smoke:
        return {}
    from irformer.archs import registry

    return dict(TINY[registry.resolve(preset)[0].name])


# --------------------------------------------------------------------------- section 2


def run_forward(
    device: torch.device, clock: Clock, smoke: bool, size: tuple[int, int], backend: str
) -> dict[str, Any]:
    """Latency and peak memory, reference vs irformer, per model x precision x mode."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    built = {p: build_pair(p, arch_overrides(p, smoke)) for p in FORWARD_MODELS}
    x32 = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    # Priority order: the bf16 target first, compile after every eager case.
    units = [("eager", p, m) for p in ("bf16", "fp32", "fp16") for m in FORWARD_MODELS]
    units += [("compile", p, m) for p in ("bf16", "fp32", "fp16") for m in FORWARD_MODELS]
    if smoke:  # every code path once: autocast/cast, fp32, fp16, compile; both models
        swinir, hat = FORWARD_MODELS
        units = [
            ("eager", "bf16", swinir),
            ("eager", "fp32", hat),
            ("eager", "fp16", swinir),
            ("compile", "bf16", swinir),
        ]
    for mode, precision, preset in units:
        needed = 45.0 if (mode == "compile" and not smoke) else 3.0
        if clock.left("forward") < needed:
            notes.append(f"skipped {preset} {precision} {mode}: forward time box used up")
            continue
        reference, ours = built[preset]
        try:
            rows.append(
                forward_case(
                    preset, precision, mode, reference, ours, x32, device, clock, smoke, backend
                )
            )
        except Exception as exc:  # one failing case must not hide the others
            notes.append(f"{preset} {precision} {mode}: {type(exc).__name__}: {exc}"[:500])
            rows.append(
                {"model": preset, "precision": precision, "mode": mode, "error": str(exc)[:500]}
            )
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if mode == "compile":
                torch._dynamo.reset()
    errors = [r for r in rows if "error" in r]
    return {
        "status": "failed" if errors else "ok",
        "input": [1, 3, *size],
        "rows": rows,
        "notes": notes,
    }


def forward_case(
    preset: str,
    precision: str,
    mode: str,
    reference: nn.Module,
    ours: dict[str, nn.Module],
    x32: Tensor,
    device: torch.device,
    clock: Clock,
    smoke: bool,
    backend: str,
) -> dict[str, Any]:
    """One model x precision x mode: interleaved timings, peak memory, output agreement.

    Low precision: irformer casts weights and input (``irformer restore --precision``'s
    path, i-LN statistics in fp32); the reference runs under autocast, because cast to
    bf16/fp16 its shifted-window attention fails (its fp32 mask promotes the scores, and
    ``attn @ v`` then mixes dtypes). ``ln_autocast`` is irformer under the same autocast.
    """
    dtype = PRECISIONS[precision]
    low = dtype != torch.float32

    def prepare(model: nn.Module, cast: bool) -> nn.Module:
        model = copy.deepcopy(model).to(device=device, dtype=dtype if cast else None).eval()
        if mode == "compile":
            model = torch.compile(model, backend=backend, dynamic=False)
        return model

    def autocast(model: nn.Module) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=low):
                return model(x32)

        return run

    x = x32.to(dtype)
    fns: dict[str, Callable[[], Tensor]] = {"ref": autocast(prepare(reference, cast=False))}
    # Compiling takes minutes at 480x640: only the reference and ln are compiled.
    for norm in ("ln",) if mode == "compile" else ("ln", "iln"):
        model = prepare(ours[norm], cast=True)
        fns[norm] = lambda model=model: model(x)
    if low and mode != "compile":
        fns["ln_autocast"] = autocast(prepare(ours["ln"], cast=False))
    compile_s: dict[str, float] = {}
    with torch.inference_mode():
        if mode == "compile":
            for name, fn in fns.items():  # the first call compiles: wall clock, synchronised
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                compile_s[name] = time.perf_counter() - t0
        outputs = {name: fn().float() for name, fn in fns.items()}
        ln_vs_ref = (outputs["ln"] - outputs["ref"]).abs().max().item()
        finite = {name: bool(torch.isfinite(out).all()) for name, out in outputs.items()}
        del outputs
        first = timed(fns["ref"], device)
        for _ in range(1 if smoke else 3):  # warm-up
            for fn in fns.values():
                fn()
        synchronize(device)
        # Interleaved repeats: every implementation sees the same clocks and temperature.
        budget = min(clock.left("forward") - 5.0, 2.0 if smoke else 12.0)
        repeats = int(max(3, min(20, budget / max(len(fns) * first, 1e-3))))
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(timed(fn, device))
        memory = {name: peak_memory_mib(fn, device) for name, fn in fns.items()}
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    row: dict[str, Any] = {
        "model": preset,
        "precision": precision,
        "mode": mode,
        "repeats": repeats,
        "ms": ms,
        "ln_vs_ref": ms["ln"] / ms["ref"],
        "iln_vs_ref": ms["iln"] / ms["ref"] if "iln" in ms else None,
        "peak_mib": memory,
        "ln_vs_ref_max_abs_diff": ln_vs_ref,
        "finite": finite,
    }
    if "ln_autocast" in ms:
        row["ln_autocast_vs_ref"] = ms["ln_autocast"] / ms["ref"]
    if memory["ref"] and memory["ln"] is not None:
        row["memory_ln_vs_ref"] = memory["ln"] / memory["ref"]
    if compile_s:
        row["compile_s"] = compile_s
    return row


# --------------------------------------------------------------------------- section 3


def make_pairs(scale: int, lr_side: int, n: int = 8) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(n):
        hr = torch.rand(3, lr_side * scale, lr_side * scale, generator=gen)
        pairs.append((F.avg_pool2d(hr[None], scale)[0], hr))
    return pairs


def plain_loop_rate(
    reference: nn.Module,
    batch: int,
    lr_patch: int,
    scale: int,
    device: torch.device,
    iters: int,
    warmup: int,
    time_box: float,
) -> dict[str, float]:
    """Adam + L1 around the reference model under bf16 autocast, pre-made batches."""
    model = copy.deepcopy(reference).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.rand(batch, 3, lr_patch, lr_patch, generator=gen).to(device),
            torch.rand(batch, 3, lr_patch * scale, lr_patch * scale, generator=gen).to(device),
        )
        for _ in range(4)
    ]

    def step(i: int) -> None:
        lq, gt = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.l1_loss(model(lq).float(), gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    synchronize(device)
    start = time.perf_counter()
    done = 0
    while done < iters and time.perf_counter() - start < time_box:
        step(done)
        done += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"iters": done, "seconds": seconds, "it_s": done / seconds}


def trainer_rate(
    config: Path,
    overrides: list[str],
    pairs: list[tuple[Tensor, Tensor]],
    device: torch.device,
    iters: int,
    warmup: int,
    time_box: float,
    work: Path,
) -> dict[str, float]:
    """irformer's :func:`train` (sample stream, EMA, logging) at the config's batch/patch."""
    from irformer.engine.config import load_config
    from irformer.engine.data import TensorPairs
    from irformer.engine.train import TrainState, train

    stamps: dict[int, float] = {}

    def progress(state: TrainState) -> None:
        stamps[state.iteration] = time.perf_counter()  # after .item(): synchronised

    cfg = load_config(
        config,
        [
            *overrides,
            "train.bf16=true",
            f"train.iters={warmup + iters}",
            f"train.time_limit_min={(time_box + 30) / 60}",
            "val.every=0",
            f"log.out_dir={work}",
            f"log.every={10**9}",
            f"log.checkpoint_every={10**9}",
            "log.probe_interval=0",
            f"data.workers={4 if device.type == 'cuda' else 0}",
        ],
    )
    data = TensorPairs(pairs, patch_size=cfg.data.patch_size, scale=cfg.model.scale)
    train(cfg, train_set=data, progress=progress, device=device.type)
    last = max(stamps)
    done = last - warmup
    seconds = stamps[last] - stamps[warmup]
    return {"iters": done, "seconds": seconds, "it_s": done / seconds}


def run_train(device: torch.device, clock: Clock, smoke: bool, work: Path) -> dict[str, Any]:
    from irformer.engine.config import load_config

    rows, notes = [], []
    for preset, rel in TRAIN_CONFIGS.items():
        left = clock.left("train")
        if left < (5.0 if smoke else 20.0):
            notes.append(f"skipped {preset}: train time box used up")
            continue
        config = REPO / rel
        overrides = []
        if smoke:
            tiny = arch_overrides(preset, smoke=True)
            overrides = [
                "model.overrides="
                + json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in tiny.items()}),
                "data.batch_size=2",
                "data.patch_size=16",
            ]
        cfg = load_config(config, overrides)
        batch, patch, scale = cfg.data.batch_size, cfg.data.patch_size, cfg.model.scale
        reference, _ = build_pair(preset, arch_overrides(preset, smoke))
        box = max(2.0, (left - 10.0) / 4)  # ref + ln of this model + a share for the next
        warmup = 2 if smoke else 5
        iters = 3 if smoke else 200
        try:
            ref = plain_loop_rate(
                reference, batch, patch // scale, scale, device, iters, warmup, box
            )
            pairs = make_pairs(scale, max(2 * patch // scale, 16))
            ours = trainer_rate(
                config,
                overrides,
                pairs,
                device,
                ref["iters"],
                warmup,
                box,
                work / f"train_{preset}",
            )
        except Exception as exc:
            notes.append(f"{preset}: {type(exc).__name__}: {exc}"[:500])
            rows.append({"model": preset, "error": traceback.format_exc()[-1500:]})
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(
            {
                "model": preset,
                "config": rel,
                "batch": batch,
                "gt_patch": patch,
                "ref_it_s": ref["it_s"],
                "ours_it_s": ours["it_s"],
                "ref_images_s": ref["it_s"] * batch,
                "ours_images_s": ours["it_s"] * batch,
                "ratio": ours["it_s"] / ref["it_s"],
                "iters": {"ref": ref["iters"], "ours": ours["iters"]},
            }
        )
    errors = [r for r in rows if "error" in r]
    return {"status": "failed" if errors else "ok", "rows": rows, "notes": notes}


# --------------------------------------------------------------------------- section 4


def write_photos(folder: Path) -> None:
    """scikit-image's five bundled colour photos (CC0 / public domain) as PNG files."""
    import skimage.data

    from irformer.data.io import write_image

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"):
        write_image(folder / f"{name}.png", getattr(skimage.data, name)(), overwrite=True)


def run_smoke(device: torch.device, clock: Clock, smoke: bool, work: Path) -> dict[str, Any]:
    """Train the i-LN config for ~2 minutes (or a few iterations in smoke mode) with probes."""
    from irformer.analysis.probes import FEATURES_FILE, FeatureProbe
    from irformer.engine.config import load_config
    from irformer.engine.data import probe_batch_for
    from irformer.engine.train import read_metrics, train

    data, run = work / "photos", work / "smoke_run"
    write_photos(data)
    box = max(5.0, clock.left("smoke") - (3.0 if smoke else 10.0))
    overrides = [
        f"data.train=[{data}]",
        f"data.workers={min(8, os.cpu_count() or 1) if device.type == 'cuda' else 0}",
        "val.every=0",
        f"log.out_dir={run}",
        f"log.checkpoint_every={10**9}",
        f"train.time_limit_min={box / 60}",
    ]
    if smoke:
        overrides += [
            "model.overrides="
            + json.dumps(
                {
                    "embed_dim": 12,
                    "depths": [1],
                    "num_heads": [2],
                    "window_size": 4,
                    "stdnorm": True,
                }
            ),
            "data.batch_size=4",
            "data.patch_size=32",
            "train.lr=2e-3",
            "train.iters=40",
            "log.every=1",
            "log.probe_interval=10",
        ]
    else:
        overrides += ["train.iters=1000000", "log.every=20", "log.probe_interval=250"]
    cfg = load_config(REPO / SMOKE_CONFIG, overrides)
    probe = FeatureProbe(probe_batch_for(cfg), out_path=run / FEATURES_FILE)
    start = time.perf_counter()
    state = train(cfg, hooks=[probe], device=device.type)
    seconds = time.perf_counter() - start
    losses = [(r["iter"], r["loss"]) for r in read_metrics(run) if "loss" in r]
    tenth = max(1, len(losses) // 10)
    first = statistics.fmean(v for _, v in losses[:tenth])
    last = statistics.fmean(v for _, v in losses[-tenth:])
    probes = [json.loads(line) for line in (run / FEATURES_FILE).read_text().splitlines()]
    probe_iters = sorted({p["iter"] for p in probes})
    probe_finite = all(
        math.isfinite(float(p[k])) for p in probes for k in ("sq_mean", "max_abs", "entropy")
    )
    falls = last < 0.9 * first
    ok = falls and bool(probes) and probe_finite
    return {
        "status": "ok" if ok else "failed",
        "config": SMOKE_CONFIG,
        "iterations": state.iteration,
        "seconds": seconds,
        "it_s": state.iteration / seconds,
        "images_s": state.iteration * cfg.data.batch_size / seconds,
        "loss_first_tenth": first,
        "loss_last_tenth": last,
        "loss_falls": falls,
        "probe_calls": len(probe_iters),
        "probe_iterations": probe_iters,
        "probe_records": len(probes),
        "probe_values_finite": probe_finite,
        "probe_seconds": probe.elapsed_s,
    }


# --------------------------------------------------------------------------- report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    forward = report["sections"].get("forward", {})
    for r in forward.get("rows", []):
        if "error" in r:
            continue
        if r["precision"] == "bf16":
            rows.append(
                {
                    "what": f"forward {r['model']} bf16 {r['mode']} time, ln / reference",
                    "value": r["ln_vs_ref"],
                    "target": f"<= {TARGETS['forward_bf16']}",
                    "met": r["ln_vs_ref"] <= TARGETS["forward_bf16"],
                }
            )
        if r.get("memory_ln_vs_ref") is not None:
            rows.append(
                {
                    "what": f"forward {r['model']} {r['precision']} {r['mode']} memory, ln / ref",
                    "value": r["memory_ln_vs_ref"],
                    "target": f"<= {TARGETS['memory']}",
                    "met": r["memory_ln_vs_ref"] <= TARGETS["memory"],
                }
            )
    for r in report["sections"].get("train", {}).get("rows", []):
        if "error" not in r:
            rows.append(
                {
                    "what": f"training {r['model']} bf16 it/s, irformer / plain loop",
                    "value": r["ratio"],
                    "target": f">= {TARGETS['train']}",
                    "met": r["ratio"] >= TARGETS["train"],
                }
            )
    return rows


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    lines = [
        f"# GPU check: {dev.get('name')}",
        "",
        f"`{report['command']}` on {report['date']} (commit {dev.get('commit')}); "
        f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget"
        + ("; **smoke mode: tiny models, not measurements**" if report["smoke"] else "")
        + ".",
        "",
        "Device: " + ", ".join(f"{k} {v}" for k, v in dev.items() if k not in ("name", "commit")),
        "",
        "## Targets",
        "",
        "| what | value | target | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t['what']} | {t['value']:.2f} | {t['target']} | {'yes' if t['met'] else '**no**'} |"
        for t in report["targets"]
    ] or ["| (no measurement ran) | | | |"]
    sections = report["sections"]
    lines += ["", "## Sections", ""]
    for name in SECTIONS:
        sec = sections.get(name, {"status": "not run"})
        lines.append(
            f"- **{name}**: {sec['status']}" + (f" ({sec['note']})" if sec.get("note") else "")
        )
    tests = sections.get("tests")
    if tests and "cases" in tests:
        lines += [
            "",
            f"## 1. CUDA tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
            f"{tests.get('skipped', 0)} skipped",
            "",
        ]
        lines += [
            f"- {c['outcome']}: `{c['name']}` ({c['seconds']:.1f} s)"
            + (f" {c['message']}" if c["outcome"] != "passed" else "")
            for c in tests["cases"]
        ]
    fwd = sections.get("forward")
    if fwd and fwd.get("rows"):
        lines += [
            "",
            f"## 2. Forward, LR input {'x'.join(map(str, fwd['input'][2:]))} (batch 1)",
            "",
            "Median ms of interleaved repeats after warm-up (CUDA events); peak MiB = allocator "
            "peak during one forward above what was allocated before it.",
            "",
            "Low precision: irformer casts weights and input (its `--precision` path); the "
            "reference runs under autocast (cast, its masked attention mixes dtypes); "
            "`ln autocast` is irformer under the same autocast.",
            "",
            "| model | precision | mode | ref ms | ln ms | iln ms | ln autocast ms | ln/ref | "
            "iln/ref | peak MiB ref / ln / iln | ln/ref memory | max abs ln-ref | "
            "compile s ref / ln |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in fwd["rows"]:
            if "error" in r:
                lines.append(
                    f"| {r['model']} | {r['precision']} | {r['mode']} | error: {r['error'][:120]} |"
                )
                continue
            ms, mem = r["ms"], r["peak_mib"]
            comp = r.get("compile_s")
            lines.append(
                f"| {r['model']} | {r['precision']} | {r['mode']} | {ms['ref']:.2f} | "
                f"{ms['ln']:.2f} | {_fmt(ms.get('iln'))} | {_fmt(ms.get('ln_autocast'))} | "
                f"{r['ln_vs_ref']:.2f} | {_fmt(r['iln_vs_ref'])} | "
                f"{_fmt(mem['ref'], 0)} / {_fmt(mem['ln'], 0)} / {_fmt(mem.get('iln'), 0)} | "
                f"{_fmt(r.get('memory_ln_vs_ref'))} | {r['ln_vs_ref_max_abs_diff']:.1e} | "
                + (f"{comp['ref']:.0f} / {comp['ln']:.0f} |" if comp else "- |")
            )
    tr = sections.get("train")
    if tr and tr.get("rows"):
        lines += [
            "",
            "## 3. Training throughput, bf16 autocast",
            "",
            "| model (config) | batch | GT patch | plain loop it/s | irformer it/s | "
            "irformer images/s | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in tr["rows"]:
            if "error" in r:
                lines.append(f"| {r['model']} | error | | | | | |")
                continue
            lines.append(
                f"| {r['model']} (`{r['config']}`) | {r['batch']} | {r['gt_patch']} | "
                f"{r['ref_it_s']:.2f} | {r['ours_it_s']:.2f} | {r['ours_images_s']:.1f} | "
                f"{r['ratio']:.2f} |"
            )
    sm = sections.get("smoke")
    if sm and "iterations" in sm:
        lines += [
            "",
            f"## 4. Training smoke run (`{sm['config']}`, fp32, probes on)",
            "",
            f"{sm['iterations']} iterations in {sm['seconds']:.0f} s ({sm['it_s']:.2f} it/s, "
            f"{sm['images_s']:.1f} images/s); L1 loss {sm['loss_first_tenth']:.4f} (first tenth) "
            f"-> {sm['loss_last_tenth']:.4f} (last tenth): "
            + ("falls" if sm["loss_falls"] else "**does not fall**")
            + f". Probes: {sm['probe_calls']} calls, {sm['probe_records']} block records, "
            + ("all finite" if sm["probe_values_finite"] else "**non-finite values**")
            + f", {sm['probe_seconds']:.1f} s.",
        ]
    notes = [n for name in SECTIONS for n in sections.get(name, {}).get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- driver


def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 480x640, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def resolve_device(name: str, smoke: bool) -> torch.device:
    if name == "cpu":
        if not smoke:
            raise DeviceUnavailable(
                "--device cpu runs only with --smoke: this check measures the GPU path"
            )
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = torch.version.cuda or "a CPU-only build"
        raise DeviceUnavailable(
            f"CUDA is not available (torch {torch.__version__}, {build}; "
            f"torch.cuda.device_count() = {torch.cuda.device_count()}): this check needs a GPU. "
            "A CPU self-check of this script: --device cpu --smoke"
        )
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --smoke)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models and sizes: checks this script, measures nothing",
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "gpu")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="total seconds")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--size", type=parse_size, help="LR input HxW (default 480x640)")
    parser.add_argument(
        "--compile-backend",
        help="torch.compile backend (default inductor; eager in --smoke: same capture, no codegen)",
    )
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    try:
        device = resolve_device(args.device, args.smoke)
    except DeviceUnavailable as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops on a shared CPU: threads cost more than they save
        # The CUDA path never uses irformer's C++ CPU kernels; building them (minutes on a
        # busy machine) would only slow the self-check down. Children inherit this.
        os.environ["IRFORMER_CPU_KERNELS"] = "off"
    size = args.size or ((24, 32) if args.smoke else (480, 640))
    backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    clock = Clock(args.budget, SMOKE_PLANNED_S if args.smoke else PLANNED_S)
    from irformer.engine.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    info = describe_device(device)
    command = "python benchmarks/gpu_check.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    report: dict[str, Any] = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": args.smoke,
        "budget_s": args.budget,
        "device": info,
        "sections": {},
    }
    print(f"gpu_check on {info['name']} ({device}); budget {args.budget:.0f} s", flush=True)
    runners = {
        "tests": lambda work: run_tests(device, clock, args.smoke, work),
        "forward": lambda work: run_forward(device, clock, args.smoke, size, backend),
        "train": lambda work: run_train(device, clock, args.smoke, work),
        "smoke": lambda work: run_smoke(device, clock, args.smoke, work),
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in SECTIONS:
            if name not in wanted:
                report["sections"][name] = {"status": "not requested"}
                continue
            if clock.left(name) <= 1.0:
                report["sections"][name] = {"status": "skipped", "note": "over budget"}
                continue
            t0 = time.monotonic()
            work = Path(tmp) / name
            work.mkdir()
            try:
                result = runners[name](work)
            except Exception as exc:
                result = {
                    "status": "failed",
                    "note": f"{type(exc).__name__}: {exc}"[:300],
                    "traceback": traceback.format_exc()[-3000:],
                }
            result["seconds"] = time.monotonic() - t0
            report["sections"][name] = result
            print(f"  {name}: {result['status']} ({result['seconds']:.0f} s)", flush=True)
    report["elapsed_s"] = clock.elapsed()
    report["targets"] = targets(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"gpu_check_{device_slug(info, args.smoke)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    for t in report["targets"]:
        print(
            f"  {t['what']}: {t['value']:.2f} (target {t['target']}) "
            + ("met" if t["met"] else "NOT met")
        )
    print(f"report: {stem.with_suffix('.md')} and .json; {report['elapsed_s']:.0f} s")
    failed = [n for n, s in report["sections"].items() if s["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
