"""PTQ4ViT baseline (Yuan et al., 2022): twin-uniform quantisers and a range search.

- Post-softmax maps and post-GELU activations (the fc2 input) get *twin
  uniform* quantisers: two ranges with ``b - 1`` bits each. Post-softmax:
  ``R2 = [0, 1)`` with step ``2^-(b-1)`` for large probabilities and
  ``R1`` with step ``step_R2 / 2^k`` for the many small ones (``k`` searched).
  Post-GELU: ``R1`` covers the negative part (step from the minimum),
  ``R2`` the positive part (step searched).
- Every other quantiser is asymmetric uniform with bounds ``(a min, a max)``,
  ``a`` searched over 100 points in [0.01, 1.2]. PTQ4ViT ranks candidates by a
  Hessian-guided output distance; here the Linear layers rank weight and
  input candidates by the squared distance of the layer output to the FP
  output on calibration rows (two alternating rounds), and the attention
  operands by their own quantisation error (their matmul partner is not at
  hand in the hook), an approximation of the paper's metric.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from irformer.compress.methods.base import (
    QuantConfig,
    QuantLinear,
    act_quantizers,
    quant_linears,
)
from irformer.compress.quantizers import ActQuantizer, BoundSearch, _check_bits

__all__ = ["TwinUniformQuantizer", "act_factory", "calibrate", "default_config"]

logger = logging.getLogger(__name__)

SEARCH_POINTS = 100
SEARCH_FACTORS = (0.01, 1.2)
CALIB_ROWS = 2048
"""Input rows (tokens) per Linear kept for the output-distance search."""
SEARCH_ROUNDS = 2


def default_config(wbits: int, abits: int) -> QuantConfig:
    return QuantConfig(
        method="ptq4vit", wbits=wbits, abits=abits, search="scaled_minmax", twin_uniform=True
    )


class TwinUniformQuantizer(nn.Module):
    """Two uniform ranges of ``2^(b-1)`` levels each; see the module docstring.

    State: ``delta_r1``/``delta_r2`` buffers (steps of the two ranges).
    """

    def __init__(self, bits: int, kind: Literal["softmax", "gelu"]) -> None:
        super().__init__()
        _check_bits(bits)
        if kind not in ("softmax", "gelu"):
            raise ValueError(f"twin-uniform kind must be 'softmax' or 'gelu', got {kind!r}")
        self.bits = bits
        self.kind = kind
        self.levels = 2 ** (bits - 1)
        self.register_buffer("delta_r1", torch.tensor(1.0 / self.levels))
        self.register_buffer("delta_r2", torch.tensor(1.0 / self.levels))
        self.mode = "fp"
        self._min = 0.0
        self._max = 0.0
        self._sample: Tensor | None = None

    def quantize(self, x: Tensor, d1: Tensor, d2: Tensor) -> Tensor:
        m = self.levels
        if self.kind == "softmax":
            q1 = torch.clamp(torch.round(x / d1), 0, m - 1) * d1
            q2 = torch.clamp(torch.round(x / d2), 0, m - 1) * d2
            return torch.where(x < (m - 1) * d1, q1, q2)
        q1 = torch.clamp(torch.round(x / d1), -(m - 1), 0) * d1
        q2 = torch.clamp(torch.round(x / d2), 0, m - 1) * d2
        return torch.where(x < 0, q1, q2)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "fp":
            return x
        if self.mode == "observe":
            flat = x.detach().float().reshape(-1)
            self._min = min(self._min, float(flat.min()))
            self._max = max(self._max, float(flat.max()))
            if flat.numel() > 1 << 20:
                gen = torch.Generator().manual_seed(0)
                flat = flat[torch.randint(flat.numel(), (1 << 20,), generator=gen).to(flat.device)]
            self._sample = (
                flat.cpu() if self._sample is None else torch.cat((self._sample, flat.cpu()))
            )
            return x
        return self.quantize(x, self.delta_r1, self.delta_r2)

    def r2_candidates(self) -> list[float]:
        """Steps tried for R2 (GELU: the positive range)."""
        top = max(self._max, 1e-8) / (self.levels - 1)
        return [a * top for a in torch.linspace(*SEARCH_FACTORS, SEARCH_POINTS).tolist()]

    def finish_calibration(self, search: BoundSearch = "scaled_minmax") -> None:
        if self._sample is None:
            raise RuntimeError("TwinUniformQuantizer has observed nothing")
        x = self._sample
        m = self.levels
        if self.kind == "softmax":
            d2 = torch.tensor(1.0 / m)
            best = min(
                range(0, 2 * self.bits + 4),
                key=lambda k: float((self.quantize(x, d2 / 2**k, d2) - x).pow(2).sum()),
            )
            self.delta_r1.fill_(float(d2) / 2**best)
            self.delta_r2.fill_(float(d2))
        else:
            self.delta_r1.fill_(max(-self._min, 1e-8) / (m - 1))
            d1 = self.delta_r1.clone()
            cands = self.r2_candidates()
            best_d2 = min(
                cands, key=lambda d: float((self.quantize(x, d1, torch.tensor(d)) - x).pow(2).sum())
            )
            self.delta_r2.fill_(best_d2)
        self._sample = None
        self.mode = "quant"

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kind={self.kind}, mode={self.mode}"


def act_factory(name: str, role: str, width: int, cfg: QuantConfig) -> nn.Module | None:
    """Twin-uniform quantisers for the post-softmax map and the fc2 (post-GELU) input."""
    if role == "post_softmax":
        return TwinUniformQuantizer(cfg.abits, "softmax")
    if role == "post_gelu":
        return TwinUniformQuantizer(cfg.abits, "gelu")
    return None


def _collect_rows(model: nn.Module, batch: Tensor, chunk: int) -> dict[str, Tensor]:
    """A seeded random subset of input rows of every QuantLinear, from an FP pass."""
    rows: dict[str, list[Tensor]] = {}
    gen = torch.Generator().manual_seed(0)
    handles = []
    for name, ql in quant_linears(model):

        def hook(module: nn.Module, args: tuple[Tensor, ...], name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            idx = torch.randint(x.shape[0], (min(CALIB_ROWS, x.shape[0]),), generator=gen)
            rows.setdefault(name, []).append(x[idx.to(x.device)])

        handles.append(ql.register_forward_pre_hook(hook))
    try:
        for start in range(0, batch.shape[0], chunk):
            model(batch[start : start + chunk])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, parts in rows.items():
        x = torch.cat(parts)
        if x.shape[0] > CALIB_ROWS:
            x = x[torch.randint(x.shape[0], (CALIB_ROWS,), generator=gen).to(x.device)]
        out[name] = x
    return out


def _factors() -> list[float]:
    return torch.linspace(*SEARCH_FACTORS, SEARCH_POINTS).tolist()


def _search_linear(ql: QuantLinear, x: Tensor) -> None:
    """Alternately pick the weight and the input range minimising ||y_q - y||^2."""
    w = ql.weight.detach()
    y = x @ w.T
    wq = ql.weight_quantizer
    groups = wq.quantizer.groups
    wd = wq.to_domain(w).reshape(groups, -1)
    wmin, wmax = wd.amin(dim=1), wd.amax(dim=1)

    def err(xq: Tensor, wh: Tensor) -> float:
        return float((xq @ wh.T - y).pow(2).sum())

    aq = ql.act_quantizer
    for _ in range(SEARCH_ROUNDS):
        xq = aq(x)
        best = (float("inf"), 1.0)
        for a in _factors():
            wq.quantizer.set_bounds(a * wmin, a * wmax)
            best = min(best, (err(xq, wq(w)), a))
        wq.quantizer.set_bounds(best[1] * wmin, best[1] * wmax)
        wh = wq(w)
        if isinstance(aq, ActQuantizer):
            lo, hi = aq._min, aq._max
            best = (float("inf"), 1.0)
            for a in _factors():
                aq.quantizer.set_bounds([a * lo], [a * hi])
                best = min(best, (err(aq(x), wh), a))
            aq.quantizer.set_bounds([best[1] * lo], [best[1] * hi])
        elif isinstance(aq, TwinUniformQuantizer) and aq.kind == "gelu":
            best_d = min(
                aq.r2_candidates(),
                key=lambda d: err(aq.quantize(x, aq.delta_r1, torch.tensor(d)), wh),
            )
            aq.delta_r2.fill_(best_d)


@torch.no_grad()
def calibrate(model: nn.Module, batch: Tensor, cfg: QuantConfig, *, chunk: int = 8) -> None:
    """Initialise every range (scaled-minmax / twin search), then refine the Linear
    layers' weight and input ranges by output distance."""
    lins = quant_linears(model)
    acts = act_quantizers(model)
    for _, ql in lins:
        ql.weight_quantizer.calibrate(ql.weight, "minmax")
        ql.weight_prequantized = True
    for _, aq in acts:
        aq.mode = "observe"
    try:
        rows = _collect_rows(model, batch, chunk)
    finally:
        for _, ql in lins:
            ql.weight_prequantized = False
    for _, aq in acts:
        aq.finish_calibration("scaled_minmax")
    for name, ql in lins:
        _search_linear(ql, rows[name])
    logger.info("PTQ4ViT calibration: %d linears, %d activation quantisers", len(lins), len(acts))
