"""Uniform fake quantisation: learnable-bound quantisers and weight-only int8/int4.

Two families live here.

**Post-training fake quantisers** (2DQuant/CompSRT). Per tensor, asymmetric,
static: ``x_hat = s * clamp(round((x - z) / s), 0, 2^b - 1) + z`` with
``s = (u - l) / (2^b - 1) + alpha`` and ``z = l + beta``. The lower/upper
bounds ``l, u`` are learnable; ``alpha = beta = 0`` unless *scalar
decomposition* (CompSRT section 3.2) makes them two more learnable scalars.
Rounding uses a straight-through estimator; the clamp passes the gradient of
clipped values to the bounds (as 2DQuant's differentiable clip does). The
integer index is clamped to the b-bit range: CompSRT's code does not clamp it,
so with ``alpha, beta != 0`` its indices can leave the range it claims to store.

:class:`ActQuantizer` and :class:`WeightQuantizer` wrap the core with the
calibration protocol (observe -> bound search -> quantise), the optional
Hadamard rotation (quantise in the rotated, zero-padded domain, rotate back,
crop) and, for weights, magnitude pruning in the rotated domain.

**Weight-only quantisation** (:func:`quantize_weights_`): int8/int4 for the
low-precision feature, per tensor or per output channel, symmetric or
asymmetric, applied in place to every ``nn.Linear``/``nn.Conv2d`` weight.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from irformer.compress.fused import rotated_fake_quantize, use_fused
from irformer.compress.hadamard import next_power_of_two, rotate, unrotate
from irformer.compress.prune import (
    PRUNE_MODES,
    PruneMode,
    channel_mask,
    magnitude_mask,
    official_prune,
)

__all__ = [
    "SUPPORTED_BITS",
    "ActQuantizer",
    "BoundSearch",
    "LayerWeightStats",
    "UniformQuantizer",
    "WeightQuantReport",
    "WeightQuantizer",
    "candidate_errors",
    "dobi_search",
    "fake_quantize",
    "fake_quantize_scaled",
    "minmax_bounds",
    "quantize_weight_tensor",
    "quantize_weights_",
    "round_ste",
    "scaled_minmax_search",
    "search_bounds",
]

logger = logging.getLogger(__name__)

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
"""Bit widths of the post-training quantisers (the papers' W/A 2, 3, 4 and 8)."""

BoundSearch = Literal["minmax", "dobi", "dobi_one_sided", "scaled_minmax"]
"""How bounds are initialised from calibration data: plain min/max; DOBI's
100-point error search shrinking both bounds (or only the upper one); or
PTQ4ViT's search over ``[a min, a max]`` for 100 factors ``a`` in [0.01, 1.2]."""

DOBI_POINTS = 100
"""Candidates in 2DQuant's distribution-oriented bound initialisation."""

OBSERVER_SAMPLE = 1 << 20
"""Elements an activation observer keeps for the bound search. The error of a
candidate is estimated on a uniform sample (min/max stay exact): a full
SwinIR-light attention map of one calibration batch has ~50M values."""

MIN_SCALE = 1e-8
"""Floor of the quantisation step, so constant tensors do not divide by zero."""


class _RoundSTE(torch.autograd.Function):
    """Exact rounding forward, identity backward (so the forward is bit-exact)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


def round_ste(x: Tensor) -> Tensor:
    """Round half to even with a straight-through gradient."""
    return _RoundSTE.apply(x)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; expected one of {SUPPORTED_BITS}")


def quant_scale_zero(
    lower: Tensor,
    upper: Tensor,
    bits: int,
    alpha: Tensor | float = 0.0,
    beta: Tensor | float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Step ``s = (u - l)/(2^b - 1) + alpha`` and offset ``z = l + beta``."""
    scale = (upper - lower) / (2**bits - 1) + alpha
    return scale.clamp_min(MIN_SCALE), lower + beta


def quantize_indices(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer grid indices ``clamp(round((x - z)/s), 0, 2^b - 1)`` (float dtype, STE)."""
    return torch.clamp(round_ste((x - zero) / scale), 0, 2**bits - 1)


def dequantize_indices(idx: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``idx * s + z``: the one dequantisation formula shared by fake quantisation and
    packed models, so a reloaded model reproduces the fake-quantised values bit for bit."""
    return idx * scale + zero


class _FakeQuantSTE(torch.autograd.Function):
    """Quantise-dequantise in one autograd node that saves only its inputs.

    Composed from elementwise ops, a fake quantiser keeps several full-size
    tensors alive for backward (on attention maps, each the size of the map);
    this node keeps its input only. (Measured on SwinIR-light DQC, the peak
    barely moved: the saved tensors of the matmuls and rotations dominate, which
    is what :func:`irformer.compress.methods.base.distill_bounds`' recompute
    addresses.) The forward is the same op sequence as
    :func:`quantize_indices` + :func:`dequantize_indices` (bit-identical); the
    backward recomputes ``t = (x - z)/s`` and applies the STE derivatives:
    ``dx = [inside]``, ``ds = clamp(round(t)) - t*[inside]``, ``dz = [outside]``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        scale: Tensor,
        zero: Tensor,
        levels: int,
    ) -> Tensor:
        ctx.save_for_backward(x, scale, zero)
        ctx.levels = levels  # type: ignore[attr-defined]
        return _fake_quantize_inplace(x, scale, zero, levels)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, scale, zero = ctx.saved_tensors  # type: ignore[attr-defined]
        levels = ctx.levels  # type: ignore[attr-defined]
        t = (x - zero).div_(scale)
        r = torch.round(t)
        inside = (r >= 0).logical_and_(r <= levels)
        gx = gs = gz = None
        if ctx.needs_input_grad[1]:
            # clamp(r) - t*[inside]: inside it is r - t, outside the clamped end level.
            t.mul_(inside).neg_().add_(r.clamp_(0, levels))
            gs = t.mul_(grad).sum_to_size(scale.shape)
        if ctx.needs_input_grad[0]:
            gx = grad * inside
        if ctx.needs_input_grad[2]:
            gz = (grad * inside.logical_not_()).sum_to_size(zero.shape)
        return gx, gs, gz, None


def fake_quantize_scaled(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """``dequantize(quantize(x))`` for a given step and offset, with STE gradients
    to ``x``, ``scale`` and ``zero`` (one memory-lean autograd node)."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero.requires_grad):
        return _FakeQuantSTE.apply(x, scale, zero, 2**bits - 1)
    return _fake_quantize_inplace(x, scale, zero, 2**bits - 1)


def _fake_quantize_inplace(x: Tensor, scale: Tensor, zero: Tensor, levels: int) -> Tensor:
    """The op sequence of ``dequantize_indices(quantize_indices(...))`` on one buffer:
    the same values bit for bit, one allocation instead of six (these tensors are
    the size of every attention map)."""
    return (x - zero).div_(scale).round_().clamp_(0, levels).mul_(scale).add_(zero)


def fake_quantize(
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    bits: int,
    alpha: Tensor | float = 0.0,
    beta: Tensor | float = 0.0,
) -> Tensor:
    """Quantise-dequantise ``x`` on the b-bit grid between ``lower`` and ``upper``.

    Bounds broadcast against ``x``. Values outside the bounds clip to the end
    levels; gradients flow to ``x`` inside the range (STE) and to the bounds.
    """
    scale, zero = quant_scale_zero(lower, upper, bits, alpha, beta)
    return fake_quantize_scaled(x, scale, zero, bits)


def minmax_bounds(x: Tensor) -> tuple[float, float]:
    return float(x.min()), float(x.max())


HIST_BINS = 8192
"""Bins of the value histogram that candidate errors are computed on for large
inputs (bin width = range / 8192, far below a 4-bit step of range / 15)."""

EXACT_ERROR_LIMIT = 1 << 22
"""Candidates x values up to which errors are computed element by element."""


def candidate_errors(x: Tensor, lowers: Tensor, uppers: Tensor, bits: int) -> Tensor:
    """Squared quantisation error of ``x`` for every candidate bound pair, (num,) float64.

    Exact for small inputs. For large ones every value is replaced by the
    centre of its histogram bin (:data:`HIST_BINS` bins over the range of ``x``
    and the candidates): one pass over ``x``, then ``num x bins`` work, so a
    100-point search costs about as much as one pass over the data. The error
    of this approximation is below ``bin_width^2 / 12`` per value.
    """
    x = x.detach().reshape(-1).float()
    lowers = lowers.float().to(x.device)
    uppers = uppers.float().to(x.device)
    num = lowers.numel()
    with torch.no_grad():
        if x.numel() * num <= EXACT_ERROR_LIMIT:
            err = fake_quantize(x[None, :], lowers[:, None], uppers[:, None], bits) - x[None, :]
            return err.double().pow(2).sum(dim=1).cpu()
        lo = min(float(x.min()), float(lowers.min()))
        hi = max(float(x.max()), float(uppers.max()))
        if hi <= lo:
            return torch.zeros(num, dtype=torch.float64)
        counts = torch.histc(x, bins=HIST_BINS, min=lo, max=hi).double()
        width = (hi - lo) / HIST_BINS
        centres = lo + (torch.arange(HIST_BINS, dtype=torch.float64, device=x.device) + 0.5) * width
        c = centres.float()[None, :]
        err = (fake_quantize(c, lowers[:, None], uppers[:, None], bits) - c).double().pow(2)
        return (err * counts[None, :]).sum(dim=1).cpu()


def dobi_search(
    x: Tensor,
    bits: int,
    *,
    one_sided: bool = False,
    num: int = DOBI_POINTS,
    lo: float | None = None,
    hi: float | None = None,
) -> tuple[float, float]:
    """2DQuant's distribution-oriented bound initialisation.

    Tries ``num`` bound pairs, shrinking both ends towards the centre in steps
    of ``(max - min) / (2 num)`` (or only the upper end in steps of
    ``(max - min) / num`` when ``one_sided``), and keeps the pair with the least
    squared quantisation error on ``x`` (:func:`candidate_errors`). ``lo``/``hi``
    override the min/max of ``x`` (an observer's exact extremes when ``x`` is a
    sample).
    """
    x = x.detach().reshape(-1).float()
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    if hi <= lo:
        return lo, hi
    i = torch.arange(num, dtype=torch.float64)
    if one_sided:
        lowers = torch.full_like(i, lo)
        uppers = hi - i * (hi - lo) / num
    else:
        step = (hi - lo) / (2 * num)
        lowers, uppers = lo + i * step, hi - i * step
    lowers, uppers = lowers.float(), uppers.float()
    best = int(torch.argmin(candidate_errors(x, lowers, uppers, bits)))
    return float(lowers[best]), float(uppers[best])


def scaled_minmax_search(
    x: Tensor,
    bits: int,
    *,
    num: int = DOBI_POINTS,
    factors: tuple[float, float] = (0.01, 1.2),
    lo: float | None = None,
    hi: float | None = None,
) -> tuple[float, float]:
    """PTQ4ViT-style range search: bounds ``(a lo, a hi)`` for ``num`` factors ``a``
    in ``factors``, keeping the least squared error on ``x``."""
    x = x.detach().reshape(-1).float()
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    if hi <= lo:
        return lo, hi
    a = torch.linspace(factors[0], factors[1], num, dtype=torch.float64)
    lowers, uppers = (a * lo).float(), (a * hi).float()
    best = int(torch.argmin(candidate_errors(x, lowers, uppers, bits)))
    return float(lowers[best]), float(uppers[best])


def search_bounds(
    x: Tensor, bits: int, method: BoundSearch, *, lo: float | None = None, hi: float | None = None
) -> tuple[float, float]:
    """Bounds for ``x`` by ``method`` (see :data:`BoundSearch`)."""
    if method == "minmax":
        mn, mx = minmax_bounds(x)
        return (mn if lo is None else lo), (mx if hi is None else hi)
    if method in ("dobi", "dobi_one_sided"):
        return dobi_search(x, bits, one_sided=method == "dobi_one_sided", lo=lo, hi=hi)
    if method == "scaled_minmax":
        return scaled_minmax_search(x, bits, lo=lo, hi=hi)
    raise ValueError(
        f"unknown bound search {method!r}; expected minmax, dobi, dobi_one_sided or scaled_minmax"
    )


class UniformQuantizer(nn.Module):
    """Asymmetric uniform fake quantiser with ``groups`` learnable bound pairs.

    ``groups = 1`` is per tensor. Weights of a fused ``qkv`` projection use
    ``groups = 3`` (one bound pair for each of q, k, v rows, as 2DQuant's
    ``qkv_separation``). With ``scalar_decomposition`` the step and offset get
    the learnable additive terms ``alpha`` and ``beta`` (init 0, CompSRT).
    """

    def __init__(self, bits: int, *, groups: int = 1, scalar_decomposition: bool = False) -> None:
        super().__init__()
        _check_bits(bits)
        self.bits = bits
        self.groups = groups
        self.lower = nn.Parameter(torch.zeros(groups))
        self.upper = nn.Parameter(torch.ones(groups))
        self.scalar_decomposition = scalar_decomposition
        if scalar_decomposition:
            self.alpha = nn.Parameter(torch.zeros(groups))
            self.beta = nn.Parameter(torch.zeros(groups))
        else:
            self.register_parameter("alpha", None)
            self.register_parameter("beta", None)

    def set_bounds(self, lower: Tensor | list[float], upper: Tensor | list[float]) -> None:
        with torch.no_grad():
            self.lower.copy_(torch.as_tensor(lower, dtype=self.lower.dtype))
            self.upper.copy_(torch.as_tensor(upper, dtype=self.upper.dtype))

    def scale_zero(self) -> tuple[Tensor, Tensor]:
        """Per group ``(s, z)``, each of shape (groups,)."""
        alpha = 0.0 if self.alpha is None else self.alpha
        beta = 0.0 if self.beta is None else self.beta
        return quant_scale_zero(self.lower, self.upper, self.bits, alpha, beta)

    def _grouped(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scale, zero = self.scale_zero()
        if self.groups == 1:
            return x, scale, zero
        if x.shape[0] % self.groups:
            raise ValueError(
                f"first dim {x.shape[0]} of shape {tuple(x.shape)} is not divisible "
                f"into {self.groups} quantisation groups"
            )
        xg = x.reshape(self.groups, -1)
        return xg, scale[:, None], zero[:, None]

    def indices(self, x: Tensor) -> Tensor:
        """Integer indices in ``[0, 2^b - 1]`` (as float), grouped by rows like ``x``."""
        xg, scale, zero = self._grouped(x)
        return quantize_indices(xg, scale, zero, self.bits).reshape(x.shape)

    def dequantize(self, idx: Tensor) -> Tensor:
        ig, scale, zero = self._grouped(idx)
        return dequantize_indices(ig, scale, zero).reshape(idx.shape)

    def forward(self, x: Tensor) -> Tensor:
        xg, scale, zero = self._grouped(x)
        return fake_quantize_scaled(xg, scale, zero, self.bits).reshape(x.shape)

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.lower, self.upper, self.alpha, self.beta) if p is not None]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.groups}, sd={self.scalar_decomposition}"


