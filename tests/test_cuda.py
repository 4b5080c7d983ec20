"""The GPU path: CUDA = CPU output, fp32 i-LN statistics, exact resume, NCCL DDP, large images.

Marked ``cuda``: they skip without a GPU (CI keeps skipping them) and run with
``pytest -m cuda`` (``benchmarks/gpu_check.py`` does that first). With
``IRFORMER_TEST_DEVICE=cpu`` they run on the CPU instead: a self-check of the
tests themselves (the device comparisons are then CPU against CPU).

Tolerance of the CUDA-vs-CPU comparisons: fp32 with TF32 off,
``|cuda - cpu| <= 1e-4 + 1e-4 * |cpu|`` elementwise; the two differ only in the
order of floating-point sums (cuBLAS/cuDNN vs oneDNN and irformer's C++ kernels).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

from irformer.archs import build_model
from irformer.engine.checkpoint import list_checkpoints, load_checkpoint
from irformer.engine.infer import (
    RestoreOptions,
    forward_exact,
    forward_plain,
    forward_tiled,
    restore_tensor,
)
from irformer.norms import HolisticLayerNorm, holistic_stats

DEVICE = os.environ.get("IRFORMER_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE.startswith("cuda") and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); run "
        "`python benchmarks/gpu_check.py` on a GPU machine, or set IRFORMER_TEST_DEVICE=cpu "
        "to self-check these tests on the CPU",
    ),
]
RTOL = ATOL = 1e-4

SMALL: dict[str, dict[str, object]] = {
    "swinir_classical_x2": {
        "embed_dim": 12,
        "depths": (2, 2),
        "num_heads": (2, 2),
        "window_size": 4,
    },
    "swinir_light_x2": {"embed_dim": 12, "depths": (2, 2), "num_heads": (2, 2), "window_size": 4},
    "hat_s_x2": {
        "embed_dim": 16,
        "depths": (2, 2),
        "num_heads": (2, 4),
        "window_size": 4,
        "compress_ratio": 2,
        "squeeze_factor": 4,
    },
    "drct_x2": {"embed_dim": 16, "depths": (2, 2), "num_heads": (4, 4), "window_size": 8, "gc": 6},
    "srformer_light_x2": {"embed_dim": 16, "depths": (2,), "num_heads": (2,), "window_size": 8},
}
"""Every architecture (SwinIR classical and light, HAT, DRCT, SRFormer) at test size."""


@pytest.fixture(autouse=True)
def no_tf32() -> Iterator[None]:
    """fp32 means fp32: TF32 would round matmul inputs to 10 mantissa bits."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def small_model(preset: str, norm: str, *, gain: float = 4.0) -> nn.Module:
    """A seeded small model whose linear weights are scaled by ``gain``, so that the
    attention/MLP branches weigh as much as in a trained model (else the output is
    mostly the skip connections and any comparison passes)."""
    torch.manual_seed(0)
    model = build_model(preset, norm=norm, drop_path_rate=0.0, **SMALL[preset]).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(gain)
    return model


# --------------------------------------------------------------------------- CUDA = CPU


@pytest.mark.parametrize("norm", ["ln", "iln"])
@pytest.mark.parametrize("preset", list(SMALL))
def test_every_arch_on_the_device_equals_the_cpu(preset: str, norm: str) -> None:
    model = small_model(preset, norm)
    x = torch.rand(2, 3, 21, 30, generator=torch.Generator().manual_seed(1))  # pads to windows
    with torch.no_grad():
        expected = model(x)
        out = copy.deepcopy(model).to(DEVICE)(x.to(DEVICE)).cpu()
        weak = small_model(preset, norm, gain=1.0)(x)
    assert out.shape == expected.shape
    diff = (out - expected).abs().max().item()
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL, msg=f"max |diff| {diff:.2e}")
    assert (expected - weak).abs().max().item() > 10 * ATOL  # the branches matter


# --------------------------------------------------------------------------- i-LN statistics


LOW = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


