"""Model-level quantisation methods on tiny SwinIR/HAT models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from irformer.archs import build_model
from irformer.compress.methods import METHODS, QuantConfig, method_config, quantize_model
from irformer.compress.methods.base import (
    QuantLinear,
    act_quantizers,
    calibrate,
    count_quantized,
    distill_bounds,
    learnable_quantizer_parameters,
    prepare_quantized_copy,
    quant_linears,
    residual_groups,
)
from irformer.compress.methods.ptq4vit import TwinUniformQuantizer
from irformer.compress.quantizers import ActQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_swinir(norm: str = "ln") -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        "swinir_light_x2", norm=norm, embed_dim=12, depths=(2, 2), num_heads=(2, 2)
    ).eval()


def batches(seed: int, n: int = 2) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.rand(n, 3, 16, 16, generator=gen)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.rand(4, 3, 16, 16, generator=gen), torch.rand(2, 3, 16, 24, generator=gen)


def _rel_error(model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    return float((out - ref).abs().max() / ref.abs().max())


def test_wraps_every_block_linear_and_attention_operand(data) -> None:
    calib, _ = data
    model = tiny_swinir()
    qmodel = quantize_model(model, method_config("minmax", wbits=4, abits=4), calib).model
    names = [n for n, _ in quant_linears(qmodel)]
    # 4 blocks x (qkv, proj, fc1, fc2); convs and the upsampler stay FP.
    assert len(names) == 16
    assert {n.rsplit(".", 1)[-1] for n in names} == {"qkv", "proj", "fc1", "fc2"}
    assert all("residual_group.blocks" in n for n in names)
    assert count_quantized(qmodel)["activation_quantizers"] == 16 + 16
    attn = qmodel.layers[0].residual_group.blocks[1].attn
    assert all(isinstance(getattr(attn.operands, h), ActQuantizer) for h in ("quant_q", "quant_k"))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # FP model untouched
    assert isinstance(qmodel.conv_first, nn.Conv2d)
    # qkv: three bound pairs (q, k, v rows), one input quantiser.
    qkv = qmodel.layers[0].residual_group.blocks[0].attn.qkv
    assert qkv.weight_quantizer.quantizer.groups == 3
    assert len(residual_groups(qmodel)) == 2


@pytest.mark.parametrize("method", list(METHODS))
def test_eight_bit_close_to_fp(method: str, data) -> None:
    calib, x = data
    model = tiny_swinir()
    cfg = method_config(method, wbits=8, abits=8, dqc_iters=0)
    qmodel = quantize_model(model, cfg, calib).model
    assert _rel_error(model, qmodel, x) < 2e-3


def test_error_grows_as_bits_shrink(data) -> None:
    calib, x = data
    model = tiny_swinir()
    errs = [
        _rel_error(
            model, quantize_model(model, method_config("minmax", wbits=b, abits=b), calib).model, x
        )
        for b in (8, 4, 3, 2)
    ]
    assert errs == sorted(errs)
    assert errs[-1] > 10 * errs[0]


def test_dobi_beats_minmax_at_two_bits(data) -> None:
    calib, x = data
    model = tiny_swinir()
    mm = quantize_model(model, method_config("minmax", wbits=2, abits=2), calib).model
    dq = quantize_model(model, method_config("dquant2d", wbits=2, abits=2, dqc_iters=0), calib)
    with torch.no_grad():
        ref = model(x)
        err_mm = float((mm(x) - ref).abs().mean())
        err_dq = float((dq.model(x) - ref).abs().mean())
    assert err_dq < 0.7 * err_mm


def test_rotation_sizes() -> None:
    model = tiny_swinir()
    calib = torch.rand(2, 3, 16, 16)
    for rotation, embed, head in (("pow2", 16, 8), ("exact", 12, 8)):
        cfg = method_config("compsrt", wbits=4, abits=4, rotation=rotation, dqc_iters=0)
        qmodel = quantize_model(model, cfg, calib).model
        blk = qmodel.layers[0].residual_group.blocks[0]
        assert blk.attn.qkv.act_quantizer.rotate_size == embed
        assert blk.attn.qkv.weight_quantizer.rotate_size == embed
        assert blk.mlp.fc2.weight_quantizer.rotate_size == 2 * embed
        assert blk.attn.operands.quant_q.rotate_size == head
        assert blk.attn.operands.quant_attn.rotate_size == 64


def test_rotation_skip() -> None:
    model = tiny_swinir()
    cfg = method_config("compsrt", wbits=4, abits=4, dqc_iters=0, rotation_skip=("post_softmax",))
    qmodel = quantize_model(model, cfg, torch.rand(2, 3, 16, 16)).model
    attn = qmodel.layers[0].residual_group.blocks[0].attn
    assert attn.operands.quant_attn.rotate_size is None and attn.operands.quant_q.rotate_size == 8
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown roles"):
        quantize_model(
            model, cfg.with_overrides(rotation_skip=("softmax",)), torch.rand(1, 3, 8, 8)
        )


@pytest.mark.parametrize("method", ["dquant2d", "compsrt"])
def test_distillation_moves_bounds_and_lowers_loss(method: str, data) -> None:
    """From min/max bounds (poor at 3 bits) DQC on a fixed batch lowers the loss."""
    calib, _ = data
    model = tiny_swinir()
    fixed = calib[:2]
    cfg = method_config(method, wbits=3, abits=3, dqc_iters=30, dqc_lr=2e-3, search="minmax")
    undistilled = quantize_model(model, cfg.with_overrides(dqc_iters=0), calib).model
    before = [p.detach().clone() for p in learnable_quantizer_parameters(undistilled)]
    result = quantize_model(model, cfg, calib, iter(lambda: fixed, None))
    after = learnable_quantizer_parameters(result.model)
    moved = sum(int(not torch.equal(a, b)) for a, b in zip(after, before, strict=True))
    assert moved > len(before) // 2
    log = result.distill
    assert len(log.loss) == 30 and log.stopped_early is None
    assert sum(log.loss[-5:]) / 5 < 0.9 * log.loss[0]
    if method == "compsrt":
        sd = [m for m in result.model.modules() if getattr(m, "alpha", None) is not None]
        assert sd and any(float(m.alpha.abs().max()) > 0 for m in sd)
    # Trained parameters are frozen again afterwards.
    assert not any(p.requires_grad for p in result.model.parameters())


def test_distillation_keeps_best_heldout_bounds(data) -> None:
    calib, _ = data
    model = tiny_swinir()
    cfg = method_config("dquant2d", wbits=4, abits=4, dqc_iters=6, dqc_lr=0.5)
    held_out = torch.rand(2, 3, 16, 16)
    result = quantize_model(model, cfg, calib, batches(3), val_batch=held_out, val_every=2)
    log = result.distill
    assert log.val_steps == [0, 2, 4, 6]
    best = min(log.val_loss)
    assert log.best_step == log.val_steps[log.val_loss.index(best)]
    with torch.no_grad():
        final = float(nn.functional.l1_loss(result.model(held_out), model(held_out)))
    assert final == pytest.approx(best, rel=1e-5)


def test_scalar_lr_is_separate_from_the_bound_lr(data) -> None:
    """``dqc_scalar_lr=0`` freezes CompSRT's alpha/beta at 0 while its bounds train."""
    calib, _ = data
    model = tiny_swinir()
    cfg = method_config("compsrt", wbits=3, abits=3, dqc_iters=3, dqc_scalar_lr=0.0)
    start = quantize_model(model, cfg.with_overrides(dqc_iters=0), calib).model
    result = quantize_model(model, cfg, calib, batches(4)).model
    scalars = learnable_quantizer_parameters(result, bounds=False)
    assert scalars and all(float(p.abs().max()) == 0 for p in scalars)
    bounds = [m.quantizer.lower for m in result.modules() if hasattr(m, "quantizer")]
    before = [m.quantizer.lower for m in start.modules() if hasattr(m, "quantizer")]
    assert any(not torch.equal(a, b) for a, b in zip(bounds, before, strict=True))


