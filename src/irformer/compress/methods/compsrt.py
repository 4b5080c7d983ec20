"""CompSRT: 2DQuant + Hadamard rotation + scalar decomposition (+ optional pruning).

Weights and activations are quantised in the Hadamard-rotated domain: the
last dim is zero-padded to a power of two (CompSRT's choice, 60 -> 64, head
dim 10 -> 16; ``rotation="exact"`` instead uses exact Hadamard orders, 60 and
12), rotated, quantised, rotated back and cropped. Step and offset each get a
learnable additive scalar (``alpha``, ``beta``, init 0) trained with the
bounds during DQC. With ``prune = p`` the smallest-magnitude fraction p of
each rotated weight is removed before the bound search (the paper: 0.4 at 3
and 4 bits).
"""

from __future__ import annotations

from typing import Any

from irformer.compress.methods.base import QuantConfig
from irformer.compress.methods.dquant2d import DQC_ITERS

__all__ = ["ABLATIONS", "ablation_config", "default_config"]

ABLATIONS: dict[str, dict[str, Any]] = {
    "2dquant_had_w": {"scalar_decomposition": False, "rotate_activations": False},
    "2dquant_had_wa": {"scalar_decomposition": False},
    "2dquant_sd": {"rotation": None},
    "2dquant_had_w_sd": {"rotate_activations": False},
    "compsrt_scalars_only": {"learn_bounds": False},
}
"""CompSRT's ablations (Figure 6, Table 7) as method names: 2DQuant plus Hadamard on
the weights only / on weights and activations; plus scalar decomposition alone /
with Hadamard on the weights only; full CompSRT training alpha/beta but not the
bounds. (2DQuant itself is ``dquant2d``, full CompSRT ``compsrt``.)"""


def default_config(wbits: int, abits: int) -> QuantConfig:
    return QuantConfig(
        method="compsrt",
        wbits=wbits,
        abits=abits,
        search="dobi",
        rotation="pow2",
        scalar_decomposition=True,
        dqc_iters=DQC_ITERS,
    )


def ablation_config(name: str, wbits: int, abits: int) -> QuantConfig:
    """The configuration of ablation ``name`` (:data:`ABLATIONS`)."""
    return default_config(wbits, abits).with_overrides(method=name, **ABLATIONS[name])