def record_iln_statistics() -> tuple[list[tuple[torch.dtype, torch.dtype, float]], object]:
    """Patch i-LN's ``statistics`` to record (input dtype, statistics dtype, relative
    error against the same statistics computed in fp64 from that input)."""
    seen: list[tuple[torch.dtype, torch.dtype, float]] = []
    original = HolisticLayerNorm.statistics

    def spy(self: HolisticLayerNorm, x: torch.Tensor) -> torch.Tensor:
        stats = original(self, x)
        exact = holistic_stats(x.detach().double(), self.eps)
        error = ((stats.detach().double() - exact).abs() / (1 + exact.abs())).max().item()
        seen.append((x.dtype, stats.dtype, error))
        return stats

    return seen, mock.patch.object(HolisticLayerNorm, "statistics", spy)


@LOW
def test_iln_statistics_stay_fp32_under_autocast(dtype: torch.dtype) -> None:
    model = small_model("swinir_light_x2", "iln").to(DEVICE).train()
    seen, patch = record_iln_statistics()
    linear_dtypes: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: linear_dtypes.add(out.dtype))
    x = torch.rand(2, 3, 16, 16, device=DEVICE)
    with patch:
        with torch.autocast(torch.device(DEVICE).type, dtype=dtype):
            out = model(x)
        out.float().mean().backward()  # the backward through the fp32 std runs too
    assert linear_dtypes == {dtype}  # autocast did run the layers in low precision
    assert seen and all(stats == torch.float32 for _, stats, _ in seen)
    worst = max(err for _, _, err in seen)
    assert worst < 1e-5, f"fp32 statistics differ from fp64 by {worst:.2e} (relative)"
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@LOW
def test_iln_statistics_stay_fp32_in_a_low_precision_model(dtype: torch.dtype) -> None:
    model = small_model("swinir_light_x2", "iln").to(DEVICE, dtype)
    seen, patch = record_iln_statistics()
    x = torch.rand(2, 3, 16, 16, device=DEVICE)
    with patch, torch.no_grad():
        out = model(x.to(dtype))
    with torch.no_grad():
        reference = small_model("swinir_light_x2", "iln").to(DEVICE)(x)
    assert seen and all(inp == dtype and stats == torch.float32 for inp, stats, _ in seen)
    worst = max(err for _, _, err in seen)
    assert worst < 1e-5, f"fp32 statistics of {dtype} features differ from fp64 by {worst:.2e}"
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max().item() < 0.05  # low precision, same model


# --------------------------------------------------------------------------- large images


def test_exact_path_and_tiling_on_the_device() -> None:
    model = small_model("swinir_light_x2", "iln")
    dev_model = copy.deepcopy(model).to(DEVICE)
    x = torch.rand(1, 3, 45, 61, generator=torch.Generator().manual_seed(2))
    xd = x.to(DEVICE)
    plain = forward_plain(dev_model, xd)
    exact = forward_exact(dev_model, xd, windows_per_chunk=5, tokens_per_chunk=48)
    torch.testing.assert_close(exact, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.cpu(), forward_plain(model, x), rtol=RTOL, atol=ATOL)
    tiled = forward_tiled(dev_model, xd, tile=24, overlap=8, blend="ramp")
    torch.testing.assert_close(
        tiled.cpu(), forward_tiled(model, x, tile=24, overlap=8, blend="ramp"), rtol=RTOL, atol=ATOL
    )
    assert (tiled - plain).abs().max().item() > 1e-3  # i-LN tiles see other statistics
    out, report = restore_tensor(dev_model, x, RestoreOptions(chunk_windows=7))
    assert report.finite and out.device == xd.device
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA memory statistics")
def test_exact_path_needs_less_gpu_memory_than_the_plain_pass() -> None:
    torch.manual_seed(0)
    model = build_model("swinir_light_x2", norm="iln").to(DEVICE).eval()
    x = torch.rand(1, 3, 256, 256, device=DEVICE)

    def peak(fn) -> tuple[torch.Tensor, int]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    plain, plain_bytes = peak(lambda: forward_plain(model, x))
    exact, exact_bytes = peak(lambda: forward_exact(model, x, windows_per_chunk=64))
    torch.testing.assert_close(exact, plain, rtol=1e-5, atol=1e-5)
    assert exact_bytes < plain_bytes, (exact_bytes, plain_bytes)


