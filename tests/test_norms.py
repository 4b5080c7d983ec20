"""The i-LN paper's propositions about the norms, and the norm factory's contract."""

from __future__ import annotations

import pytest
import torch

from irformer.archs.swinir import SwinIR, SwinTransformerBlock
from irformer.norms import (
    NORM_NAMES,
    BatchNorm,
    ChannelAffine,
    HolisticLayerNorm,
    build_norm,
    merge_residual,
    set_batchnorm_eval_mode,
)


def _pairwise_differences(t: torch.Tensor) -> torch.Tensor:
    """t: (L, C) -> (L, L, C) of t_l - t_k."""
    return t[:, None, :] - t[None, :, :]


def test_ln_star_is_a_homothety_on_token_differences() -> None:
    """Prop.: LN*(x)_l - LN*(x)_k = (x_l - x_k) / sigma for every pair (unit affine)."""
    torch.manual_seed(0)
    for scale, shift in ((1.0, 0.0), (7.0, -3.0), (0.2, 5.0)):
        x = torch.randn(3, 40, 16, dtype=torch.float64) * scale + shift
        norm = build_norm("ln_star", 16).double()
        y = norm(x)
        for b in range(3):
            sigma = torch.sqrt(x[b].var(unbiased=False) + norm.eps)
            expected = _pairwise_differences(x[b]) / sigma
            torch.testing.assert_close(_pairwise_differences(y[b]), expected, rtol=1e-5, atol=1e-5)
        # distance ratios (hence angles) between token pairs are preserved
        dx = _pairwise_differences(x[0]).norm(dim=-1)
        dy = _pairwise_differences(y[0]).norm(dim=-1)
        off = ~torch.eye(40, dtype=torch.bool)
        ratio = dy[off] / dx[off]
        assert ratio.std() / ratio.mean() < 1e-6


def test_ln_star_with_affine_applies_one_linear_map_to_all_differences() -> None:
    torch.manual_seed(1)
    norm = build_norm("ln_star", 8).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    x = torch.randn(1, 30, 8, dtype=torch.float64) * 3
    sigma = torch.sqrt(x.var(unbiased=False) + norm.eps)
    expected = _pairwise_differences(x[0]) * norm.weight / sigma
    torch.testing.assert_close(
        _pairwise_differences(norm(x)[0]), expected, rtol=1e-5, atol=1e-5, check_dtype=False
    )


def test_ln_is_not_conformal_for_generic_tokens() -> None:
    """Per-token LN scales each pair's difference differently (tokens differ in mean/var)."""
    torch.manual_seed(2)
    x = torch.randn(1, 40, 16, dtype=torch.float64) * torch.rand(1, 40, 1) * 5 + torch.randn(
        1, 40, 1
    )
    y = build_norm("ln", 16).double()(x)
    dx = _pairwise_differences(x[0]).norm(dim=-1)
    dy = _pairwise_differences(y[0]).norm(dim=-1)
    off = ~torch.eye(40, dtype=torch.bool)
    ratio = dy[off] / dx[off]
    assert ratio.std() / ratio.mean() > 0.3  # far from a single scale factor


def test_ln_is_a_homothety_when_tokens_share_mean_and_variance() -> None:
    """The exception in the proposition: equal per-token mean and variance."""
    torch.manual_seed(3)
    base = torch.randn(40, 16, dtype=torch.float64)
    base = (base - base.mean(-1, keepdim=True)) / base.std(-1, unbiased=False, keepdim=True)
    x = (base * 2.5 + 0.7).unsqueeze(0)  # every token: mean 0.7, std 2.5
    norm = build_norm("ln", 16).double()
    y = norm(x)
    sigma = torch.sqrt(torch.tensor(2.5**2 + norm.eps, dtype=torch.float64))
    torch.testing.assert_close(
        _pairwise_differences(y[0]), _pairwise_differences(x[0]) / sigma, rtol=1e-5, atol=1e-5
    )


def _branch_output(norm_name: str, x: torch.Tensor, train: bool) -> torch.Tensor:
    torch.manual_seed(4)
    norm = build_norm(norm_name, x.shape[-1])
    norm.train(train)
    stats = norm.statistics(x)
    y = norm.normalize(x, stats)
    return merge_residual(x, torch.tanh(y), norm, stats)


