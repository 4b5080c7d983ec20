"""Figures for the probe results (i-LN paper Figs. 1, 2, 4, 7, 8, 9).

Everything draws on :class:`matplotlib.figure.Figure` with the Agg canvas (no
pyplot global state, no display needed) and writes a PNG. Inputs are the plain
records the probes produce, so figures can be redrawn from ``features.jsonl``
files long after training.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from irformer.analysis.probes import BiasAlignment, BlockStats, rpe_smoothness
from irformer.files import atomic_write

DPI = 120
KIND_COLOURS = {"layer": "tab:blue", "group": "tab:orange"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    fmt = path.suffix.lstrip(".") or "png"
    return atomic_write(path, lambda handle: fig.savefig(handle, dpi=DPI, format=fmt))


def _short(name: str) -> str:
    """``layers.0.residual_group.blocks.3`` -> ``L0.b3``: readable tick labels."""
    parts = name.split(".")
    out = []
    for i, p in enumerate(parts):
        if p.isdigit() and i > 0:
            prev = parts[i - 1]
            out.append(("L" if prev == "layers" else "b" if prev == "blocks" else prev[:1]) + p)
    return ".".join(out) if out else name


# --------------------------------------------------------------------------- one checkpoint


def plot_block_stats(stats: Sequence[BlockStats], path: str | Path, *, title: str = "") -> Path:
    """Per-block mean square (bars, log axis; ``max|x|`` as dots) and both channel
    entropies (lines: Algorithm 1 and the scale-invariant balance)."""
    if not stats:
        raise ValueError("no block statistics to plot")
    fig = Figure(figsize=(max(6.0, 0.25 * len(stats) + 2), 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(stats))
    colours = [KIND_COLOURS.get(s.kind, "tab:gray") for s in stats]
    ax.bar(x, [max(s.sq_mean, 1e-30) for s in stats], color=colours, label="mean square $x^2$")
    ax.plot(x, [s.max_abs for s in stats], "k.", label="max |x|")
    ax.set_yscale("log")
    ax.set_ylabel("feature magnitude")
    ax.set_xticks(x, [_short(s.block) for s in stats], rotation=90, fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(x, [s.entropy for s in stats], "-o", color="tab:red", ms=3, label="Alg. 1 entropy")
    ax2.plot(
        x,
        [s.balance_entropy for s in stats],
        "--s",
        color="tab:purple",
        ms=3,
        label="balance entropy (scale-free)",
    )
    ax2.set_ylabel("channel entropy (nats)", color="tab:red")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=7, loc="upper left")
    ax.set_title(title or "per-block feature statistics (blue: layers, orange: groups)")
    return _save(fig, path)


# --------------------------------------------------------------------------- over training


def records_by_block(
    records: Sequence[Mapping[str, Any]], metric: str, *, kind: str | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``block -> (iterations, values)`` of one metric, in block order of first appearance.

    Records without ``metric`` (files written before it was recorded) are skipped.
    """
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        if kind is not None and rec.get("kind", kind) != kind:
            continue
        if metric not in rec:
            continue
        series[rec["block"]].append((int(rec["iter"]), float(rec[metric])))
    out = {}
    for block, pairs in series.items():
        pairs.sort()
        out[block] = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    return out


