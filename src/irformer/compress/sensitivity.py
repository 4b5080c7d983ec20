"""Which quantisers cost the quality: sensitivity of a quantised model by group.

A fake-quantised model loses quality through ~100 quantisers at once. To find
the ones responsible, quantisers are grouped (the weights of one Linear kind,
the activations of one role, everything inside one residual group) and the
model is scored twice per group: with only that group back in full precision
(how much quality the group costs inside the quantised model) and with only
that group quantised (how much it costs alone). Each activation quantiser also
reports how many of its ``2^b`` levels the data actually uses (the entropy of
its indices): min/max bounds stretched by a few outliers put almost every value
into one level, which erases the tensor without any single large error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from irformer.compress.methods.base import (
    QuantLinear,
    act_quantizers,
    quant_linears,
    residual_groups,
)
from irformer.compress.quantizers import ActQuantizer

__all__ = [
    "LevelUsage",
    "QuantGroup",
    "SensitivityRow",
    "full_precision",
    "level_usage",
    "quantizer_groups",
    "sensitivity",
    "sensitivity_table",
    "usage_table",
]

Score = Callable[[nn.Module], float]
"""Quantised model -> quality (e.g. PSNR on a benchmark); higher is better."""

LINEAR_KINDS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
ATTENTION_OPERANDS: tuple[tuple[str, str], ...] = (
    ("quant_q", "q"),
    ("quant_k", "k"),
    ("quant_attn", "post-softmax"),
    ("quant_v", "v"),
)


@dataclass
class QuantGroup:
    """A named set of quantisers switched together: QuantLinears whose weight
    goes FP and activation quantisers (anything with a ``mode``) that go FP."""

    name: str
    weights: list[QuantLinear] = field(default_factory=list)
    activations: list[nn.Module] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.weights) + len(self.activations)


def _attr(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def quantizer_groups(qmodel: nn.Module) -> list[QuantGroup]:
    """Groups by kind (weights of qkv/proj/fc1/fc2, inputs of each Linear kind,
    the four attention operands), then one group per residual group.

    Empty groups are dropped (e.g. the attention operands when
    ``quantize_attention`` is off).
    """
    linears = quant_linears(qmodel)
    groups = [
        QuantGroup(f"W {kind}", weights=[ql for n, ql in linears if _attr(n) == kind])
        for kind in LINEAR_KINDS
    ]
    groups += [
        QuantGroup(
            f"A {kind} input",
            activations=[ql.act_quantizer for n, ql in linears if _attr(n) == kind],
        )
        for kind in LINEAR_KINDS
    ]
    groups += [
        QuantGroup(f"A {label}", activations=_operands(qmodel, (attr,)))
        for attr, label in ATTENTION_OPERANDS
    ]
    every_operand = tuple(attr for attr, _ in ATTENTION_OPERANDS)
    for name, stack in residual_groups(qmodel):
        inner = [m for m in stack.modules() if isinstance(m, QuantLinear)]
        acts = [ql.act_quantizer for ql in inner] + _operands(stack, every_operand)
        label = name.removesuffix(".residual_group")
        groups.append(QuantGroup(label, weights=inner, activations=acts))
    return [g for g in groups if len(g)]


def _operands(root: nn.Module, attrs: tuple[str, ...]) -> list[nn.Module]:
    """The attention-operand quantisers (``quant_q`` ...) named ``attrs`` under ``root``."""
    return [
        getattr(m, attr)
        for m in root.modules()
        for attr in attrs
        if isinstance(getattr(m, attr, None), nn.Module)
    ]


@contextmanager
def full_precision(groups: Sequence[QuantGroup]) -> Iterator[None]:
    """Within the block, the groups' weights and activations run in full precision."""
    weights = {id(ql): ql for g in groups for ql in g.weights}
    acts = {id(a): a for g in groups for a in g.activations}
    saved_w = {k: ql.weight_prequantized for k, ql in weights.items()}
    saved_a = {k: a.mode for k, a in acts.items()}
    try:
        for ql in weights.values():
            ql.weight_prequantized = True  # the FP weight is used as is
        for a in acts.values():
            a.mode = "fp"
        yield
    finally:
        for k, ql in weights.items():
            ql.weight_prequantized = saved_w[k]
        for k, a in acts.items():
            a.mode = saved_a[k]


@dataclass(frozen=True)
class SensitivityRow:
    group: str
    size: int
    """Number of quantisers in the group (weights + activations)."""
    only_this_fp: float
    """Score with everything quantised except this group."""
    only_this_quantized: float
    """Score with nothing quantised except this group."""