# --------------------------------------------------------------------------- training


CONFIG = """\
name: {name}
model:
  arch: swinir_light_x2
  norm: iln
  scale: 2
  overrides: {{embed_dim: 12, depths: [2], num_heads: [2], window_size: 4, img_size: 8,
              drop_path_rate: {drop_path}}}
data: {{train: [{data}], patch_size: 16, batch_size: 2, workers: {workers}}}
train: {{iters: {iters}, lr: 1.0e-3, step_size: 25, ema: 0.99}}
val: {{every: 0}}
log: {{out_dir: {out}, every: 1, checkpoint_every: {ckpt_every}, keep_last: 2}}
"""
RESUME_ITERS = 40
LAUNCHER = "import sys\nfrom irformer.cli import main\nsys.exit(main())\n"


def make_images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        small = (torch.rand(6, 6, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(small).resize((40, 40), Image.BICUBIC).save(folder / f"im{i}.png")
    return folder


def write_config(tmp_path: Path, name: str, **values: object) -> Path:
    defaults = {"workers": 0, "iters": RESUME_ITERS, "drop_path": 0.6, "ckpt_every": 10}
    text = CONFIG.format(
        name=name, data=tmp_path / "data", out=tmp_path / name, **{**defaults, **values}
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def train_command(launcher: Path, config: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(launcher),
        "train",
        "--config",
        str(config),
        "--no-progress",
        "--device",
        torch.device(DEVICE).type,
        "--deterministic",
        *extra,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["iter"] not in out, f"iteration {record['iter']} logged twice"
        out[record["iter"]] = record["loss"]
    return out


def test_killed_and_resumed_run_is_bit_identical_with_deterministic_kernels(
    tmp_path: Path,
) -> None:
    make_images(tmp_path / "data")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    ref = subprocess.run(
        train_command(launcher, write_config(tmp_path, "ref")), env=env(), capture_output=True
    )
    assert ref.returncode == 0, ref.stderr.decode()[-3000:]
    reference = losses(tmp_path / "ref")

    config = write_config(tmp_path, "killed", workers=2)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        train_command(launcher, config),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 15:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    saved = [it for it, _ in list_checkpoints(run_dir / "checkpoints")]
    assert saved and saved[-1] < RESUME_ITERS
    resumed = subprocess.run(
        train_command(launcher, config, "--resume"), env=env(), capture_output=True
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    again = losses(run_dir)
    assert sorted(again) == sorted(reference) == list(range(1, RESUME_ITERS + 1))
    mismatched = [it for it in reference if reference[it] != again[it]]
    assert not mismatched, f"losses differ at {mismatched[:10]} (resumed at {saved[-1]})"
    final = f"checkpoints/iter_{RESUME_ITERS:08d}.pth"
    a, b = load_checkpoint(tmp_path / "ref" / final), load_checkpoint(run_dir / final)
    for key in ("params", "params_ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"


def test_ddp_with_one_process_equals_the_single_process_run(tmp_path: Path) -> None:
    make_images(tmp_path / "data")
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    values = {"iters": 12, "drop_path": 0.0, "ckpt_every": 6}
    single = subprocess.run(
        train_command(launcher, write_config(tmp_path, "single", **values)),
        env=env(),
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "1",
            *train_command(launcher, write_config(tmp_path, "ddp", **values))[1:],
        ],
        env=env(),
        capture_output=True,
        text=True,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    backend = "nccl" if DEVICE.startswith("cuda") else "gloo"
    assert f"joined {backend} process group: rank 0 of 1" in ddp.stderr
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    torch.testing.assert_close(
        torch.tensor([b[i] for i in sorted(b)]),
        torch.tensor([a[i] for i in sorted(a)]),
        rtol=1e-5,
        atol=1e-6,
    )
    final = "checkpoints/iter_00000012.pth"
    ca, cb = load_checkpoint(tmp_path / "single" / final), load_checkpoint(tmp_path / "ddp" / final)
    assert len(cb["rng"]) == 1  # all_gather_object ran on the process group
    for key in ("params", "params_ema"):
        for name, value in ca[key].items():
            torch.testing.assert_close(cb[key][name], value, rtol=1e-5, atol=1e-6)