@pytest.mark.parametrize("name", NORM_NAMES)
@pytest.mark.parametrize("train", [False, True])
def test_outputs_do_not_depend_on_other_samples(name: str, train: bool) -> None:
    """Per-sample statistics: sample 0's output ignores sample 1 (except BN in train mode)."""
    torch.manual_seed(5)
    x0 = torch.randn(1, 24, 8) * 2 + 1
    a = _branch_output(name, torch.cat([x0, torch.randn(1, 24, 8)]), train)[0]
    b = _branch_output(name, torch.cat([x0, torch.randn(1, 24, 8) * 9 - 4]), train)[0]
    if name == "bn" and train:
        assert (a - b).abs().max() > 0.1
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["ln", "iln", "in", "bn"])
def test_model_outputs_do_not_depend_on_other_samples(name: str) -> None:
    torch.manual_seed(6)
    model = SwinIR(
        img_size=8, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, mlp_ratio=2.0,
        upscale=2, upsampler="pixelshuffledirect", norm=name,
    ).eval()  # fmt: skip
    x0 = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        a = model(torch.cat([x0, torch.rand(1, 3, 8, 8)]))[0]
        b = model(torch.cat([x0, torch.rand(1, 3, 8, 8) * 0.1]))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _block(norm: str) -> SwinTransformerBlock:
    torch.manual_seed(7)
    block = SwinTransformerBlock(8, 2, window_size=4, shift_size=2, mlp_ratio=2.0, norm=norm)
    with torch.no_grad():  # non-trivial affine, biases included: homogeneity must not need zeros
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return block.double().eval()


@pytest.mark.parametrize("a", [0.5, 3.0, 40.0])
def test_iln_block_is_positively_homogeneous(a: float) -> None:
    """block(a x) = a block(x): LN* output is scale invariant and the branch is multiplied
    by the std, which scales by a (exact up to eps = 1e-4 against a variance of ~100, and
    the fp32 statistics)."""
    x = torch.randn(2, 64, 8, dtype=torch.float64) * 10 + 3
    block = _block("iln")
    with torch.no_grad():
        want = a * block(x, (8, 8))
        rel = (block(a * x, (8, 8)) - want).norm() / want.norm()
    assert rel < 1e-6


def test_ln_block_is_not_homogeneous() -> None:
    x = torch.randn(2, 64, 8, dtype=torch.float64) * 10 + 3
    block = _block("ln")
    with torch.no_grad():
        want = 3 * block(x, (8, 8))
        rel = (block(3 * x, (8, 8)) - want).norm() / want.norm()
    assert rel > 1e-2


