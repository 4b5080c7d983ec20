"""Controlled studies: one model, several settings, one table (i-LN Table 1, Figs. 2, 4).

A study is a list of :class:`StudyRun` (a label and a full training config)
that differ in one thing only: the norm (:func:`norm_variants`) or the depth
and width (:func:`scale_variants`). Each run trains with the ordinary trainer
(same seed, data stream and budget), a :class:`~irformer.analysis.probes.FeatureProbe`
hook records the per-block magnitude and entropy, and the final weights are
scored on the benchmarks. BatchNorm runs are scored twice: with running
statistics (eval mode) and with batch statistics (the paper's "train mode").

Results land in ``OUT/<label>/`` (the run folder, with ``features.jsonl`` and
``result.json``) and in ``OUT/table.md``, ``table.csv``, ``summary.json`` plus
the overlaid figures. A study can be resumed: finished runs (with a
``result.json``) are skipped.

An experiment (:mod:`irformer.experiments`): it orchestrates the trainer,
the probes and the evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from irformer.analysis.plots import (
    has_metric,
    plot_bars,
    plot_final_entropies,
    plot_per_block_curves,
    plot_run_overlay,
    reduce_over_blocks,
)
from irformer.analysis.probes import FEATURES_FILE, FeatureProbe, read_feature_records
from irformer.analysis.readout import (
    SAME_BALANCE_NATS,
    LayerReadout,
    entropy_contrast,
    entropy_verdict,
    layer_readout,
)
from irformer.engine.config import Config
from irformer.engine.data import probe_batch_for
from irformer.errors import IrformerError
from irformer.files import atomic_write
from irformer.norms import NORM_NAMES, set_batchnorm_eval_mode

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"


class StudyExistsError(IrformerError, FileExistsError, ValueError):
    """The study's run folder already exists and ``resume`` was not asked for."""


@dataclass(frozen=True)
class StudyRun:
    """One training run of a study."""

    label: str
    config: Config
    norm: str
    params: dict[str, Any] = field(default_factory=dict)
    """What distinguishes this run (e.g. ``{"depth": 4, "width": 60}``), for the table."""


@dataclass
class RunResult:
    """What one run of a study measured."""

    label: str
    norm: str
    run_dir: str
    params: dict[str, Any]
    num_parameters: int
    iters_planned: int
    iters_done: int
    diverged: bool
    divergence: str
    """Why the run stopped early ('' when it finished)."""
    final_loss: float
    train_seconds: float
    probe_seconds: float
    probe_calls: int
    max_sq_mean: float
    """Max over probes and blocks of the mean square, mean of x^2 (the paper's "feature
    magnitude"; RMS squared)."""
    max_abs: float
    """Max over probes and blocks of |x|."""
    final_sq_mean: float
    """Max over blocks of the mean of x^2 at the last probe."""
    final_entropy: float
    """Mean over Transformer layers of the Algorithm-1 channel entropy at the last probe
    (scale dependent: see :mod:`irformer.analysis.probes`)."""
    metrics: dict[str, float]
    """``"Set5/psnr"`` etc. of the final weights (BN: running statistics)."""
    metrics_batch_stats: dict[str, float] | None = None
    """BN only: the same with batch statistics at test time."""
    final_balance_entropy: float = math.nan
    """Mean over Transformer layers of the scale-invariant channel balance entropy at the
    last probe (NaN in results written before it was recorded)."""

    @property
    def probe_overhead(self) -> float:
        """Probe time as a fraction of the training time (which includes it)."""
        return self.probe_seconds / self.train_seconds if self.train_seconds > 0 else math.nan


# --------------------------------------------------------------------------- building runs


def _with(cfg: Config, section: str, **changes: Any) -> Config:
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)}
    )


