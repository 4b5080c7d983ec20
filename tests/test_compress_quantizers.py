"""Fake quantisers: round trips, clamped indices, STE gradients, bound search,
rotation, weight-only int8/int4."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from irformer.compress.quantizers import (
    ActQuantizer,
    UniformQuantizer,
    WeightQuantizer,
    candidate_errors,
    dequantize_indices,
    dobi_search,
    fake_quantize,
    fake_quantize_scaled,
    quantize_indices,
    quantize_weight_tensor,
    quantize_weights_,
    round_ste,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sd", [False, True])
def test_round_trip_is_idempotent_and_on_grid(bits: int, sd: bool) -> None:
    torch.manual_seed(bits)
    q = UniformQuantizer(bits, scalar_decomposition=sd)
    q.set_bounds([-1.3], [0.7])
    if sd:
        with torch.no_grad():
            q.alpha.fill_(0.01)
            q.beta.fill_(-0.02)
    x = torch.randn(4096) * 2
    y = q(x)
    # Values already on the grid are unchanged, bit for bit.
    assert torch.equal(q(y), y)
    idx = q.indices(x)
    assert torch.equal(idx, idx.round())
    assert idx.min() >= 0 and idx.max() <= 2**bits - 1
    assert len(torch.unique(y)) <= 2**bits
    # Grid points themselves (dequantised indices) survive a round trip.
    grid = q.dequantize(torch.arange(2**bits, dtype=torch.float32))
    assert torch.equal(q(grid), grid)


def test_indices_clamped_even_with_decomposition() -> None:
    """CompSRT's code does not clamp; with alpha < 0 the top index would overflow."""
    q = UniformQuantizer(2, scalar_decomposition=True)
    q.set_bounds([0.0], [3.0])
    with torch.no_grad():
        q.alpha.fill_(-0.5)  # step 0.5: x = 3 would be index 6 without the clamp
    idx = q.indices(torch.tensor([-10.0, 0.0, 3.0, 10.0]))
    assert idx.tolist() == [0.0, 0.0, 3.0, 3.0]


def test_known_values() -> None:
    x = torch.tensor([-1.0, 0.1, 0.24, 0.26, 0.9, 5.0])
    y = fake_quantize(x, torch.tensor(0.0), torch.tensor(1.0), 2)  # grid 0, 1/3, 2/3, 1
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 1 / 3, 1 / 3, 1.0, 1.0]))


def test_ste_gradients() -> None:
    q = UniformQuantizer(4)
    q.set_bounds([-1.0], [1.0])
    x = torch.tensor([-3.0, -0.5, 0.1, 0.33, 2.0], requires_grad=True)
    q(x).sum().backward()
    # Straight through inside the range, zero for clipped values.
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # A value clipped below moves with the lower bound, one above with the upper.
    q.zero_grad()
    q(torch.tensor([-5.0, -6.0, 7.0])).sum().backward()
    assert q.lower.grad.item() == pytest.approx(2.0)
    assert q.upper.grad.item() == pytest.approx(1.0)


def test_bound_gradient_matches_lsq_form() -> None:
    """Inside the range d x_hat / d u = (round(v) - v) / (2^b - 1) (STE through round)."""
    q = UniformQuantizer(3)
    q.set_bounds([0.0], [7.0])  # step 1
    x = torch.tensor([2.3])
    q(x).sum().backward()
    assert q.upper.grad.item() == pytest.approx((2.0 - 2.3) / 7, abs=1e-6)
    assert q.lower.grad.item() == pytest.approx(-(2.0 - 2.3) / 7, abs=1e-6)


def test_scalar_decomposition_gets_gradients_and_starts_neutral() -> None:
    torch.manual_seed(0)
    x = torch.randn(1000)
    plain, sd = UniformQuantizer(3), UniformQuantizer(3, scalar_decomposition=True)
    for q in (plain, sd):
        q.set_bounds([-2.0], [2.0])
    assert torch.equal(plain(x), sd(x))
    (sd(x) - x).pow(2).sum().backward()
    assert sd.alpha.grad.abs().item() > 0 and sd.beta.grad.abs().item() > 0


def test_round_ste_exact_forward() -> None:
    v = torch.tensor([0.5, 1.5, 2.4999, -0.5], requires_grad=True)
    r = round_ste(v)
    assert r.tolist() == [0.0, 2.0, 2.0, -0.0]
    r.sum().backward()
    assert v.grad.tolist() == [1.0] * 4


