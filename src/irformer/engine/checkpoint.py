"""Checkpoints: atomic, resumable, loadable with ``weights_only=True``.

A training checkpoint is a plain dict with BasicSR's keys ``params`` and
``params_ema`` (so BasicSR-style tools read our weights) plus everything an
exact resume needs: optimiser, scheduler, every RNG state, the data position
and the iteration. Only tensors and plain containers are stored, so loading
never unpickles arbitrary objects.

Writes go through :func:`irformer.files.atomic_write` (a temporary file in the
same directory, then a rename): a run killed mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from irformer.errors import CheckpointReadError
from irformer.files import atomic_write
from irformer.safe_load import torch_load_weights_only

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^iter_(\d+)\.pth$")
ATOMIC_TEMP_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
"""Temporary files of the atomic writes below (``.<name>.<8 random chars>.tmp``):
left behind only when the process was killed mid-write."""
SKIPPED_SUFFIX = ".skipped"
"""Appended to a checkpoint that ``--resume`` found unusable, so that neither a
later resume nor pruning takes it for the newest checkpoint."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:08d}.pth"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`irformer.files.atomic_write` (complete or not at all)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors/lists (``weights_only``-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def preserve_rng() -> Iterator[None]:
    """Run a block without disturbing any global RNG (validation, probes, data).

    Side work that draws random numbers (a stochastic-depth forward in a probe,
    a noise draw in validation) must not shift the training stream, or a run
    with probes would differ from one without, and resume would depend on them.
    """
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


# --------------------------------------------------------------------------- save/load


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Atomically write a training checkpoint dict (see module docstring)."""
    path = Path(path)
    atomic_torch_save(dict(state), path)
    logger.debug("wrote checkpoint %s", path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch_load_weights_only(path, map_location)
    if not isinstance(ckpt, dict):
        raise CheckpointReadError(
            f"{path}: expected a training checkpoint dict, got {type(ckpt).__name__}"
        )
    return ckpt


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``iter_*.pth`` in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest ``iter_*.pth`` in ``directory`` (None if there is none)."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` iteration checkpoints; returns the deleted."""
    found = list_checkpoints(directory)
    doomed = [path for _, path in found[: max(0, len(found) - keep_last)]]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state`` holding a NaN or inf."""
    return [
        key
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


def checkpoint_problem(ckpt: Mapping[str, Any]) -> str | None:
    """Why a loaded training checkpoint cannot be resumed from (None if it can)."""
    missing = [k for k in ("params", "optimizer", "rng", "data", "iteration") if k not in ckpt]
    if missing:
        return f"not a training checkpoint (lacks {', '.join(missing)})"
    for key in ("params", "params_ema"):
        bad = nonfinite_tensors(ckpt.get(key) or {})
        if bad:
            return f"{len(bad)} tensors of {key} are non-finite (first: {bad[0]})"
    return None


def newest_usable_checkpoint(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """``(path, checkpoint, skipped)``: the newest ``iter_*.pth`` that loads and holds
    finite weights, and the newer ones passed over with the reason for each.

    A run killed at the wrong moment or a full disk can leave a truncated newest
    checkpoint; an older complete one is a better place to resume than nowhere.
    """
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            ckpt = load_checkpoint(path, map_location)
        except CheckpointReadError as exc:
            skipped.append((path, str(exc)))
            continue
        problem = checkpoint_problem(ckpt)
        if problem is not None:
            skipped.append((path, f"{path}: {problem}"))
            continue
        return path, ckpt, skipped
    return None, None, skipped


def set_aside(path: str | Path) -> Path:
    """Rename an unusable checkpoint to ``<name>.skipped`` (kept, but never resumed
    from or counted by :func:`prune_checkpoints` again)."""
    path = Path(path)
    target = path.with_name(path.name + SKIPPED_SUFFIX)
    os.replace(path, target)
    return target


def remove_orphaned_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes in ``directory``.

    Only called when resuming, when no write of this run can be in flight; the
    files can be as large as a checkpoint each.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.iterdir() if p.is_file() and ATOMIC_TEMP_PATTERN.match(p.name)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------- export


def export_weights(
    path: str | Path, model: nn.Module, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write inference weights only (pass the EMA model) with irformer metadata.

    ``.safetensors``: tensors plus metadata key ``"irformer"`` = JSON of ``meta``;
    ``.pth``: ``{"params": state_dict, "irformer": meta}`` (BasicSR-readable).
    ``meta`` defaults to what ``build_model`` recorded on the model. One writer
    for the whole project: :func:`irformer.archs.save_model_weights`.
    """
    from irformer.archs import save_model_weights

    return save_model_weights(path, model, dict(meta) if meta is not None else None)


def export_checkpoint(checkpoint: str | Path, path: str | Path) -> Path:
    """A training checkpoint's EMA weights (``params`` without EMA) as an export.

    The model is rebuilt from the checkpoint's metadata, so the export loads
    with :func:`irformer.archs.load_checkpoint_model` like any other.
    """
    from irformer.archs import load_checkpoint_model, save_model_weights

    model, meta = load_checkpoint_model(checkpoint)
    return save_model_weights(path, model, meta)