def study_config(
    base: Config, *, label: str, out_dir: Path, iters: int, probe_interval: int, eval_ema: bool
) -> Config:
    """``base`` with the study's budget and run folder; periodic validation off.

    EMA is switched off unless ``eval_ema``: at a budget of a few hundred
    iterations an EMA of 0.999 still weighs the initial weights by ~0.999^iters.
    """
    cfg = dataclasses.replace(base, name=f"{base.name}-{label}")
    cfg = _with(cfg, "train", iters=iters, ema=base.train.ema if eval_ema else 0.0)
    cfg = _with(
        cfg,
        "log",
        out_dir=str(out_dir / label),
        probe_interval=probe_interval,
        checkpoint_every=max(iters, 1),
        keep_last=1,
    )
    return _with(cfg, "val", every=0)


def norm_variants(
    base: Config,
    norms: Sequence[str],
    *,
    iters: int,
    out_dir: str | Path,
    probe_interval: int,
    eval_ema: bool = False,
) -> list[StudyRun]:
    """The same config once per norm (the paper's Table 1 / Fig. 4 set)."""
    unknown = [n for n in norms if n not in NORM_NAMES]
    if unknown:
        raise ValueError(f"unknown norms {unknown}; valid: {', '.join(NORM_NAMES)}")
    if len(set(norms)) != len(norms):
        raise ValueError(f"norms listed twice in {list(norms)}")
    out = Path(out_dir)
    runs = []
    for norm in norms:
        cfg = study_config(
            base,
            label=norm,
            out_dir=out,
            iters=iters,
            probe_interval=probe_interval,
            eval_ema=eval_ema,
        )
        runs.append(StudyRun(norm, _with(cfg, "model", norm=norm), norm, {"norm": norm}))
    return runs


def scale_variants(
    base: Config,
    *,
    depths: Sequence[int] = (),
    widths: Sequence[int] = (),
    norms: Sequence[str] = ("ln",),
    iters: int,
    out_dir: str | Path,
    probe_interval: int,
    eval_ema: bool = False,
) -> list[StudyRun]:
    """Depth (Transformer blocks per group) x width (``embed_dim``) x norm (Fig. 2a-b).

    Depth sets every entry of the preset's ``depths``; width sets ``embed_dim``
    (it must stay divisible by the heads). An empty list keeps the base value.
    """
    from irformer.archs.registry import resolve

    spec, _, preset = resolve(base.model.arch)
    kwargs = {**spec.defaults(), **preset, **base.model.overrides}
    groups = kwargs.get("depths")
    if depths and not isinstance(groups, list | tuple):
        raise ValueError(f"model {base.model.arch!r} has no 'depths' to vary")
    out = Path(out_dir)
    runs = []
    for norm in norms:
        if norm not in NORM_NAMES:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORM_NAMES)}")
        for depth in depths or (None,):
            for width in widths or (None,):
                overrides = dict(base.model.overrides)
                params: dict[str, Any] = {"norm": norm}
                parts = [norm]
                if depth is not None:
                    overrides["depths"] = [int(depth)] * len(groups)  # type: ignore[arg-type]
                    params["depth"] = int(depth)
                    parts.append(f"d{depth}")
                if width is not None:
                    overrides["embed_dim"] = int(width)
                    params["width"] = int(width)
                    parts.append(f"w{width}")
                label = "-".join(parts)
                cfg = study_config(
                    base,
                    label=label,
                    out_dir=out,
                    iters=iters,
                    probe_interval=probe_interval,
                    eval_ema=eval_ema,
                )
                cfg = _with(cfg, "model", norm=norm, overrides=overrides)
                runs.append(StudyRun(label, cfg, norm, params))
    return runs


# --------------------------------------------------------------------------- running