QuantMode = Literal["fp", "observe", "quant"]


class ActQuantizer(nn.Module):
    """Static per-tensor activation quantiser with a calibration observer.

    Modes: ``fp`` passes through; ``observe`` records min/max (exact) and a
    uniform sample of the (rotated) values, passing ``x`` through unchanged so
    every quantiser sees full-precision inputs during calibration (as 2DQuant);
    ``quant`` fake-quantises. ``rotate_size`` turns on the Hadamard rotation:
    the last dim is zero-padded to that size, rotated, quantised, rotated back
    and cropped (CompSRT). ``noise`` (NoisyQuant) is a fixed per-channel
    fraction of the step added before quantisation and removed after.
    """

    def __init__(
        self,
        bits: int,
        *,
        rotate_size: int | None = None,
        scalar_decomposition: bool = False,
        sample_size: int = OBSERVER_SAMPLE,
    ) -> None:
        super().__init__()
        self.quantizer = UniformQuantizer(bits, scalar_decomposition=scalar_decomposition)
        self.rotate_size = rotate_size
        self.sample_size = sample_size
        self.mode: QuantMode = "fp"
        self.register_buffer("noise", None)
        self._min = math.inf
        self._max = -math.inf
        self._samples: list[Tensor] = []
        self._generator: torch.Generator | None = None

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    def set_noise(self, unit_noise: Tensor) -> None:
        """Fix NoisyQuant's noise: ``unit_noise`` (C,) in [-1/2, 1/2], scaled by the step."""
        self.noise = unit_noise.detach().clone()

    def _to_domain(self, x: Tensor) -> Tensor:
        return x if self.rotate_size is None else rotate(x, self.rotate_size)

    def _from_domain(self, y: Tensor, n: int) -> Tensor:
        return y if self.rotate_size is None else unrotate(y, n)

    def observe(self, x: Tensor) -> None:
        y = self._to_domain(x.detach()).float().reshape(-1)
        self._min = min(self._min, float(y.min()))
        self._max = max(self._max, float(y.max()))
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(len(self._samples) + 1234)
        if y.numel() > self.sample_size:
            idx = torch.randint(y.numel(), (self.sample_size,), generator=self._generator)
            y = y[idx.to(y.device)]
        self._samples.append(y.cpu())
        total = sum(s.numel() for s in self._samples)
        if total > 2 * self.sample_size:
            pool = torch.cat(self._samples)
            idx = torch.randint(pool.numel(), (self.sample_size,), generator=self._generator)
            self._samples = [pool[idx]]

    def calibration_sample(self) -> Tensor:
        """The observed (rotated) values kept for the bound search, flattened."""
        if not self._samples:
            raise RuntimeError("ActQuantizer has observed nothing; run calibration data first")
        return torch.cat(self._samples)

    def finish_calibration(self, search: BoundSearch = "dobi") -> None:
        """Set the bounds from what was observed and switch to ``quant`` mode."""
        sample = self.calibration_sample()
        if search == "minmax":
            lo, hi = self._min, self._max
        else:
            lo, hi = search_bounds(sample, self.bits, search, lo=self._min, hi=self._max)
        self.quantizer.set_bounds([lo], [hi])
        self._samples = []
        self.mode = "quant"

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "fp":
            return x
        if self.mode == "observe":
            self.observe(x)
            return x
        n = x.shape[-1]
        if self.noise is None and use_fused(x, self.rotate_size):
            scale, zero = self.quantizer.scale_zero()
            return rotated_fake_quantize(x, scale, zero, self.bits, self.rotate_size)
        y = self._to_domain(x)
        if self.noise is not None:
            step = self.quantizer.scale_zero()[0]
            shift = self.noise.to(y.dtype) * step
            return self._from_domain(self.quantizer(y + shift) - shift, n)
        return self._from_domain(self.quantizer(y), n)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, rotate_size={self.rotate_size}"