def test_official_dqc_loss_divides_by_element_counts(data) -> None:
    """``dqc_loss="official"``: the first step's L1 is the mean L1 over one sample's
    output element count and the feature term shrinks by the feature element count,
    so with Adam's eps the same lr moves the bounds less."""
    calib, _ = data
    model = tiny_swinir()
    fixed = calib[:2]
    cfg = method_config("dquant2d", wbits=3, abits=3, dqc_iters=3, dqc_lr=1e-2)
    logs, moves = {}, {}
    start = learnable_quantizer_parameters(
        quantize_model(model, cfg.with_overrides(dqc_iters=0), calib).model
    )
    for loss in ("mean", "official"):
        result = quantize_model(
            model, cfg.with_overrides(dqc_loss=loss), calib, iter(lambda: fixed, None)
        )
        logs[loss] = result.distill
        after = learnable_quantizer_parameters(result.model)
        moves[loss] = sum(
            float((a.detach() - b.detach()).abs().sum()) for a, b in zip(after, start, strict=True)
        )
    with torch.no_grad():
        per_sample = model(fixed)[0].numel()
    assert logs["official"].pixel[0] == pytest.approx(logs["mean"].pixel[0] / per_sample, rel=1e-5)
    assert 0 < logs["official"].feature[0] < logs["mean"].feature[0] / 100
    assert 0 < moves["official"] < moves["mean"]
    with pytest.raises(ValueError, match="dqc_loss"):
        QuantConfig(dqc_loss="sum")  # type: ignore[arg-type]


