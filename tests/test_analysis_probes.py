"""Feature probes: Algorithm 1 entropy, per-block statistics, Fig. 7 bias and Fig. 9 RPE."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from irformer.analysis.probes import (
    FeatureProbe,
    block_kind,
    channel_balance_entropy,
    channel_entropy,
    discover_blocks,
    feature_stats,
    final_norm_alignment,
    load_probe_batch,
    measure_blocks,
    read_feature_records,
    register_block_type,
    rpe_smoothness,
    rpe_tables,
)
from irformer.archs.layers import ResidualGroup
from irformer.archs.swinir import SwinTransformerBlock
from irformer.norms import BatchNorm, build_norm

# --------------------------------------------------------------------------- entropy


def test_entropy_uniform_channels_is_log_c() -> None:
    x = torch.ones(1, 5, 4)  # every channel has mean |x| = 1 -> uniform softmax
    assert channel_entropy(x).item() == pytest.approx(math.log(4), abs=1e-6)


def test_entropy_two_channels_by_hand() -> None:
    # mean |x| per channel: c0 = (1 + 1)/2 = 1, c1 = (3 + 1)/2 = 2
    x = torch.tensor([[[1.0, -3.0], [-1.0, 1.0]]])
    # softmax([1, 2]) = [0.2689414, 0.7310586]; -sum p ln p = 0.5822031
    assert channel_entropy(x).item() == pytest.approx(0.5822031, abs=1e-6)


def test_entropy_maps_equal_tokens_and_batch_is_per_sample() -> None:
    torch.manual_seed(0)
    maps = torch.randn(3, 6, 4, 5)
    tokens = maps.flatten(2).transpose(1, 2)
    e_maps = channel_entropy(maps)
    assert e_maps.shape == (3,)
    torch.testing.assert_close(e_maps, channel_entropy(tokens, layout="tokens"))
    torch.testing.assert_close(channel_entropy(maps[1:2]), e_maps[1:2])


def test_entropy_collapses_with_one_huge_channel() -> None:
    x = torch.zeros(2, 8, 16)
    x[..., 3] = 1000.0  # one channel dominates: p -> one-hot
    assert channel_entropy(x).max().item() < 1e-6
    x[..., 3] = 1.0  # mild peak: only slightly below log 16
    e = channel_entropy(x).mean().item()
    assert 2.6 < e < math.log(16)


def test_entropy_layout_errors() -> None:
    with pytest.raises(ValueError, match="layout 'maps'"):
        channel_entropy(torch.zeros(1, 2, 3), layout="maps")
    with pytest.raises(ValueError, match="expected tokens"):
        channel_entropy(torch.zeros(2, 3))


# --------------------------------------------------------------------------- balance entropy


def test_balance_entropy_two_channels_by_hand() -> None:
    # mean |x| per channel: [1, 2] -> p = [1/3, 2/3]; -sum p ln p = 0.6365142
    x = torch.tensor([[[1.0, -3.0], [-1.0, 1.0]]])
    assert channel_balance_entropy(x).item() == pytest.approx(0.6365142, abs=1e-6)
    assert channel_balance_entropy(torch.ones(1, 5, 4)).item() == pytest.approx(math.log(4))


@pytest.mark.parametrize("a", [1e-4, 0.1, 3.0, 1e4, -2.0])
def test_balance_entropy_is_scale_invariant_and_algorithm1_is_not(a: float) -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 40, 16) * torch.linspace(0.2, 3.0, 16)  # an uneven channel profile
    torch.testing.assert_close(channel_balance_entropy(a * x), channel_balance_entropy(x))
    if abs(a) >= 1e3:  # Algorithm 1 collapses for large features, same profile ...
        assert channel_entropy(a * x).max() < 0.01
    if abs(a) <= 1e-3:  # ... and reads "perfectly balanced" for small ones
        assert channel_entropy(a * x).min() > math.log(16) - 1e-6


def test_balance_entropy_is_per_sample() -> None:
    """Each sample's value ignores the rest of the batch; maps and tokens agree."""
    torch.manual_seed(2)
    maps = torch.randn(3, 6, 4, 5)
    tokens = maps.flatten(2).transpose(1, 2)
    full = channel_balance_entropy(maps)
    assert full.shape == (3,)
    torch.testing.assert_close(full, channel_balance_entropy(tokens, layout="tokens"))
    other = torch.cat([maps[1:2], 1000.0 * torch.randn(2, 6, 4, 5)])
    torch.testing.assert_close(channel_balance_entropy(other)[0], full[1])