def reduce_over_blocks(
    records: Sequence[Mapping[str, Any]],
    metric: str,
    how: str = "max",
    *,
    kind: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per iteration, the max (or mean) of ``metric`` over all blocks (or those of one kind).

    Records without ``metric`` are skipped (empty arrays if none has it).
    """
    per_iter: dict[int, list[float]] = defaultdict(list)
    for rec in records:
        if kind is not None and rec.get("kind", kind) != kind:
            continue
        if metric not in rec:
            continue
        per_iter[int(rec["iter"])].append(float(rec[metric]))
    iters = np.array(sorted(per_iter))
    fn = {"max": np.max, "mean": np.mean, "min": np.min}.get(how)
    if fn is None:
        raise ValueError(f"how must be 'max', 'mean' or 'min', got {how!r}")
    return iters, np.array([fn(per_iter[i]) for i in iters], dtype=float)


def has_metric(records: Sequence[Mapping[str, Any]], metric: str) -> bool:
    """Whether any record carries ``metric`` (old ``features.jsonl`` lack ``balance_entropy``)."""
    return any(metric in rec for rec in records)


def plot_per_block_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    metric: str = "sq_mean",
    kind: str = "layer",
    sharey: bool = True,
) -> Path:
    """One panel per run: ``metric`` of every block vs iteration, coloured by depth (Fig. 1a).

    ``sharey`` gives every panel the same y range, so runs compare at a glance
    (per-panel ranges would blow a 0.01-nat wiggle up to full height).
    """
    if not runs:
        raise ValueError("no runs to plot")
    n = len(runs)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    log = metric in ("sq_mean", "max_abs")
    first = None
    for i, (label, records) in enumerate(runs.items()):
        ax = fig.add_subplot(rows, cols, i + 1, sharey=first if sharey else None)
        first = first or ax
        series = records_by_block(records, metric, kind=kind) or records_by_block(records, metric)
        cmap = _colormap("viridis")
        for j, (_, (it, val)) in enumerate(series.items()):
            ax.plot(it, val, color=cmap(j / max(1, len(series) - 1)), lw=1)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{label} ({len(series)} {kind}s, dark = shallow)", fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel(_METRIC_LABELS.get(metric, metric))
    return _save(fig, path)


def plot_run_overlay(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    metric: str = "sq_mean",
    how: str = "max",
    kind: str | None = None,
) -> Path:
    """Several runs overlaid: per iteration the max/mean of ``metric`` over blocks (Figs. 2, 4).

    ``kind`` restricts the blocks to Transformer ``layer``s or residual ``group``s.
    """
    if not runs:
        raise ValueError("no runs to plot")
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for label, records in runs.items():
        it, val = reduce_over_blocks(records, metric, how, kind=kind)
        ax.plot(it, val, "-o", ms=2, lw=1.2, label=label)
    if metric in ("sq_mean", "max_abs"):
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    blocks = {"layer": "layers", "group": "groups"}.get(kind or "", "blocks")
    ax.set_ylabel(f"{how} over {blocks} of {_METRIC_LABELS.get(metric, metric)}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


_METRIC_LABELS = {
    "sq_mean": "mean square $x^2$",
    "max_abs": "max |x|",
    "entropy": "Alg. 1 channel entropy (nats)",
    "balance_entropy": "channel balance entropy (nats, scale-free)",
}


def _colormap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]


def plot_bars(
    values: Mapping[str, float], path: str | Path, *, ylabel: str, log: bool = True, title: str = ""
) -> Path:
    """One bar per configuration, e.g. final channel entropy per norm (Fig. 8)."""
    if not values:
        raise ValueError("no values to plot")
    fig = Figure(figsize=(max(4.0, 0.7 * len(values) + 1.5), 3.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    labels = list(values)
    heights = [values[k] for k in labels]
    finite = [h if math.isfinite(h) else 0.0 for h in heights]
    ax.bar(range(len(labels)), [max(h, 1e-30) if log else h for h in finite], color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    for i, h in enumerate(heights):
        ax.annotate(f"{h:.3g}", (i, max(finite[i], 1e-30)), ha="center", va="bottom", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_final_entropies(
    alg1: Mapping[str, float],
    balance: Mapping[str, float],
    path: str | Path,
    *,
    channels: int | None = None,
    title: str = "",
) -> Path:
    """Both channel entropies per configuration, side by side (Fig. 8 with the
    scale-invariant measure beside the paper's). ``channels`` draws ``log C``."""
    labels = list(dict.fromkeys([*alg1, *balance]))
    if not labels:
        raise ValueError("no values to plot")
    fig = Figure(figsize=(max(4.5, 0.9 * len(labels) + 2.0), 3.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(labels))
    width = 0.38
    for offset, values, colour, name in (
        (-width / 2, alg1, "tab:red", "Alg. 1 (softmax of mean |x|)"),
        (width / 2, balance, "tab:purple", "balance (mean |x| / sum, scale-free)"),
    ):
        heights = [float(values.get(k, math.nan)) for k in labels]
        shown = [h if math.isfinite(h) else 0.0 for h in heights]
        ax.bar(pos + offset, shown, width, color=colour, label=name)
        for i, h in enumerate(heights):
            ax.annotate(
                f"{h:.3f}", (pos[i] + offset, shown[i]), ha="center", va="bottom", fontsize=6
            )
    if channels:
        ax.axhline(math.log(channels), color="gray", ls="--", lw=0.8, label=f"log {channels}")
    ax.set_xticks(pos, labels, rotation=30, ha="right")
    ax.set_ylabel("channel entropy at the end (nats)")
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- Fig. 7 and Fig. 9


def plot_bias_alignment(alignment: BiasAlignment, path: str | Path, *, title: str = "") -> Path:
    """Feature mean per channel above the final norm's bias, plus their scatter (Fig. 7)."""
    c = np.arange(alignment.bias.size)
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    ax1 = fig.add_subplot(grid[0, :2])
    ax1.bar(c, alignment.feature_mean, color="tab:blue", width=0.9)
    ax1.set_ylabel("feature mean")
    ax1.set_title(title or f"input of final norm '{alignment.norm}' vs its learned bias")
    ax2 = fig.add_subplot(grid[1, :2], sharex=ax1)
    ax2.bar(c, alignment.bias, color="tab:red", width=0.9)
    ax2.set_ylabel("affine bias")
    ax2.set_xlabel("channel index")
    for ch in alignment.feature_peaks[:3]:
        for ax in (ax1, ax2):
            ax.axvline(ch, color="gray", ls=":", lw=0.8)
    ax3 = fig.add_subplot(grid[:, 2])
    ax3.scatter(alignment.feature_mean, alignment.bias, s=8)
    ax3.set_xlabel("feature mean")
    ax3.set_ylabel("bias")
    ax3.set_title(f"r = {alignment.pearson:.2f}, r(|.|) = {alignment.pearson_abs:.2f}", fontsize=9)
    return _save(fig, path)


def plot_rpe(tables: Sequence[tuple[str, Tensor]], path: str | Path, *, max_rows: int = 8) -> Path:
    """Relative position bias per head as images: one row per attention module (Fig. 9)."""
    if not tables:
        raise ValueError("model has no relative position bias tables")
    step = max(1, math.ceil(len(tables) / max_rows))
    shown = list(tables)[::step]
    cols = max(images.shape[0] for _, images in shown)
    fig = Figure(figsize=(1.3 * cols + 1.0, 1.4 * len(shown) + 0.3), layout="constrained")
    for r, (name, images) in enumerate(shown):
        smooth = rpe_smoothness(images).tolist()
        for h in range(images.shape[0]):
            ax = fig.add_subplot(len(shown), cols, r * cols + h + 1)
            img = images[h].numpy()
            lim = float(np.abs(img).max()) or 1.0  # symmetric: white is a zero bias
            ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"h{h} s={smooth[h]:.2f}", fontsize=6)
            if h == 0:
                ax.set_ylabel(_short(name), fontsize=6)
    return _save(fig, path)