def test_iln_rescale_gradient_flows_through_std() -> None:
    """The authors do not detach the std: the gradient has the std term, and it matches
    a finite difference (detaching it would change the gradient by far more)."""
    torch.manual_seed(8)
    norm = build_norm("iln", 6)
    lin = torch.nn.Linear(6, 6)

    def f(x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        stats = norm.statistics(x)
        branch = lin(norm.normalize(x, stats))
        return merge_residual(x, branch, norm, stats.detach() if detach else stats)

    x = torch.randn(2, 5, 6) * 3 + 1
    w = torch.randn(2, 5, 6)
    direction = torch.randn(2, 5, 6)
    grads = []
    for detach in (False, True):
        xg = x.clone().requires_grad_(True)
        (f(xg, detach) * w).sum().backward()
        grads.append((xg.grad * direction).sum())
    h = 1e-2
    with torch.no_grad():
        numeric = ((f(x + h * direction) - f(x - h * direction)) * w).sum() / (2 * h)
    assert abs(grads[0] - numeric) < 2e-3 * abs(numeric)
    assert abs(grads[1] - numeric) > 20 * abs(grads[0] - numeric)


def test_iln_statistics_are_fp32_under_low_precision() -> None:
    norm = build_norm("iln", 8).bfloat16()
    x = (torch.randn(2, 16, 8) * 300).bfloat16()
    stats = norm.statistics(x)
    assert stats.dtype == torch.float32 and stats.shape == (2, 2, 1)
    torch.testing.assert_close(stats[:, 0, 0], x.float().mean(dim=(1, 2)))
    assert norm.normalize(x, stats).dtype == torch.bfloat16


def test_iln_embed_and_final_roles_are_affine() -> None:
    """i-LN replaces the post-embedding and final norms by a per-channel affine."""
    for role in ("embed", "final"):
        norm = build_norm("iln", 4, role=role)
        assert isinstance(norm, ChannelAffine)
        x = torch.randn(1, 3, 4)
        torch.testing.assert_close(norm(x), x)  # weight 1, bias 0 at init
    assert isinstance(build_norm("iln", 4), HolisticLayerNorm)


def test_rezero_and_layerscale_start_near_identity() -> None:
    x = torch.randn(1, 10, 4)
    for name, bound in (("rezero", 0.0), ("layerscale", 1e-3)):
        norm = build_norm(name, 4)
        stats = norm.statistics(x)
        out = merge_residual(x, torch.ones_like(x), norm, stats)
        assert (out - x).abs().max() <= bound + 1e-12


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown norm 'layernorm'; valid norms: ln, ln_star, iln"):
        build_norm("layernorm", 4)
    with pytest.raises(ValueError, match="unknown norm role 'body'"):
        build_norm("ln", 4, role="body")  # type: ignore[arg-type]


def test_batchnorm_eval_modes() -> None:
    """BN: running statistics in eval by default; batch statistics on request (no update)."""
    torch.manual_seed(9)
    model = torch.nn.Module()
    model.bn = build_norm("bn", 4)
    bn: BatchNorm = model.bn
    x = torch.randn(3, 20, 4) * 4 + 2
    bn.train()
    for _ in range(100):  # momentum 0.1: 0.9**100 of the init remains
        bn(x)
    assert int(bn.bn.num_batches_tracked) == 100
    running_mean = bn.bn.running_mean.clone()
    torch.testing.assert_close(running_mean, x.reshape(-1, 4).mean(0), rtol=1e-3, atol=1e-3)
    bn.eval()
    y_running = bn(x * 0.5)
    expected = (x * 0.5 - running_mean) / torch.sqrt(bn.bn.running_var + bn.bn.eps)
    torch.testing.assert_close(y_running, expected * bn.bn.weight + bn.bn.bias)
    assert set_batchnorm_eval_mode(model, use_batch_stats=True) == 1
    y_batch = bn(x * 0.5)
    flat = y_batch.reshape(-1, 4)
    torch.testing.assert_close(flat.mean(0), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(flat.var(0, unbiased=False), torch.ones(4), rtol=1e-3, atol=1e-3)
    assert torch.equal(bn.bn.running_mean, running_mean)  # eval never updates
    assert int(bn.bn.num_batches_tracked) == 100
    set_batchnorm_eval_mode(model, use_batch_stats=False)
    torch.testing.assert_close(bn(x * 0.5), y_running)


def test_instance_norm_normalises_each_channel_over_tokens() -> None:
    x = torch.randn(2, 50, 6) * torch.arange(1, 7) + torch.arange(6)
    y = build_norm("in", 6)(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 6), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(2, 6), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("batch", [1, 3])
def test_iln_bf16_inference_path_matches_fp64(batch: int) -> None:
    """bf16 inference normalises with one fused kernel (per-sample mean/std as
    batch_norm running stats); the result equals the fp64 formula to bf16 rounding,
    also for a mean far from zero, and each sample uses its own statistics."""
    torch.manual_seed(0)
    norm = build_norm("iln", 24)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(batch, 50, 24) * torch.tensor([1.0, 3.0, 0.2])[:batch, None, None] + 20.0
    xb = x.bfloat16()
    with torch.no_grad():
        stats = norm.statistics(xb)
        fast = norm.normalize(xb, stats)
        x64, s64 = xb.double(), stats.double()
        exact = (x64 - s64[:, 0:1]) / s64[:, 1:2] * norm.weight.double() + norm.bias.double()
    assert fast.dtype == torch.bfloat16 and fast.shape == x.shape
    ulp = exact.abs().clamp_min(1e-3) * 2.0**-8
    assert ((fast.double() - exact).abs() <= ulp).all()
    # Under autograd the fp32 chain runs (and gives the same values).
    slow = norm.normalize(xb, stats)
    assert slow.requires_grad and (slow.double() - exact).abs().le(ulp).all()
