"""Model cards for weight files, as model hubs and OpenModelDB present models.

``irformer models card CKPT`` writes Markdown with a YAML front matter (the
Hugging Face model-card convention; the field names of the front matter follow
OpenModelDB's model records where one exists: ``architecture``, ``scale``,
``inputChannels``, ``outputChannels``, ``size``, ``trainingIterations``,
``trainingBatchSize``, ``trainingHRSize``, ``dataset``, ``license``), then
sections for the model, training data and budget, metrics with the exact
evaluation command, fp16 safety, files and usage.

Nothing in a card is typed in by hand: architecture, norm, scale, task and
version come from the file's irformer metadata; parameter count, size and
SHA-256 from the file; training data and budget from the training config
(:func:`irformer.engine.config.load_config`); metrics from ``irformer eval
--out-json`` records; fp16 safety is measured now
(:func:`irformer.engine.fp16.measure_fp16_safety`, default probe). For the
shipped files the config and eval records are found by name
(``configs/reference/<stem>.yaml``, ``docs/reference/eval_<stem>.json``, relative
to a repository root); another file names them explicitly, and a card says
"not recorded" for what it was not given.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from irformer.tasks import TASK_TITLES

__all__ = ["CardSources", "find_card_sources", "model_card", "write_model_card"]

ARCH_TITLES: dict[str, str] = {
    "swinir": "SwinIR",
    "hat": "HAT",
    "drct": "DRCT",
    "srformer": "SRFormer",
}
NORM_TITLES: dict[str, str] = {
    "ln": "LayerNorm (as the original)",
    "iln": "i-LN (image-wise LayerNorm with input-adaptive rescaling, ICLR 2026)",
    "ln_star": "LN* (holistic LayerNorm without rescaling)",
}
CARD_DOC = "docs/reference/MODEL_CARD.md"
"""The narrative record of the reference runs (wall times, validation curves)."""


@dataclass(frozen=True)
class CardSources:
    """Where a card's training and evaluation facts come from."""

    config: Path | None = None
    """The training config (YAML) the weights came from."""
    evaluations: tuple[Path, ...] = field(default_factory=tuple)
    """``irformer eval --out-json`` records of these weights."""
    notes: Path | None = None
    """A document with the run's narrative (linked, not parsed)."""


def find_card_sources(weights: str | os.PathLike[str], root: str | os.PathLike[str]) -> CardSources:
    """The config, eval records and notes of a shipped file, found by its stem under ``root``.

    ``configs/reference/<stem>.yaml``, ``docs/reference/eval_<stem>*.json``,
    ``docs/reference/MODEL_CARD.md``; missing ones are left out.
    """
    root = Path(root)
    stem = Path(weights).stem
    config = root / "configs" / "reference" / f"{stem}.yaml"
    evaluations = sorted((root / "docs" / "reference").glob(f"eval_{stem}*.json"))
    notes = root / CARD_DOC
    return CardSources(
        config=config if config.is_file() else None,
        evaluations=tuple(e for e in evaluations if _own_records(e, stem, strict=True))
        or tuple(evaluations),
        notes=notes if notes.is_file() else None,
    )


