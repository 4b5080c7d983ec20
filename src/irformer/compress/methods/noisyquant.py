"""NoisyQuant baseline (Liu et al., 2023): a fixed noisy bias before activation
quantisation.

Each Linear input gets a fixed per-channel noise ``n = u * step`` with ``u``
uniform in [-1/2, 1/2] (seeded), added before quantisation and subtracted
after: ``Q(x + n) - n``. In a deployed model ``-W n`` folds into the layer's
bias, so the cost is nil; the noise decorrelates the rounding error from the
(heavy-tailed) activation distribution. Bounds come from DOBI on the
calibration batch; there is no distillation. The attention-matmul operands
have no bias to fold into and get plain quantisers.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from irformer.compress.methods.base import QuantConfig, default_act_quantizer

__all__ = ["act_factory", "default_config", "unit_noise"]


def default_config(wbits: int, abits: int) -> QuantConfig:
    return QuantConfig(method="noisyquant", wbits=wbits, abits=abits, search="dobi", noise=True)


def unit_noise(name: str, width: int, seed: int) -> torch.Tensor:
    """Uniform [-1/2, 1/2) noise for the quantiser at ``name``, reproducible per name."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.rand(width, generator=gen) - 0.5


def act_factory(name: str, role: str, width: int, cfg: QuantConfig) -> nn.Module | None:
    if role not in ("linear_input", "post_gelu"):
        return None
    aq = default_act_quantizer(width, cfg, role)
    aq.set_noise(unit_noise(name, width, cfg.noise_seed))
    return aq
