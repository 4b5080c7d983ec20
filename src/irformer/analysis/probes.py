"""Feature probes: what happens inside an IR Transformer (i-LN paper, Sec. 2.1 and 3.3).

On a fixed probe batch, every Transformer layer and every residual group is
measured with four numbers:

* ``sq_mean``: the *mean square*, the mean of ``x**2`` over all values (not the
  RMS, which is its square root). The paper plots "the squared mean of
  intermediate features ... following EDM2" (arXiv v1: "the squared feature
  norms"), a squared quantity, so this is what its Figs. 1, 2 and 4 show; about
  1 for unit-variance features, and a "million-scale" mean square is an RMS of
  ~1000;
* ``max_abs``: the largest ``|x|`` (where fp16 overflows first);
* ``entropy``: the channel entropy of the paper's Algorithm 1 (softmax over the
  channel-wise mean ``|x|``), averaged over the batch. It is kept exactly as the
  paper defines it, but it is *not* scale invariant: the softmax acts on the raw
  magnitudes, so it tends to ``log(C)`` as the features shrink and to 0 as they
  grow, whatever the channel profile;
* ``balance_entropy``: the Shannon entropy of the channel profile normalised to
  sum 1 (:func:`channel_balance_entropy`). Invariant to the feature scale, so
  it measures only how evenly the channels share the magnitude: ``log(C)`` for
  balanced channels, 0 when one channel carries everything.

:class:`FeatureProbe` runs as a trainer hook (appending JSONL records to the run
directory) or once on a checkpoint. Two checkpoint analyses go with it: the
channel profile in front of the final norm against that norm's learned bias
(Fig. 7) and the relative-position-bias tables per head (Fig. 9).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from irformer.archs.layers import ResidualGroup, TransformerBlock
from irformer.files import atomic_write

logger = logging.getLogger(__name__)

ENTROPY_EPS = 1e-8
"""The small constant inside ``log(p + eps)`` of Algorithm 1 (the paper gives no value)."""

FEATURES_FILE = "features.jsonl"
"""File name of the probe records inside a run directory."""

BlockKind = Literal["layer", "group"]

# --------------------------------------------------------------------------- statistics


def channel_entropy(x: Tensor, *, layout: str = "auto", eps: float = ENTROPY_EPS) -> Tensor:
    """Channel entropy of the paper's Algorithm 1, one value per sample.

    For each sample: mean ``|x|`` over the spatial positions of every channel,
    softmax over channels, ``-sum(p * log(p + eps))``.

    x: tokens ``(B, L, C)`` (``layout="tokens"``) or maps ``(B, C, H, W)``
    (``layout="maps"``); ``"auto"`` picks by rank. Returns ``(B,)`` in fp32.
    """
    layout = _resolve_layout(x, layout)
    a = x.detach().float().abs()
    x_ave = a.mean(dim=1) if layout == "tokens" else a.mean(dim=(2, 3))  # (B, C)
    p = torch.softmax(x_ave, dim=-1)
    return -(p * torch.log(p + eps)).sum(dim=-1)


def channel_balance_entropy(x: Tensor, *, layout: str = "auto") -> Tensor:
    """Scale-invariant channel balance, one value per sample (nats).

    For each sample, ``m_c`` is the mean ``|x|`` of channel ``c`` over the
    spatial positions (Algorithm 1's step 1), ``p_c = m_c / sum_c m_c`` and the
    result is ``-sum_c p_c log p_c`` (``0 log 0 = 0``, no eps).

    Why this and not Algorithm 1: Algorithm 1's softmax over ``m`` is a softmax
    with temperature 1 over raw magnitudes, so ``Alg1(a x)`` tends to ``log C``
    as ``a -> 0`` and to ``log(#argmax channels)`` as ``a -> inf`` for any
    fixed channel profile; it mixes "how large" with "how uneven". Normalising
    ``m`` by its sum removes the scale exactly (``m(a x) = |a| m(x)``), keeps the
    paper's step 1 (channel-wise mean ``|x|``) and its reading (``log C`` =
    perfectly balanced, 0 = one channel carries everything), and needs no
    temperature. (Algorithm 1 applied to ``m / mean(m)`` would also be scale
    free, but its exponential still weights the profile by a C-dependent,
    arbitrary temperature.) ``exp`` of the value is the effective number of
    channels carrying the magnitude (the perplexity of ``p``).

    x: tokens ``(B, L, C)`` or maps ``(B, C, H, W)`` (see :func:`channel_entropy`).
    Returns ``(B,)`` in fp32; NaN for an all-zero sample (no profile to measure).
    """
    layout = _resolve_layout(x, layout)
    a = x.detach().float().abs()
    m = a.mean(dim=1) if layout == "tokens" else a.mean(dim=(2, 3))  # (B, C)
    total = m.sum(dim=-1, keepdim=True)
    p = m / total  # 0/0 = NaN for an all-zero sample, on purpose
    return -torch.special.xlogy(p, p).sum(dim=-1)


def _resolve_layout(x: Tensor, layout: str) -> str:
    if layout == "auto":
        if x.dim() == 3:
            return "tokens"
        if x.dim() == 4:
            return "maps"
        raise ValueError(
            f"expected tokens (B, L, C) or maps (B, C, H, W), got shape {tuple(x.shape)}"
        )
    if layout == "tokens" and x.dim() == 3:
        return layout
    if layout == "maps" and x.dim() == 4:
        return layout
    raise ValueError(
        f"layout {layout!r} does not fit shape {tuple(x.shape)}; expected 'tokens' for "
        "(B, L, C), 'maps' for (B, C, H, W) or 'auto'"
    )


@dataclass(frozen=True)
class BlockStats:
    """The probe numbers of one block on the probe batch."""

    block: str
    """Qualified module name, e.g. ``layers.0.residual_group.blocks.3``."""
    kind: str
    """``layer`` (one Transformer block) or ``group`` (a residual group)."""
    sq_mean: float
    """Mean square: mean of ``x**2`` (RMS squared)."""
    max_abs: float
    entropy: float
    """Algorithm 1 channel entropy (scale dependent), batch mean."""
    balance_entropy: float = math.nan
    """Scale-invariant channel balance (:func:`channel_balance_entropy`), batch mean.
    NaN only for statistics made before it existed."""

    def record(self, iteration: int) -> dict[str, Any]:
        """The JSONL record written by :class:`FeatureProbe`."""
        return {"iter": iteration, **asdict(self)}


def feature_stats(x: Tensor, *, eps: float = ENTROPY_EPS) -> tuple[float, float, float, float]:
    """``(sq_mean, max_abs, entropy, balance_entropy)`` of a tokens or maps tensor,
    batch-averaged (see :class:`BlockStats`)."""
    values = _stats_tensor(x, eps).cpu().tolist()
    return float(values[0]), float(values[1]), float(values[2]), float(values[3])


def _stats_tensor(x: Tensor, eps: float) -> Tensor:
    """(4,) tensor ``[sq_mean, max_abs, entropy, balance_entropy]`` on x's device."""
    xf = x.detach().float()
    return torch.stack(
        [
            xf.square().mean(),
            xf.abs().amax(),
            channel_entropy(xf, eps=eps).mean(),
            channel_balance_entropy(xf).mean(),
        ]
    )


# --------------------------------------------------------------------------- block discovery

BLOCK_TYPES: dict[str, BlockKind] = {}
"""Class name -> block kind, for models built outside irformer. irformer's own are
found by type: every :class:`~irformer.archs.layers.TransformerBlock` is a
``layer`` and every :class:`~irformer.archs.layers.ResidualGroup` a ``group``
(the same blocks :func:`irformer.archs.transformer_blocks` gives training and
compression)."""


def register_block_type(class_name: str, kind: BlockKind) -> None:
    """Make the probes measure modules of another class (e.g. a new architecture's block)."""
    if kind not in ("layer", "group"):
        raise ValueError(f"block kind must be 'layer' or 'group', got {kind!r}")
    BLOCK_TYPES[class_name] = kind


def block_kind(module: nn.Module) -> BlockKind | None:
    """``layer``/``group`` for a module the probes measure, None otherwise."""
    if isinstance(module, TransformerBlock):
        return "layer"
    if isinstance(module, ResidualGroup):
        return "group"
    for cls in type(module).__mro__:
        kind = BLOCK_TYPES.get(cls.__name__)
        if kind is not None:
            return kind
    return None


def discover_blocks(model: nn.Module) -> list[tuple[str, BlockKind, nn.Module]]:
    """Every measured block as ``(qualified name, kind, module)``, in module order."""
    model = _unwrap(model)
    found = []
    for name, module in model.named_modules():
        kind = block_kind(module)
        if kind is not None and name:
            found.append((name, kind, module))
    return found


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DDP / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, list | tuple):
        for item in output:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients, restoring every module's own mode afterwards.

    Eval mode matters: a train-mode BatchNorm would update its running
    statistics from the probe batch.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def measure_blocks(
    model: nn.Module,
    batch: Tensor,
    *,
    eps: float = ENTROPY_EPS,
    blocks: Sequence[str] | None = None,
) -> list[BlockStats]:
    """Run ``batch`` (B, C, H, W) through ``model`` in eval mode and measure every block.

    ``blocks`` restricts the measurement to these qualified names.
    """
    net = _unwrap(model)
    found = discover_blocks(net)
    if blocks is not None:
        wanted = set(blocks)
        missing = wanted - {name for name, _, _ in found}
        if missing:
            raise KeyError(
                f"blocks {sorted(missing)} not found; measurable blocks: "
                f"{[name for name, _, _ in found]}"
            )
        found = [item for item in found if item[0] in wanted]
    if not found:
        raise ValueError(
            f"no measurable blocks in {type(net).__name__}; register its block classes with "
            "irformer.analysis.probes.register_block_type"
        )
    results: dict[str, tuple[BlockKind, Tensor]] = {}

    def make_hook(name: str, kind: BlockKind) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is None:
                return
            results[name] = (kind, _stats_tensor(t, eps))

        return hook

    handles = [m.register_forward_hook(make_hook(n, k)) for n, k, m in found]
    try:
        with _eval_no_grad(net):
            net(batch.to(_model_device(net)))
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, _, _ in found:
        if name not in results:
            continue  # a block that the forward pass skipped
        kind, stats = results[name]
        sq, mx, ent, bal = stats.cpu().tolist()
        out.append(BlockStats(name, kind, float(sq), float(mx), float(ent), float(bal)))
    return out


