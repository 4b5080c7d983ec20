"""Reading weight files safely, with one clear error per bad file.

Every ``torch.load`` in irformer goes through :func:`torch_load_weights_only`
(``weights_only=True``: tensors and plain containers only) and every safetensors
read through :func:`read_safetensors`. A truncated or corrupt file becomes a
:class:`~irformer.errors.CheckpointReadError` naming it; a pickle that would
call a Python object on loading becomes an
:class:`~irformer.errors.UnsafeCheckpointError` naming that object. PyTorch's own
message for the latter suggests retrying with ``weights_only=False``, which
would run the file's code: irformer never does, and does not repeat the advice.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from irformer.errors import CheckpointReadError, UnsafeCheckpointError

__all__ = ["read_safetensors", "refused_global", "torch_load_weights_only"]

_GLOBAL_PATTERN = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|$)", re.DOTALL)


def refused_global(message: str) -> str | None:
    """The Python object (``posix.system``) a weights-only refusal names, if any."""
    match = _GLOBAL_PATTERN.search(message)
    return match.group(1) if match else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def torch_load_weights_only(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error per failure.

    Raises ``FileNotFoundError``/``PermissionError`` as the OS reports them,
    :class:`UnsafeCheckpointError` for a pickle that references Python objects
    (loading it would execute code) and :class:`CheckpointReadError` for
    anything else that does not load (truncated, corrupt, not a torch file).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except pickle.UnpicklingError as exc:
        # PyTorch's message opens with advice to retry with weights_only=False:
        # only the named global (or the unpickler's own complaint) is passed on.
        message = str(exc)
        name = refused_global(message)
        if name is not None:
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: the file's pickle calls the Python object {name}, "
                "so loading it would execute code; irformer reads only tensors and plain "
                "containers (weights-only) and will not load this file"
            ) from None
        detail = _UNPICKLER_DETAIL.search(message)
        reason = " ".join(detail.group(1).split()) if detail else _first_line(exc)
        raise CheckpointReadError(
            f"{path}: not a readable PyTorch file (corrupt, truncated or another format): {reason}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        # Truncated zip archives surface as OSError(EINVAL) or RuntimeError from the
        # C++ reader, a cut legacy pickle as EOFError.
        raise CheckpointReadError(
            f"{path}: unreadable or truncated PyTorch file: {type(exc).__name__}: "
            f"{_first_line(exc)}"
        ) from None


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, string metadata)`` of a safetensors file, or one clear error.

    A file that is not a complete safetensors file (random bytes, a cut
    download) raises :class:`CheckpointReadError` naming it, never the
    library's bare ``SafetensorError``.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointReadError(
            f"{path}: not a readable safetensors file (corrupt or truncated): {_first_line(exc)}"
        ) from None
    return tensors, metadata


def json_metadata(path: str | Path, text: str, key: str) -> dict[str, Any]:
    """A JSON object stored as safetensors metadata ``key``; corrupt JSON names the file."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointReadError(f"{path}: unreadable {key!r} metadata: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointReadError(
            f"{path}: {key!r} metadata is {type(value).__name__}, expected a JSON object"
        )
    return value
