"""What an architecture module declares about itself: :class:`ArchSpec`.

Each architecture module (``swinir``, ``hat``, ``drct``, ``srformer``) ends with
``SPEC = ArchSpec(...)``: its model class, its presets (name -> constructor
keyword arguments) with the task of each, and how to recognise its official
state dicts. :mod:`irformer.archs.registry` lists the four specs explicitly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from irformer.tasks import TASKS

DetectFn = Callable[[Mapping[str, Tensor]], "dict[str, object] | None"]
"""Constructor kwargs read off a state dict's key names and shapes, or None when
the keys are not this architecture's."""


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: model class, presets, their tasks, state-dict detection."""

    name: str
    model_class: type[nn.Module]
    presets: Mapping[str, Mapping[str, object]]
    preset_tasks: Mapping[str, str]
    """Preset name -> task (``sr``/``dn``/``car``/``dr``), one entry per preset."""
    detect: DetectFn

    def __post_init__(self) -> None:
        missing = sorted(set(self.presets) - set(self.preset_tasks))
        if missing:
            raise ValueError(f"{self.name}: presets without a task: {', '.join(missing)}")
        unknown = {p: t for p, t in self.preset_tasks.items() if t not in TASKS}
        if unknown:
            raise ValueError(f"{self.name}: preset tasks outside {TASKS}: {unknown}")

    def defaults(self) -> dict[str, object]:
        """The constructor's keyword defaults."""
        params = inspect.signature(self.model_class).parameters.values()
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
