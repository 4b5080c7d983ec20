"""Normalisation layers for token sequences and the one residual-merge point.

Every Transformer block in :mod:`irformer.archs` normalises its input with a
norm from :func:`build_norm`, runs a branch (attention or MLP) on the result and
adds the branch back with :func:`merge_residual`. The norm decides how the
branch is rescaled before the add, which is where i-LN hooks in:

    x + sqrt(var + eps) * f(LN*(x))          (i-LN, paper Eq. 5)

Norms are stateless between calls (the i-LN authors keep ``self.last_var`` on
the module, which breaks under activation checkpointing and re-entrant calls):
``stats = norm.statistics(x)`` returns whatever the branch rescale needs, and it
is passed explicitly to :func:`merge_residual`.

Tokens are ``(B, L, C)``. Parameter names (``weight``/``bias``) follow
``nn.LayerNorm`` so that official checkpoints load into ``ln`` models.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irformer import cpu_kernels
from irformer.execution import in_graph_capture

NormName = Literal[
    "ln",
    "ln_star",
    "iln",
    "rms",
    "in",
    "bn",
    "none",
    "layerscale",
    "rezero",
    "ln_rs",
]
NORM_NAMES: tuple[str, ...] = get_args(NormName)
"""Every name :func:`build_norm` accepts: the paper's Table 1 set and ``ln_rs``, the
one Table 3 row that Table 1 lacks (per-token LN with i-LN's rescale).

The four rows of Table 3 are ``ln`` (idx 1), ``ln_rs`` (idx 2: rescaling, no
spatial holisticness), ``ln_star`` (idx 3: holisticness, no rescaling) and
``iln`` (idx 4: both)."""

RESCALING_NORMS: tuple[NormName, ...] = ("iln", "ln_rs")
"""Norms whose branch is multiplied by the input's std before the residual add
(the paper's "Rs"): their blocks carry the input scale through, and their
post-embedding and final norms are plain affines (see :func:`build_norm`)."""

NormRole = Literal["branch", "embed", "final"]
"""Where a norm sits: ``branch`` feeds an attention/MLP branch that is merged
back into the residual stream; ``embed`` follows patch embedding; ``final``
follows the body (no residual of its own)."""

ILN_EPS = 1e-4
"""i-LN's eps, from the authors' configs (NOTES.md)."""

LAYERSCALE_INIT = 1e-4
"""LayerScale's initial per-channel branch scale (CaiT uses 1e-4..1e-1 by depth)."""


class TokenNorm(nn.Module):
    """Base class: a norm over tokens ``(B, L, C)`` with an explicit statistics pass.

    Subclasses implement :meth:`statistics` and :meth:`normalize`; the default
    :meth:`rescale_branch` leaves the branch unchanged (plain pre-norm residual).
    """

    image_statistics: bool = False
    """Whether the statistics span the whole image (all tokens), so that a tile of
    an image is normalised differently from the whole: tiled inference is then not
    the model's output (see :func:`image_statistics_norms`)."""

    def statistics(self, x: Tensor) -> Tensor | None:
        """Statistics that :meth:`normalize` and :meth:`rescale_branch` share."""
        return None

    def normalize(self, x: Tensor, stats: Tensor | None) -> Tensor:
        raise NotImplementedError

    def rescale_branch(self, branch: Tensor, stats: Tensor | None) -> Tensor:
        """Scale the branch output before the residual add (identity by default)."""
        return branch

    def merge(self, x: Tensor, branch: Tensor, stats: Tensor | None) -> Tensor:
        """``x + rescale_branch(branch, stats)``; subclasses may fuse the two."""
        return x + self.rescale_branch(branch, stats)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x, self.statistics(x))


class _ChannelAffine(TokenNorm):
    """Shared per-channel ``weight``/``bias`` (named as in ``nn.LayerNorm``)."""

    def __init__(self, dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def _affine(self, y: Tensor) -> Tensor:
        y = y * self.weight
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.dim}"


class ChannelAffine(_ChannelAffine):
    """No normalisation, only ``y = weight * x + bias``.

    i-LN replaces the norms after patch embedding, before patch unembedding and
    after the body with this (the authors' HAT code; removing the final vanilla
    LN "helps a lot"), keeping the same parameter names.
    """

    def normalize(self, x: Tensor, stats: Tensor | None) -> Tensor:
        return self._affine(x)


class LayerNorm(_ChannelAffine):
    """Per-token LayerNorm (the baseline): statistics over C for every token."""

    def __init__(self, dim: int, *, eps: float = 1e-5) -> None:
        super().__init__(dim)
        self.eps = eps

    def normalize(self, x: Tensor, stats: Tensor | None) -> Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)


