"""Pre/post-Hadamard statistics and the paired tests."""

from __future__ import annotations

import pytest
import torch

from irformer.archs import build_model
from irformer.compress.stats import (
    activation_tensors,
    compare_pre_post,
    paired_test,
    summarise,
    weight_tensors,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summary_numbers() -> None:
    x = torch.tensor([-2.0, -0.005, 0.0, 0.0, 0.05, 0.5, 1.0, 3.0])
    s = summarise(x, eps=(0.01, 0.5))
    assert s.numel == 8 and s.exact_zeros == 2
    assert s.range == 5.0
    assert s.band == {0.01: 3 / 8, 0.5: 5 / 8}
    gauss = summarise(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    heavy = summarise(torch.distributions.StudentT(2.0).sample((20000,)), eps=(0.01,), seed=1)
    assert gauss.shapiro_w > 0.99 and abs(gauss.kurtosis) < 0.2
    assert heavy.shapiro_w < gauss.shapiro_w and heavy.kurtosis > 3


def test_paired_test_direction_and_effect_size() -> None:
    up = paired_test("w", "m", [0.1, 0.2, 0.3, 0.25, 0.15, 0.05, 0.12, 0.3])
    assert up.p_value < 0.01 and up.cohen_dz > 1 and up.n == 8
    down = paired_test("w", "m", [-0.1, -0.2, -0.3, -0.25, -0.15, -0.05, -0.12, -0.3])
    assert down.p_value > 0.99 and down.cohen_dz < -1
    d = [0.0, 0.0, 1.0, 2.0, 3.0]
    t = paired_test("w", "m", d)
    # Zero differences are dropped from the signed-rank test, kept in d_z.
    assert t.wilcoxon_stat == 6.0 and t.n == 5
    assert t.cohen_dz == pytest.approx(1.2 / torch.tensor(d).std().item())


def test_rotation_reduces_range_of_spiky_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = []
    for i in range(12):
        w = 0.05 * torch.randn(24, 60, generator=gen)
        w[i, (5 * i) % 60] = 2.0  # one outlier per tensor
        tensors.append((f"w{i}", "weight", w))
    report = compare_pre_post(tensors, rotation="pow2")
    tests = {t.metric: t for t in report.tests}
    assert tests["range_reduction"].p_value < 0.001
    assert tests["range_reduction"].cohen_dz > 1
    assert tests["kurtosis_reduction"].p_value < 0.001
    assert all(p.rotate_size == 64 and p.padding_zeros == 0 for p in report.pairs)
    assert all(p.post.exact_zeros == 0 for p in report.pairs)
    exact = compare_pre_post(tensors, rotation="exact")
    assert all(p.rotate_size == 60 for p in exact.pairs)
    assert len(report.tests) == 3 + len(report.eps)


def test_paper_padding_reports_padding_zeros() -> None:
    w = torch.randn(60, 60, generator=torch.Generator().manual_seed(1))
    ours = compare_pre_post([("w", "weight", w)]).pairs[0]
    paper = compare_pre_post([("w", "weight", w)], paper_padding=True).pairs[0]
    # 60 x 60 -> 64 x 64: 4 extra rows of 64 exact zeros after the rotation.
    assert paper.padding_zeros == 4 * 64
    assert paper.post.exact_zeros >= 256 and ours.post.exact_zeros == 0
    assert paper.post.band[0.01] > ours.post.band[0.01]
    assert paper.post.numel == 64 * 64 and ours.post.numel == 60 * 64


def test_model_tensors() -> None:
    torch.manual_seed(0)
    model = build_model("swinir_light_x2", embed_dim=12, depths=(2,), num_heads=(2,)).eval()
    ws = weight_tensors(model)
    # 2 blocks x (q, k, v, proj, fc1, fc2), the paper's unit (144 for SwinIR-light).
    assert len(ws) == 12
    assert [n.rsplit(".", 1)[-1] for n, _, _ in ws[:6]] == ["q", "k", "v", "proj", "fc1", "fc2"]
    assert len(weight_tensors(model, split_qkv=False)) == 8
    acts = activation_tensors(model, torch.rand(2, 3, 16, 16), rows=300)
    assert len(acts) == 16
    shapes = {n.rsplit(".", 1)[-1]: tuple(t.shape) for n, _, t in acts[:8]}
    assert shapes == {
        "qkv": (300, 12),
        "proj": (300, 12),
        "fc1": (300, 12),
        "fc2": (300, 24),
        "quant_q": (300, 6),
        "quant_k": (300, 6),
        "quant_attn": (300, 64),
        "quant_v": (300, 6),
    }
    report = compare_pre_post(ws + acts)
    assert {t.kind for t in report.tests} == {"weight", "activation"}
    assert report.as_dict()["tests"][0]["n"] in (12, 16)
