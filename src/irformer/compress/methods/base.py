"""What every post-training quantisation method shares: where quantisers go,
calibration, and bound distillation (DQC).

Quantised, as in 2DQuant/CompSRT: in every Transformer block
(:func:`irformer.archs.transformer_blocks`) every ``nn.Linear`` (qkv, proj,
fc1, fc2; SRFormer's q, kv) is swapped for a :class:`QuantLinear` (weight
quantiser + input-activation quantiser), and every attention's
:class:`~irformer.archs.attention.AttentionOperands` for
:class:`QuantizedOperands`, whose quantisers ``quant_q``, ``quant_k``,
``quant_attn``, ``quant_v`` take the four matmul operands (q after the
``1/sqrt(d)`` scaling, k, the post-softmax map, v). Convolutions, norms,
softmax, GELU, biases and the position bias stay FP32.

The fused ``qkv`` projection is one ``nn.Linear`` in SwinIR. Its weight is
quantised with three bound pairs (rows of q, k and v separately, ``qkv_split``,
like 2DQuant's ``qkv_separation: True``) but with one input quantiser: 2DQuant
splits the layer into three linears, each with its own quantiser of the same
input, i.e. three different quantised copies of one tensor, which no integer
kernel would run. ``QuantConfig(qkv_inputs="split")`` does what their code does
(:class:`SplitInputQuantLinear`), for comparisons with their published numbers.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from irformer.archs import transformer_blocks
from irformer.archs.attention import AttentionOperands
from irformer.archs.layers import ResidualGroup
from irformer.compress.fused import fused_fake_quant
from irformer.compress.hadamard import RotationMode, hadamard_size
from irformer.compress.prune import PRUNE_MODES, PruneMode
from irformer.compress.quantizers import (
    OBSERVER_SAMPLE,
    ActQuantizer,
    BoundSearch,
    UniformQuantizer,
    WeightQuantizer,
)
from irformer.errors import CheckpointReadError
from irformer.files import atomic_write
from irformer.safe_load import torch_load_weights_only

__all__ = [
    "ACT_ROLES",
    "ATTENTION_OPERANDS",
    "QKV_INPUTS",
    "DistillCheckpoint",
    "DistillLog",
    "QkvInputs",
    "QuantConfig",
    "QuantLinear",
    "QuantizedOperands",
    "SplitInputQuantLinear",
    "act_quantizers",
    "attach_quantizers",
    "attention_modules",
    "calibrate",
    "count_quantized",
    "default_act_quantizer",
    "distill_bounds",
    "learnable_quantizer_parameters",
    "prepare_quantized_copy",
    "quant_linears",
    "quantizer_drift",
    "quantizer_snapshot",
    "residual_groups",
]

logger = logging.getLogger(__name__)

QkvInputs = Literal["shared", "split"]
"""Input quantisers of a fused qkv Linear: one (``shared``, what an integer kernel
runs) or one per q, k, v row block (``split``, 2DQuant's and CompSRT's code)."""
QKV_INPUTS: tuple[str, ...] = get_args(QkvInputs)
DqcLoss = Literal["mean", "official"]
"""DQC loss scaling: irformer's means, or the reference code's (see ``QuantConfig.dqc_loss``)."""
DQC_LOSSES: tuple[str, ...] = get_args(DqcLoss)

ATTENTION_OPERANDS: tuple[str, ...] = ("quant_q", "quant_k", "quant_attn", "quant_v")
""":class:`QuantizedOperands`' quantisers: q, k, post-softmax map, v (before the two matmuls)."""