def test_ptq4vit_uses_twin_uniform(data) -> None:
    calib, _ = data
    model = tiny_swinir()
    qmodel = quantize_model(model, method_config("ptq4vit", wbits=4, abits=4), calib).model
    blk = qmodel.layers[0].residual_group.blocks[0]
    assert isinstance(blk.attn.operands.quant_attn, TwinUniformQuantizer)
    assert isinstance(blk.mlp.fc2.act_quantizer, TwinUniformQuantizer)
    assert isinstance(blk.attn.qkv.act_quantizer, ActQuantizer)
    # Post-softmax: R1 is finer than R2 by a power of two.
    q = blk.attn.operands.quant_attn
    ratio = float(q.delta_r2 / q.delta_r1)
    assert ratio >= 1 and ratio == 2 ** round(torch.log2(torch.tensor(ratio)).item())


def test_twin_uniform_levels() -> None:
    q = TwinUniformQuantizer(3, "softmax")  # 4 levels per range
    d1, d2 = torch.tensor(1 / 32), torch.tensor(1 / 4)
    x = torch.tensor([0.0, 0.02, 0.05, 0.3, 0.99])
    out = q.quantize(x, d1, d2)
    # 0.05 < 3/32 stays in the fine range R1: round(1.6) * 1/32.
    assert out.tolist() == pytest.approx([0.0, 1 / 32, 2 / 32, 0.25, 0.75])
    g = TwinUniformQuantizer(3, "gelu")
    out = g.quantize(torch.tensor([-0.17, -0.01, 0.4, 9.0]), torch.tensor(0.05), torch.tensor(0.5))
    assert out.tolist() == pytest.approx([-0.15, 0.0, 0.5, 1.5])
    with pytest.raises(ValueError, match="kind"):
        TwinUniformQuantizer(3, "relu")  # type: ignore[arg-type]


