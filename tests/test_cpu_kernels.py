"""The fused CPU window-attention kernel (irformer.cpu_kernels).

Checked against an fp64 reference of ``softmax(scale q k^T + bias + mask) v``
for the AVX-512 micro-kernel shapes (64 / 256 tokens, head dims 10-64) and the
portable loop (49 tokens), in window and in feature-map layout; as part of
whole models against the eager path; and its dispatch policy and build-failure
fallback.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

from irformer import cpu_kernels as ck
from irformer.archs import build_model
from irformer.archs.windows import shifted_window_mask, window_mask_flags, window_partition
from irformer.engine.precision import prepare_model_for_precision

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler on PATH: the fused kernel cannot be built here",
)


@pytest.fixture(scope="module")
def kernel_built() -> None:
    if ck.load_kernel() is None:
        pytest.fail(
            f"the fused kernel did not build on a machine with a compiler: {ck.KERNELS.failure}"
        )


def reference(
    qkv: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None, heads: int, scale: float
) -> torch.Tensor:
    """fp64 attention of (windows, N, 3C) qkv -> (windows, N, C)."""
    bw, n, c3 = qkv.shape
    c = c3 // 3
    q, k, v = qkv.double().view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    scores = scale * q @ k.transpose(-2, -1) + bias.double()
    if mask is not None:
        nw = mask.shape[0]
        scores = scores.view(bw // nw, nw, heads, n, n) + mask.double()[None, :, None]
        scores = scores.view(bw, heads, n, n)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)


def some_masked(windows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows, n, n) masks, every third all zero, the rest -100 on random pairs."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.where(torch.rand(windows, n, n, generator=gen) < 0.3, -100.0, 0.0)
    mask[::3] = 0.0
    return mask, window_mask_flags(mask)


SHAPES = [  # (windows, tokens, heads, head_dim)
    (12, 64, 6, 10),  # SwinIR-light
    (6, 64, 3, 30),  # SwinIR / HAT head dim
    (4, 64, 2, 64),
    (3, 256, 2, 16),  # HAT 16x16 windows
    (6, 49, 2, 8),  # 7x7 windows: the portable loop
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_kernel_matches_fp64_reference(
    kernel_built: None, shape: tuple[int, int, int, int], with_mask: bool
) -> None:
    windows, n, heads, d = shape
    torch.manual_seed(1)
    qkv = torch.randn(windows, n, 3 * heads * d) * 1.5
    bias = torch.randn(heads, n, n)
    mask_windows = 3 if windows % 3 == 0 else 2
    mask, flags = some_masked(mask_windows, n, seed=2) if with_mask else (None, None)
    scale = d**-0.5
    ref = reference(qkv, bias, mask, heads, scale)
    out = ck.fused_window_attention(qkv, bias, mask, flags, heads, scale)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    # bf16 storage: inputs rounded to bf16, arithmetic in fp32, output rounded once
    out16 = ck.fused_window_attention(qkv.bfloat16(), bias, mask, flags, heads, scale)
    ref16 = reference(qkv.bfloat16().float(), bias, mask, heads, scale)
    assert out16.dtype == torch.bfloat16
    err = (out16.double() - ref16).abs()
    assert float(err.max()) <= 2**-8 * float(ref16.abs().max()) + 1e-6


@pytest.mark.parametrize(("h", "w", "shift"), [(16, 24, 4), (8, 8, 0), (24, 16, 2)])
def test_kernel_map_layout_equals_roll_and_partition(
    kernel_built: None, h: int, w: int, shift: int
) -> None:
    """Given the (B, H, W, 3C) map the kernel does the cyclic shift, the window
    partition and their inverses itself."""
    ws, heads, d, b = 8, 2, 10, 2
    torch.manual_seed(3)
    qkv_map = torch.randn(b, h, w, 3 * heads * d)
    bias = torch.randn(heads, ws * ws, ws * ws)
    mask = shifted_window_mask(h, w, ws, shift, torch.device("cpu")) if shift else None
    flags = None if mask is None else window_mask_flags(mask)
    out = ck.fused_window_attention(qkv_map, bias, mask, flags, heads, 0.3, window=ws, shift=shift)
    rolled = torch.roll(qkv_map, shifts=(-shift, -shift), dims=(1, 2))
    windows = window_partition(rolled, ws).view(-1, ws * ws, 3 * heads * d)
    ref = reference(windows, bias, mask, heads, 0.3).view(-1, ws, ws, heads * d)
    ref = ref.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)
    ref = torch.roll(ref, shifts=(shift, shift), dims=(1, 2))
    assert out.shape == (b, h, w, heads * d)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)


def test_kernel_rejects_bad_input(kernel_built: None) -> None:
    qkv = torch.randn(2, 64, 30)
    bias = torch.randn(2, 64, 64)
    with pytest.raises(RuntimeError, match="bias must be"):
        ck.fused_window_attention(qkv, bias[:1], None, None, 2, 0.3)
    with pytest.raises(RuntimeError, match="not a multiple of window"):
        ck.fused_window_attention(torch.randn(1, 12, 16, 30), bias, None, None, 2, 0.3, window=8)
    with pytest.raises(RuntimeError, match="masked flags"):
        mask = torch.zeros(2, 64, 64)
        ck.fused_window_attention(qkv, bias, mask, torch.zeros(3, dtype=torch.uint8), 2, 0.3)


@pytest.mark.parametrize(
    ("preset", "overrides", "size"),
    [
        ("swinir_light_x2", {"embed_dim": 24, "depths": (2, 2), "num_heads": (2, 2)}, (24, 40)),
        ("hat_s_x2", {"embed_dim": 24, "depths": (2,), "num_heads": (2,)}, (20, 16)),
    ],
)
@pytest.mark.parametrize("norm", ["ln", "iln"])
def test_models_fused_equal_eager(
    kernel_built: None,
    monkeypatch: pytest.MonkeyPatch,
    preset: str,
    overrides: dict[str, object],
    size: tuple[int, int],
    norm: str,
) -> None:
    """Whole models (shifted windows, padding to the window multiple): the
    kernel in fp32 equals the eager path to float rounding, and bf16 with the
    kernel is no further from fp32 than bf16 without it."""
    torch.manual_seed(4)
    model = build_model(preset, norm=norm, **overrides).eval()
    x = torch.rand(1, 3, *size)
    with torch.inference_mode():
        monkeypatch.setenv("IRFORMER_CPU_KERNELS", "off")
        eager = model(x)
        model16 = prepare_model_for_precision(copy.deepcopy(model), "bf16")
        eager16 = model16(x.bfloat16()).float()
        monkeypatch.setenv("IRFORMER_CPU_KERNELS", "all")
        fused = model(x)
        monkeypatch.setenv("IRFORMER_CPU_KERNELS", "bf16")
        fused16 = model16(x.bfloat16()).float()
        assert torch.equal(model(x), eager)  # policy bf16: fp32 stays eager
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    err_fused = float((fused16 - eager).abs().mean())
    err_eager = float((eager16 - eager).abs().mean())
    assert err_fused <= 1.2 * err_eager + 1e-4


def test_dispatch_policy(kernel_built: None, monkeypatch: pytest.MonkeyPatch) -> None:
    x16 = torch.zeros(2, 64, 60, dtype=torch.bfloat16)
    x32 = torch.zeros(2, 64, 60)
    with torch.no_grad():
        monkeypatch.delenv("IRFORMER_CPU_KERNELS", raising=False)
        assert ck.use_fused_attention(x16, 64, 10)
        assert ck.use_fused_attention(x32, 64, 10)  # default policy: all
        assert not ck.use_fused_attention(x16, 400, 10)  # window too large
        assert not ck.use_fused_attention(x16, 64, 80)  # head dim too large
        assert not ck.use_fused_attention(x16.half(), 64, 10)  # fp16: eager
        monkeypatch.setenv("IRFORMER_CPU_KERNELS", "bf16")
        assert ck.use_fused_attention(x16, 64, 10)
        assert not ck.use_fused_attention(x32, 64, 10)
        monkeypatch.setenv("IRFORMER_CPU_KERNELS", "off")
        assert not ck.use_fused_attention(x16, 64, 10)
        monkeypatch.setenv("IRFORMER_CPU_KERNELS", "fast")
        with pytest.raises(ValueError, match=r"IRFORMER_CPU_KERNELS='fast'.*all, bf16, off"):
            ck.use_fused_attention(x16, 64, 10)
    monkeypatch.setenv("IRFORMER_CPU_KERNELS", "all")
    assert not ck.use_fused_attention(x32, 64, 10)  # autograd on: training keeps eager


def test_build_failure_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise OSError("no compiler here")

    monkeypatch.setattr(ck.KERNELS, "module", None)
    monkeypatch.setattr(ck.KERNELS, "failure", None)
    monkeypatch.setattr(ck, "_build", broken)
    monkeypatch.setenv("IRFORMER_CPU_KERNELS", "all")
    torch.manual_seed(0)
    model = build_model("swinir_light_x2", embed_dim=12, depths=(2,), num_heads=(2,)).eval()
    x = torch.rand(1, 3, 16, 16)
    with (
        pytest.warns(RuntimeWarning, match="could not be built.*no compiler here"),
        torch.inference_mode(),
    ):
        out = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            assert torch.equal(model(x), out)  # no second warning; eager path
    monkeypatch.setenv("IRFORMER_CPU_KERNELS", "off")
    with torch.inference_mode():
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)


def test_build_uses_tagged_directory_and_clears_a_stale_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build folder is named after CPU flags + torch + Python; a lock left by
    a killed build (older than STALE_LOCK_SECONDS) is removed, a fresh one kept."""
    from torch.utils import cpp_extension

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "module")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = tmp_path / f"irformer_cpu_kernels_{ck._build_tag()}"
    build_dir.mkdir()
    lock = build_dir / "lock"
    lock.touch()
    assert ck._build() == "module"  # fresh lock: left alone (another process is building)
    assert lock.exists()
    old = time.time() - ck.STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        ck._build()
    assert not lock.exists()
    assert calls[-1]["build_directory"] == str(build_dir)
    assert calls[-1]["name"] == build_dir.name


