"""The model zoo: what ``--model NAME`` means, for every command.

A ``--model`` value is, in this order:

1. a weights file that exists (``.pth`` / ``.safetensors``, official or irformer);
2. the name of a weights file shipped with the package (its stem in
   :data:`WEIGHTS_DIR`, e.g. ``swinir_light_x4_iln``), which carries its task,
   scale and norm in its metadata;
3. a preset or architecture name (``swinir_light_x4``): *untrained* weights,
   refused (:class:`UntrainedModelError`) unless the caller allows random
   weights (``--random-weights``), since a random network's output looks like
   a broken model's;
4. anything else is an error listing the shipped names.

Without ``--model``, :func:`default_weights` picks the shipped i-LN model of a
task (``irformer restore``). Checkpoints are loaded by
:func:`irformer.archs.checkpoints.load_checkpoint_model`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from irformer.archs.checkpoints import META_KEY, load_checkpoint_model
from irformer.archs.registry import build_model, list_archs, list_presets
from irformer.errors import IrformerError
from irformer.safe_load import json_metadata
from irformer.tasks import TASKS, task_from_meta

__all__ = [
    "DEFAULT_TASK_WEIGHTS",
    "WEIGHTS_DIR",
    "LoadedModel",
    "ModelChoice",
    "ShippedModel",
    "UntrainedModelError",
    "default_weights",
    "load_model",
    "resolve_model",
    "shipped_models",
    "weights_path",
]

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
"""Reference checkpoints shipped with the package (``irformer/weights``)."""

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth")
_PATH_SUFFIXES = (*WEIGHT_SUFFIXES, ".pt", ".ckpt")

DEFAULT_TASK_WEIGHTS: dict[str, str] = {
    "sr": "swinir_light_x{scale}_iln",
    "dn": "swinir_1_dn_iln",
    "car": "swinir_1_car_iln",
}
"""The shipped model a task runs by default (file stem; ``{scale}`` filled in for SR,
2 unless asked): the i-LN one of each task."""


class UntrainedModelError(IrformerError, ValueError):
    """``--model`` named a preset (random weights) where trained weights are expected."""


@dataclass(frozen=True)
class ShippedModel:
    """A weights file in :data:`WEIGHTS_DIR`, described by its irformer metadata."""

    name: str
    """The file stem: what ``--model`` accepts."""
    path: Path
    arch: str
    preset: str | None
    norm: str
    task: str
    scale: int


def _folder(weights_dir: str | os.PathLike[str] | None) -> Path:
    """``weights_dir`` or, when None, :data:`WEIGHTS_DIR` as it is now (tests point it
    at a folder of their own)."""
    return Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR


def _file_metadata(path: Path) -> dict[str, object]:
    """The irformer metadata of a weights file; the safetensors header alone is read."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(META_KEY)
        return json_metadata(path, text, META_KEY) if text else {}
    from irformer.archs.checkpoints import read_state_dict

    return read_state_dict(path)[1]