def test_rejects_unsupported_bits() -> None:
    with pytest.raises(ValueError, match=r"bits=5 .*\(2, 3, 4, 8\)"):
        UniformQuantizer(5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dobi_beats_minmax(bits: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(20000)
    x[0] = 12.0  # an outlier makes min/max wasteful
    lo, hi = dobi_search(x, bits)
    err_dobi = (fake_quantize(x, torch.tensor(lo), torch.tensor(hi), bits) - x).pow(2).sum()
    err_mm = (fake_quantize(x, x.min(), x.max(), bits) - x).pow(2).sum()
    assert err_dobi < 0.7 * err_mm
    assert x.min() < lo < hi < x.max()
    # The symmetric search shrinks both ends by the same amount.
    assert (lo - float(x.min())) == pytest.approx(float(x.max()) - hi, rel=1e-4)
    lo1, hi1 = dobi_search(x, bits, one_sided=True)
    assert lo1 == pytest.approx(float(x.min())) and hi1 < float(x.max())


def test_act_quantizer_calibration_cycle_and_rotation() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 60)
    x[:, 7] *= 25.0  # one outlier channel, as in SR transformer activations
    errors = {}
    for rot in (None, 64, 60):
        aq = ActQuantizer(4, rotate_size=rot)
        assert torch.equal(aq(x), x)  # fp mode
        aq.mode = "observe"
        assert torch.equal(aq(x), x)  # observing passes through
        aq.finish_calibration("dobi")
        assert aq.mode == "quant"
        y = aq(x)
        assert y.shape == x.shape
        errors[rot] = float((y - x).detach().pow(2).mean())
    # Rotating spreads the outlier channel: much lower error at 4 bits.
    assert errors[64] < 0.5 * errors[None]
    assert errors[60] < 0.5 * errors[None]


def test_act_quantizer_subsamples_large_inputs() -> None:
    aq = ActQuantizer(8, sample_size=1000)
    aq.mode = "observe"
    for _ in range(5):
        aq(torch.randn(10, 500))
    assert aq.calibration_sample().numel() <= 2000
    with pytest.raises(RuntimeError, match="observed nothing"):
        ActQuantizer(8).calibration_sample()


def test_noise_is_removed_after_quantisation() -> None:
    torch.manual_seed(3)
    aq = ActQuantizer(8)
    aq.quantizer.set_bounds([-4.0], [4.0])
    aq.mode = "quant"
    x = torch.randn(100, 16)
    aq.set_noise(torch.rand(16) - 0.5)
    y = aq(x)
    step = 8.0 / 255
    assert float((y - x).detach().abs().max()) <= 0.5 * step + 1e-6


def test_weight_quantizer_prune_keeps_zeros_and_groups() -> None:
    torch.manual_seed(4)
    w = torch.randn(180, 60)
    wq = WeightQuantizer(4, groups=3, rotate_size=64, prune=0.4)
    wq.calibrate(w)
    assert wq.mask.shape == (180, 64)
    assert float(1 - wq.mask.float().mean()) == pytest.approx(0.4, abs=1e-3)
    # In the quantised (rotated) domain pruned entries are exactly zero.
    deq = wq.quantizer.dequantize(wq.indices(w)) * wq.mask
    assert torch.all(deq[~wq.mask] == 0)
    assert int((deq == 0).sum()) >= int((~wq.mask).sum())
    # Three bound pairs (q, k, v rows); the weight comes back in its shape.
    assert wq.quantizer.lower.shape == (3,)
    assert wq(w).shape == w.shape
    with pytest.raises(RuntimeError, match="calibrate"):
        WeightQuantizer(4)(w)


def test_weight_quantizer_8bit_close() -> None:
    torch.manual_seed(5)
    w = torch.randn(32, 16)
    for rot in (None, 16):
        wq = WeightQuantizer(8, rotate_size=rot)
        wq.calibrate(w, "minmax")
        rel = float((wq(w) - w).detach().norm() / w.norm())
        assert rel < 0.01


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_only_quantisation(bits: int, granularity: str, symmetric: bool) -> None:
    torch.manual_seed(6)
    w = torch.randn(16, 3, 3, 3) * torch.linspace(0.1, 3, 16)[:, None, None, None]
    w_hat, scale, zp = quantize_weight_tensor(w, bits, granularity=granularity, symmetric=symmetric)
    shape = (16, 1, 1, 1) if granularity == "per_channel" else ()
    q = w_hat / scale.reshape(shape) + zp.reshape(shape)
    torch.testing.assert_close(q, q.round(), atol=1e-3, rtol=0)
    if symmetric:
        assert q.abs().max() <= 2 ** (bits - 1) - 1 + 1e-3
    else:
        assert q.min() >= -1e-3 and q.max() <= 2**bits - 1 + 1e-3
    err = (w_hat - w).abs().reshape(16, -1).amax(dim=1)
    assert torch.all(err <= 0.5 * scale.expand(16) + 1e-6)
    rel = float((w_hat - w).norm() / w.norm())
    assert rel < (0.02 if bits == 8 else 0.2)


def test_per_channel_beats_per_tensor_with_scaled_channels() -> None:
    torch.manual_seed(7)
    w = torch.randn(64, 32) * torch.logspace(-2, 0, 64)[:, None]
    errs = {
        g: float((quantize_weight_tensor(w, 4, granularity=g)[0] - w).norm())
        for g in ("per_tensor", "per_channel")
    }
    assert errs["per_channel"] < 0.5 * errs["per_tensor"]


def test_quantize_weights_inplace_report() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    before = model[3].weight.detach().clone()
    bias_before = model[3].bias.detach().clone()
    report = quantize_weights_(model, bits=4, granularity="per_channel", symmetric=True)
    assert [s.name for s in report.layers] == ["0.weight", "3.weight"]
    assert report.quantized_params == 8 * 27 + 32
    assert report.other_params == 8 + 4
    assert not torch.equal(model[3].weight, before)
    assert torch.equal(model[3].bias, bias_before)
    # int4 per channel: 248 weights -> 124 bytes, 12 fp32 scales, 12 fp32 biases.
    assert report.storage_bytes == 124 + 12 * 4 + 12 * 4
    assert 0 < report.mean_rel_rmse < 0.2
    with pytest.raises(ValueError, match="granularity"):
        quantize_weights_(model, granularity="per_row")  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_histogram_errors_match_exact(bits: int) -> None:
    """Large inputs use binned errors; they pick the same DOBI candidate."""
    torch.manual_seed(bits)
    x = torch.distributions.StudentT(3.0).sample((1 << 17,))
    lo, hi = float(x.min()), float(x.max())
    i = torch.arange(100, dtype=torch.float64)
    lowers = (lo + i * (hi - lo) / 200).float()
    uppers = (hi - i * (hi - lo) / 200).float()
    binned = candidate_errors(x, lowers, uppers, bits)
    exact = torch.cat(
        [candidate_errors(x, lowers[j : j + 8], uppers[j : j + 8], bits) for j in range(0, 100, 8)]
    )
    assert x.numel() * 8 <= 1 << 22 < x.numel() * 100  # really two code paths
    assert int(binned.argmin()) == int(exact.argmin())
    torch.testing.assert_close(binned, exact, rtol=5e-3, atol=0)


@pytest.mark.parametrize("grouped", [False, True])
def test_fused_fake_quant_matches_composed_autograd(grouped: bool) -> None:
    """The memory-lean autograd node gives the same values and gradients (to x,
    scale, zero) as the plain composition of round-STE, clamp and dequantise."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8) * 2
    shape = (4, 1, 1) if grouped else ()
    scale = torch.rand(shape) * 0.3 + 0.1
    zero = torch.randn(shape) * 0.5 - 1.5
    # Some values land exactly on the clamp edges (r == 0 and r == levels).
    x[0, 0, :2] = zero.flatten()[0] + torch.tensor([0.0, 15.0]) * scale.flatten()[0]
    grad_out = torch.randn_like(x)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, scale, zero)]
        out = fn(*leaves)
        out.backward(grad_out)
        return out.detach(), [t.grad for t in leaves]

    def composed(xx, s, z):
        return dequantize_indices(quantize_indices(xx, s, z, 4), s, z)

    out_a, g_a = grads(composed)
    out_b, g_b = grads(lambda xx, s, z: fake_quantize_scaled(xx, s, z, 4))
    assert torch.equal(out_a, out_b)
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert g_b[2].abs().sum() > 0 and g_b[1].abs().sum() > 0  # both ends clip somewhere
