"""How long library jobs report progress: a callback the caller gives, never a print.

The library never draws on the console (the CLI owns it, progress bars included):
a function that runs for long takes ``progress: Progress | None`` and calls
``progress(done, total, label)`` once with ``done=0`` when a job starts and after
every step (an image, a row of a table, a scoring pass). ``irformer``'s commands
turn these calls into tqdm bars (``irformer.cli.progress``).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "report"]

Progress = Callable[[int, int, str], None]
"""``progress(done, total, label)``: ``done`` of ``total`` steps of the job ``label``."""


def report(progress: Progress | None, done: int, total: int, label: str) -> None:
    """Call ``progress`` when one was given."""
    if progress is not None:
        progress(done, total, label)
