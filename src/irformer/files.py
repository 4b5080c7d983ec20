"""The one way irformer writes a file: complete or not at all, with the user's umask.

Everything irformer writes (weights, checkpoints, packed models, reports,
tables, images) goes to a temporary file in the destination folder, is flushed
to disk and then renamed over the destination, so a run killed mid-write leaves
the previous file intact and never a truncated one. The temporary file is
created private (``mkstemp``) and gets the permissions a plain ``open()`` would
have given the file (``0o666`` minus the umask) before the rename.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Writer = Callable[[BinaryIO], object]
TEMP_SUFFIX = ".tmp"
"""Suffix of in-flight temporary files (``.<name>.<random>.tmp`` next to the target)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], content: bytes | str | Writer) -> Path:
    """Write ``content`` (bytes, text as UTF-8, or a function writing to a binary handle).

    Parent folders are created. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(content, str):
                handle.write(content.encode("utf-8"))
            elif isinstance(content, bytes | bytearray | memoryview):
                handle.write(content)
            else:
                content(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
