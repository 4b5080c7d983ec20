"""The restoration tasks irformer knows, by one name each, everywhere.

The same four names are used by training configs, checkpoint metadata, the
presets, evaluation and the CLI: ``sr`` (bicubic super-resolution; the
real-world SR presets are ``sr`` models too), ``dn`` (Gaussian denoising),
``car`` (JPEG compression-artefact removal) and ``dr`` (deraining).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

Task = Literal["sr", "dn", "car", "dr"]
TASKS: tuple[str, ...] = get_args(Task)

TASK_TITLES: dict[str, str] = {
    "sr": "super-resolution",
    "dn": "denoising",
    "car": "JPEG artefact removal",
    "dr": "deraining",
}

LEGACY_TASK_NAMES: dict[str, str] = {
    "denoise": "dn",
    "jpeg_car": "car",
    "derain": "dr",
    "real_sr": "sr",
}
"""Task names that irformer 0.1 wrote into checkpoint metadata; read, never written."""


def check_task(task: str, *, where: str = "task") -> Task:
    """``task`` if it is one of :data:`TASKS` (legacy names mapped), else a ValueError."""
    task = LEGACY_TASK_NAMES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"{where}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task  # type: ignore[return-value]


def task_from_meta(meta: Mapping[str, object]) -> Task:
    """The task of a checkpoint's irformer metadata (legacy names mapped); metadata
    without a task: ``sr`` when the model upscales, else a ValueError."""
    task = meta.get("task")
    if task is None:
        if int(meta.get("scale") or 1) > 1:  # type: ignore[call-overload]
            return "sr"
        raise ValueError("the checkpoint's metadata names no task; pass --task")
    return check_task(str(task), where="checkpoint metadata task")
