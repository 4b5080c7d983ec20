"""The i-LN paper's propositions about the norms, and the norm factory's contract."""

from __future__ import annotations

import pytest
import torch

from irformer.archs.swinir import SwinIR, SwinTransformerBlock
from irformer.norms import (
    NORM_NAMES,
    RESCALING_NORMS,
    BatchNorm,
    ChannelAffine,
    HolisticLayerNorm,
    RescaledLayerNorm,
    build_norm,
    image_statistics_norms,
    merge_residual,
    set_batchnorm_eval_mode,
    token_std,
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


@pytest.mark.parametrize("name", NORM_NAMES)
@pytest.mark.parametrize("train", [False, True])
def test_image_statistics_flag_matches_behaviour(name: str, train: bool) -> None:
    """``image_statistics`` (what the tiling warning and the memory planner read) is
    True exactly when a token slice is normalised and merged differently from the
    same tokens inside the whole image: ln_rs, like ln, uses per-token statistics
    only (its rescale too), so tiles see the model's own numbers; LN*, i-LN, IN
    and BN with batch statistics do not."""
    torch.manual_seed(7)
    x = torch.randn(1, 32, 8) * torch.rand(1, 32, 1) * 5 + 1
    norm = build_norm(name, 8).train(train)
    whole = _branch_output(name, x, train)[:, :10]
    part = _branch_output(name, x[:, :10], train)
    differs = not torch.allclose(whole, part, rtol=0, atol=1e-6)
    assert norm.image_statistics == differs
    model = SwinIR(
        img_size=8, embed_dim=8, depths=(1,), num_heads=(2,), window_size=4,
        upscale=2, upsampler="pixelshuffledirect", norm=name,
    ).train(train)  # fmt: skip
    assert bool(image_statistics_norms(model)) == differs


@pytest.mark.parametrize("name", ["ln", "iln", "in", "bn", "ln_rs"])
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


def _per_token_scales(x: torch.Tensor) -> torch.Tensor:
    """A positive factor per token, (B, L, 1), spanning two orders of magnitude."""
    torch.manual_seed(11)
    return torch.exp(torch.empty(x.shape[0], x.shape[1], 1, dtype=x.dtype).uniform_(-2.3, 2.3))


def test_ln_rs_block_is_homogeneous_per_token() -> None:
    """Table 3 idx 2: block(D x) = D block(x) for any positive per-token diagonal D.

    Proof the test checks: LN(a_l x_l) = LN(x_l) for a_l > 0 (up to eps), so every
    token's normalised input, hence the attention/MLP branch (which mixes tokens
    only through those normalised inputs), is unchanged; the merge multiplies token
    l's branch by sqrt(a_l^2 var_l + eps) ~ a_l sqrt(var_l + eps), so both halves of
    the block map x_l to a_l * out_l. Up to eps = 1e-5 against a variance of ~100.
    """
    x = torch.randn(2, 64, 8, dtype=torch.float64) * 10 + 3
    d = _per_token_scales(x)
    block = _block("ln_rs")
    with torch.no_grad():
        want = d * block(x, (8, 8))
        rel = (block(d * x, (8, 8)) - want).norm() / want.norm()
        rel_global = (block(3.0 * x, (8, 8)) - 3.0 * block(x, (8, 8))).norm() / want.norm()
    assert rel < 1e-6 and rel_global < 1e-6


@pytest.mark.parametrize("name", ["iln", "ln", "ln_star"])
def test_only_ln_rs_is_homogeneous_per_token(name: str) -> None:
    """i-LN is homogeneous for one global factor only (per-token factors change the
    holistic statistics and the token geometry); LN and LN* not at all."""
    x = torch.randn(2, 64, 8, dtype=torch.float64) * 10 + 3
    d = _per_token_scales(x)
    block = _block(name)
    with torch.no_grad():
        want = d * block(x, (8, 8))
        rel = (block(d * x, (8, 8)) - want).norm() / want.norm()
    assert rel > 1e-2


def test_ln_rs_merge_is_the_per_token_std_rescale() -> None:
    """x + sqrt(var_c(x_l) + eps) * branch_l, with LN's biased per-token variance."""
    torch.manual_seed(12)
    norm = build_norm("ln_rs", 6).double()
    assert isinstance(norm, RescaledLayerNorm) and norm.eps == 1e-5
    x = torch.randn(2, 5, 6, dtype=torch.float64) * torch.rand(2, 5, 1) * 4 + 1
    branch = torch.randn(2, 5, 6, dtype=torch.float64)
    stats = norm.statistics(x)
    std = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(merge_residual(x, branch, norm, stats), x + std * branch)
    torch.testing.assert_close(norm.normalize(x, stats), build_norm("ln", 6).double()(x))
    # any token slice gets exactly its own std (the chunked inference paths)
    torch.testing.assert_close(
        merge_residual(x[:, 1:3], branch[:, 1:3], norm, stats), (x + std * branch)[:, 1:3]
    )
    with pytest.raises(ValueError, match="per-token std of the residual input"):
        norm.rescale_branch(branch, stats)


def assert_gradient_has_the_std_term(f) -> None:
    """``f(x, detach)``'s gradient matches a central finite difference, and detaching the
    rescale's std (``detach=True``) would change it by far more than that error."""
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


def test_ln_rs_rescale_gradient_flows_through_std() -> None:
    """As i-LN: the per-token std is not detached; the analytic gradient matches a
    finite difference, and detaching the std would change it by far more."""
    torch.manual_seed(13)
    norm = build_norm("ln_rs", 6)
    lin = torch.nn.Linear(6, 6)

    def f(x: torch.Tensor, detach: bool = False) -> torch.Tensor:
        stats = norm.statistics(x)
        branch = lin(norm.normalize(x, stats))
        if not detach:
            return merge_residual(x, branch, norm, stats)
        return x + token_std(x, norm.eps).detach() * branch

    assert_gradient_has_the_std_term(f)


def test_ln_rs_statistics_are_fp32_under_low_precision() -> None:
    """The rescale's std is computed in fp32 from bf16 tokens (also under autocast);
    only the final multiply-add runs in the branch dtype."""
    torch.manual_seed(14)
    x = (torch.randn(2, 16, 8) * 300 + 50).bfloat16()
    std = token_std(x, 1e-5)
    assert std.dtype == torch.float32 and std.shape == (2, 16, 1)
    torch.testing.assert_close(std, torch.sqrt(x.float().var(-1, unbiased=False, keepdim=True)))
    norm = build_norm("ln_rs", 8).bfloat16()
    branch = torch.randn(2, 16, 8).bfloat16()
    out = merge_residual(x, branch, norm, norm.statistics(x))
    assert out.dtype == torch.bfloat16
    exact = x.double() + std.bfloat16().double() * branch.double()
    assert ((out.double() - exact).abs() <= exact.abs() * 2.0**-7 + 1e-3).all()
    block = _block("ln_rs").float()
    xf = torch.randn(1, 64, 8) * 10
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(xf, (8, 8))
    ref = block(xf, (8, 8)).detach()
    assert torch.isfinite(y).all() and (y.float() - ref).norm() / ref.norm() < 2e-2


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

    assert_gradient_has_the_std_term(f)


def test_iln_statistics_are_fp32_under_low_precision() -> None:
    norm = build_norm("iln", 8).bfloat16()
    x = (torch.randn(2, 16, 8) * 300).bfloat16()
    stats = norm.statistics(x)
    assert stats.dtype == torch.float32 and stats.shape == (2, 2, 1)
    torch.testing.assert_close(stats[:, 0, 0], x.float().mean(dim=(1, 2)))
    assert norm.normalize(x, stats).dtype == torch.bfloat16


@pytest.mark.parametrize("name", RESCALING_NORMS)
def test_rescaling_norms_embed_and_final_roles_are_affine(name: str) -> None:
    """i-LN (and ln_rs, its per-token ablation) replace the post-embedding and final
    norms by a per-channel affine: a norm there would erase the input scale the
    rescale carries. LN* (no rescale) keeps its norm there."""
    for role in ("embed", "final"):
        norm = build_norm(name, 4, role=role)
        assert type(norm) is ChannelAffine
        x = torch.randn(1, 3, 4)
        torch.testing.assert_close(norm(x), x)  # weight 1, bias 0 at init
        assert isinstance(build_norm("ln_star", 4, role=role), HolisticLayerNorm)
    assert isinstance(build_norm("iln", 4), HolisticLayerNorm)
    assert isinstance(build_norm("ln_rs", 4), RescaledLayerNorm)


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