def sensitivity(
    qmodel: nn.Module,
    score: Score,
    groups: Sequence[QuantGroup] | None = None,
    *,
    quantized: float | None = None,
) -> tuple[float, float, list[SensitivityRow]]:
    """``(fully quantised score, FP score, one row per group)``; 2 evaluations per group
    (plus one for the fully quantised model unless ``quantized`` already holds it)."""
    groups = list(groups) if groups is not None else quantizer_groups(qmodel)
    everything = QuantGroup(
        "all",
        weights=[ql for _, ql in quant_linears(qmodel)],
        activations=[aq for _, aq in act_quantizers(qmodel)],
    )
    if quantized is None:
        quantized = score(qmodel)
    with full_precision([everything]):
        fp = score(qmodel)
    rows = []
    for g in groups:
        with full_precision([g]):
            without = score(qmodel)
        members = {id(m) for m in (*g.weights, *g.activations)}
        rest = QuantGroup(
            "rest",
            weights=[ql for ql in everything.weights if id(ql) not in members],
            activations=[a for a in everything.activations if id(a) not in members],
        )
        with full_precision([rest]):
            alone = score(qmodel)
        rows.append(SensitivityRow(g.name, len(g), without, alone))
    return quantized, fp, rows


@dataclass(frozen=True)
class LevelUsage:
    name: str
    bits: int
    lower: float
    upper: float
    entropy_bits: float
    """Entropy of the quantisation indices over everything seen: ``bits`` when all
    levels are used equally, 0 when every value lands on one level."""
    modal_fraction: float
    """Share of values on the most used level."""
    std: float
    """Standard deviation of the quantised-domain values (range / std = stretch)."""


@contextmanager
def _recording(qmodel: nn.Module) -> Iterator[dict[str, list[Tensor]]]:
    """Per uniform activation quantiser: index histogram and running moments."""
    record: dict[str, list[Tensor]] = {}
    handles = []
    for name, aq in qmodel.named_modules():
        if not isinstance(aq, ActQuantizer):
            continue

        def hook(module: ActQuantizer, args: tuple[Tensor, ...], name: str = name) -> None:
            if module.mode != "quant":
                return
            y = module._to_domain(args[0].detach()).float()
            idx = module.quantizer.indices(y).long().reshape(-1)
            hist = torch.bincount(idx, minlength=2**module.bits).cpu().double()
            yd = y.double()
            moments = torch.stack([yd.new_tensor(yd.numel()), yd.sum(), yd.square().sum()]).cpu()
            if name in record:
                record[name][0] += hist
                record[name][1] += moments
            else:
                record[name] = [hist, moments]

        handles.append(aq.register_forward_pre_hook(hook))
    try:
        yield record
    finally:
        for h in handles:
            h.remove()


def level_usage(qmodel: nn.Module, run: Callable[[nn.Module], object]) -> list[LevelUsage]:
    """Run ``run(qmodel)`` (e.g. one benchmark pass) and report every uniform
    activation quantiser's level usage, fewest used bits first (NoisyQuant's noise
    and PTQ4ViT's twin-uniform quantisers are not covered: indices without noise)."""
    with _recording(qmodel) as record:
        run(qmodel)
    modules = dict(qmodel.named_modules())
    out = []
    for name, (hist, moments) in record.items():
        aq = modules[name]
        assert isinstance(aq, ActQuantizer)
        p = hist / hist.sum()
        nz = p[p > 0]
        n, s1, s2 = moments.tolist()
        var = max(s2 / n - (s1 / n) ** 2, 0.0)
        out.append(
            LevelUsage(
                name=name,
                bits=aq.bits,
                lower=float(aq.quantizer.lower.detach()[0]),
                upper=float(aq.quantizer.upper.detach()[0]),
                entropy_bits=float(-(nz * nz.log2()).sum()),
                modal_fraction=float(p.max()),
                std=math.sqrt(var),
            )
        )
    return sorted(out, key=lambda u: u.entropy_bits)


def sensitivity_table(quantized: float, fp: float, rows: Sequence[SensitivityRow]) -> str:
    """Markdown: each group's cost inside the quantised model and alone."""
    lines = [
        f"All quantised: {quantized:.2f}; full precision: {fp:.2f} (change {quantized - fp:+.2f})",
        "",
        "| group | quantisers | all but this group quantised | gain vs all quantised "
        "| only this group quantised | change vs FP |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.group} | {r.size} | {r.only_this_fp:.2f} | {r.only_this_fp - quantized:+.2f} "
            f"| {r.only_this_quantized:.2f} | {r.only_this_quantized - fp:+.2f} |"
        )
    return "\n".join(lines) + "\n"


def usage_table(usage: Sequence[LevelUsage], limit: int | None = None) -> str:
    """Markdown: activation quantisers by how many bits of their levels carry data."""
    lines = [
        "| activation quantiser | bits | bounds | range / std | index entropy (bits) "
        "| share on the modal level |",
        "|---|---|---|---|---|---|",
    ]
    for u in usage[:limit]:
        stretch = (u.upper - u.lower) / u.std if u.std > 0 else math.inf
        lines.append(
            f"| {u.name} | {u.bits} | [{u.lower:.3g}, {u.upper:.3g}] | {stretch:.1f} "
            f"| {u.entropy_bits:.2f} | {u.modal_fraction:.3f} |"
        )
    return "\n".join(lines) + "\n"