def test_noisyquant_noise_is_fixed_per_layer(data) -> None:
    calib, x = data
    model = tiny_swinir()
    cfg = method_config("noisyquant", wbits=4, abits=4)
    a = quantize_model(model, cfg, calib).model
    b = quantize_model(model, cfg, calib).model
    noises = [m.noise for _, m in act_quantizers(a) if getattr(m, "noise", None) is not None]
    assert len(noises) == 16  # linear inputs only
    assert not torch.equal(noises[0], noises[1])
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_hat_blocks_including_overlapping_attention() -> None:
    torch.manual_seed(0)
    model = build_model(
        "hat_1_x2",
        embed_dim=12,
        depths=(2,),
        num_heads=(2,),
        window_size=8,
        compress_ratio=3,
        squeeze_factor=4,
        num_feat=16,
    ).eval()
    calib = torch.rand(2, 3, 16, 16)
    qmodel = quantize_model(model, method_config("compsrt", wbits=8, abits=8, dqc_iters=0), calib)
    names = [n for n, _ in quant_linears(qmodel.model)]
    assert any("overlap_attn.qkv" in n for n in names) and len(names) == 12
    ocab = qmodel.model.layers[0].residual_group.overlap_attn
    assert ocab.operands.quant_attn.rotate_size == 256  # 12 x 12 key window -> 144 -> 256
    assert _rel_error(model, qmodel.model, calib) < 2e-3


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown quantisation method 'gptq'"):
        method_config("gptq", wbits=4, abits=4)
    assert method_config("2dquant", wbits=4, abits=4).method == "dquant2d"
    with pytest.raises(KeyError, match="bogus"):
        method_config("minmax", wbits=4, abits=4, bogus=1)
    with pytest.raises(ValueError, match="no Transformer blocks"):
        quantize_model(nn.Sequential(nn.Conv2d(3, 3, 3)), QuantConfig(), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="no training batches"):
        quantize_model(
            tiny_swinir(), method_config("dquant2d", wbits=4, abits=4), torch.rand(1, 3, 16, 16)
        )


def test_config_round_trip() -> None:
    cfg = method_config("compsrt", wbits=3, abits=3, prune=0.4)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(KeyError, match="unknown"):
        QuantConfig.from_dict({"nope": 1})