def _eval_records(path: Path) -> list[dict[str, object]]:
    """An ``irformer eval --out-json`` file: one record, or a list (several noise levels or
    JPEG qualities, baseline rows)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not an irformer eval JSON record ({exc})") from exc
    records = data if isinstance(data, list) else [data]
    if not records or not all(
        isinstance(r, dict) and isinstance(r.get("benchmarks"), list) for r in records
    ):
        raise ValueError(f"{path}: not an irformer eval JSON record (no 'benchmarks' list)")
    return records


def _own_records(path: Path, stem: str, *, strict: bool = False) -> list[dict[str, object]]:
    """The records of ``path`` that measured ``stem`` (all of them when none names it,
    unless ``strict``): the baseline rows of a multi-level file are left out."""
    records = _eval_records(path)
    own = [r for r in records if r.get("model") == stem]
    return own if own or strict else records


def _level(record: Mapping[str, object]) -> str:
    """`` (sigma 15)`` / `` (quality 40)`` for DN / CAR records, empty otherwise."""
    if record.get("sigma") is not None:
        return f" (sigma {float(record['sigma']):g})"  # type: ignore[arg-type]
    if record.get("quality") is not None:
        return f" (quality {record['quality']})"
    return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return str(path)


def _license() -> str:
    from importlib import metadata

    try:
        text = metadata.metadata("irformer").get("License") or ""
    except metadata.PackageNotFoundError:
        text = ""
    return text.strip() or "see the irformer repository's licence"


_DEGRADED_ON_THE_FLY = {
    "sr": "LR (MATLAB bicubic)",
    "dn": "noisy inputs",
    "car": "JPEG inputs",
    "dr": "rainy inputs",
}
"""What the training stream makes from each clean patch, per task."""


def _eval_command(records: Sequence[Mapping[str, object]], weights: str, out_json: str) -> str:
    """The ``irformer eval`` command that wrote one file (all its levels)."""
    record = records[0]
    benches = ",".join(str(b["benchmark"]) for b in record["benchmarks"])  # type: ignore[index, union-attr]
    parts = ["irformer eval", f"--model {weights}", f"--task {record.get('task', 'sr')}"]
    if record.get("task", "sr") == "sr":
        parts.append(f"--scale {record.get('scale')}")
    for key in ("sigma", "quality"):
        levels = list(dict.fromkeys(r[key] for r in records if r.get(key) is not None))
        if levels:
            parts.append(f"--{key} " + ",".join(f"{v:g}" for v in levels))
    parts.append(f"--bench {benches} --data-root ../shared/data")
    if record.get("precision", "fp32") != "fp32":
        parts.append(f"--precision {record['precision']}")
    parts.append(f"--out-json {out_json}")
    return " ".join(parts)


def model_card(
    weights: str | os.PathLike[str],
    sources: CardSources | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
) -> str:
    """The Markdown card of a weights file (see the module docstring).

    ``root``: the repository root that relative paths in the card (the eval
    command, the sources) are written against.
    """
    from irformer.archs import describe_checkpoint, load_checkpoint_model
    from irformer.engine.config import load_config
    from irformer.engine.fp16 import measure_fp16_safety

    path = Path(weights)
    root_path = Path(root) if root is not None else None
    sources = sources or CardSources()
    info = describe_checkpoint(path)
    model, meta = load_checkpoint_model(path)
    if not info["meta"]:
        raise ValueError(
            f"{path} has no irformer metadata: a card needs the norm and task the file "
            "was trained with (official files: see their own model cards)"
        )
    verdict = measure_fp16_safety(model)
    arch = str(meta["arch"])
    norm = str(meta["norm"])
    scale = int(meta["scale"])  # type: ignore[arg-type]
    task = str(meta.get("task") or "sr")
    chans = int(getattr(model, "in_chans", 3))
    stem = path.stem
    shown = _relative(path, root_path)

    config = load_config(sources.config) if sources.config is not None else None
    evaluations = [(_own_records(p, stem), p) for p in sources.evaluations]

    front: dict[str, object] = {
        "name": stem,
        "license": _license(),
        "library_name": "irformer",
        "pipeline_tag": "image-to-image",
        "tags": [TASK_TITLES.get(task, task), ARCH_TITLES.get(arch, arch), norm],
        "architecture": ARCH_TITLES.get(arch, arch),
        "arch": arch,
        "preset": meta.get("preset"),
        "norm": norm,
        "scale": scale,
        "task": task,
        "inputChannels": chans,
        "outputChannels": chans,
        "parameters": int(info["parameters"]),
        "size": f"{path.stat().st_size / 1e6:.1f} MB",
        "sha256": _sha256(path),
        "irformer_version": meta.get("version"),
        **verdict.record(),
    }
    if config is not None:
        front |= {
            "trainingIterations": config.train.iters,
            "trainingBatchSize": config.data.batch_size,
            "trainingHRSize": config.data.patch_size,
            "dataset": [Path(d).name for d in config.data.train],
        }
    if evaluations:
        front["metrics"] = {
            f"{b['benchmark']}{_level(record)}": {
                "psnr": round(float(b["psnr"]), 2),
                "ssim": round(float(b["ssim"]), 4),
            }
            for records, _ in evaluations
            for record in records
            for b in record["benchmarks"]  # type: ignore[union-attr]
        }

    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    title = f"{ARCH_TITLES.get(arch, arch)} x{scale} {TASK_TITLES.get(task, task)}, {norm}"
    lines += [f"# {stem}: {title}", ""]
    lines += [
        f"`{shown}` -- {ARCH_TITLES.get(arch, arch)} (preset `{meta.get('preset')}`) with "
        f"{NORM_TITLES.get(norm, f'norm `{norm}`')}, {TASK_TITLES.get(task, task)}"
        + (f" x{scale}" if scale > 1 else "")
        + f", {chans}-channel input. Written by irformer {meta.get('version')}; the file's "
        "`irformer` metadata record names the norm, so irformer never loads it as another.",
        "",
        "## Model",
        "",
        "| field | value |",
        "|---|---|",
        f"| architecture | {ARCH_TITLES.get(arch, arch)} (`{arch}`, "
        f"preset `{meta.get('preset')}`) |",
        f"| normalisation | `{norm}` |",
        f"| scale / task | x{scale} / `{task}` |",
        f"| parameters | {int(info['parameters']):,} |",
        f"| file | {path.stat().st_size / 1e6:.1f} MB, sha256 `{front['sha256']}` |",
        f"| hyper-parameters | `{json.dumps(meta.get('model_kwargs'), sort_keys=True)}` |",
        "",
        "## Training data and budget",
        "",
    ]
    if config is not None:
        cfg_src = _relative(Path(sources.config), root_path)  # type: ignore[arg-type]
        warm = config.train.warm_start
        lines += [
            f"From `{cfg_src}`:",
            "",
            f"- data: {', '.join(f'`{d}`' for d in config.data.train)} "
            f"({config.data.task}, {_DEGRADED_ON_THE_FLY.get(config.data.task, 'inputs')} made "
            "on the fly)",
            f"- {config.train.iters:,} iterations x batch {config.data.batch_size} of "
            f"{config.data.patch_size}-px GT patches = "
            f"{config.train.iters * config.data.batch_size:,} patches",
            f"- Adam lr {config.train.lr:g}, scheduler {config.train.scheduler}, EMA "
            f"{config.train.ema}, {'bf16 autocast' if config.train.bf16 else 'fp32'}, seed "
            f"{config.train.seed}" + (f", warm start from `{warm}`" if warm else ""),
        ]
        if sources.notes is not None:
            lines.append(
                f"- hardware and wall time: CPU; see `{_relative(sources.notes, root_path)}`"
            )
    else:
        lines.append("Not recorded (no training config given to `irformer models card`).")
    lines += ["", "## Metrics", ""]
    if evaluations:
        lines += [
            "PSNR (dB) / SSIM as `irformer eval` computes them (MATLAB bicubic LR, "
            "Y channel with border crop for SR and deraining, RGB for DN/CAR):",
            "",
            "| benchmark | images | PSNR | SSIM |",
            "|---|---|---|---|",
        ]
        for records, _ in evaluations:
            for record in records:
                for b in record["benchmarks"]:  # type: ignore[union-attr]
                    lines.append(
                        f"| {b['benchmark']}{_level(record)} | {b.get('num_images', '?')} "
                        f"| {float(b['psnr']):.2f} | {float(b['ssim']):.4f} |"
                    )
        lines += ["", "Reproduce (from the repository root, benchmark data beside it):", ""]
        lines.append("```bash")
        for records, src in evaluations:
            lines.append(_eval_command(records, shown, _relative(src, root_path)))
        lines.append("```")
    else:
        lines.append("Not recorded (no `irformer eval --out-json` record given).")
    lines += [
        "",
        "## fp16 safety",
        "",
        f"`fp16_safe: {str(verdict.safe).lower()}` -- largest feature magnitude "
        f"{verdict.max_abs:.4g} at `{verdict.layer}`, against the limit 65504 / "
        f"{65504 / verdict.threshold:g} = {verdict.threshold:.0f}. Measured by "
        f"`irformer models card` ({verdict.probe}). "
        + (
            "fp16 inference is expected to stay finite."
            if verdict.safe
            else "fp16 inference would overflow (NaN/inf pixels): irformer refuses fp16 for "
            "this model or falls back to bf16 (`--fp16-unsafe bf16`)."
        ),
        "",
        "## Use",
        "",
        "```bash",
        f"irformer restore photo.png -o out/ --model {shown}",
        f"irformer models export {shown} {stem}.onnx        # ONNX, dynamic size",
        "```",
        "",
        "## Licence",
        "",
        f"{front['license']} (the irformer repository's licence). Training data: see the "
        "data folders' own licences.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    weights: str | os.PathLike[str],
    out: str | os.PathLike[str],
    sources: CardSources | None = None,
    *,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Write :func:`model_card` to ``out`` atomically."""
    from irformer.files import atomic_write

    return atomic_write(out, model_card(weights, sources, root=root))