def test_two_checkouts_share_one_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The build compiles a copy of the source inside the build folder, so checkouts
    with the same source (same tag) hand ninja the same path and never rebuild each
    other; the copy is rewritten only when it differs (its mtime drives ninja). The
    "compiling" message appears only when no built module exists yet."""
    import logging

    from torch.utils import cpp_extension

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw) or "module")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = tmp_path / f"irformer_cpu_kernels_{ck._build_tag()}"
    with caplog.at_level(logging.INFO, logger="irformer.cpu_kernels"):
        ck._build()
    copy = build_dir / ck.SOURCE.name
    assert calls[-1]["sources"] == [str(copy)]
    assert copy.read_bytes() == ck.SOURCE.read_bytes()
    assert "compiling" in caplog.text
    old = time.time() - 3600
    os.utime(copy, (old, old))
    (build_dir / f"{build_dir.name}.so").touch()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="irformer.cpu_kernels"):
        ck._build()  # as another checkout of the same source would
    assert calls[-1]["sources"] == [str(copy)]
    assert copy.stat().st_mtime == pytest.approx(old)  # untouched: nothing to rebuild
    assert "compiling" not in caplog.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 300, 60), (1, 4097, 12), (3, 7, 5)])
def test_holistic_norm_kernels_match_fp64(
    kernel_built: None, dtype: torch.dtype, shape: tuple[int, int, int]
) -> None:
    """LN*/i-LN statistics (per sample, over tokens and channels, biased) and the
    normalisation with affine, against the fp64 formula; |mean| >> std included."""
    torch.manual_seed(7)
    offset = torch.tensor([0.5, 400.0, -2.0])[: shape[0], None, None]
    x = (torch.randn(shape) * 3 + offset).to(dtype)
    w, b = torch.randn(shape[2]), torch.randn(shape[2])
    xd = x.double()
    mean = xd.mean(dim=(1, 2))
    std = (xd.var(dim=(1, 2), unbiased=False) + 1e-4).sqrt()
    stats = ck.holistic_stats(x, 1e-4)
    assert stats.shape == (shape[0], 2, 1) and stats.dtype == torch.float32
    torch.testing.assert_close(stats[:, 0, 0].double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats[:, 1, 0].double(), std, rtol=1e-5, atol=1e-6)
    # the normalisation given the (fp32) statistics: exact up to fp32 rounding
    m, sd = stats[:, 0:1].double(), stats[:, 1:2].double()
    ref = (xd - m) / sd * w.double() + b.double()
    out = ck.holistic_normalize(x, stats, w, b)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(
        ck.holistic_normalize(x, stats, w, None).double(), ref - b.double(), rtol=tol, atol=tol
    )


def test_iln_norm_uses_kernels_only_for_inference(
    kernel_built: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """i-LN under autograd keeps PyTorch ops (gradients through the std); in
    inference the kernels give the same statistics and output."""
    from irformer.norms import build_norm

    norm = build_norm("iln", 12)
    torch.manual_seed(8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 50, 12) * 5 + 3
    calls: list[str] = []
    real = ck.holistic_stats
    monkeypatch.setattr(ck, "holistic_stats", lambda *a: calls.append("k") or real(*a))
    stats = norm.statistics(x.requires_grad_())
    y = norm.normalize(x, stats)
    assert calls == [] and y.requires_grad
    with torch.inference_mode():
        stats_k = norm.statistics(x.detach())
        y_k = norm.normalize(x.detach(), stats_k)
    assert calls == ["k"]
    torch.testing.assert_close(stats_k, stats.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_k, y.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("h", "w", "ws", "ows", "d"), [(32, 48, 16, 24, 16), (16, 16, 8, 12, 10)])
def test_kernel_cross_attention_equals_unfold(
    kernel_built: None, h: int, w: int, ws: int, ows: int, d: int
) -> None:
    """HAT's OCAB: queries of ws-windows attend to the co-centred ows-windows of
    keys/values, zero-padded outside the map (576 keys: the AVX-512 kernel; 144:
    the portable loop) — against unfold + fp64 attention."""
    heads, b = 2, 2
    c = heads * d
    torch.manual_seed(9)
    qkv = torch.randn(b, h, w, 3 * c)
    bias = torch.randn(heads, ws * ws, ows * ows)
    out = ck.fused_window_attention(qkv, bias, None, None, heads, 0.25, window=ws, kv_window=ows)
    pad = (ows - ws) // 2
    q = window_partition(qkv[..., :c].contiguous(), ws).view(-1, ws * ws, heads, d)
    kv = torch.nn.functional.pad(qkv[..., c:], (0, 0, pad, pad, pad, pad))
    kv = kv.unfold(1, ows, ws).unfold(2, ows, ws)  # (B, nH, nW, 2C, ows, ows)
    kv = kv.permute(0, 1, 2, 4, 5, 3).reshape(-1, ows * ows, 2, heads, d)
    k, v = kv[:, :, 0].double(), kv[:, :, 1].double()
    scores = torch.einsum("wqhd,wkhd->whqk", q.double(), k) * 0.25 + bias.double()
    ref = torch.einsum("whqk,wkhd->wqhd", scores.softmax(-1), v).reshape(-1, ws, ws, c)
    ref = ref.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    out16 = ck.fused_window_attention(
        qkv.bfloat16(), bias, None, None, heads, 0.25, window=ws, kv_window=ows
    )
    assert float((out16.double() - ref).abs().max()) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_holistic_normalize_keeps_non_finite_values(kernel_built: None, dtype: torch.dtype) -> None:
    """NaN and Inf in the input stay NaN/Inf after the normalisation (the fp16/bf16
    non-finite reports rely on it); finite statistics given."""
    x = torch.ones(1, 4, 20, dtype=dtype)
    x[0, 1, 3] = float("nan")
    x[0, 2, 17] = float("inf")
    stats = torch.tensor([[[0.5], [2.0]]])
    out = ck.holistic_normalize(x, stats, torch.ones(20), torch.zeros(20)).float()
    assert torch.isnan(out[0, 1, 3]) and torch.isinf(out[0, 2, 17])
    assert torch.isfinite(out).sum() == out.numel() - 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_attention_propagates_nan(kernel_built: None, dtype: torch.dtype) -> None:
    """A NaN in one window's queries makes that window's (head's) output NaN, as
    PyTorch's softmax does; the other windows stay finite."""
    torch.manual_seed(10)
    qkv = torch.randn(4, 64, 3 * 2 * 10)
    qkv[1, 5, 3] = float("nan")  # window 1, token 5, head 0's q
    out = ck.fused_window_attention(qkv.to(dtype), torch.randn(2, 64, 64), None, None, 2, 0.3)
    ref = reference(qkv, torch.zeros(2, 64, 64), None, 2, 0.3)
    assert torch.isnan(out[1, 5, :10].float()).all() and torch.isnan(ref[1, 5, :10]).all()
    assert torch.isfinite(out[[0, 2, 3]].float()).all()
