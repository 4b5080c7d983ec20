"""irformer's error classes: one base, so the CLI can tell bad input from a bug.

Everything irformer raises on purpose about a file, a key or a value the user
gave derives from :class:`IrformerError` and names the offending path/key/value
and what was expected; ``irformer`` prints such an error as one line and exits
with status 2. Every class also derives from the builtin it refines
(``ValueError``, ``FileExistsError``, ``PermissionError``...), so code catching
the builtin keeps working. Other exceptions are bugs or environment failures
and keep their traceback.

Classes defined next to the code that raises them (all subclasses of
:class:`IrformerError`): ``irformer.engine.config.ConfigError``,
``irformer.archs.state.CheckpointMismatchError``,
``irformer.data.io.ImageReadError`` / ``ImageTooLargeError`` /
``OutputExistsError``, ``irformer.engine.train.NonFiniteLossError`` /
``NonFiniteWeightsError``, ``irformer.experiments.norm_study.StudyExistsError``,
``irformer.archs.zoo.UntrainedModelError``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointReadError",
    "DeviceUnavailableError",
    "IrformerError",
    "OutputNotWritableError",
    "RunExistsError",
    "UnsafeCheckpointError",
]


class IrformerError(Exception):
    """Base of the errors irformer raises deliberately (bad input or state, named)."""

    def __str__(self) -> str:
        # KeyError-derived classes would otherwise print their message quoted.
        if len(self.args) == 1:
            return str(self.args[0])
        return super().__str__()


class CheckpointReadError(IrformerError, ValueError):
    """A weights/checkpoint file is truncated, corrupt, or not the format its name says."""


class UnsafeCheckpointError(CheckpointReadError):
    """A pickle that weights-only loading refuses: loading it would execute code."""


class RunExistsError(IrformerError, FileExistsError):
    """``train`` without ``--resume`` into a folder that holds an earlier run."""


class OutputNotWritableError(IrformerError, PermissionError):
    """An output folder cannot be created or written (checked before any work)."""


class DeviceUnavailableError(IrformerError, RuntimeError):
    """A device was asked for (``--device cuda``) that this machine does not have."""
