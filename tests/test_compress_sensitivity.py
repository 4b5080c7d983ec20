"""Quantisation sensitivity: groups cover every quantiser once, switching groups to
FP is exact and undone, the level usage detects a range stretched by an outlier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from irformer.archs import build_model
from irformer.compress.methods import method_config, quantize_model
from irformer.compress.methods.base import quant_linears
from irformer.compress.quantizers import ActQuantizer
from irformer.compress.sensitivity import (
    QuantGroup,
    full_precision,
    level_usage,
    quantizer_groups,
    sensitivity,
    sensitivity_table,
    usage_table,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quantized() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(
        "swinir_light_x2", norm="iln", embed_dim=12, depths=(2, 2), num_heads=(2, 2)
    ).eval()
    gen = torch.Generator().manual_seed(3)
    calib = torch.rand(4, 3, 16, 16, generator=gen)
    qmodel = quantize_model(model, method_config("minmax", wbits=2, abits=2), calib).model.eval()
    x = torch.rand(1, 3, 16, 24, generator=gen)
    return model, qmodel, x


def _act_quantizers(qmodel: nn.Module) -> list[nn.Module]:
    return [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]


def test_groups_cover_every_quantizer_once_by_kind_and_by_layer(quantized) -> None:
    _, qmodel, _ = quantized
    groups = {g.name: g for g in quantizer_groups(qmodel)}
    kinds = [g for n, g in groups.items() if n.startswith(("W ", "A "))]
    layers = [g for n, g in groups.items() if not n.startswith(("W ", "A "))]
    assert [g.name for g in layers] == ["layers.0", "layers.1"]
    assert {"W qkv", "W fc2", "A fc2 input", "A q", "A post-softmax"} <= set(groups)
    linears = [ql for _, ql in quant_linears(qmodel)]
    acts = _act_quantizers(qmodel)
    for partition in (kinds, layers):
        weights = [id(w) for g in partition for w in g.weights]
        activations = [id(a) for g in partition for a in g.activations]
        assert sorted(weights) == sorted(id(w) for w in linears)
        assert sorted(activations) == sorted(id(a) for a in acts)


def test_full_precision_is_exact_and_undone(quantized) -> None:
    model, qmodel, x = quantized
    groups = quantizer_groups(qmodel)
    with torch.no_grad():
        before = qmodel(x)
        with full_precision(groups):
            fp = qmodel(x)
        after = qmodel(x)
        ref = model(x)
    # Up to float reassociation: the quantised copy runs attention through explicit
    # matmuls (the operands' hooks), the FP model through the fused kernel.
    torch.testing.assert_close(fp, ref, rtol=0, atol=1e-5)
    assert torch.equal(before, after)
    assert not torch.equal(before, ref)
    assert all(a.mode == "quant" for a in _act_quantizers(qmodel))
    assert not any(ql.weight_prequantized for _, ql in quant_linears(qmodel))


def test_sensitivity_rows(quantized) -> None:
    model, qmodel, x = quantized
    with torch.no_grad():
        ref = model(x)

    def score(m: nn.Module) -> float:
        with torch.no_grad():
            return -float((m(x) - ref).abs().mean())

    quantized_score, fp, rows = sensitivity(qmodel, score)
    assert fp > -1e-5  # all FP reproduces the model
    assert quantized_score < 0.0
    assert [r.group for r in rows] == [g.name for g in quantizer_groups(qmodel)]
    for r in rows:
        assert r.only_this_fp != quantized_score  # every group changes the output
        assert r.only_this_quantized < fp
    # A group holding every quantiser: FP alone = the FP model, quantised alone = all.
    everything = QuantGroup(
        "all", weights=[ql for _, ql in quant_linears(qmodel)], activations=_act_quantizers(qmodel)
    )
    _, _, [row] = sensitivity(qmodel, score, [everything])
    assert row.only_this_fp == fp and row.only_this_quantized == quantized_score
    assert row.size == len(everything.weights) + len(everything.activations)
    text = sensitivity_table(quantized_score, fp, rows)
    assert "| layers.0 |" in text and "| W qkv |" in text


def test_level_usage_detects_an_outlier_stretched_range() -> None:
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(64, 16, generator=gen)
    outlier = data.clone()
    outlier[0, 0] = 500.0
    usage = {}
    for name, calib, search in (("clean", data, "minmax"), ("stretched", outlier, "minmax")):
        aq = ActQuantizer(2)
        aq.mode = "observe"
        aq(calib)
        aq.finish_calibration(search)
        [usage[name]] = level_usage(nn.Sequential(aq), lambda m: m(data))
    assert usage["clean"].entropy_bits > 1.0
    assert usage["stretched"].entropy_bits < 0.05
    assert usage["stretched"].modal_fraction > 0.99
    assert usage["stretched"].upper == pytest.approx(500.0)
    assert 0.0 <= usage["clean"].entropy_bits <= 2.0
    row = usage_table([usage["stretched"]]).splitlines()[-1]
    assert row.startswith("| 0 | 2 |") and ", 500] |" in row
