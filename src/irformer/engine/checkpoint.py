"""Checkpoints: atomic, resumable, loadable with ``weights_only=True``.

A training checkpoint is a plain dict with BasicSR's keys ``params`` and
``params_ema`` (so BasicSR-style tools read our weights) plus everything an
exact resume needs: optimiser, scheduler, every RNG state, the data position
and the iteration. Only tensors and plain containers are stored, so loading
never unpickles arbitrary objects.

Writes go to a temporary file in the same directory followed by
``os.replace``: a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^iter_(\d+)\.pth$")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:08d}.pth"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file next to ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write bytes atomically (same temp-file + rename scheme)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as exc:
        raise RuntimeError(f"checkpoint {path} is unreadable or truncated: {exc}") from exc


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