# --------------------------------------------------------------------------- the probe


class FeatureProbe:
    """Measures a model on a fixed probe batch; usable as a trainer hook.

    As a hook (``probe(state)``), it reads the model and iteration from the
    trainer state and appends one JSONL record per block,
    ``{iter, block, kind, sq_mean, max_abs, entropy, balance_entropy}``, to
    ``out_path``. The
    time spent is kept in :attr:`elapsed_s` so that its overhead can be
    reported against the training time.
    """

    def __init__(
        self,
        batch: Tensor,
        *,
        out_path: str | Path | None = None,
        eps: float = ENTROPY_EPS,
        blocks: Sequence[str] | None = None,
    ) -> None:
        if batch.dim() != 4:
            raise ValueError(f"probe batch must be (B, C, H, W), got shape {tuple(batch.shape)}")
        self.batch = batch
        self.out_path = Path(out_path) if out_path is not None else None
        self.eps = eps
        self.blocks = blocks
        self.elapsed_s = 0.0
        self.calls = 0
        self.last: list[BlockStats] = []

    def measure(self, model: nn.Module) -> list[BlockStats]:
        """Per-block statistics of ``model`` on the probe batch (no side effects)."""
        return measure_blocks(model, self.batch, eps=self.eps, blocks=self.blocks)

    def record(self, model: nn.Module, iteration: int) -> list[BlockStats]:
        """Measure and append the records of ``iteration`` to :attr:`out_path`."""
        start = time.perf_counter()
        stats = self.measure(model)
        if self.out_path is not None:
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            with self.out_path.open("a") as fh:
                for s in stats:
                    fh.write(json.dumps(s.record(iteration)) + "\n")
        self.elapsed_s += time.perf_counter() - start
        self.calls += 1
        self.last = stats
        return stats

    def __call__(self, state: Any) -> None:
        """Trainer hook: ``state`` carries the model and the iteration (see ``engine.train``)."""
        model = _state_attr(state, ("model", "net"))
        iteration = int(_state_attr(state, ("iteration", "iter", "step")))
        if self.out_path is None:
            run_dir = _state_attr(state, ("run_dir", "out_dir"), required=False)
            if run_dir is not None:
                self.out_path = Path(run_dir) / FEATURES_FILE
        if self.calls == 0 and self.out_path is not None:
            # A resumed run re-does the iterations after its checkpoint: drop their records.
            start = _state_attr(state, ("start_iteration",), required=False)
            if start is not None:
                truncate_records(self.out_path, int(start))
        self.record(model, iteration)


