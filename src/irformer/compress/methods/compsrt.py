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

from irformer.compress.methods.base import QuantConfig
from irformer.compress.methods.dquant2d import DQC_ITERS

__all__ = ["default_config"]


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