def shipped_models(weights_dir: str | os.PathLike[str] | None = None) -> list[ShippedModel]:
    """Every shipped weights file with its arch, preset, norm, task and scale (by name)."""
    folder = _folder(weights_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.suffix not in WEIGHT_SUFFIXES or not path.is_file():
            continue
        meta = _file_metadata(path)
        preset = meta.get("preset")
        found.append(
            ShippedModel(
                name=path.stem,
                path=path,
                arch=str(meta.get("arch", "?")),
                preset=str(preset) if preset else None,
                norm=str(meta.get("norm", "ln")),
                task=task_from_meta(meta),
                scale=int(meta.get("scale") or 1),  # type: ignore[call-overload]
            )
        )
    return found


def default_weights(
    task: str = "sr", scale: int | None = None, weights_dir: str | os.PathLike[str] | None = None
) -> Path | None:
    """The shipped model ``task`` runs without ``--model`` (SR: at ``scale``, default 2),
    or None when it is not shipped."""
    if task not in DEFAULT_TASK_WEIGHTS:
        raise ValueError(
            f"no shipped model for task {task!r}; expected one of {', '.join(DEFAULT_TASK_WEIGHTS)}"
        )
    stem = DEFAULT_TASK_WEIGHTS[task].format(scale=scale or 2)
    for suffix in WEIGHT_SUFFIXES:
        path = _folder(weights_dir) / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class ModelChoice:
    """What a ``--model`` value resolved to."""

    kind: Literal["file", "shipped", "preset", "bicubic"]
    name: str
    """The label of its rows in tables: the file stem, the preset name or ``bicubic``."""
    path: Path | None = None
    """The weights file (``file`` / ``shipped``)."""


def _looks_like_path(text: str) -> bool:
    return Path(text).suffix.lower() in _PATH_SUFFIXES or "/" in text or os.sep in text


def resolve_model(
    spec: str | os.PathLike[str] | None,
    *,
    task: str | None = None,
    scale: int | None = None,
    random_weights: bool = False,
    allow_bicubic: bool = False,
    weights_dir: str | os.PathLike[str] | None = None,
) -> ModelChoice:
    """Resolve a ``--model`` value (see the module docstring); ``None``: the shipped
    default of ``task``/``scale``. Reads no weights."""
    if spec is None:
        wanted = task or "sr"
        path = default_weights(wanted, scale if wanted == "sr" else None, weights_dir)
        if path is None:
            what = f"x{scale or 2} super-resolution" if wanted == "sr" else f"task {wanted}"
            raise FileNotFoundError(
                f"no shipped model for {what} in {_folder(weights_dir)} to default to; pass "
                "--model CHECKPOINT (`irformer models list` shows the shipped names)"
            )
        return ModelChoice("shipped", path.stem, path)
    text = os.fspath(spec)
    if allow_bicubic and text.lower() == "bicubic":
        return ModelChoice("bicubic", "bicubic")
    path = Path(text)
    if path.is_file():
        return ModelChoice("file", path.stem, path)
    shipped = {m.name: m for m in shipped_models(weights_dir)}
    stem = path.stem if path.suffix in WEIGHT_SUFFIXES and "/" not in text else text
    if stem in shipped:
        return ModelChoice("shipped", stem, shipped[stem].path)
    if _looks_like_path(text):
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    if text in list_presets() or text in list_archs():
        if random_weights:
            return ModelChoice("preset", text)
        trained = [name for name, m in shipped.items() if m.preset == text]
        hint = (
            f"its shipped weights: --model {' or --model '.join(trained)}"
            if trained
            else "no weights for it ship with irformer (`irformer models list`)"
        )
        raise UntrainedModelError(
            f"--model {text}: a preset has no trained weights ({hint}); pass --random-weights "
            "to run it with random weights anyway"
        )
    names = [*shipped, *list_presets()]
    close = difflib.get_close_matches(text, names, n=1, cutoff=0.6)
    raise FileNotFoundError(
        f"--model {text!r}: no such file, shipped model or preset"
        + (f"; did you mean {close[0]!r}?" if close else "")
        + (f" Shipped: {', '.join(shipped)}" if shipped else "")
    )


def weights_path(
    spec: str | os.PathLike[str], *, weights_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The weights file of a file path or shipped name (commands that need trained
    weights: lowprec, compress); a preset is an :class:`UntrainedModelError`."""
    choice = resolve_model(spec, weights_dir=weights_dir)
    assert choice.path is not None
    return choice.path


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run, with what it is."""

    model: nn.Module
    meta: dict[str, object]
    choice: ModelChoice
    description: str
    """One line for the console: the file and its arch/norm, or ``preset X (untrained)``."""

    @property
    def task(self) -> str | None:
        """The model's task from its metadata (None when unknown)."""
        try:
            return task_from_meta(self.meta)
        except ValueError:
            return None

    @property
    def scale(self) -> int:
        return int(getattr(self.model, "upscale", 1))


def load_model(
    spec: str | os.PathLike[str] | None,
    *,
    task: str | None = None,
    scale: int | None = None,
    param_key: str | None = None,
    random_weights: bool = False,
    weights_dir: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Resolve and load ``--model`` in eval mode; a ``task`` or ``scale`` the model
    contradicts (its metadata, its upscale) is an error naming both."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task is not None and task != "sr" and scale not in (None, 1):
        raise ValueError(f"--scale {scale}: task {task!r} restores at scale 1")
    choice = resolve_model(
        spec, task=task, scale=scale, random_weights=random_weights, weights_dir=weights_dir
    )
    meta: Mapping[str, object]
    if choice.path is not None:
        kwargs = {"param_key": param_key} if param_key else {}
        model, meta = load_checkpoint_model(choice.path, **kwargs)
        described = f"{choice.path} ({meta.get('arch')}, norm={meta.get('norm')})"
    else:
        model = build_model(choice.name)
        meta = model.irformer_meta
        described = f"preset {choice.name} (untrained, random weights)"
    loaded = LoadedModel(model.eval(), dict(meta), choice, described)
    if scale is not None and loaded.scale != scale:
        raise ValueError(f"--scale {scale} but {described} is an x{loaded.scale} model")
    own_task = loaded.task
    if task is not None and meta.get("task") is not None and own_task != task:
        raise ValueError(f"--task {task} but {described} is a {own_task} model (metadata)")
    return loaded
