"""Distribution statistics before and after the Hadamard rotation (CompSRT 3.1, 7.1).

Unit of analysis: one tensor (a weight, or one activation tensor on the
calibration batch), summarised before and after rotation along its last dim:

- Shapiro-Wilk W on a seeded sample of at most 5000 values (scipy's limit for
  an accurate p-value);
- range ``max - min``; excess kurtosis;
- fraction of values with ``|x| <= eps`` for a sweep of eps (section 7.1).

Across tensors, each metric's paired differences get a one-sided Wilcoxon
signed-rank test (zero differences dropped) and Cohen's ``d_z = mean(d) /
sd(d)``, with the direction the paper claims (W up, range down, band mass up,
kurtosis down). Tensors are never padded in any dim but the rotated one, so
the rotated tensor has no exact zeros of padding. CompSRT's code pads *every*
dim to a power of two, which adds exact zeros (e.g. 4 extra rows of a 60 x 60
weight) that count as "near zero" after the rotation; ``paper_padding=True``
reproduces that layout, and each row reports how many such zeros there are.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats as sps
from torch import Tensor, nn

from irformer.compress.hadamard import RotationMode, hadamard_size, next_power_of_two, rotate

__all__ = [
    "EPS_SWEEP",
    "PairedTest",
    "StatsReport",
    "TensorPair",
    "activation_tensors",
    "compare_pre_post",
    "paired_test",
    "summarise",
    "weight_tensors",
]

logger = logging.getLogger(__name__)

EPS_SWEEP: tuple[float, ...] = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""The paper's section 7.1 sweep; the first is the main band."""

SHAPIRO_SAMPLE = 5000
ACT_ROWS = 4096
"""Rows (last-dim vectors) kept per activation tensor."""


@dataclass(frozen=True)
class Summary:
    """One tensor's statistics."""

    numel: int
    shapiro_w: float
    range: float
    kurtosis: float
    band: dict[float, float]
    """eps -> fraction with |x| <= eps."""
    exact_zeros: int


def summarise(
    x: Tensor, eps: Sequence[float] = EPS_SWEEP, *, sample: int = SHAPIRO_SAMPLE, seed: int = 0
) -> Summary:
    """Statistics of the values of ``x`` (flattened)."""
    v = x.detach().reshape(-1).double().cpu().numpy()
    rng = np.random.default_rng(seed)
    s = v if v.size <= sample else rng.choice(v, sample, replace=False)
    w = float(sps.shapiro(s).statistic) if s.size >= 3 and np.ptp(s) > 0 else math.nan
    a = np.abs(v)
    return Summary(
        numel=int(v.size),
        shapiro_w=w,
        range=float(v.max() - v.min()),
        kurtosis=float(sps.kurtosis(v)) if np.ptp(v) > 0 else math.nan,
        band={float(e): float((a <= e).mean()) for e in eps},
        exact_zeros=int((v == 0).sum()),
    )


@dataclass(frozen=True)
class TensorPair:
    """Pre/post-rotation statistics of one tensor."""

    name: str
    kind: str
    """``weight`` or ``activation``."""
    shape: tuple[int, ...]
    rotate_size: int
    pre: Summary
    post: Summary
    padding_zeros: int
    """Exact zeros the (paper-style) padding put into the post tensor."""


@dataclass(frozen=True)
class PairedTest:
    """One-sided paired test across tensors of ``metric`` (``d = post - pre``,
    or ``pre - post`` for metrics the rotation should lower)."""

    kind: str
    metric: str
    n: int
    mean_diff: float
    cohen_dz: float
    wilcoxon_stat: float
    p_value: float
    diff_shapiro_p: float
    """Normality of the differences (why the paper uses Wilcoxon, not t)."""


def paired_test(kind: str, metric: str, d: Sequence[float]) -> PairedTest:
    """Wilcoxon signed-rank (alternative: median(d) > 0, zeros dropped) and d_z."""
    arr = np.asarray([x for x in d if math.isfinite(x)], dtype=np.float64)
    nz = arr[arr != 0]
    if nz.size == 0:
        stat, p = math.nan, math.nan
    else:
        res = sps.wilcoxon(nz, alternative="greater", zero_method="wilcox")
        stat, p = float(res.statistic), float(res.pvalue)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
    dz = float(arr.mean() / sd) if sd and math.isfinite(sd) and sd > 0 else math.nan
    norm_p = float(sps.shapiro(arr).pvalue) if arr.size >= 3 and np.ptp(arr) > 0 else math.nan
    return PairedTest(
        kind=kind,
        metric=metric,
        n=int(arr.size),
        mean_diff=float(arr.mean()) if arr.size else math.nan,
        cohen_dz=dz,
        wilcoxon_stat=stat,
        p_value=p,
        diff_shapiro_p=norm_p,
    )


def _paper_padded(x: Tensor) -> Tensor:
    """Zero-pad every dim to a power of two (CompSRT's ``hadamard_transform_nd``)."""
    pad: list[int] = []
    for n in reversed(x.shape):
        pad += [0, next_power_of_two(n) - n]
    return torch.nn.functional.pad(x, pad)