def run_study(
    runs: Sequence[StudyRun],
    *,
    out_dir: str | Path,
    benchmarks: Sequence[str],
    data_root: str | Path | None = None,
    probe_count: int = 4,
    resume: bool = False,
    device: str | None = None,
    progress: Callable[[Any], None] | None = None,
) -> list[RunResult]:
    """Train and score every run in turn; finished runs are reused when ``resume``.

    Without ``resume`` an existing run folder is an error (nothing is deleted
    silently). ``data_root`` defaults to the base config's ``val.root``.
    """
    if not runs:
        raise ValueError("a study needs at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch = probe_batch_for(runs[0].config, count=probe_count)
    results = []
    for run in runs:
        run_dir = Path(run.config.log.out_dir)
        done = run_dir / RESULT_FILE
        if resume and done.is_file():
            logger.info("%s: finished earlier, reusing %s", run.label, done)
            results.append(RunResult(**json.loads(done.read_text())))
            continue
        if run_dir.exists() and any(run_dir.iterdir()):
            if not resume:
                raise StudyExistsError(
                    f"run folder {run_dir} exists; pass resume=True (--resume) to reuse finished "
                    "runs and redo unfinished ones, or choose another output folder"
                )
            shutil.rmtree(run_dir)  # an unfinished run of this study: start it again
        result = train_and_score(
            run,
            probe_batch=batch,
            benchmarks=benchmarks,
            data_root=data_root or run.config.val.root,
            device=device,
            progress=progress,
        )
        atomic_write(done, json.dumps(dataclasses.asdict(result), indent=1))
        results.append(result)
    return results


def train_and_score(
    run: StudyRun,
    *,
    probe_batch: Tensor,
    benchmarks: Sequence[str],
    data_root: str | Path,
    device: str | None = None,
    progress: Callable[[Any], None] | None = None,
) -> RunResult:
    """Train one run with the feature probe attached, then evaluate its final weights."""
    from irformer.engine.train import NonFiniteLossError, build_network, seed_everything, train

    cfg = run.config
    run_dir = Path(cfg.log.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = FeatureProbe(probe_batch, out_path=run_dir / FEATURES_FILE)
    # Build exactly as the trainer would (same seed), so the probe sees the
    # initial weights as iteration 0.
    seed_everything(cfg.train.seed)
    model = build_network(cfg)
    if device is not None:
        model.to(device)
    # The clock starts before the iteration-0 probe: probe_seconds counts it, so
    # train_seconds must too (else the overhead fraction can exceed 1 on short runs).
    start = time.perf_counter()
    probe.record(model, 0)
    diverged, reason, final_loss = False, "", math.nan
    last_iter = [0]

    def track(state: Any) -> None:
        last_iter[0] = state.iteration
        if progress is not None:
            progress(state)

    try:
        state = train(cfg, model=model, hooks=[probe], progress=track, device=device)
        final_loss = state.loss
        eval_model = state.eval_model
    except NonFiniteLossError as exc:
        diverged, reason = True, str(exc)
        eval_model = model
        logger.warning("%s diverged: %s", run.label, exc)
    iters_done = last_iter[0]
    train_seconds = time.perf_counter() - start
    if not diverged:
        final_loss = _last_logged_loss(run_dir, final_loss)

    records = read_feature_records(run_dir / FEATURES_FILE)
    finite = all(math.isfinite(r["sq_mean"]) and math.isfinite(r["max_abs"]) for r in records)
    if not finite and not diverged:
        diverged, reason = True, "non-finite features in the probe records"
    last_probe = max(r["iter"] for r in records)
    last = [r for r in records if r["iter"] == last_probe]
    layers = [r for r in last if r.get("kind") == "layer"] or last

    metrics: dict[str, float] = {}
    metrics_bs: dict[str, float] | None = None
    if not diverged:
        metrics = score(eval_model, cfg, benchmarks, data_root, device)
        if set_batchnorm_eval_mode(eval_model, use_batch_stats=True):
            metrics_bs = score(eval_model, cfg, benchmarks, data_root, device)
            set_batchnorm_eval_mode(eval_model, use_batch_stats=False)
    return RunResult(
        label=run.label,
        norm=run.norm,
        run_dir=str(run_dir),
        params=dict(run.params),
        num_parameters=sum(p.numel() for p in model.parameters()),
        iters_planned=cfg.train.iters,
        iters_done=iters_done,
        diverged=diverged,
        divergence=reason,
        final_loss=final_loss,
        train_seconds=train_seconds,
        probe_seconds=probe.elapsed_s,
        probe_calls=probe.calls,
        max_sq_mean=max(r["sq_mean"] for r in records),
        max_abs=max(r["max_abs"] for r in records),
        final_sq_mean=max(r["sq_mean"] for r in last),
        final_entropy=sum(r["entropy"] for r in layers) / len(layers),
        metrics=metrics,
        metrics_batch_stats=metrics_bs,
        final_balance_entropy=_layer_mean(layers, "balance_entropy"),
    )


def _layer_mean(records: Sequence[dict[str, Any]], metric: str) -> float:
    """Mean of ``metric`` over ``records``; NaN when the records predate the metric."""
    values = [float(r[metric]) for r in records if metric in r]
    return sum(values) / len(values) if values else math.nan


def score(
    model: nn.Module,
    cfg: Config,
    benchmarks: Sequence[str],
    data_root: str | Path,
    device: str | None,
) -> dict[str, float]:
    """``{"Set5/psnr": .., "Set5/ssim": ..}`` with :func:`irformer.engine.evaluate.evaluate`."""
    from irformer.engine.evaluate import evaluate

    if not benchmarks:
        return {}
    result = evaluate(
        model,
        task=cfg.data.task,
        benchmarks=benchmarks,
        data_root=data_root,
        scale=cfg.model.scale,
        sigma=cfg.data.sigma,
        quality=cfg.data.quality,
        device=device or "auto",
        seed=cfg.train.seed,
    )
    out = {}
    for bench in result.benchmarks:
        out[f"{bench.benchmark}/psnr"] = bench.psnr
        out[f"{bench.benchmark}/ssim"] = bench.ssim
    return out


def _metric_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _last_logged_loss(run_dir: Path, default: float) -> float:
    losses = [r["loss"] for r in _metric_records(run_dir) if "loss" in r]
    return float(losses[-1]) if losses else default


# --------------------------------------------------------------------------- reporting


def _fmt(value: float, spec: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, spec)


def table_rows(results: Sequence[RunResult], benchmarks: Sequence[str]) -> list[dict[str, str]]:
    """One row per run (two for BatchNorm: running and batch statistics)."""
    from irformer.data.benchmarks import benchmark_label, split_benchmark_list

    labels = [benchmark_label(b) for b in split_benchmark_list(benchmarks)]
    rows = []
    for r in results:
        variants = [("", r.metrics)]
        if r.metrics_batch_stats is not None:
            variants = [(" (eval)", r.metrics), (" (train-mode stats)", r.metrics_batch_stats)]
        for suffix, metrics in variants:
            row = {"run": r.label + suffix}
            for key, value in r.params.items():
                if key != "norm":
                    row[key] = str(value)
            for b in labels:
                row[f"{b} PSNR"] = _fmt(metrics.get(f"{b}/psnr", math.nan), ".2f")
                row[f"{b} SSIM"] = _fmt(metrics.get(f"{b}/ssim", math.nan), ".4f")
            row.update(
                {
                    "max mean x²": _fmt(r.max_sq_mean, ".3g"),
                    "max |x|": _fmt(r.max_abs, ".3g"),
                    "final entropy (Alg. 1)": _fmt(r.final_entropy, ".3f"),
                    "final balance entropy": _fmt(r.final_balance_entropy, ".3f"),
                    "final loss": _fmt(r.final_loss, ".4f"),
                    "iters": f"{r.iters_done}/{r.iters_planned}",
                    "diverged": "yes" if r.diverged else "no",
                    "probe overhead": _fmt(100 * r.probe_overhead, ".1f") + "%",
                }
            )
            rows.append(row)
    return rows


ENTROPY_REFERENCE = "iln"
"""The norm every other run's channel entropies are read against in a study report."""


def entropy_reading(
    results: Sequence[RunResult], *, reference: str = ENTROPY_REFERENCE
) -> list[str]:
    """Markdown lines reading each run's end-of-training channel entropies against the
    ``reference`` norm's: both entropies, the effective channel count, the two gaps
    and :func:`~irformer.analysis.readout.entropy_verdict`, then the ``ln`` vs
    ``reference`` paragraph of :func:`~irformer.analysis.readout.entropy_contrast`.

    Why: Algorithm 1 alone credits a norm with small features (i-LN) with balanced
    channels whatever its channel profile; the report of the study itself says
    whether the scale-free balance agrees, so the finding comes out of the one
    command that ran the study. Readouts come from each run's ``features.jsonl``
    (Transformer layers at the last probe; the result fields when the file is gone).
    Empty when no run uses ``reference``.
    """
    ref = next((r for r in results if r.norm == reference and not r.diverged), None)
    if ref is None:
        return []
    readouts: dict[str, LayerReadout] = {r.label: _readout(r) for r in results}
    base = readouts[ref.label]
    channels = _feature_channels(results)
    top = f" of {channels}" if channels else ""
    lines = [
        f"Channel entropies at the last probe, mean over Transformer layers, read against "
        f"{ref.label} (gap = {ref.label} minus the run; the balance entropy is scale free, "
        f"Algorithm 1 is not; exp(balance) = effective channels{top}):",
        "",
        "| run | max layer mean x² | Alg. 1 entropy | balance entropy | effective channels "
        f"| Alg. 1 gap to {ref.label} | balance gap to {ref.label} | reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    words = {
        "same": "same balance: Alg. 1's gap is the scale",
        "reversed": "balance reverses Alg. 1",
        "mostly scale": "mostly the scale",
        "confirmed": "balance confirms Alg. 1",
        "unknown": "balance not recorded",
    }
    for r in results:
        mine = readouts[r.label]
        is_ref = r.label == ref.label
        cells = [
            r.label,
            _fmt(mine.max_sq_mean, ".3g"),
            _fmt(mine.entropy, ".3f"),
            _fmt(mine.balance_entropy, ".3f"),
            _fmt(mine.effective_channels, ".1f") if math.isfinite(mine.balance_entropy) else "—",
            "—" if is_ref else _fmt(base.entropy - mine.entropy, "+.3f"),
            "—" if is_ref else _fmt(base.balance_entropy - mine.balance_entropy, "+.3f"),
            "(reference)" if is_ref else _reading(r, mine, base, words),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ln = next((r for r in results if r.norm == "ln" and not r.diverged), None)
    if ln is not None and channels:
        lines += [
            "",
            entropy_contrast(ln.label, readouts[ln.label], ref.label, base, channels=channels),
        ]
    return lines


def _reading(
    result: RunResult, mine: LayerReadout, reference: LayerReadout, words: dict[str, str]
) -> str:
    if result.diverged:
        return "diverged"
    verdict = entropy_verdict(mine, reference)
    if verdict == "same" and abs(reference.entropy - mine.entropy) < SAME_BALANCE_NATS:
        return "same on both"
    return words[verdict]


def _readout(result: RunResult) -> LayerReadout:
    """:class:`~irformer.analysis.readout.LayerReadout` of a run's last probe."""
    path = Path(result.run_dir) / FEATURES_FILE
    if path.is_file():
        return layer_readout(read_feature_records(path))
    return LayerReadout(
        iteration=result.iters_done,
        max_sq_mean=result.final_sq_mean,
        entropy=result.final_entropy,
        balance_entropy=result.final_balance_entropy,
    )


def _feature_channels(results: Sequence[RunResult]) -> int | None:
    """The residual stream's channel count C (entropy maximum log C), from the first run
    folder's ``config.yaml``: the width of ``conv_first``, which every architecture has."""
    from irformer.engine.config import load_config
    from irformer.engine.train import build_network

    for r in results:
        path = Path(r.run_dir) / "config.yaml"
        if path.is_file():
            conv = getattr(build_network(load_config(path)), "conv_first", None)
            return int(conv.out_channels) if isinstance(conv, nn.Conv2d) else None
    return None


def write_study_report(
    results: Sequence[RunResult],
    out_dir: str | Path,
    *,
    benchmarks: Sequence[str],
    title: str,
    command: str = "",
) -> dict[str, Path]:
    """``table.md``, ``table.csv``, ``summary.json`` and the overlaid figures in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(results, benchmarks)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    paths: dict[str, Path] = {}

    lines = [f"# {title}", ""]
    if command:
        lines += ["```", command, "```", ""]
    # "max |x|": a bare pipe inside a cell would split the Markdown column
    header = [c.replace("|", "\\|") for c in columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "") for c in columns) + " |" for row in rows]
    lines.append("")
    for r in results:
        if r.diverged:
            lines.append(f"- {r.label}: {r.divergence}")
    reading = entropy_reading(results)
    if reading:
        lines += ["", *reading]
    paths["table.md"] = out / "table.md"
    atomic_write(paths["table.md"], "\n".join(lines) + "\n")

    paths["table.csv"] = out / "table.csv"
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(paths["table.csv"], buffer.getvalue())

    paths["summary.json"] = out / "summary.json"
    atomic_write(
        paths["summary.json"],
        json.dumps(
            {"title": title, "command": command, "runs": [dataclasses.asdict(r) for r in results]},
            indent=1,
        ),
    )
    paths.update(write_study_plots(results, out))
    return paths


def write_study_plots(results: Sequence[RunResult], out_dir: str | Path) -> dict[str, Path]:
    """Overlaid magnitude/entropy curves, per-block curves and final bars of a study.

    Both channel entropies are drawn: Algorithm 1 (``entropy*.png``) and the
    scale-invariant balance (``balance_entropy*.png``, for runs that recorded it),
    and ``final_entropies.png`` puts their final values side by side (Fig. 8).
    """
    out = Path(out_dir)
    runs = {}
    for r in results:
        try:
            runs[r.label] = read_feature_records(Path(r.run_dir) / FEATURES_FILE)
        except FileNotFoundError:
            logger.warning("%s: no feature records, left out of the figures", r.label)
    if not runs:
        return {}
    paths = {
        "magnitude.png": plot_run_overlay(runs, out / "magnitude.png", metric="sq_mean"),
        "max_abs.png": plot_run_overlay(runs, out / "max_abs.png", metric="max_abs"),
        "entropy.png": plot_run_overlay(
            runs, out / "entropy.png", metric="entropy", how="mean", kind="layer"
        ),
        "magnitude_per_block.png": plot_per_block_curves(runs, out / "magnitude_per_block.png"),
        "entropy_per_block.png": plot_per_block_curves(
            runs, out / "entropy_per_block.png", metric="entropy"
        ),
    }
    balanced = {label: recs for label, recs in runs.items() if has_metric(recs, "balance_entropy")}
    if balanced:
        paths["balance_entropy.png"] = plot_run_overlay(
            balanced,
            out / "balance_entropy.png",
            metric="balance_entropy",
            how="mean",
            kind="layer",
        )
        paths["balance_entropy_per_block.png"] = plot_per_block_curves(
            balanced, out / "balance_entropy_per_block.png", metric="balance_entropy"
        )
    final_entropy = {r.label: r.final_entropy for r in results}
    paths["final_entropy.png"] = plot_bars(
        final_entropy,
        out / "final_entropy.png",
        ylabel="Alg. 1 channel entropy at the end (nats)",
        log=False,
    )
    paths["final_entropies.png"] = plot_final_entropies(
        final_entropy,
        {r.label: r.final_balance_entropy for r in results},
        out / "final_entropies.png",
        title="channel entropy at the end, mean over Transformer layers",
    )
    final_mag = {
        label: float(reduce_over_blocks(recs, "sq_mean", "max")[1].max())
        for label, recs in runs.items()
    }
    paths["max_magnitude.png"] = plot_bars(
        final_mag, out / "max_magnitude.png", ylabel="max over training of mean square $x^2$"
    )
    return paths
