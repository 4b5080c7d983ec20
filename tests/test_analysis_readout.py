"""The end-of-training readout and the sentence contrasting two norms' entropies."""

from __future__ import annotations

import math

import pytest

from irformer.analysis.readout import (
    LayerReadout,
    entropy_contrast,
    entropy_verdict,
    layer_readout,
)


def _records() -> list[dict]:
    return [
        {"iter": 0, "block": "a", "kind": "layer", "sq_mean": 1.0, "entropy": 3.8,
         "balance_entropy": 3.7},
        {"iter": 50, "block": "a", "kind": "layer", "sq_mean": 4.0, "entropy": 3.0,
         "balance_entropy": 3.4},
        {"iter": 50, "block": "b", "kind": "layer", "sq_mean": 9.0, "entropy": 2.0,
         "balance_entropy": 3.2},
        {"iter": 50, "block": "g", "kind": "group", "sq_mean": 99.0, "entropy": 0.1,
         "balance_entropy": 0.1},
    ]  # fmt: skip


def test_layer_readout_last_and_first_probe() -> None:
    last = layer_readout(_records())
    assert last == LayerReadout(50, 9.0, 2.5, pytest.approx(3.3))
    assert last.effective_channels == pytest.approx(math.exp(3.3))
    first = layer_readout(_records(), first=True)
    assert (first.iteration, first.max_sq_mean, first.entropy) == (0, 1.0, 3.8)
    old = [{k: v for k, v in r.items() if k != "balance_entropy"} for r in _records()]
    assert math.isnan(layer_readout(old).balance_entropy)
    with pytest.raises(ValueError, match="no feature records"):
        layer_readout([])


def _r(entropy: float, balance: float, sq: float = 1.0) -> LayerReadout:
    return LayerReadout(100, sq, entropy, balance)


@pytest.mark.parametrize(
    ("base", "other", "verdict", "phrase"),
    [
        (_r(3.58, 3.70), _r(3.87, 3.705), "same", "equally balanced"),
        (_r(3.58, 3.75), _r(3.87, 3.60), "reversed", "LN's channels are the more balanced"),
        (_r(3.00, 3.60), _r(3.80, 3.70), "mostly scale", "Most of Algorithm 1's gap"),
        (_r(3.00, 3.00), _r(3.80, 3.70), "confirmed", "confirms the gap"),
        (_r(3.00, math.nan), _r(3.80, 3.70), "unknown", "was not recorded"),
    ],
)
def test_entropy_contrast_says_which_story(base, other, verdict, phrase) -> None:
    assert entropy_verdict(base, other) == verdict
    text = entropy_contrast("LN", base, "i-LN", other, channels=48)
    assert phrase in text
    assert f"{base.entropy:.3f} for LN vs {other.entropy:.3f} for i-LN" in text
    assert "log 48 = 3.871" in text