def _state_attr(state: Any, names: Sequence[str], *, required: bool = True) -> Any:
    for name in names:
        if isinstance(state, dict) and name in state:
            return state[name]
        if hasattr(state, name):
            return getattr(state, name)
    if required:
        raise AttributeError(
            f"trainer state {type(state).__name__} has none of the attributes {list(names)}"
        )
    return None


def truncate_records(path: Path, last_iteration: int) -> None:
    """Keep only the records of iterations ``<= last_iteration`` (lines cut by a kill go too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(rec.get("iter", 0)) <= last_iteration:
            kept.append(line + "\n")
    atomic_write(path, "".join(kept))


def read_feature_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``features.jsonl`` file (or of the one inside a run directory).

    ``balance_entropy`` is optional: files written before it existed lack it
    (they cannot be re-derived: the channel profile was never stored).
    """
    path = Path(path)
    if path.is_dir():
        path = path / FEATURES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no feature records at {path} (train with the FeatureProbe hook)")
    records = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON record: {exc}") from exc
            missing = {"iter", "block", "sq_mean", "max_abs", "entropy"} - rec.keys()
            if missing:
                raise ValueError(f"{path}:{lineno}: record lacks keys {sorted(missing)}")
            records.append(rec)
    return records


# --------------------------------------------------------------------------- probe batches


