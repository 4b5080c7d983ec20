"""Plots write real PNGs; the reductions they draw are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from irformer.analysis.plots import (
    _short,
    has_metric,
    plot_bars,
    plot_bias_alignment,
    plot_block_stats,
    plot_final_entropies,
    plot_per_block_curves,
    plot_rpe,
    plot_run_overlay,
    records_by_block,
    reduce_over_blocks,
)
from irformer.analysis.probes import BiasAlignment, BlockStats


def _records(growth: float) -> list[dict]:
    out = []
    for it in (0, 10, 20, 30):
        for b in range(3):
            out.append(
                {
                    "iter": it,
                    "block": f"layers.0.residual_group.blocks.{b}",
                    "kind": "layer",
                    "sq_mean": (1 + b) * growth ** (it / 10),
                    "max_abs": 3.0,
                    "entropy": 2.0 - 0.01 * it * b,
                }
            )
        out.append(
            {
                "iter": it,
                "block": "layers.0",
                "kind": "group",
                "sq_mean": 1.0,
                "max_abs": 1.0,
                "entropy": 1.0,
            }
        )
    return out


def _assert_png(path, min_side: int = 100) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert min(im.size) >= min_side


def test_reductions() -> None:
    recs = _records(10.0)
    it, mx = reduce_over_blocks(recs, "sq_mean", "max")
    assert it.tolist() == [0, 10, 20, 30]
    np.testing.assert_allclose(mx, [3.0, 30.0, 300.0, 3000.0])
    _, mean_ent = reduce_over_blocks(recs, "entropy", "mean")
    assert mean_ent[-1] == pytest.approx((2.0 + 1.7 + 1.4 + 1.0) / 4)
    _, layer_ent = reduce_over_blocks(recs, "entropy", "mean", kind="layer")
    assert layer_ent[-1] == pytest.approx((2.0 + 1.7 + 1.4) / 3)
    series = records_by_block(recs, "sq_mean", kind="layer")
    assert list(series) == [f"layers.0.residual_group.blocks.{b}" for b in range(3)]
    with pytest.raises(ValueError, match="how must be"):
        reduce_over_blocks(recs, "sq_mean", "median")


def test_short_names() -> None:
    assert _short("layers.0.residual_group.blocks.3") == "L0.b3"
    assert _short("norm") == "norm"


def test_training_curve_plots(tmp_path) -> None:
    runs = {"ln": _records(10.0), "iln": _records(1.0)}
    _assert_png(plot_per_block_curves(runs, tmp_path / "per_block.png"))
    _assert_png(plot_run_overlay(runs, tmp_path / "overlay.png"))
    _assert_png(plot_run_overlay(runs, tmp_path / "ent.png", metric="entropy", how="mean"))
    _assert_png(
        plot_bars({"ln": 0.01, "ln_star": 0.5, "iln": 4.0}, tmp_path / "bars.png", ylabel="entropy")
    )
    with pytest.raises(ValueError, match="no runs"):
        plot_run_overlay({}, tmp_path / "x.png")
    _assert_png(
        plot_final_entropies(
            {"ln": 3.5, "iln": 3.87}, {"ln": 3.2, "iln": float("nan")}, tmp_path / "f8.png",
            channels=48,
        )
    )  # fmt: skip


def test_records_without_a_metric_are_skipped() -> None:
    """Old features.jsonl files have no balance_entropy: reductions skip them."""
    recs = _records(1.0)
    assert not has_metric(recs, "balance_entropy")
    it, val = reduce_over_blocks(recs, "balance_entropy", "mean")
    assert it.size == 0 and val.size == 0
    assert records_by_block(recs, "balance_entropy") == {}
    recs[0]["balance_entropy"] = 2.5
    assert has_metric(recs, "balance_entropy")
    assert reduce_over_blocks(recs, "balance_entropy", "mean")[1].tolist() == [2.5]


def test_block_bias_rpe_plots(tmp_path) -> None:
    stats = [
        BlockStats(f"layers.0.residual_group.blocks.{i}", "layer", 10.0**i, 10.0**i, 3.0 - i, 2.0)
        for i in range(4)
    ] + [BlockStats("layers.0", "group", 5.0, 9.0, 1.0)]  # balance NaN: an old record
    _assert_png(plot_block_stats(stats, tmp_path / "sub" / "blocks.png"))
    rng = np.random.default_rng(0)
    fm = rng.normal(size=16)
    align = BiasAlignment("norm", fm, np.abs(fm), -fm, -1.0, 1.0, (3, 1), (3, 1))
    _assert_png(plot_bias_alignment(align, tmp_path / "bias.png"))
    tables = [(f"layers.{i}.attn", torch.randn(3, 7, 7)) for i in range(10)]
    _assert_png(plot_rpe(tables, tmp_path / "rpe.png", max_rows=4), min_side=50)
    with pytest.raises(ValueError, match="no relative position"):
        plot_rpe([], tmp_path / "none.png")
