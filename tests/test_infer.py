"""Inference paths: exact chunked == plain, tiling, self-ensemble, precision."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from irformer.archs import attention
from irformer.archs.attention import window_sdpa
from irformer.archs.hat import HAB
from irformer.archs.swinir import SwinIR, WindowAttention
from irformer.archs.windows import shifted_window_mask
from irformer.engine.infer import (
    RestoreOptions,
    forward_exact,
    forward_plain,
    forward_tiled,
    restore_tensor,
    run_with_precision,
    self_ensemble,
)
from irformer.engine.precision import precision_dtype, prepare_model_for_precision
from irformer.execution import current_execution, execution_context


def tiny_swinir(norm: str, *, scale: int = 2, gain: float = 1.0, seed: int = 0) -> SwinIR:
    """4 blocks (2 shifted), window 4; ``gain`` scales the linear weights so the
    attention/MLP branches matter as much as in a trained model."""
    torch.manual_seed(seed)
    model = SwinIR(
        img_size=16,
        embed_dim=12,
        depths=(2, 2),
        num_heads=(2, 2),
        window_size=4,
        mlp_ratio=2.0,
        upscale=scale,
        upsampler="pixelshuffledirect",
        norm=norm,
    ).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(gain)
    return model


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean()))


# --------------------------------------------------------------------------- exact path


@pytest.mark.parametrize("norm", ["ln", "iln", "in", "ln_rs"])
def test_exact_chunked_equals_plain(norm: str) -> None:
    model = tiny_swinir(norm, gain=8.0)
    # 14x22 pads to 16x24: 4x6 windows of 4, shifted blocks wrap the border.
    x = torch.rand(2, 3, 14, 22)
    ref = forward_plain(model, x)
    assert ref.shape == (2, 3, 28, 44)
    # Branches must matter, else equality would be vacuous.
    assert float((ref - forward_plain(tiny_swinir(norm, gain=1.0), x)).abs().max()) > 0.05
    # 5 windows: one row of 6 per chunk, attention sub-chunked 5 + 1.
    for windows, tokens in ((5, 40), (13, None)):
        out = forward_exact(model, x, windows_per_chunk=windows, tokens_per_chunk=tokens)
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (norm, windows)


def test_execution_context_nests_and_restores() -> None:
    """Chunking is a property of the call (the context), never of the modules."""
    assert current_execution().windows_per_chunk is None
    with execution_context(windows_per_chunk=11, tokens_per_chunk=5) as context:
        assert current_execution() is context
        assert context.mlp_tokens(window_size=4) == 5
        with execution_context(cpu_kernels="off"):
            assert current_execution().windows_per_chunk == 11  # nesting keeps chunking
            assert current_execution().kernel_policy == "off"
    assert current_execution().windows_per_chunk is None
    with execution_context(windows_per_chunk=3):
        assert current_execution().mlp_tokens(window_size=4) == 3 * 16
    with pytest.raises(ValueError, match="windows_per_chunk"):
        execution_context(windows_per_chunk=0).__enter__()
    model = tiny_swinir("ln")
    assert not any(hasattr(m, "chunk_windows") for m in model.modules())


def test_window_attention_chunked_with_mask() -> None:
    torch.manual_seed(1)
    attn = WindowAttention(8, 4, 2).eval()
    mask = shifted_window_mask(12, 16, 4, 2, torch.device("cpu"))  # 12 windows
    x = torch.randn(2 * mask.shape[0], 16, 8)
    geometry = {
        "qkv": attn.qkv,
        "proj": attn.proj,
        "bias": attn.position_bias().detach(),
        "heads": 2,
        "scale": attn.scale,
    }
    with torch.no_grad(), execution_context(cpu_kernels="off"):
        ref = attention._attend_windows(x, mask, None, attn.operands, **geometry)
        # chunks 5+5+2 per image, never across images
        out = attention._attend_windows(x, mask, 5, attn.operands, **geometry)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shift", [0, 2])
def test_chunked_block_with_conv_branch(shift: int) -> None:
    """HAT's hybrid block: the conv branch joins the attention before the i-LN rescale."""
    torch.manual_seed(2)
    block = HAB(
        12,
        3,
        window_size=4,
        shift_size=shift,
        mlp_ratio=2.0,
        norm="iln",
        compress_ratio=3,
        squeeze_factor=3,
        conv_scale=0.5,
    ).eval()
    x = torch.randn(2, 12 * 16, 12) * 3
    with torch.no_grad():
        ref = block(x, (12, 16))
        with execution_context(windows_per_chunk=4):
            out = block(x, (12, 16))
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- tiling