@dataclass(frozen=True)
class QuantConfig:
    """Everything that defines a quantised model (serialised into packed files).

    ``search``: bound initialisation (``minmax`` or DOBI); ``rotation``: Hadamard
    sizing (None = no rotation); ``dqc_iters > 0`` distils the bounds against
    the FP model. Defaults are 2DQuant's published configuration.
    """

    method: str = "minmax"
    wbits: int = 4
    abits: int = 4
    search: BoundSearch = "minmax"
    rotation: RotationMode | None = None
    rotation_skip: tuple[str, ...] = ()
    """Activation roles left unrotated, e.g. ``("post_softmax",)``: every row of
    a softmax map sums to 1, so its rotation has a constant first coordinate
    ``1/sqrt(n)`` that becomes the range's outlier. CompSRT rotates all."""
    rotate_activations: bool = True
    """With ``rotation``: False rotates the weights only (CompSRT's Figure 6 ablation)."""
    scalar_decomposition: bool = False
    learn_bounds: bool = True
    """False: DQC trains only alpha/beta, the bounds stay at their search result
    (CompSRT's Table 7 ablation; needs ``scalar_decomposition``)."""
    prune: float = 0.0
    prune_mode: PruneMode = "magnitude"
    """``magnitude``, ``channel`` (whole rows) or ``official`` (CompSRT's code's
    sampled threshold; see :mod:`irformer.compress.prune`)."""
    qkv_split: bool = True
    qkv_inputs: QkvInputs = "shared"
    quantize_attention: bool = True
    observer_sample: int = OBSERVER_SAMPLE
    twin_uniform: bool = False
    noise: bool = False
    noise_seed: int = 0
    dqc_iters: int = 0
    dqc_lr: float = 1e-2
    dqc_scalar_lr: float | None = None
    """Learning rate of CompSRT's alpha/beta (None: ``dqc_lr``, as the reference code,
    which puts bounds and scalars in one Adam group)."""
    dqc_betas: tuple[float, float] = (0.9, 0.99)
    dqc_loss: DqcLoss = "mean"
    """``mean``: mean L1 + mean MSE. ``official``: the 2DQuant/CompSRT code's scaling,
    the mean L1 divided by one sample's output element count and the mean MSE by the
    feature tensor's element count. Adam is scale-free except for its ``eps`` (1e-8):
    the official scale puts most bound gradients near or below ``eps``, which damps
    their steps, so the same lr moves the bounds less (see :func:`distill_bounds`)."""
    feature_weight: float = 5.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.prune_mode not in PRUNE_MODES:
            raise ValueError(
                f"unknown prune_mode {self.prune_mode!r}; valid: {', '.join(PRUNE_MODES)}"
            )
        if self.dqc_loss not in DQC_LOSSES:
            raise ValueError(f"unknown dqc_loss {self.dqc_loss!r}; valid: {', '.join(DQC_LOSSES)}")
        if self.qkv_inputs not in QKV_INPUTS:
            raise ValueError(
                f"unknown qkv_inputs {self.qkv_inputs!r}; valid: {', '.join(QKV_INPUTS)}"
            )

    def with_overrides(self, **kwargs: Any) -> QuantConfig:
        unknown = set(kwargs) - set(asdict(self))
        if unknown:
            raise KeyError(
                f"unknown QuantConfig fields {sorted(unknown)}; valid: {sorted(asdict(self))}"
            )
        return replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dqc_betas"] = list(self.dqc_betas)
        d["rotation_skip"] = list(self.rotation_skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        d = dict(d)
        for key in ("dqc_betas", "rotation_skip"):
            if key in d:
                d[key] = tuple(d[key])
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise KeyError(f"unknown QuantConfig fields {sorted(unknown)}")
        return cls(**d)


class QuantLinear(nn.Module):
    """``nn.Linear`` with a fake-quantised input activation and weight.

    ``weight``/``bias`` keep their FP values and names; ``weight_prequantized``
    marks a weight already replaced by its dequantised value (a model loaded
    from a packed file), which then skips the weight quantiser.
    """

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: WeightQuantizer,
        act_quantizer: nn.Module,
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.weight_prequantized = False

    def quantized_weight(self) -> Tensor:
        if self.weight_prequantized or not self.weight_quantizer.calibrated:
            return self.weight
        return self.weight_quantizer(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act_quantizer(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SplitInputQuantLinear(QuantLinear):
    """A fused qkv Linear whose q, k and v row blocks each take their own quantised
    copy of the input (``act_quantizer``, ``act_quantizer_k``, ``act_quantizer_v``):
    what 2DQuant's and CompSRT's code does by splitting qkv into three Linears.
    The three start from the same bounds and drift apart in DQC."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: WeightQuantizer,
        act_quantizers: tuple[nn.Module, nn.Module, nn.Module],
    ) -> None:
        if linear.out_features % 3:
            raise ValueError(f"a qkv Linear needs 3k outputs, got {linear.out_features}")
        super().__init__(linear, weight_quantizer, act_quantizers[0])
        self.act_quantizer_k = act_quantizers[1]
        self.act_quantizer_v = act_quantizers[2]

    def forward(self, x: Tensor) -> Tensor:
        weights = self.quantized_weight().chunk(3, dim=0)
        biases = (None,) * 3 if self.bias is None else self.bias.chunk(3)
        quantizers = (self.act_quantizer, self.act_quantizer_k, self.act_quantizer_v)
        return torch.cat(
            [F.linear(aq(x), w, b) for aq, w, b in zip(quantizers, weights, biases, strict=True)],
            dim=-1,
        )


class QuantizedOperands(AttentionOperands):
    """Fake-quantises the four operands of an attention's two matmuls.

    Swapped in for an attention module's plain ``operands`` by
    :func:`attach_quantizers`; :func:`irformer.archs.attention.attend` then runs
    the explicit matmul path through these quantisers.
    """

    quantizes = True

    def __init__(
        self, quant_q: nn.Module, quant_k: nn.Module, quant_attn: nn.Module, quant_v: nn.Module
    ) -> None:
        super().__init__()
        self.quant_q = quant_q
        self.quant_k = quant_k
        self.quant_attn = quant_attn
        self.quant_v = quant_v

    def q(self, t: Tensor) -> Tensor:
        return self.quant_q(t)

    def k(self, t: Tensor) -> Tensor:
        return self.quant_k(t)

    def attn(self, t: Tensor) -> Tensor:
        return self.quant_attn(t)

    def v(self, t: Tensor) -> Tensor:
        return self.quant_v(t)


def attention_modules(block: nn.Module, block_name: str) -> list[tuple[str, nn.Module]]:
    """The attention module(s) of a block: those owning an ``operands`` child."""
    return [
        (f"{block_name}.{name}".strip("."), module)
        for name, module in block.named_modules()
        if isinstance(getattr(module, "operands", None), AttentionOperands)
    ]


def residual_groups(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual groups' block stacks (``<RSTB>.residual_group``), whose outputs
    2DQuant's feature loss compares (its ``hook_per_layer`` on ``BasicLayer``)."""
    groups = []
    for name, module in model.named_modules():
        sub = getattr(module, "residual_group", None)
        if isinstance(module, ResidualGroup) and isinstance(sub, nn.Module):
            groups.append((f"{name}.residual_group" if name else "residual_group", sub))
    return groups


def _rotate_size(n: int, cfg: QuantConfig) -> int | None:
    return None if cfg.rotation is None else hadamard_size(n, cfg.rotation)


def default_act_quantizer(n: int, cfg: QuantConfig, role: str = "linear_input") -> ActQuantizer:
    """The uniform activation quantiser of a tensor whose last dim is ``n``."""
    return ActQuantizer(
        cfg.abits,
        rotate_size=(
            None
            if role in cfg.rotation_skip or not cfg.rotate_activations
            else _rotate_size(n, cfg)
        ),
        scalar_decomposition=cfg.scalar_decomposition,
        sample_size=cfg.observer_sample,
    )


ACT_ROLES: tuple[str, ...] = ("linear_input", "post_gelu", "q", "k", "post_softmax", "v")
"""Roles of activation quantisers (``post_gelu`` is the fc2 input)."""


def attach_quantizers(
    model: nn.Module,
    cfg: QuantConfig,
    *,
    act_factory: Callable[[str, str, int, QuantConfig], nn.Module | None] | None = None,
) -> nn.Module:
    """Wrap, in place, every Linear of every Transformer block and hook the attention.

    ``act_factory(name, role, width, cfg)`` may supply the activation quantiser
    of a role (``linear_input``, ``post_gelu``, ``q``, ``k``, ``post_softmax``,
    ``v``; e.g. PTQ4ViT's twin-uniform quantisers) for the module at ``name``;
    when it returns None an :class:`ActQuantizer` is used.
    """
    unknown = set(cfg.rotation_skip) - set(ACT_ROLES)
    if unknown:
        raise ValueError(f"rotation_skip names unknown roles {sorted(unknown)}; valid: {ACT_ROLES}")
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no Transformer blocks to quantise")

    def make_act(name: str, role: str, width: int) -> nn.Module:
        if act_factory is not None:
            special = act_factory(name, role, width, cfg)
            if special is not None:
                return special
        return default_act_quantizer(width, cfg, role)

    for block_name, block in blocks:
        targets = [
            (f"{block_name}.{pname}".strip("."), parent, attr, child)
            for pname, parent in block.named_modules()
            for attr, child in parent.named_children()
            if isinstance(child, nn.Linear)
        ]
        for pname, parent, attr, linear in targets:
            groups = 3 if (cfg.qkv_split and attr == "qkv") else 1
            wq = WeightQuantizer(
                cfg.wbits,
                groups=groups,
                rotate_size=_rotate_size(linear.in_features, cfg),
                scalar_decomposition=cfg.scalar_decomposition,
                prune=cfg.prune,
                prune_mode=cfg.prune_mode,
            )
            role = "post_gelu" if attr == "fc2" else "linear_input"
            aq = make_act(f"{pname}.{attr}", role, linear.in_features)
            if attr == "qkv" and cfg.qkv_inputs == "split":
                more = (make_act(f"{pname}.{attr}.{p}", role, linear.in_features) for p in "kv")
                setattr(parent, attr, SplitInputQuantLinear(linear, wq, (aq, *more)))
            else:
                setattr(parent, attr, QuantLinear(linear, wq, aq))
        if cfg.quantize_attention:
            for prefix, module in attention_modules(block, block_name):
                head_dim = module.dim // module.num_heads
                tokens = module.key_tokens  # each query's keys: the post-softmax row length
                name = f"{prefix}.operands"
                module.operands = QuantizedOperands(
                    make_act(f"{name}.quant_q", "q", head_dim),
                    make_act(f"{name}.quant_k", "k", head_dim),
                    make_act(f"{name}.quant_attn", "post_softmax", tokens),
                    make_act(f"{name}.quant_v", "v", head_dim),
                )
    return model


def quant_linears(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def act_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every activation quantiser (anything with an observe/quant ``mode``)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if hasattr(m, "mode") and hasattr(m, "finish_calibration")
    ]


def learnable_quantizer_parameters(model: nn.Module, *, bounds: bool = True) -> list[nn.Parameter]:
    """Bounds (and alpha/beta) of every uniform quantiser: what DQC trains
    (``bounds=False``: alpha/beta only)."""
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, UniformQuantizer):
            params.extend(
                p
                for p in m.learnable_parameters()
                if bounds or (p is not m.lower and p is not m.upper)
            )
    return params


@torch.no_grad()
def calibrate(model: nn.Module, batch: Tensor, cfg: QuantConfig, *, chunk: int = 8) -> None:
    """Initialise every bound: weights from themselves, activations from ``batch``.

    All activation quantisers observe in one FP forward pass (chunked over the
    batch to bound memory), then search their bounds (``cfg.search``).
    """
    for name, ql in quant_linears(model):
        ql.weight_quantizer.calibrate(ql.weight, cfg.search)
        logger.debug("weight %s bounds %s", name, ql.weight_quantizer.quantizer.lower.tolist())
    acts = act_quantizers(model)
    for _, aq in acts:
        aq.mode = "observe"
    # Weights stay FP during observation, as in 2DQuant's calibration pass.
    for _, ql in quant_linears(model):
        ql.weight_prequantized = True
    try:
        for start in range(0, batch.shape[0], chunk):
            model(batch[start : start + chunk])
    finally:
        for _, ql in quant_linears(model):
            ql.weight_prequantized = False
    for _, aq in acts:
        aq.finish_calibration(cfg.search)
    logger.info(
        "calibrated %d weight and %d activation quantisers (%s, W%d A%d)",
        len(quant_linears(model)),
        len(acts),
        cfg.search,
        cfg.wbits,
        cfg.abits,
    )


@dataclass
class DistillLog:
    """Losses of bound distillation, one entry per iteration."""

    loss: list[float] = field(default_factory=list)
    pixel: list[float] = field(default_factory=list)
    feature: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    """L1 to the FP output on the held-out batch, before training and every
    ``val_every`` iterations."""
    best_step: int | None = None
    """Iterations done when the kept (lowest held-out loss) bounds were reached."""
    stopped_early: str | None = None


def _normalised(f: Tensor) -> Tensor:
    """Per-sample Frobenius normalisation (2DQuant's feature loss)."""
    norm = f.flatten(1).norm(dim=1).clamp_min(1e-12).detach()
    return f / norm.view(-1, *([1] * (f.dim() - 1)))


class _FeatureTap:
    """Forward hooks collecting residual-group outputs."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.features: list[Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.features.append(output)

    def pop(self) -> list[Tensor]:
        out, self.features = self.features, []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _recomputed(modules: list[nn.Module]) -> Iterator[None]:
    """Run each module under activation checkpointing while the context is open.

    Fake quantisers keep several attention-map-sized tensors per block for
    backward: on SwinIR-light a DQC batch of 4 64x64 patches peaked at 9.1 GB
    and 2DQuant's batch of 16 was OOM-killed on a 24 GB machine. Recomputing
    each residual group in backward keeps one group's activations at a time
    (batch 8: 5.4 GB) for one extra forward. The wrapper
    replaces ``forward`` (not ``__call__``), so forward hooks such as the
    feature taps still fire once per forward and not again in the recompute.
    """
    originals = []
    for m in modules:
        orig = m.forward
        originals.append((m, orig))

        def forward(*args: Any, _orig: Callable[..., Any] = orig, **kwargs: Any) -> Any:
            return checkpoint(_orig, *args, use_reentrant=False, **kwargs)

        m.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m, orig in originals:
            m.forward = orig  # type: ignore[method-assign]


@dataclass(frozen=True)
class DistillCheckpoint:
    """What :func:`distill_bounds` hands its ``on_checkpoint`` callback.

    The quantised model holds the bounds of ``selected_step`` while the callback
    runs (the best held-out step so far, or ``step`` itself: the last iterate),
    and gets the training bounds back afterwards.
    """

    step: int
    """Iterations done."""
    selected_step: int
    """Iteration whose bounds the model holds now."""
    log: DistillLog


STATE_VERSION = 1


def _state_fingerprint(cfg: QuantConfig, params: list[nn.Parameter]) -> str:
    import json

    return json.dumps({"config": cfg.to_dict(), "params": [list(p.shape) for p in params]})


def _save_state(
    path: Path,
    step: int,
    params: list[nn.Parameter],
    best: list[Tensor] | None,
    opt: torch.optim.Optimizer,
    log: DistillLog,
    fingerprint: str,
) -> None:
    import io

    payload = {
        "version": STATE_VERSION,
        "fingerprint": fingerprint,
        "step": step,
        "params": [p.detach().cpu().clone() for p in params],
        "best": None if best is None else [b.cpu() for b in best],
        "optimizer": opt.state_dict(),
        "log": asdict(log),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, buffer.getvalue())


def _load_state(
    path: Path,
    params: list[nn.Parameter],
    opt: torch.optim.Optimizer,
    fingerprint: str,
) -> tuple[int, list[Tensor] | None, DistillLog]:
    state = torch_load_weights_only(path)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointReadError(f"{path}: not a DQC state file (version {STATE_VERSION})")
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path}: DQC state of another configuration; delete it to start over "
            f"(saved {state['fingerprint'][:200]}..., now {fingerprint[:200]}...)"
        )
    with torch.no_grad():
        for p, v in zip(params, state["params"], strict=True):
            p.copy_(v)
    opt.load_state_dict(state["optimizer"])
    device = params[0].device if params else torch.device("cpu")
    best = None if state["best"] is None else [b.to(device) for b in state["best"]]
    return int(state["step"]), best, DistillLog(**state["log"])


def distill_bounds(
    qmodel: nn.Module,
    fp_model: nn.Module,
    batches: Iterable[Tensor],
    cfg: QuantConfig,
    *,
    device: torch.device | str | None = None,
    on_step: Callable[[int, float], None] | None = None,
    val_batch: Tensor | None = None,
    val_every: int = 100,
    recompute: bool = True,
    fused: bool = False,
    checkpoints: Sequence[int] = (),
    on_checkpoint: Callable[[DistillCheckpoint], None] | None = None,
    state_path: str | Path | None = None,
    state_every: int = 25,
) -> DistillLog:
    """DQC: train only the quantisers' bounds (and alpha/beta) against the FP model.

    Loss = L1(quantised output, FP output) + ``feature_weight`` x sum over
    residual groups of MSE between per-sample-normalised features (2DQuant,
    ``loss_weight 5``). Adam, ``cfg.dqc_lr`` (``dqc_scalar_lr`` for alpha/beta
    where set)/``dqc_betas``, gradients clipped
    to +-``grad_clip`` by value; stops on a non-finite loss (CompSRT 7.4).
    ``cfg.dqc_loss="official"`` divides both terms by element counts as the
    reference code does (see :class:`QuantConfig`); the logged losses are then
    on that scale too.
    Note that with Frobenius-normalised features and mean reduction the
    feature term is orders of magnitude smaller than the L1 term, as in the
    reference code: the output loss drives the bounds.

    With ``val_batch`` (held-out patches from the *training* pool) the bounds
    with the lowest held-out L1 are kept, checked before training, every
    ``val_every`` iterations, at every checkpoint and at the end. The papers
    select their iteration on Set5, a test set; this keeps selection off the
    benchmarks. The FP output of the held-out batch is computed once.

    ``recompute`` checkpoints the student's residual groups (same result, a
    fraction of the memory, ~one extra forward per step; see :func:`_recomputed`).
    ``fused`` runs the activation quantisers through the fused CPU kernel
    (:mod:`irformer.compress.fused`: same values up to float rounding, several
    times faster on CPU).

    ``checkpoints``: iteration counts (0 = before training) at which
    ``on_checkpoint`` is called with the model holding the bounds a run of that
    many iterations would keep, then, when those are from an earlier step, again
    with the last iterate's (:class:`DistillCheckpoint`). When ``val_every``
    divides every checkpoint, each call sees exactly what a separate run of
    that length would have produced (the held-out checks of a prefix are the
    same).

    ``state_path``: the distillation state (bounds, Adam, log, best bounds) is
    saved there atomically every ``state_every`` iterations and at each
    checkpoint; a run started with an existing state continues from it,
    skipping the batches already used (``batches`` must be the same
    deterministic stream), so a killed run resumes where it saved.
    """
    params = learnable_quantizer_parameters(qmodel, bounds=cfg.learn_bounds)
    if not params:
        raise ValueError(
            f"{cfg.method}: nothing to distil (learn_bounds={cfg.learn_bounds}, "
            f"scalar_decomposition={cfg.scalar_decomposition})"
        )
    for p in qmodel.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    fp_model.eval()
    qmodel.eval()
    scalars = {id(p) for p in learnable_quantizer_parameters(qmodel, bounds=False)}
    groups = [
        {"params": [p for p in params if id(p) not in scalars], "lr": cfg.dqc_lr},
        {
            "params": [p for p in params if id(p) in scalars],
            "lr": cfg.dqc_lr if cfg.dqc_scalar_lr is None else cfg.dqc_scalar_lr,
        },
    ]
    opt = torch.optim.Adam([g for g in groups if g["params"]], betas=cfg.dqc_betas)

    def feature_scale(f: Tensor) -> int:
        return f.numel() if cfg.dqc_loss == "official" else 1

    q_groups = [m for _, m in residual_groups(qmodel)]
    f_groups = [m for _, m in residual_groups(fp_model)]
    use_features = cfg.feature_weight > 0 and len(q_groups) == len(f_groups) > 0
    tap_q = _FeatureTap(q_groups if use_features else [])
    tap_f = _FeatureTap(f_groups if use_features else [])
    log = DistillLog()
    it: Iterator[Tensor] = iter(batches)
    val_target: Tensor | None = None
    if val_batch is not None:
        if device is not None:
            val_batch = val_batch.to(device)
        with torch.no_grad():
            val_target = fp_model(val_batch)
        tap_f.pop()
    best: list[Tensor] | None = None
    marks = sorted({int(c) for c in checkpoints})
    if marks and (marks[0] < 0 or marks[-1] > cfg.dqc_iters):
        raise ValueError(f"DQC checkpoints {marks} outside 0..{cfg.dqc_iters} iterations")
    fingerprint = _state_fingerprint(cfg, params)
    state_file = None if state_path is None else Path(state_path)
    start = 0

    def validate(step: int) -> None:
        nonlocal best
        if val_batch is None or (log.val_steps and log.val_steps[-1] == step):
            return
        with torch.no_grad(), fused_fake_quant(fused):
            loss = float(F.l1_loss(qmodel(val_batch), val_target))
        tap_q.pop()
        log.val_steps.append(step)
        log.val_loss.append(loss)
        if math.isfinite(loss) and loss <= min(log.val_loss):
            best = [p.detach().clone() for p in params]
            log.best_step = step

    def checkpoint_reached(step: int) -> None:
        validate(step)
        if on_checkpoint is not None:
            current = [p.detach().clone() for p in params]
            chosen = step if best is None or log.best_step is None else log.best_step
            if chosen != step:
                with torch.no_grad():
                    for p, b in zip(params, best, strict=True):  # type: ignore[arg-type]
                        p.copy_(b)
                try:
                    on_checkpoint(DistillCheckpoint(step, chosen, log))
                finally:
                    with torch.no_grad():
                        for p, c in zip(params, current, strict=True):
                            p.copy_(c)
            on_checkpoint(DistillCheckpoint(step, step, log))
            tap_q.pop()  # whatever the callback ran through the models is not a DQC feature
            tap_f.pop()
        if state_file is not None:
            _save_state(state_file, step, params, best, opt, log, fingerprint)

    try:
        if state_file is not None and state_file.is_file():
            start, best, log = _load_state(state_file, params, opt, fingerprint)
            for _ in range(start):  # the same stream, positioned after the used batches
                next(it)
            logger.info("DQC resumed from %s at iteration %d", state_file, start)
        if start == 0:
            validate(0)
            if 0 in marks:
                checkpoint_reached(0)
        for step in range(start, cfg.dqc_iters):
            if log.stopped_early:
                break
            lq = next(it)
            if device is not None:
                lq = lq.to(device)
            with torch.no_grad():
                out_f = fp_model(lq)
            feats_f = tap_f.pop()
            with fused_fake_quant(fused):
                with _recomputed(q_groups if recompute else []):
                    out_q = qmodel(lq)
                feats_q = tap_q.pop()
                pixel = F.l1_loss(out_q, out_f)
                feature = sum(
                    (
                        F.mse_loss(_normalised(fq), _normalised(ff)) / feature_scale(fq)
                        for fq, ff in zip(feats_q, feats_f, strict=True)
                    ),
                    start=torch.zeros((), device=out_q.device),
                )
                if cfg.dqc_loss == "official":
                    pixel = pixel / (out_q.numel() // out_q.shape[0])
                loss = pixel + cfg.feature_weight * feature
                if not torch.isfinite(loss):
                    log.stopped_early = f"non-finite loss at iteration {step}"
                    logger.warning("DQC stopped: %s", log.stopped_early)
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_value_(params, cfg.grad_clip)
            opt.step()
            log.loss.append(float(loss.detach()))
            log.pixel.append(float(pixel.detach()))
            log.feature.append(float(feature.detach()))
            if on_step is not None:
                on_step(step, log.loss[-1])
            done = step + 1
            if done % val_every == 0 or done == cfg.dqc_iters:
                validate(done)
            if done in marks:
                checkpoint_reached(done)
            elif state_file is not None and done % state_every == 0:
                _save_state(state_file, done, params, best, opt, log, fingerprint)
        if best is not None:
            with torch.no_grad():
                for p, b in zip(params, best, strict=True):
                    p.copy_(b)
    finally:
        tap_q.close()
        tap_f.close()
        for p in params:
            p.requires_grad_(False)
    return log


def quantizer_snapshot(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Every weight/activation quantiser's bounds (and alpha/beta), by module name:
    the reference :func:`quantizer_drift` measures distillation against."""
    snap = {}
    for name, module in model.named_modules():
        if isinstance(module, WeightQuantizer | ActQuantizer):
            q = module.quantizer
            snap[name] = {
                k: getattr(q, k).detach().clone()
                for k in ("lower", "upper", "alpha", "beta")
                if getattr(q, k) is not None
            }
    return snap


def quantizer_drift(model: nn.Module, snapshot: dict[str, dict[str, Tensor]]) -> dict[str, float]:
    """How far distillation moved the quantisers since ``snapshot``, in grid steps.

    For weights (``w_``) and activations (``a_``): the mean and max over
    quantisers (and bound groups) of ``|l - l0|``, ``|u - u0|`` in units of the
    initial step ``s0 = (u0 - l0) / (2^b - 1)``, and of ``|alpha| / s0`` and
    ``|beta| / s0`` (scalar decomposition; absent without it). 1.0 = one step.
    """
    shifts: dict[str, list[Tensor]] = {}
    for name, module in model.named_modules():
        if name not in snapshot or not isinstance(module, WeightQuantizer | ActQuantizer):
            continue
        q, ref = module.quantizer, snapshot[name]
        kind = "w" if isinstance(module, WeightQuantizer) else "a"
        step0 = ((ref["upper"] - ref["lower"]) / (2**q.bits - 1)).clamp_min(1e-12)
        terms = {
            "lower_shift": (q.lower.detach() - ref["lower"]).abs() / step0,
            "upper_shift": (q.upper.detach() - ref["upper"]).abs() / step0,
        }
        if q.alpha is not None and q.beta is not None:
            terms["alpha"] = q.alpha.detach().abs() / step0
            terms["beta"] = q.beta.detach().abs() / step0
        for key, value in terms.items():
            shifts.setdefault(f"{kind}_{key}", []).append(value.reshape(-1).float().cpu())
    out: dict[str, float] = {}
    for key, values in sorted(shifts.items()):
        flat = torch.cat(values)
        out[f"{key}_mean"] = float(flat.mean())
        out[f"{key}_max"] = float(flat.max())
    return out


def prepare_quantized_copy(model: nn.Module, cfg: QuantConfig, **attach_kwargs: Any) -> nn.Module:
    """A deep copy of ``model`` with quantisers attached (FP weights frozen)."""
    qmodel = copy.deepcopy(model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    return attach_quantizers(qmodel, cfg, **attach_kwargs)


def count_quantized(model: nn.Module) -> dict[str, int]:
    """How many weights/activation tensors are quantised (for logs and reports)."""
    lin = quant_linears(model)
    return {
        "linears": len(lin),
        "weights": sum(ql.weight.numel() for _, ql in lin),
        "activation_quantizers": len(act_quantizers(model)),
        "blocks": len(transformer_blocks(model)),
    }