class WeightQuantizer(nn.Module):
    """Static weight quantiser: optional rotation, magnitude pruning, per-group bounds.

    w: (out, in) (a Linear weight). The rotated domain is ``pad(w) @ H.T`` along
    ``in`` (size ``rotate_size``). With ``prune > 0`` the fraction of smallest
    magnitudes in that domain is masked *after* the Hadamard and before the
    bound search (CompSRT 3.3); pruned entries are re-zeroed after
    dequantisation, so they stay exactly zero (CompSRT's code lets them
    quantise back to small non-zeros) and the 1-bit-mask storage model is the
    model evaluated. The bound search sees only the kept entries.
    ``prune_mode="channel"`` prunes whole output rows instead;
    ``prune_mode="official"`` reproduces CompSRT's code (see
    :mod:`irformer.compress.prune`): a fresh sampled threshold on every forward,
    padded rows counted, pruned zeros quantised (no mask is kept).
    """

    def __init__(
        self,
        bits: int,
        *,
        groups: int = 1,
        rotate_size: int | None = None,
        scalar_decomposition: bool = False,
        prune: float = 0.0,
        prune_mode: PruneMode = "magnitude",
    ) -> None:
        super().__init__()
        if not 0.0 <= prune < 1.0:
            raise ValueError(f"prune fraction must be in [0, 1), got {prune}")
        if prune_mode not in PRUNE_MODES:
            raise ValueError(f"unknown prune mode {prune_mode!r}; valid: {', '.join(PRUNE_MODES)}")
        self.quantizer = UniformQuantizer(
            bits, groups=groups, scalar_decomposition=scalar_decomposition
        )
        self.rotate_size = rotate_size
        self.prune = prune
        self.prune_mode = prune_mode
        self.register_buffer("mask", None)
        self.calibrated = False
        self._official_rng: torch.Generator | None = None

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    def to_domain(self, w: Tensor) -> Tensor:
        """The tensor that is actually quantised: (out, rotate_size or in)."""
        return w if self.rotate_size is None else rotate(w, self.rotate_size)

    def from_domain(self, y: Tensor, n: int) -> Tensor:
        return y if self.rotate_size is None else unrotate(y, n)

    @property
    def official_pruning(self) -> bool:
        return self.prune > 0 and self.prune_mode == "official"

    def _official_pruned(self, y: Tensor) -> Tensor:
        if self._official_rng is None:
            self._official_rng = torch.Generator().manual_seed(0)
        return official_prune(
            y, self.prune, groups=self.quantizer.groups, generator=self._official_rng
        )

    def calibrate(self, w: Tensor, search: BoundSearch = "dobi") -> None:
        y = self.to_domain(w.detach().float())
        groups = self.quantizer.groups
        if self.official_pruning:
            self._calibrate_official(y, search)
            return
        if self.prune > 0 and self.prune_mode == "channel":
            self.mask = channel_mask(y, self.prune, groups=groups)
        elif self.prune > 0:
            self.mask = magnitude_mask(y, self.prune)
        yg = y.reshape(groups, -1)
        mg = None if self.mask is None else self.mask.reshape(groups, -1)
        lowers, uppers = [], []
        for g in range(groups):
            vals = yg[g] if mg is None else yg[g][mg[g]]
            lo, hi = search_bounds(vals, self.bits, search)
            lowers.append(lo)
            uppers.append(hi)
        self.quantizer.set_bounds(lowers, uppers)
        self.calibrated = True

    def _calibrate_official(self, y: Tensor, search: BoundSearch) -> None:
        """CompSRT's code: the bound search sees the pruned tensor with its zeros
        and the zero rows padding each block to a power of two."""
        groups = self.quantizer.groups
        rows = y.shape[0] // groups
        padding = (next_power_of_two(rows) - rows) * y.shape[1]
        lowers, uppers = [], []
        for block in self._official_pruned(y).reshape(groups, -1):
            vals = torch.cat([block, block.new_zeros(padding)])
            lo, hi = search_bounds(vals, self.bits, search)
            lowers.append(lo)
            uppers.append(hi)
        self.quantizer.set_bounds(lowers, uppers)
        self.calibrated = True

    def indices(self, w: Tensor) -> Tensor:
        """Grid indices of ``w`` in the quantised domain (float, STE)."""
        if self.official_pruning:
            raise ValueError(
                "prune_mode 'official' has no stored indices: its mask changes on every "
                "forward and pruned zeros are quantised to non-zeros (use 'magnitude')"
            )
        return self.quantizer.indices(self.to_domain(w))

    def dequantize(self, idx: Tensor, n: int) -> Tensor:
        """Indices -> weight (out, n): dequantise, re-zero pruned entries, rotate back."""
        y = self.quantizer.dequantize(idx)
        if self.mask is not None:
            y = y * self.mask
        return self.from_domain(y, n)

    def forward(self, w: Tensor) -> Tensor:
        if not self.calibrated:
            raise RuntimeError("WeightQuantizer used before calibrate(weight)")
        if self.official_pruning:
            return self.from_domain(
                self.quantizer(self._official_pruned(self.to_domain(w))), w.shape[-1]
            )
        return self.dequantize(self.indices(w), w.shape[-1])

    def extra_repr(self) -> str:
        mode = f", prune_mode={self.prune_mode}" if self.prune else ""
        return f"rotate_size={self.rotate_size}, prune={self.prune}{mode}"