class PointwiseSR(nn.Module):
    """1x1 conv + pixel shuffle: no spatial context, so tiling must be exact."""

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 3 * scale * scale, 1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


@pytest.mark.parametrize(
    ("tile", "overlap", "blend"), [(8, 2, "mean"), (10, 3, "ramp"), (64, 0, "mean")]
)
def test_tiled_exact_for_pointwise_model(tile: int, overlap: int, blend: str) -> None:
    model = PointwiseSR().eval()
    x = torch.rand(2, 3, 19, 23)
    ref = forward_plain(model, x)
    out = forward_tiled(model, x, tile=tile, overlap=overlap, blend=blend)  # type: ignore[arg-type]
    assert out.shape == ref.shape == (2, 3, 38, 46)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


def test_tiled_ln_close_to_plain_and_single_tile_exact() -> None:
    model = tiny_swinir("ln")
    x = torch.rand(1, 3, 40, 40)
    ref = forward_plain(model, x)
    # A tile covering the image is the plain pass.
    assert torch.equal(forward_tiled(model, x, tile=64, overlap=8), ref)
    # Overlapping tiles with a linear cross-fade: close, not equal (convs and
    # shifted windows see the tile border).
    value = psnr(forward_tiled(model, x, tile=24, overlap=12, blend="ramp"), ref)
    assert 30.0 < value < 100.0, value


def test_tile_errors() -> None:
    model = PointwiseSR()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="overlap"):
        forward_tiled(model, x, tile=8, overlap=8)
    with pytest.raises(ValueError, match="blend"):
        forward_tiled(model, x, tile=8, overlap=2, blend="gauss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        RestoreOptions(tile=8, chunk_windows=4)
    with pytest.raises(ValueError, match="precision"):
        RestoreOptions(precision="fp8")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- ensemble


def test_ensemble_of_equivariant_models_is_unchanged() -> None:
    x = torch.rand(2, 3, 6, 9)
    assert torch.allclose(self_ensemble(lambda t: t, x), x, atol=1e-6, rtol=0)
    up = nn.Upsample(scale_factor=2, mode="nearest")
    assert torch.allclose(self_ensemble(up, x), up(x), atol=1e-6, rtol=0)


def test_ensemble_is_the_group_average() -> None:
    """For a non-equivariant model the ensemble is equivariant and idempotent,
    which fails if any inverse transform is wrong."""
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 3, 3, padding=1).eval()
    f = lambda t: conv(t) * t  # noqa: E731 (a non-linear, non-equivariant model)
    x = torch.rand(1, 3, 7, 10)
    with torch.no_grad():
        ens = self_ensemble(f, x)
        assert float((ens - f(x)).abs().max()) > 1e-2
        for g in (
            lambda t: t.flip(-1),
            lambda t: t.flip(-2),
            lambda t: t.transpose(-1, -2),
            lambda t: torch.rot90(t, 1, (-2, -1)),
        ):
            assert torch.allclose(self_ensemble(f, g(x)), g(ens), atol=1e-6)
        assert torch.allclose(self_ensemble(lambda t: self_ensemble(f, t), x), ens, atol=1e-6)


def test_restore_tensor_ensemble_with_exact_path() -> None:
    model = tiny_swinir("iln")
    x = torch.rand(1, 3, 12, 16)
    out, report = restore_tensor(model, x, RestoreOptions(ensemble=True, chunk_windows=3))
    ref = self_ensemble(lambda t: forward_plain(model, t), x)
    assert report.finite and report.total_pixels == 24 * 32
    assert torch.allclose(out, ref, atol=1e-5)


# --------------------------------------------------------------------------- precision

# Documented tolerances (max abs on [0, 1] outputs of tiny random models):
# bf16 keeps 8 mantissa bits (~4e-3 relative), fp16 11 bits (~5e-4).
PRECISION_ATOL = {"bf16": 3e-2, "fp16": 5e-3}