def center_crop(x: np.ndarray, size: int) -> np.ndarray:
    """Central ``size x size`` crop of an ``(H, W, C)`` image (smaller sides kept whole)."""
    h, w = x.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return x[top : top + size, left : left + size]


def load_probe_batch(
    folder: str | Path, *, count: int = 4, size: int = 48, channels: str = "rgb"
) -> Tensor:
    """The first ``count`` images of ``folder`` (model inputs, e.g. LR images), centre-cropped.

    Images smaller than ``size`` are skipped. Returns ``(count, C, size, size)`` in [0, 1].
    """
    from irformer.data.io import image_to_tensor, list_images, read_image

    tensors = []
    for path in list_images(folder):
        image = read_image(path, channels=channels)  # type: ignore[arg-type]
        if min(image.shape[:2]) < size:
            continue
        tensors.append(image_to_tensor(center_crop(image, size)))
        if len(tensors) == count:
            break
    if not tensors:
        raise ValueError(f"no image in {folder} is at least {size}x{size} pixels")
    return torch.stack(tensors)


# --------------------------------------------------------------------------- final norm vs bias


@dataclass(frozen=True)
class BiasAlignment:
    """Channel profile in front of the final norm against its learned bias (Fig. 7)."""

    norm: str
    """Qualified name of the final norm module."""
    feature_mean: np.ndarray
    """(C,) per-channel mean of the features entering the final norm."""
    feature_abs_mean: np.ndarray
    """(C,) per-channel mean of ``|x|``."""
    bias: np.ndarray
    """(C,) the final norm's learned bias."""
    pearson: float
    """Correlation of ``feature_mean`` with ``bias`` (signed; negative = compensating)."""
    pearson_abs: float
    """Correlation of ``|feature_mean|`` with ``|bias|`` (peaks aligned, either sign)."""
    feature_peaks: tuple[int, ...]
    """Channels with the largest ``|feature_mean|``, largest first."""
    bias_peaks: tuple[int, ...]
    """Channels with the largest ``|bias|``, largest first."""

    @property
    def peak_overlap(self) -> float:
        """Fraction of the top feature channels that are also top bias channels."""
        return len(set(self.feature_peaks) & set(self.bias_peaks)) / max(1, len(self.feature_peaks))

    def summary(self) -> dict[str, Any]:
        return {
            "norm": self.norm,
            "channels": int(self.bias.size),
            "pearson": self.pearson,
            "pearson_abs": self.pearson_abs,
            "feature_peaks": list(self.feature_peaks),
            "bias_peaks": list(self.bias_peaks),
            "peak_overlap": self.peak_overlap,
            "max_abs_feature_mean": float(np.abs(self.feature_mean).max()),
            "max_abs_bias": float(np.abs(self.bias).max()),
        }


def find_final_norm(model: nn.Module) -> tuple[str, nn.Module]:
    """The norm after the body: the top-level ``norm`` of SwinIR, HAT, DRCT and SRFormer."""
    net = _unwrap(model)
    norm = getattr(net, "norm", None)
    if not isinstance(norm, nn.Module):
        raise ValueError(
            f"{type(net).__name__} has no top-level 'norm' module (the final norm after the body)"
        )
    return "norm", norm


