"""2DQuant (Liu et al., 2024): DOBI bound search + DQC bound distillation.

DOBI: for every quantiser, 100 bound pairs shrinking symmetrically from the
calibration min/max, the one with the least quantisation error wins (one
batch of 32 LR patches of 64 x 64). DQC: the bounds are then trained against
the FP model with Adam (lr 1e-2, betas (0.9, 0.99)) on L1 of the outputs plus
5 x MSE of normalised residual-group outputs, 4000 iterations of batch 16
(their configs; the paper text says 3000 and 32).
"""

from __future__ import annotations

from irformer.compress.methods.base import QuantConfig

__all__ = ["DQC_BATCH", "DQC_ITERS", "default_config"]

DQC_ITERS = 4000
DQC_BATCH = 16


def default_config(wbits: int, abits: int) -> QuantConfig:
    return QuantConfig(
        method="dquant2d", wbits=wbits, abits=abits, search="dobi", dqc_iters=DQC_ITERS
    )