@pytest.mark.parametrize("norm", ["ln", "iln", "ln_rs"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_agrees_with_fp32(norm: str, precision: str) -> None:
    model = tiny_swinir(norm)
    x = torch.rand(1, 3, 16, 20)
    ref = forward_plain(model, x)
    low = copy.deepcopy(model)
    out, report = run_with_precision(low, x, precision)
    assert out.dtype == torch.float32 and report.finite
    assert all(
        p.dtype == precision_dtype(precision) for p in low.parameters() if p.is_floating_point()
    )
    err = float((out - ref).abs().max())
    assert 0 < err < PRECISION_ATOL[precision], err
    assert psnr(out, ref) > 45.0


def test_prepare_model_for_precision_channels_last() -> None:
    model = prepare_model_for_precision(tiny_swinir("ln"), "bf16")
    assert model.conv_first.weight.dtype == torch.bfloat16
    assert model.conv_first.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.training
    with pytest.raises(ValueError, match="unknown precision"):
        prepare_model_for_precision(model, "int3")


@pytest.mark.parametrize("shape", [(300, 6, 64, 10), (1, 6 * 40, 64, 10), (3, 2, 49, 8)])
def test_window_sdpa_bf16_cpu_path(shape: tuple[int, int, int, int]) -> None:
    """The chunked bf16 CPU attention (fp32 softmax) against fp32 SDPA, with a
    broadcast mask and a per-(batch, head) mask; d=10 heads as in SwinIR-light."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(shape) * 2 for _ in range(3))
    b, h, n, _ = shape
    for mask in (torch.randn(1, h, n, n), torch.randn(b, h, n, n) * 10):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        with torch.no_grad():
            out = window_sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.3)
            kernel = torch.nn.functional.scaled_dot_product_attention(
                q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask.bfloat16(), scale=0.3
            )
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        err = (out.float() - ref).pow(2).mean().sqrt()
        assert err < 2 * (kernel.float() - ref).pow(2).mean().sqrt() + 1e-3
        kernel_max = float((kernel.float() - ref).abs().max())
        assert float((out.float() - ref).abs().max()) < 2 * kernel_max + 0.02
    # fp32 with one thread goes to SDPA unchanged
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            assert torch.equal(
                window_sdpa(q, k, v, mask, 0.3),
                torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=0.3
                ),
            )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(300, 6, 64, 10), (1, 6 * 40, 64, 10), (3, 2, 49, 8)])
def test_window_sdpa_fp32_blocked_path(shape: tuple[int, int, int, int]) -> None:
    """With several threads fp32 windows run as blocked baddbmm/softmax/bmm: equal
    to SDPA to float rounding for a broadcast mask, per-window masks and no mask."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(shape) * 2 for _ in range(3))
    b, h, n, _ = shape
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for mask in (torch.randn(1, h, n, n), torch.randn(b, h, n, n) * 10, None):
            ref = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=0.3
            )
            with torch.no_grad():
                out = window_sdpa(q, k, v, mask, 0.3)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        (
            "hat",
            {
                "embed_dim": 12,
                "depths": (2,),
                "num_heads": (2,),
                "window_size": 4,
                "compress_ratio": 3,
                "squeeze_factor": 4,
                "mlp_ratio": 2.0,
                "num_feat": 8,
            },
        ),
        (
            "drct",
            {
                "img_size": 16,
                "embed_dim": 12,
                "depths": (2,),
                "num_heads": (2,),
                "window_size": 4,
                "gc": 6,
                "num_feat": 8,
            },
        ),
    ],
)
def test_exact_path_other_archs(arch: str, kwargs: dict[str, object]) -> None:
    """HAT's hybrid blocks (conv branch with global channel attention) and DRCT's
    dense blocks go through the chunked Swin block; HAT's OCAB runs whole."""
    from irformer.archs import build_model

    torch.manual_seed(6)
    model = build_model(arch, **kwargs, upscale=2, norm="iln").eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.mul_(6.0)
    x = torch.rand(1, 3, 14, 18)
    ref = forward_plain(model, x)
    out = forward_exact(model, x, windows_per_chunk=3, tokens_per_chunk=30)
    assert out.shape == ref.shape == (1, 3, 28, 36)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