class RescaledLayerNorm(LayerNorm):
    """Per-token LN with i-LN's rescale: the i-LN paper's Table 3 idx 2 ("Rs" without "SH").

    The branch fed by this norm is multiplied, token by token, by the std of
    that token over its C channels before the residual add:

        x_l + sqrt(var_c(x_l) + eps) * f(LN(x))_l

    i.e. i-LN (paper Eq. 5) with LN's per-token statistics in place of LN*'s
    per-image ones. Because ``LN(a_l x_l) = LN(x_l)`` for any positive per-token
    factor ``a_l`` (up to eps), the whole block is positively homogeneous of
    degree one *per token*: ``block(D x) = D block(x)`` for every positive
    diagonal ``D`` over tokens, which is stronger than i-LN's one global factor.

    The per-token std is a function of the token alone, so :meth:`merge`
    recomputes it (in fp32, even under autocast) from the residual input it is
    given instead of carrying it in ``stats``: any token slice of ``x`` (the
    chunked inference paths) then gets exactly its own std without indexing a
    ``(B, L, 1)`` statistics tensor. :meth:`statistics` therefore returns None,
    and the gradient flows through the std (not detached), as in i-LN.
    """

    def merge(self, x: Tensor, branch: Tensor, stats: Tensor | None) -> Tensor:
        return torch.addcmul(x, branch, token_std(x, self.eps).to(branch.dtype))

    def rescale_branch(self, branch: Tensor, stats: Tensor | None) -> Tensor:
        raise ValueError(
            "ln_rs rescales the branch by the per-token std of the residual input, which "
            "rescale_branch does not see; merge through merge_residual(x, branch, norm, stats)"
        )

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, rescale=per-token"


def token_std(x: Tensor, eps: float) -> Tensor:
    """Per-token ``sqrt(var + eps)`` over the channel dim (biased variance), in fp32.

    x: (..., C). Returns (..., 1) in fp32 (fp64 stays fp64), as LN's own statistics.
    """
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).square().mean(dim=-1, keepdim=True)  # two passes: stable
    return torch.sqrt(var + eps)