def test_balance_entropy_detects_concentration() -> None:
    """One dominant channel gives a value near 0 at any scale; mild and balanced
    profiles stay near log C; an all-zero sample has no profile (NaN)."""
    torch.manual_seed(3)
    x = 0.01 * torch.randn(2, 64, 16)
    x[..., 3] = 50.0
    for a in (1e-3, 1.0, 1e3):
        assert channel_balance_entropy(a * x).max().item() < 0.05
    assert channel_entropy(1e-3 * x).min().item() > 2.7  # Algorithm 1 misses it when small
    half = torch.randn(1, 64, 16)
    half[..., 8:] *= 1e-6  # mass shared by 8 channels: exp(H) = 8 effective channels
    assert math.exp(channel_balance_entropy(half).item()) == pytest.approx(8.0, rel=0.02)
    balanced = torch.randn(1, 4096, 16)
    assert channel_balance_entropy(balanced).item() == pytest.approx(math.log(16), abs=2e-3)
    assert math.isnan(channel_balance_entropy(torch.zeros(1, 4, 16)).item())


def test_feature_stats_numbers() -> None:
    x = torch.tensor([[[1.0, -3.0], [-1.0, 1.0]]])
    sq, mx, ent, bal = feature_stats(x)
    assert sq == pytest.approx((1 + 9 + 1 + 1) / 4)
    assert mx == 3.0
    assert ent == pytest.approx(0.5822031, abs=1e-6)
    # m = [1, 2] -> p = [1/3, 2/3]; -sum p ln p = 0.6365142
    assert bal == pytest.approx(0.6365142, abs=1e-6)


# --------------------------------------------------------------------------- a tiny model


class _Group(ResidualGroup):
    """A residual group in the SwinIR convention (``residual_group`` + conv)."""

    def __init__(self, dim: int, depth: int, norm: str) -> None:
        super().__init__()
        self.residual_group = nn.ModuleList(
            SwinTransformerBlock(
                dim, 2, window_size=4, shift_size=2 * (i % 2), mlp_ratio=2.0, norm=norm
            )
            for i in range(depth)
        )
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        y = x
        for blk in self.residual_group:
            y = blk(y, x_size)
        b, _, c = y.shape
        maps = y.transpose(1, 2).reshape(b, c, *x_size)
        return self.conv(maps).flatten(2).transpose(1, 2) + x