def _norm_bias(norm: nn.Module, name: str) -> Tensor:
    bias = getattr(norm, "bias", None)
    if bias is None and hasattr(norm, "bn"):  # irformer's BatchNorm wraps nn.BatchNorm1d
        bias = getattr(norm.bn, "bias", None)
    if not isinstance(bias, Tensor):
        raise ValueError(
            f"final norm {name!r} ({type(norm).__name__}) has no learned bias; the Fig. 7 "
            "analysis needs an affine final norm (ln, ln_star, iln, rms-free variants)"
        )
    return bias.detach().float().cpu()


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def final_norm_alignment(model: nn.Module, batch: Tensor, *, top_k: int = 5) -> BiasAlignment:
    """Per-channel features entering the final norm vs its bias, on ``batch`` (B, C, H, W)."""
    net = _unwrap(model)
    name, norm = find_final_norm(net)
    bias = _norm_bias(norm, name)
    captured: list[Tensor] = []

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach().float())

    handle = norm.register_forward_pre_hook(pre_hook)
    try:
        with _eval_no_grad(net):
            net(batch.to(_model_device(net)))
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"final norm {name!r} was not called in the forward pass")
    x = captured[-1]
    if x.dim() == 4:  # maps -> tokens
        x = x.flatten(2).transpose(1, 2)
    x = x.reshape(-1, x.shape[-1]).cpu()
    if x.shape[-1] != bias.numel():
        raise ValueError(
            f"final norm {name!r}: {x.shape[-1]} feature channels but a bias of {bias.numel()}"
        )
    feature_mean = x.mean(0).double().numpy()
    feature_abs = x.abs().mean(0).double().numpy()
    b = bias.double().numpy()
    k = min(top_k, b.size)
    return BiasAlignment(
        norm=name,
        feature_mean=feature_mean,
        feature_abs_mean=feature_abs,
        bias=b,
        pearson=_pearson(feature_mean, b),
        pearson_abs=_pearson(np.abs(feature_mean), np.abs(b)),
        feature_peaks=tuple(int(i) for i in np.argsort(-np.abs(feature_mean))[:k]),
        bias_peaks=tuple(int(i) for i in np.argsort(-np.abs(b))[:k]),
    )


# --------------------------------------------------------------------------- relative position bias


def rpe_tables(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every relative-position-bias table as ``(module name, (heads, S, S))`` images.

    Rows are vertical offsets ``dy``, columns horizontal offsets ``dx`` (the
    Swin index convention), so a convolution-like bias shows as a smooth blob.
    """
    net = _unwrap(model)
    tables = []
    for name, module in net.named_modules():
        table = getattr(module, "relative_position_bias_table", None)
        if not isinstance(table, Tensor) or table.dim() != 2:
            continue
        entries, heads = table.shape
        side = math.isqrt(entries)
        t = table.detach().float().cpu()
        if side * side == entries:
            images = t.T.reshape(heads, side, side)
        else:
            images = t.T.reshape(heads, 1, entries)
        tables.append((name, images))
    return tables


def rpe_smoothness(images: Tensor) -> Tensor:
    """Lag-1 spatial autocorrelation of each head's bias image, ``(heads,)``.

    About 0 for the random initial tables, near 1 for smooth, convolution-like
    ones: a number for what Fig. 9 shows by eye.
    """
    heads = images.shape[0]
    x = images.double().reshape(heads, images.shape[-2], images.shape[-1])
    pairs = []
    if x.shape[2] > 1:
        pairs.append(_paired_corr(x[:, :, 1:], x[:, :, :-1]))
    if x.shape[1] > 1:
        pairs.append(_paired_corr(x[:, 1:, :], x[:, :-1, :]))
    if not pairs:
        return torch.full((heads,), float("nan"))
    return torch.stack(pairs).mean(0).float()


def _paired_corr(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per head of two equally shaped (heads, h, w) stacks."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    denom = (a.square().sum(1) * b.square().sum(1)).sqrt().clamp_min(1e-300)
    return (a * b).sum(1) / denom


BUILTIN_IMAGES: tuple[str, ...] = ("astronaut", "coffee", "chelsea", "rocket")
"""Photos that scikit-image ships offline (CC0 / public domain): the default probe inputs."""


def builtin_probe_batch(*, count: int = 4, size: int = 48, scale: int = 1) -> Tensor:
    """Centre crops of scikit-image's bundled photos, as model inputs ``(count, 3, size, size)``.

    For SR (``scale`` > 1) a ``size * scale`` crop is reduced with MATLAB bicubic,
    so the probe sees LR-like content. Used when no ``--images`` folder is given.
    """
    import skimage.data

    from irformer.data.degradations import matlab_imresize
    from irformer.data.io import image_to_tensor

    if not 1 <= count <= len(BUILTIN_IMAGES):
        raise ValueError(f"count must be 1..{len(BUILTIN_IMAGES)} for the built-in images")
    tensors = []
    for name in BUILTIN_IMAGES[:count]:
        image = center_crop(getattr(skimage.data, name)(), size * scale)
        if image.shape[0] < size * scale or image.shape[1] < size * scale:
            raise ValueError(f"built-in image {name} is smaller than {size * scale} px")
        if scale > 1:
            image = matlab_imresize(image, 1.0 / scale)
        tensors.append(image_to_tensor(image))
    return torch.stack(tensors)
