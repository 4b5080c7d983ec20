"""Progress bars for the library's :data:`irformer.progress.Progress` callbacks."""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import TextIO

from tqdm import tqdm


class ProgressBars:
    """A tqdm bar per job label on stderr: ``bars(done, total, label)`` moves the bar
    of ``label`` (a new label closes the previous bar). Lines printed with
    :meth:`write` appear above the bar instead of breaking it."""

    def __init__(self, *, unit: str = "img", disable: bool = False, leave: bool = False) -> None:
        self.unit, self.disable, self.leave = unit, disable, leave
        self._bar: tqdm | None = None
        self._label: str | None = None

    def __call__(self, done: int, total: int, label: str) -> None:
        if self._bar is None or label != self._label:
            self.close()
            self._bar = tqdm(
                total=total,
                desc=label,
                unit=self.unit,
                leave=self.leave,
                disable=self.disable,
                dynamic_ncols=True,
                file=sys.stderr,
            )
            self._label = label
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print a line without breaking the bar."""
        tqdm.write(text, file=file or sys.stdout)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._label = None, None

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TqdmLoggingHandler(logging.StreamHandler):
    """Log records on stderr through ``tqdm.write``, so a warning printed while a bar is
    drawn appears above it instead of cutting it in two."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's own contract: never raise from emit
            self.handleError(record)
