"""What the probe records say at the end of training, in numbers and in one sentence.

Two channel entropies are recorded per block (:mod:`irformer.analysis.probes`):
the paper's Algorithm 1 (softmax over the channel-wise mean ``|x|``), which
depends on the feature scale, and the scale-invariant balance entropy (the same
profile normalised to sum 1). Comparing two norms by Algorithm 1 alone mixes
"the features are larger" with "the features sit in fewer channels"; the
functions here report both and say which story the scale-free measure tells.
They are shared by the demo summary and the norm-study reports, so every place
that contrasts two norms words it the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SAME_BALANCE_NATS = 0.02
"""Balance-entropy differences below this (nats) are read as "the same balance":
about 2 % in effective channels, below the spread between layers of one model."""


@dataclass(frozen=True)
class LayerReadout:
    """The Transformer layers of one model at one probe."""

    iteration: int
    max_sq_mean: float
    """Largest per-layer mean square (mean of x^2, RMS squared)."""
    entropy: float
    """Mean over layers of the Algorithm-1 channel entropy (nats, scale dependent)."""
    balance_entropy: float
    """Mean over layers of the scale-invariant balance entropy (nats; NaN if not recorded)."""

    @property
    def effective_channels(self) -> float:
        """``exp(balance_entropy)``: how many equally loaded channels give this balance."""
        return math.exp(self.balance_entropy)


def layer_readout(records: Sequence[Mapping[str, Any]], *, first: bool = False) -> LayerReadout:
    """:class:`LayerReadout` of the last (or ``first``) probe in ``records``.

    Uses the records of kind ``layer`` (Transformer blocks); records without a
    kind count as layers. Records written before the balance entropy existed give
    NaN for it.
    """
    if not records:
        raise ValueError("no feature records to read")
    at = (min if first else max)(int(r["iter"]) for r in records)
    layers = [r for r in records if int(r["iter"]) == at and r.get("kind", "layer") == "layer"]
    if not layers:
        raise ValueError(f"no Transformer-layer records at iteration {at}")
    balance = [float(r["balance_entropy"]) for r in layers if "balance_entropy" in r]
    return LayerReadout(
        iteration=at,
        max_sq_mean=max(float(r["sq_mean"]) for r in layers),
        entropy=sum(float(r["entropy"]) for r in layers) / len(layers),
        balance_entropy=sum(balance) / len(balance) if balance else math.nan,
    )


def entropy_verdict(base: LayerReadout, other: LayerReadout) -> str:
    """How the balance entropy's gap relates to Algorithm 1's, ``other`` minus ``base``.

    ``"same"``: Algorithm 1 separates the two but the scale-free balance does not
    (|gap| < :data:`SAME_BALANCE_NATS`), so the scale explains Algorithm 1's gap;
    ``"reversed"``: the balance gap has the opposite sign; ``"mostly scale"``:
    same sign but less than half of Algorithm 1's gap; ``"confirmed"``: at least
    half of it; ``"unknown"`` when the balance was not recorded.
    """
    alg_gap = other.entropy - base.entropy
    bal_gap = other.balance_entropy - base.balance_entropy
    if not math.isfinite(bal_gap):
        return "unknown"
    if abs(bal_gap) < SAME_BALANCE_NATS:
        return "same"
    if alg_gap * bal_gap < 0:
        return "reversed"
    if abs(bal_gap) < 0.5 * abs(alg_gap):
        return "mostly scale"
    return "confirmed"


def entropy_contrast(
    base_label: str,
    base: LayerReadout,
    other_label: str,
    other: LayerReadout,
    *,
    channels: int,
) -> str:
    """Markdown paragraph contrasting two models' magnitude and both channel entropies.

    The first sentences give the numbers, the last says plainly whether the
    scale-invariant measure agrees with Algorithm 1 (see :func:`entropy_verdict`).
    """
    ratio = base.max_sq_mean / other.max_sq_mean if other.max_sq_mean > 0 else math.inf
    log_c = math.log(channels)
    text = (
        f"At the end of training {base_label}'s largest layer mean square (mean of x^2) is "
        f"{ratio:.3g}x {other_label}'s ({base.max_sq_mean:.3g} vs {other.max_sq_mean:.3g}). "
        f"Algorithm 1's channel entropy, which depends on that scale, is {base.entropy:.3f} "
        f"for {base_label} vs {other.entropy:.3f} for {other_label} (maximum log {channels} "
        f"= {log_c:.3f})"
    )
    verdict = entropy_verdict(base, other)
    if verdict == "unknown":
        return text + "; the scale-invariant balance entropy was not recorded."
    text += (
        f"; the scale-invariant balance entropy is {base.balance_entropy:.3f} vs "
        f"{other.balance_entropy:.3f} ({base.effective_channels:.1f} vs "
        f"{other.effective_channels:.1f} effective channels of {channels}). "
    )
    alg_gap = other.entropy - base.entropy
    bal_gap = other.balance_entropy - base.balance_entropy
    if verdict == "same":
        return text + (
            f"**Once the scale is factored out the two are equally balanced**: "
            f"Algorithm 1's gap of {alg_gap:+.3f} nats is a magnitude effect, not channel "
            f"concentration (balance gap {bal_gap:+.3f})."
        )
    if verdict == "reversed":
        more = base_label if bal_gap < 0 else other_label
        return text + (
            f"**The scale-invariant measure reverses Algorithm 1's order**: with the scale "
            f"factored out, {more}'s channels are the more balanced ones (balance gap "
            f"{bal_gap:+.3f} vs Algorithm 1's {alg_gap:+.3f} nats)."
        )
    if verdict == "mostly scale":
        return text + (
            f"**Most of Algorithm 1's gap ({alg_gap:+.3f} nats) is the feature scale**: the "
            f"scale-free balance differs by only {bal_gap:+.3f} nats."
        )
    return text + (
        f"**The scale-invariant measure confirms the gap**: {bal_gap:+.3f} nats of balance vs "
        f"{alg_gap:+.3f} by Algorithm 1, so the difference is channel concentration, not "
        "only scale."
    )