def _pair(
    name: str,
    kind: str,
    x: Tensor,
    rotation: RotationMode,
    eps: Sequence[float],
    paper_padding: bool,
    seed: int,
) -> TensorPair:
    x = x.detach().double()
    if paper_padding:
        padded = _paper_padded(x)
        size = padded.shape[-1]
        post = rotate(padded, size)
        # Rows added by padding other dims stay exactly zero after the rotation.
        padding_zeros = padded[..., 0].numel() * size - x[..., 0].numel() * size
    else:
        size = hadamard_size(x.shape[-1], rotation)
        post = rotate(x, size)
        padding_zeros = 0
    return TensorPair(
        name=name,
        kind=kind,
        shape=tuple(x.shape),
        rotate_size=size,
        pre=summarise(x, eps, seed=seed),
        post=summarise(post, eps, seed=seed),
        padding_zeros=int(padding_zeros),
    )


@dataclass
class StatsReport:
    pairs: list[TensorPair] = field(default_factory=list)
    tests: list[PairedTest] = field(default_factory=list)
    eps: tuple[float, ...] = EPS_SWEEP

    def as_dict(self) -> dict[str, Any]:
        return {
            "eps": list(self.eps),
            "pairs": [asdict(p) for p in self.pairs],
            "tests": [asdict(t) for t in self.tests],
        }


def _tests_for(kind: str, pairs: list[TensorPair], eps: Sequence[float]) -> list[PairedTest]:
    tests = [
        paired_test(
            kind, "shapiro_w_increase", [p.post.shapiro_w - p.pre.shapiro_w for p in pairs]
        ),
        paired_test(kind, "range_reduction", [p.pre.range - p.post.range for p in pairs]),
        paired_test(kind, "kurtosis_reduction", [p.pre.kurtosis - p.post.kurtosis for p in pairs]),
    ]
    for e in eps:
        tests.append(
            paired_test(
                kind, f"band_increase@{e:g}", [p.post.band[e] - p.pre.band[e] for p in pairs]
            )
        )
    return tests


def compare_pre_post(
    tensors: Sequence[tuple[str, str, Tensor]],
    *,
    rotation: RotationMode = "pow2",
    eps: Sequence[float] = EPS_SWEEP,
    paper_padding: bool = False,
    seed: int = 0,
) -> StatsReport:
    """Per-tensor pre/post statistics and the paired tests, per kind.

    ``tensors``: ``(name, kind, tensor)``; rotation along the last dim.
    """
    report = StatsReport(eps=tuple(float(e) for e in eps))
    for i, (name, kind, x) in enumerate(tensors):
        report.pairs.append(_pair(name, kind, x, rotation, eps, paper_padding, seed + i))
    for kind in sorted({p.kind for p in report.pairs}):
        report.tests += _tests_for(kind, [p for p in report.pairs if p.kind == kind], report.eps)
    return report


def weight_tensors(model: nn.Module, *, split_qkv: bool = True) -> list[tuple[str, str, Tensor]]:
    """Weights of every Linear inside the Transformer blocks (what is quantised).

    ``split_qkv`` counts q, k and v separately, as the paper's 144 weight
    tensors of SwinIR-light (24 blocks x 6) do.
    """
    from irformer.archs import transformer_blocks

    out: list[tuple[str, str, Tensor]] = []
    for block_name, block in transformer_blocks(model):
        for name, mod in block.named_modules():
            w = getattr(mod, "weight", None)
            if not isinstance(mod, nn.Linear) and not hasattr(mod, "weight_quantizer"):
                continue
            full = f"{block_name}.{name}".strip(".")
            if split_qkv and name.endswith("qkv"):
                for part, chunk in zip("qkv", w.detach().chunk(3, dim=0), strict=True):
                    out.append((f"{full}.{part}", "weight", chunk))
            else:
                out.append((full, "weight", w.detach()))
    return out


class _Recorder(nn.Module):
    """Stand-in activation quantiser that keeps a seeded sample of input rows."""

    def __init__(self, rows: int, seed: int) -> None:
        super().__init__()
        self.rows = rows
        self.generator = torch.Generator().manual_seed(seed)
        self.parts: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        flat = x.detach().reshape(-1, x.shape[-1])
        idx = torch.randint(
            flat.shape[0], (min(self.rows, flat.shape[0]),), generator=self.generator
        )
        self.parts.append(flat[idx.to(flat.device)].cpu())
        return x

    def sample(self) -> Tensor:
        x = torch.cat(self.parts)
        if x.shape[0] > self.rows:
            x = x[torch.randint(x.shape[0], (self.rows,), generator=self.generator)]
        return x


@torch.no_grad()
def activation_tensors(
    model: nn.Module, batch: Tensor, *, rows: int = ACT_ROWS, chunk: int = 8
) -> list[tuple[str, str, Tensor]]:
    """Calibration activations of everything that is quantised: each Linear's
    input (one per Linear; the fused qkv input once) and the four attention-matmul
    operands, as ``(rows, last dim)`` samples of the FP model on ``batch``."""
    import copy

    from irformer.compress.methods.base import QuantConfig, attach_quantizers

    recorders: dict[str, _Recorder] = {}

    def factory(name: str, role: str, width: int, cfg: QuantConfig) -> nn.Module:
        rec = _Recorder(rows, seed=len(recorders))
        recorders[name] = rec
        return rec

    probe = attach_quantizers(
        copy.deepcopy(model).eval(), QuantConfig(wbits=8, abits=8), act_factory=factory
    )
    for m in probe.modules():
        if hasattr(m, "weight_prequantized"):
            m.weight_prequantized = True
    for start in range(0, batch.shape[0], chunk):
        probe(batch[start : start + chunk])
    return [(name, "activation", rec.sample()) for name, rec in recorders.items()]
