"""MinMax baseline: bounds are the min and max seen on the calibration batch."""

from __future__ import annotations

from irformer.compress.methods.base import QuantConfig

__all__ = ["default_config"]


def default_config(wbits: int, abits: int) -> QuantConfig:
    return QuantConfig(method="minmax", wbits=wbits, abits=abits, search="minmax")