class HolisticLayerNorm(_ChannelAffine):
    """LN*: one mean/variance per image over all ``L*C`` values (paper Eq. 4).

    With ``rescale=True`` this is i-LN: the branch fed by this norm is multiplied
    by ``sqrt(var + eps)`` before the residual add, so the block is homogeneous
    of degree one in its input. Statistics are per sample (never across the
    batch), biased, and computed in fp32 even under autocast; the gradient flows
    through the std as in the authors' code.
    """

    image_statistics = True

    def __init__(self, dim: int, *, eps: float = ILN_EPS, rescale: bool = False) -> None:
        super().__init__(dim)
        self.eps = eps
        self.rescale = rescale

    def statistics(self, x: Tensor) -> Tensor:
        """Returns ``(B, 2, 1)``: mean and ``sqrt(var + eps)`` per sample."""
        if cpu_kernels.use_norm_kernels(x):
            return cpu_kernels.holistic_stats(x, self.eps)  # one call, not ~9 ops
        return holistic_stats(x, self.eps)

    def normalize(self, x: Tensor, stats: Tensor | None) -> Tensor:
        if stats is None:
            stats = self.statistics(x)
        if cpu_kernels.use_norm_kernels(x):
            return cpu_kernels.holistic_normalize(x, stats, self.weight, self.bias)
        mean, std = stats[:, 0:1], stats[:, 1:2]
        if _fused_low_precision(x, self.weight):
            return _normalize_per_sample(x, mean, std, self.weight, self.bias)
        # (x - mean) * (weight / std) + bias: two passes over x, the affine folded
        # into a (B, 1, C) factor. The mean is subtracted first on purpose: folding
        # it into the bias loses precision when |mean| >> std.
        centred = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x) - mean
        scale = self.weight.float() / std
        if self.bias is None:
            return (centred * scale).to(x.dtype)
        return torch.addcmul(self.bias.float(), centred, scale).to(x.dtype)

    def rescale_branch(self, branch: Tensor, stats: Tensor | None) -> Tensor:
        if not self.rescale:
            return branch
        return branch * self._branch_std(branch, stats)

    def merge(self, x: Tensor, branch: Tensor, stats: Tensor | None) -> Tensor:
        if not self.rescale:
            return x + branch
        return torch.addcmul(x, branch, self._branch_std(branch, stats))  # one pass

    @staticmethod
    def _branch_std(branch: Tensor, stats: Tensor | None) -> Tensor:
        if stats is None:
            raise ValueError("i-LN rescale needs the statistics of the norm that fed the branch")
        std = stats[:, 1:2].reshape((stats.shape[0],) + (1,) * (branch.dim() - 1))
        return std.to(branch.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, rescale={self.rescale}"


def _fused_low_precision(x: Tensor, weight: Tensor) -> bool:
    """bf16 (any device) or fp16 (CUDA) eager inference, where one fused kernel pays
    (never in a captured graph: the per-sample loop would fix the batch size)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if in_graph_capture():
        return False
    return x.dtype == torch.bfloat16 or (x.dtype == torch.float16 and x.is_cuda)


def _normalize_per_sample(
    x: Tensor, mean: Tensor, std: Tensor, weight: Tensor, bias: Tensor | None
) -> Tensor:
    """``(x - mean) / std * weight + bias`` per sample via eval-mode ``batch_norm``.

    Its CPU/CUDA kernels read low-precision ``x`` once, compute in fp32 with
    fp32 statistics and affine (the per-sample mean/std given as every
    channel's running mean/variance, eps 0) and write once: 4 bytes of traffic
    per element instead of ~28 for the upcast/centre/affine/downcast chain,
    with the same result (checked in the tests).
    """
    c = x.shape[-1]
    w = weight.float()
    b = None if bias is None else bias.float()
    rows = []
    for i in range(x.shape[0]):
        m = mean[i].reshape(1).float().expand(c).contiguous()
        v = std[i].reshape(1).float().square().expand(c).contiguous()
        rows.append(F.batch_norm(x[i].reshape(-1, c), m, v, w, b, False, 0.0, 0.0))
    return (rows[0] if len(rows) == 1 else torch.stack(rows)).reshape(x.shape)


def holistic_stats(x: Tensor, eps: float) -> Tensor:
    """Per-sample mean and ``sqrt(var + eps)`` over every non-batch dim, in fp32.

    x: (B, ...). Returns (B, 2, 1) so the two can be broadcast against (B, L, C).
    """
    flat = x.reshape(x.shape[0], -1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # fp32 at least; fp64 stays fp64
    # Two passes (mean, then the norm of the centred values): as stable as
    # var_mean and several times faster on CPU, and differentiable (the i-LN
    # rescale back-propagates through the std, as in the authors' code).
    mean = flat.mean(dim=1, keepdim=True)
    var = torch.linalg.vector_norm(flat - mean, dim=1, keepdim=True).square() / flat.shape[1]
    return torch.stack([mean, torch.sqrt(var + eps)], dim=1)


class RMSNorm(TokenNorm):
    """Per-token RMSNorm (no centring, no bias)."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def normalize(self, x: Tensor, stats: Tensor | None) -> Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


class InstanceNorm(_ChannelAffine):
    """InstanceNorm: per sample and per channel, statistics over the L tokens."""

    image_statistics = True

    def __init__(self, dim: int, *, eps: float = 1e-5) -> None:
        super().__init__(dim)
        self.eps = eps

    def normalize(self, x: Tensor, stats: Tensor | None) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = xf.mean(dim=1, keepdim=True)
        centred = xf - mean  # two passes: var_mean is far slower on CPU
        var = centred.square().mean(dim=1, keepdim=True)
        y = centred * torch.rsqrt(var + self.eps)
        return self._affine(y.to(x.dtype))


class BatchNorm(TokenNorm):
    """BatchNorm over channels with running statistics.

    In training mode it normalises with the statistics of the whole batch (all
    samples and tokens), so it is the one norm whose output for one sample
    depends on the others. ``use_batch_stats_in_eval`` evaluates a trained model
    with batch statistics (the paper reports BN both ways).
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.dim = dim
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum)
        self.use_batch_stats_in_eval = False

    @property
    def image_statistics(self) -> bool:  # type: ignore[override]
        """Batch statistics (training, or ``use_batch_stats_in_eval``) pool every token of
        the batch, so tiles see other values; running statistics do not."""
        return self.training or self.use_batch_stats_in_eval

    def normalize(self, x: Tensor, stats: Tensor | None) -> Tensor:
        b, l, c = x.shape
        use_batch = self.training or self.use_batch_stats_in_eval
        y = F.batch_norm(
            x.reshape(b * l, c),
            self.bn.running_mean,
            self.bn.running_var,
            self.bn.weight,
            self.bn.bias,
            training=use_batch,
            momentum=self.bn.momentum if self.training else 0.0,
            eps=self.bn.eps,
        )
        if self.training:
            self.bn.num_batches_tracked += 1
        return y.reshape(b, l, c)


class Identity(TokenNorm):
    """No normalisation at all (the paper's "None" row)."""

    def normalize(self, x: Tensor, stats: Tensor | None) -> Tensor:
        return x


class LayerScaleNorm(LayerNorm):
    """LN plus LayerScale: a learnable per-channel branch scale, small at init."""

    def __init__(self, dim: int, *, init: float = LAYERSCALE_INIT) -> None:
        super().__init__(dim)
        self.layer_scale = nn.Parameter(torch.full((dim,), init))

    def rescale_branch(self, branch: Tensor, stats: Tensor | None) -> Tensor:
        return branch * self.layer_scale  # branch: (..., C)


class ReZero(Identity):
    """ReZero: no norm; the branch is scaled by one scalar initialised at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.rezero_alpha = nn.Parameter(torch.zeros(1))

    def rescale_branch(self, branch: Tensor, stats: Tensor | None) -> Tensor:
        return branch * self.rezero_alpha


def image_statistics_norms(model: nn.Module) -> list[str]:
    """Class names of the norms in ``model`` whose statistics span the whole image
    (LN*, i-LN, InstanceNorm; BatchNorm with batch statistics): tiles of an image see
    other statistics than the image,
    so tiled inference differs from the model's output (``restore --exact-chunk`` is
    the exact bounded-memory path)."""
    found = {
        type(m).__name__: None
        for m in model.modules()
        if isinstance(m, TokenNorm) and m.image_statistics
    }
    return list(found)


def build_norm(
    name: str, dim: int, *, role: NormRole = "branch", eps: float | None = None
) -> TokenNorm:
    """The one norm factory: every architecture names its norms through here.

    ``role`` places the norm: ``branch`` norms feed a residual branch; ``embed``
    and ``final`` norms (after patch embedding / after the body) have no branch,
    so i-LN replaces them with :class:`ChannelAffine` (as the authors' code
    does), and ``rezero``/``none`` with the identity.

    ``ln_rs`` (Table 3 idx 2) does what i-LN does there: an affine, not a
    per-token LN. A per-token LN after patch embedding would erase each token's
    input scale, which is exactly what the rescale is meant to carry through the
    body, and keeping the two roles identical makes ``ln_rs`` vs ``iln`` differ
    in one factor only (per-token vs per-image statistics), as the ablation
    intends. (``ln_star``, idx 3, keeps LN* there: without a rescale there is no
    input scale to preserve, so it normalises like ``ln``.)
    """
    if name not in NORM_NAMES:
        raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(NORM_NAMES)}")
    if role not in ("branch", "embed", "final"):
        raise ValueError(f"unknown norm role {role!r}; expected 'branch', 'embed' or 'final'")
    kwargs = {} if eps is None else {"eps": eps}
    if role != "branch":
        if name in RESCALING_NORMS:
            return ChannelAffine(dim)
        if name in ("rezero", "none"):
            return Identity()
        if name == "layerscale":
            return LayerNorm(dim, **kwargs)
    if name == "ln":
        return LayerNorm(dim, **kwargs)
    if name == "ln_rs":
        return RescaledLayerNorm(dim, **kwargs)
    if name == "ln_star":
        return HolisticLayerNorm(dim, **kwargs)
    if name == "iln":
        return HolisticLayerNorm(dim, rescale=True, **kwargs)
    if name == "rms":
        return RMSNorm(dim, **kwargs)
    if name == "in":
        return InstanceNorm(dim, **kwargs)
    if name == "bn":
        return BatchNorm(dim, **kwargs)
    if name == "layerscale":
        return LayerScaleNorm(dim)
    if name == "rezero":
        return ReZero()
    return Identity()


def merge_residual(
    x: Tensor,
    branch: Tensor,
    norm: TokenNorm,
    stats: Tensor | None,
    *,
    drop_prob: float = 0.0,
    side: Tensor | None = None,
) -> Tensor:
    """The one residual-merge point: ``x + norm.rescale_branch(drop(branch) + side, stats)``.

    ``norm`` is the norm that fed ``branch`` and ``stats`` what its
    :meth:`TokenNorm.statistics` returned for ``x``; for i-LN this applies the
    input-adaptive rescale, for LayerScale/ReZero their learnable scales.
    ``drop_prob`` is the block's stochastic-depth rate, applied only while
    ``norm`` is in training mode (see :func:`drop_path`). ``side`` joins the
    branch after the drop and before the rescale: HAT's scaled conv branch,
    which the official and the i-LN authors' HAT never drop but do rescale.
    """
    if drop_prob > 0.0 and norm.training:
        branch = drop_path(branch, drop_prob)
    if side is not None:
        branch = branch + side
    return norm.merge(x, branch, stats)


def drop_path(branch: Tensor, prob: float) -> Tensor:
    """Stochastic depth: drop each sample's whole branch with probability ``prob``.

    Survivors are scaled by ``1 / (1 - prob)`` so the expected branch is
    unchanged and inference needs no correction (the originals' ``DropPath``).
    One Bernoulli draw per sample from the global torch generator, which the
    trainer's checkpoints save, so a resumed run draws the same masks.
    """
    if not 0.0 <= prob < 1.0:
        raise ValueError(f"drop-path probability must be in [0, 1), got {prob}")
    keep = 1.0 - prob
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(keep)
    return branch * mask.div_(keep)


def set_batchnorm_eval_mode(model: nn.Module, *, use_batch_stats: bool) -> int:
    """Choose running (False) or batch (True) statistics for every BN in eval.

    Returns the number of BatchNorm layers changed.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, BatchNorm):
            module.use_batch_stats_in_eval = use_batch_stats
            count += 1
    return count