class TinyIR(nn.Module):
    """conv -> 2 groups x 2 Swin blocks -> final norm -> conv (same-size restoration)."""

    def __init__(self, norm: str = "ln", dim: int = 8) -> None:
        super().__init__()
        self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        self.layers = nn.ModuleList(_Group(dim, 2, norm) for _ in range(2))
        self.norm = build_norm(norm, dim, role="final")
        self.conv_last = nn.Conv2d(dim, 3, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        feat = self.conv_first(x)
        t = feat.flatten(2).transpose(1, 2)
        for layer in self.layers:
            t = layer(t, (h, w))
        t = self.norm(t)
        return x + self.conv_last(t.transpose(1, 2).reshape_as(feat))


def test_discover_blocks_names_and_kinds() -> None:
    blocks = discover_blocks(TinyIR())
    assert [(n, k) for n, k, _ in blocks] == [
        ("layers.0", "group"),
        ("layers.0.residual_group.0", "layer"),
        ("layers.0.residual_group.1", "layer"),
        ("layers.1", "group"),
        ("layers.1.residual_group.0", "layer"),
        ("layers.1.residual_group.1", "layer"),
    ]


def test_block_registry_by_class_name() -> None:
    class MyFancyBlock(nn.Module):
        pass

    assert block_kind(MyFancyBlock()) is None
    register_block_type("MyFancyBlock", "layer")
    try:
        assert block_kind(MyFancyBlock()) == "layer"
    finally:
        from irformer.analysis import probes

        del probes.BLOCK_TYPES["MyFancyBlock"]
    with pytest.raises(ValueError, match="block kind"):
        register_block_type("X", "stage")  # type: ignore[arg-type]


def test_measure_blocks_matches_manual_forward() -> None:
    torch.manual_seed(0)
    model = TinyIR().train()
    batch = torch.rand(2, 3, 8, 8)
    stats = measure_blocks(model, batch)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    # Recompute the last layer block and the second group by hand.
    with torch.no_grad():
        model.eval()
        t = model.conv_first(batch).flatten(2).transpose(1, 2)
        t0 = model.layers[0](t, (8, 8))
        y = model.layers[1].residual_group[0](t0, (8, 8))
        y = model.layers[1].residual_group[1](y, (8, 8))
        t1 = model.layers[1](t0, (8, 8))
    by_name = {s.block: s for s in stats}
    last = by_name["layers.1.residual_group.1"]
    assert last.sq_mean == pytest.approx(y.square().mean().item(), rel=1e-5)
    assert last.max_abs == pytest.approx(y.abs().max().item(), rel=1e-5)
    assert last.entropy == pytest.approx(channel_entropy(y).mean().item(), rel=1e-5)
    assert by_name["layers.1"].sq_mean == pytest.approx(t1.square().mean().item(), rel=1e-5)
    assert 0 < last.entropy <= math.log(8) + 1e-6


def test_measure_blocks_selection_and_errors() -> None:
    model = TinyIR()
    stats = measure_blocks(model, torch.rand(1, 3, 8, 8), blocks=["layers.1"])
    assert [s.block for s in stats] == ["layers.1"]
    with pytest.raises(KeyError, match=r"layers\.7"):
        measure_blocks(model, torch.rand(1, 3, 8, 8), blocks=["layers.7"])
    with pytest.raises(ValueError, match="no measurable blocks"):
        measure_blocks(nn.Conv2d(3, 3, 1), torch.rand(1, 3, 8, 8))


def test_probe_leaves_batchnorm_statistics_alone() -> None:
    torch.manual_seed(0)
    model = TinyIR("bn").train()
    bns = [m.bn for m in model.modules() if isinstance(m, BatchNorm)]
    before = [bn.running_mean.clone() for bn in bns]
    measure_blocks(model, torch.rand(2, 3, 8, 8))
    for bn, ref in zip(bns, before, strict=True):
        torch.testing.assert_close(bn.running_mean, ref)
        assert bn.num_batches_tracked.item() == 0


def test_feature_probe_hook_writes_jsonl(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyIR()
    probe = FeatureProbe(torch.rand(2, 3, 8, 8))
    for it in (10, 20):
        probe(SimpleNamespace(model=model, iteration=it, run_dir=tmp_path))
    records = read_feature_records(tmp_path)
    assert len(records) == 2 * 6
    assert [r["iter"] for r in records[:6]] == [10] * 6 and records[-1]["iter"] == 20
    assert set(records[0]) == {
        "iter", "block", "kind", "sq_mean", "max_abs", "entropy", "balance_entropy"}  # fmt: skip
    assert records[0]["sq_mean"] == pytest.approx(records[6]["sq_mean"])  # same weights
    assert probe.calls == 2 and probe.elapsed_s > 0
    with pytest.raises(AttributeError, match="model"):
        probe(SimpleNamespace(iteration=1))


def test_read_feature_records_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"features\.jsonl"):
        read_feature_records(tmp_path)
    bad = tmp_path / "features.jsonl"
    bad.write_text('{"iter": 1, "block": "a"}\n')
    with pytest.raises(ValueError, match=r"features.jsonl:1: record lacks keys"):
        read_feature_records(bad)


def test_iln_keeps_magnitude_bounded_where_input_scales() -> None:
    """i-LN blocks are homogeneous: scaling the input scales sq_mean by the square (Eq. 5)."""
    torch.manual_seed(0)
    blk = SwinTransformerBlock(8, 2, window_size=4, shift_size=0, mlp_ratio=2.0, norm="iln")
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        y1, y10 = blk(x, (4, 4)), blk(10 * x, (4, 4))
    s1, s10 = feature_stats(y1)[0], feature_stats(y10)[0]
    # eps = 1e-4 breaks exact homogeneity by a hair
    assert s10 / s1 == pytest.approx(100.0, rel=1e-3)


# --------------------------------------------------------------------------- Fig. 7 / Fig. 9


def test_final_norm_alignment_finds_the_peak() -> None:
    torch.manual_seed(0)
    model = TinyIR("ln")
    with torch.no_grad():
        model.conv_first.bias[5] = 40.0  # channel 5 carries a huge offset everywhere
        model.norm.bias.zero_()
        model.norm.bias[5] = -3.0  # ... that the final bias compensates
        model.norm.bias[1] = 0.5
    res = final_norm_alignment(model, torch.rand(2, 3, 8, 8), top_k=2)
    assert res.feature_peaks[0] == 5 and res.bias_peaks[0] == 5
    assert res.peak_overlap >= 0.5
    assert res.pearson < -0.8
    assert res.pearson_abs > 0.8
    assert res.feature_mean.shape == (8,)
    assert res.summary()["max_abs_bias"] == pytest.approx(3.0)


def test_final_norm_alignment_needs_a_bias() -> None:
    with pytest.raises(ValueError, match="no learned bias"):
        final_norm_alignment(TinyIR("none"), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="no top-level 'norm'"):
        final_norm_alignment(nn.Conv2d(3, 3, 1), torch.rand(1, 3, 8, 8))


def test_rpe_tables_layout_and_smoothness() -> None:
    torch.manual_seed(0)
    model = TinyIR()
    tables = rpe_tables(model)
    assert [n for n, _ in tables][:2] == [
        "layers.0.residual_group.0.attn",
        "layers.0.residual_group.1.attn",
    ]
    attn = model.layers[0].residual_group[0].attn
    side = 2 * 4 - 1
    dy = torch.arange(side).view(side, 1) - 3.0
    dx = torch.arange(side).view(1, side) - 3.0
    smooth = -(dy**2 + 2 * dx**2)  # a conv-like blob, wider along dy
    with torch.no_grad():
        attn.relative_position_bias_table[:, 0] = smooth.flatten()
        attn.relative_position_bias_table[:, 1] = torch.randn(side * side)
    images = rpe_tables(model)[0][1]
    assert images.shape == (2, side, side)
    torch.testing.assert_close(images[0], smooth)
    # the bias that the attention adds for query (0,0) -> key (1,0): dy = -1, dx = 0
    bias = attn.position_bias()
    assert bias[0, 0, 4].item() == pytest.approx(smooth[3 - 1, 3].item())
    s = rpe_smoothness(images)
    assert s[0] > 0.6 and abs(s[1]) < 0.4
    ramp = (dy + 0.5 * dx).expand(side, side).unsqueeze(0)
    assert rpe_smoothness(ramp).item() == pytest.approx(1.0, abs=1e-6)


def test_load_probe_batch(tmp_path) -> None:
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for i, size in enumerate((20, 12, 30)):
        arr = (torch.rand(size, size + 2, 3, generator=rng) * 255).byte().numpy()
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
    batch = load_probe_batch(tmp_path, count=4, size=16)
    assert batch.shape == (2, 3, 16, 16)  # the 12-px image is skipped
    assert batch.min() >= 0.0 and batch.max() <= 1.0
    with pytest.raises(ValueError, match="at least 64x64"):
        load_probe_batch(tmp_path, size=64)


def test_builtin_probe_batch() -> None:
    from irformer.analysis.probes import builtin_probe_batch

    batch = builtin_probe_batch(count=2, size=24, scale=2)
    assert batch.shape == (2, 3, 24, 24)
    assert 0.05 < batch.mean().item() < 0.95 and batch.std().item() > 0.02
    with pytest.raises(ValueError, match="count must be"):
        builtin_probe_batch(count=9)


def test_feature_probe_drops_records_of_redone_iterations(tmp_path) -> None:
    model = TinyIR()
    first = FeatureProbe(torch.rand(1, 3, 8, 8))
    for it in (10, 20, 30):
        first(SimpleNamespace(model=model, iteration=it, run_dir=tmp_path, start_iteration=0))
    with (tmp_path / "features.jsonl").open("a") as fh:
        fh.write('{"iter": 40, "blo')  # a line cut short by a kill
    resumed = FeatureProbe(torch.rand(1, 3, 8, 8))  # resumed from the checkpoint at 20
    resumed(SimpleNamespace(model=model, iteration=30, run_dir=tmp_path, start_iteration=20))
    iters = [r["iter"] for r in read_feature_records(tmp_path)]
    assert iters == [10] * 6 + [20] * 6 + [30] * 6


@pytest.mark.parametrize(
    ("arch", "kwargs", "expected"),
    [
        (
            "hat",
            {"compress_ratio": 3, "squeeze_factor": 4, "upsampler": "pixelshuffle", "num_feat": 8},
            ["layers.0", "layers.0.residual_group.blocks.0", "layers.0.residual_group.blocks.1",
             "layers.0.residual_group.overlap_attn"],
        ),
        (
            "drct",
            {"img_size": 8, "gc": 4, "upsampler": "pixelshuffle", "num_feat": 8},
            ["layers.0", *[f"layers.0.swin{k}" for k in range(1, 6)]],
        ),
        (
            "srformer",
            {"img_size": 8, "upsampler": "pixelshuffledirect"},
            ["layers.0", "layers.0.residual_group.blocks.0", "layers.0.residual_group.blocks.1"],
        ),
    ],
)  # fmt: skip
def test_blocks_of_every_architecture(arch: str, kwargs: dict, expected: list[str]) -> None:
    from irformer.archs import build_model

    torch.manual_seed(0)
    model = build_model(
        arch, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4, upscale=2, **kwargs
    )
    blocks = discover_blocks(model)
    assert [n for n, _, _ in blocks] == expected
    assert blocks[0][1] == "group" and {k for _, k, _ in blocks[1:]} == {"layer"}
    stats = measure_blocks(model, torch.rand(1, 3, 16, 16))
    assert [s.block for s in stats] == expected
    assert all(s.sq_mean > 0 and 0 < s.entropy <= math.log(12 + 4 * 4) for s in stats)
    assert len(rpe_tables(model)) >= 2