def test_distillation_with_recompute_equals_without(data) -> None:
    """Checkpointing the residual groups (the default, for memory) changes nothing:
    the same losses, feature terms and final bounds as keeping every activation."""
    calib, _ = data
    model = tiny_swinir()
    cfg = method_config("compsrt", wbits=3, abits=3, dqc_iters=4, dqc_lr=1e-2)
    logs, bounds = [], []
    for recompute in (True, False):
        qmodel = prepare_quantized_copy(model, cfg)
        calibrate(qmodel, calib, cfg)
        logs.append(distill_bounds(qmodel, model, batches(5), cfg, recompute=recompute))
        bounds.append([p.detach().clone() for p in learnable_quantizer_parameters(qmodel)])
    assert logs[0].feature[0] > 0  # the feature taps saw every group once per step
    assert logs[0].loss == pytest.approx(logs[1].loss, rel=1e-5)
    assert logs[0].feature == pytest.approx(logs[1].feature, rel=1e-5)
    for a, b in zip(*bounds, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ablation_variants_configure_what_they_name(data) -> None:
    """CompSRT's ablations: Hadamard on weights only leaves activations unrotated;
    scalars-only DQC trains alpha/beta and leaves the bounds at their search result."""
    calib, _ = data
    model = tiny_swinir()
    w_only = quantize_model(
        model, method_config("2dquant_had_w", wbits=3, abits=3, dqc_iters=0), calib
    )
    assert w_only.config.method == "2dquant_had_w" and not w_only.config.scalar_decomposition
    assert all(aq.rotate_size is None for _, aq in act_quantizers(w_only.model))
    sizes = {
        ql.in_features: ql.weight_quantizer.rotate_size for _, ql in quant_linears(w_only.model)
    }
    assert sizes == {12: 16, 24: 32}
    sd = method_config("2dquant_sd", wbits=3, abits=3)
    assert sd.rotation is None and sd.scalar_decomposition and sd.search == "dobi"
    cfg = method_config("compsrt_scalars_only", wbits=3, abits=3, dqc_iters=4, dqc_lr=1e-2)
    undistilled = quantize_model(model, cfg.with_overrides(dqc_iters=0), calib).model
    result = quantize_model(model, cfg, calib, batches(1))
    for (name, q0), (_, q1) in zip(
        undistilled.named_modules(), result.model.named_modules(), strict=True
    ):
        if hasattr(q1, "lower") and hasattr(q1, "alpha") and q1.alpha is not None:
            assert torch.equal(q0.lower, q1.lower) and torch.equal(q0.upper, q1.upper), name
    moved = [m for m in result.model.modules() if getattr(m, "alpha", None) is not None]
    assert any(float(m.alpha.abs().max()) > 0 for m in moved)
    with pytest.raises(ValueError, match="nothing to distil"):
        bad = method_config("2dquant_had_w", wbits=3, abits=3, dqc_iters=2, learn_bounds=False)
        quantize_model(model, bad, calib, batches(1))
    with pytest.raises(ValueError, match="unknown quantisation method"):
        method_config("compsrt_nope", wbits=3, abits=3)


def test_split_qkv_inputs_three_quantisers_of_one_input() -> None:
    """``qkv_inputs="split"`` (2DQuant's/CompSRT's code): q, k and v rows each
    take their own quantised copy of the input; all three start from the same
    bounds, and with equal bounds the layer equals the shared-input layer."""
    from irformer.compress.methods.base import SplitInputQuantLinear, quant_linears

    torch.manual_seed(0)
    model = build_model("swinir_light_x2", embed_dim=12, depths=(2,), num_heads=(2,)).eval()
    calib = torch.rand(2, 3, 16, 16)
    shared = quantize_model(model, method_config("dquant2d", wbits=4, abits=4, dqc_iters=0), calib)
    split_cfg = method_config("dquant2d", wbits=4, abits=4, dqc_iters=0, qkv_inputs="split")
    split = quantize_model(model, split_cfg, calib)
    layers = [ql for name, ql in quant_linears(split.model) if name.endswith(".qkv")]
    assert layers and all(isinstance(ql, SplitInputQuantLinear) for ql in layers)
    for ql in layers:
        bounds = [
            (float(aq.quantizer.lower.detach()), float(aq.quantizer.upper.detach()))
            for aq in (ql.act_quantizer, ql.act_quantizer_k, ql.act_quantizer_v)
        ]
        assert bounds[0] == bounds[1] == bounds[2]
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(split.model(x), shared.model(x), rtol=0, atol=1e-6)
        # Moving one copy's bounds changes only that copy's rows.
        layers[0].act_quantizer_k.quantizer.upper.mul_(0.5)
        assert not torch.allclose(split.model(x), shared.model(x), atol=1e-6)
    from irformer.compress.int_linear import unsupported_reason

    assert "three times" in (unsupported_reason(layers[0]) or "")


def test_official_pruning_draws_a_new_mask_each_forward() -> None:
    torch.manual_seed(0)
    model = build_model("swinir_light_x2", embed_dim=12, depths=(2,), num_heads=(2,)).eval()
    cfg = method_config("compsrt", wbits=3, abits=3, prune=0.4, prune_mode="official", dqc_iters=0)
    qmodel = quantize_model(model, cfg, torch.rand(2, 3, 16, 16)).model
    from irformer.compress.methods.base import quant_linears

    ql = quant_linears(qmodel)[0][1]
    wq = ql.weight_quantizer
    rng_before = wq._official_rng.get_state()
    with torch.no_grad():
        w = ql.quantized_weight()
    # Each forward draws a new threshold sample (the tiny weight's 1e6-draw
    # quantile barely moves; tests/test_compress_prune.py shows a 60x64 mask move).
    assert not torch.equal(wq._official_rng.get_state(), rng_before)
    assert torch.isfinite(w).all() and wq.mask is None
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(qmodel(x)).all()
    with pytest.raises(ValueError, match="unknown prune_mode 'bands'"):
        method_config("compsrt", wbits=3, abits=3, prune_mode="bands")