# --------------------------------------------------------------------------
# Weight-only quantisation (low-precision feature)
# --------------------------------------------------------------------------

Granularity = Literal["per_tensor", "per_channel"]


def quantize_weight_tensor(
    w: Tensor, bits: int, *, granularity: Granularity = "per_channel", symmetric: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest weight quantisation; returns ``(w_hat, scale, zero_point)``.

    Per channel means per output channel (dim 0 of Linear and Conv weights).
    Symmetric: ``q in [-(2^(b-1) - 1), 2^(b-1) - 1]`` (restricted range, so +-max
    are both representable), ``scale = max|w| / (2^(b-1) - 1)``, zero point 0.
    Asymmetric: ``q in [0, 2^b - 1]``, the range is ``[min(w, 0), max(w, 0)]`` so
    that 0 is exactly representable (as PyTorch's observers), integer zero point.
    ``scale``/``zero_point`` have shape (out,) per channel, () per tensor.
    """
    if bits < 2 or bits > 16:
        raise ValueError(f"weight-only bits must be in [2, 16], got {bits}")
    if granularity not in ("per_tensor", "per_channel"):
        raise ValueError(f"granularity {granularity!r}; expected 'per_tensor' or 'per_channel'")
    wf = w.detach().float()
    flat = wf.reshape(wf.shape[0], -1) if granularity == "per_channel" else wf.reshape(1, -1)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = flat.abs().amax(dim=1) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(flat / scale[:, None]), -qmax, qmax)
        zero_point = torch.zeros_like(scale)
        deq = q * scale[:, None]
    else:
        qmax = 2**bits - 1
        lo = flat.amin(dim=1).clamp_max(0)
        hi = flat.amax(dim=1).clamp_min(0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
        q = torch.clamp(torch.round(flat / scale[:, None]) + zero_point[:, None], 0, qmax)
        deq = (q - zero_point[:, None]) * scale[:, None]
    if granularity == "per_tensor":
        scale, zero_point = scale[0], zero_point[0]
    return deq.reshape(w.shape).to(w.dtype), scale, zero_point


@dataclass(frozen=True)
class LayerWeightStats:
    """What weight-only quantisation did to one weight."""

    name: str
    shape: tuple[int, ...]
    numel: int
    max_abs_error: float
    rel_rmse: float
    """``||w_hat - w|| / ||w||``."""


@dataclass
class WeightQuantReport:
    """Summary returned by :func:`quantize_weights_`."""

    bits: int
    granularity: Granularity
    symmetric: bool
    layers: list[LayerWeightStats] = field(default_factory=list)
    quantized_params: int = 0
    other_params: int = 0

    @property
    def mean_rel_rmse(self) -> float:
        return sum(s.rel_rmse for s in self.layers) / max(len(self.layers), 1)

    @property
    def storage_bytes(self) -> int:
        """Packed integer weights + an fp32 scale (and zero point if asymmetric)
        per quantisation group + every other parameter in fp32."""
        per_group = 4 if self.symmetric else 8
        groups = sum((s.shape[0] if self.granularity == "per_channel" else 1) for s in self.layers)
        bits = self.quantized_params * self.bits
        return math.ceil(bits / 8) + groups * per_group + 4 * self.other_params


def quantize_weights_(
    model: nn.Module,
    bits: int = 8,
    granularity: Granularity = "per_channel",
    symmetric: bool = True,
    *,
    modules: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
) -> WeightQuantReport:
    """Replace every Linear/Conv2d weight by its quantised-dequantised value, in place.

    Biases, norms and position-bias tables stay in floating point (the i-LN
    paper's Table 4 setting quantises the weights of the linear maps only).
    Returns per-layer errors and the storage the quantised model would need.
    """
    report = WeightQuantReport(bits=bits, granularity=granularity, symmetric=symmetric)
    quantized_ids: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, modules) or getattr(module, "weight", None) is None:
            continue
        w = module.weight
        w_hat, _, _ = quantize_weight_tensor(w, bits, granularity=granularity, symmetric=symmetric)
        diff = (w_hat.float() - w.detach().float()).reshape(-1)
        norm = float(w.detach().float().norm())
        report.layers.append(
            LayerWeightStats(
                name=f"{name}.weight",
                shape=tuple(w.shape),
                numel=w.numel(),
                max_abs_error=float(diff.abs().max()),
                rel_rmse=float(diff.norm()) / norm if norm > 0 else 0.0,
            )
        )
        with torch.no_grad():
            w.copy_(w_hat)
        quantized_ids.add(id(w))
        report.quantized_params += w.numel()
    report.other_params = sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids)
    logger.info(
        "weight-only int%d %s %s: %d weights, mean relative RMSE %.3g",
        bits,
        granularity,
        "symmetric" if symmetric else "asymmetric",
        len(report.layers),
        report.mean_rel_rmse,
    )
    return report
