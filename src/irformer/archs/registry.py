"""The one door to every architecture: the table of the four, presets, ``build_model``.

:data:`ARCHITECTURES` lists the architecture modules' specs explicitly (each
module ends with ``SPEC = ArchSpec(...)``). A name is either an architecture
(its constructor defaults) or a preset (paper or official hyper-parameters);
preset names are unique across architectures. Checkpoint files are read and
written by :mod:`irformer.archs.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

import irformer
from irformer.archs import drct, hat, srformer, swinir
from irformer.archs.spec import ArchSpec

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec for spec in (swinir.SPEC, hat.SPEC, drct.SPEC, srformer.SPEC)
}
"""Architecture name -> spec, in the order detection tries them."""


def _check_unique_names() -> None:
    names = [p for spec in ARCHITECTURES.values() for p in spec.presets]
    clashes = sorted({p for p in names if names.count(p) > 1} | (set(names) & set(ARCHITECTURES)))
    if clashes:
        raise RuntimeError(f"preset names defined twice or equal to an arch name: {clashes}")


_check_unique_names()


def list_archs() -> list[str]:
    """Names of the architectures."""
    return list(ARCHITECTURES)


def list_presets(arch: str | None = None) -> list[str]:
    """Preset names, of one architecture or of all."""
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHITECTURES)}")
        return list(ARCHITECTURES[arch].presets)
    return [p for spec in ARCHITECTURES.values() for p in spec.presets]


def resolve(name: str) -> tuple[ArchSpec, str | None, dict[str, object]]:
    """``(arch spec, preset or None, preset kwargs)`` for a preset or an arch name."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name], None, {}
    for spec in ARCHITECTURES.values():
        if name in spec.presets:
            return spec, name, dict(spec.presets[name])
    valid = ", ".join([*ARCHITECTURES, *list_presets()])
    raise ValueError(f"unknown model name {name!r}; valid archs and presets: {valid}")


def preset_kwargs(name: str) -> dict[str, object]:
    """Constructor kwargs of a preset (a copy)."""
    _, preset, kwargs = resolve(name)
    if preset is None:
        raise ValueError(f"{name!r} is an architecture, not a preset")
    return kwargs


def jsonable(value: object) -> object:
    """Tuples as lists, mapping keys as strings: what a JSON round trip gives back."""
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return value


def same_value(a: object, b: object) -> bool:
    """Equal after a JSON round trip (``(6, 6) == [6, 6]``)."""
    return jsonable(a) == jsonable(b)


def make_meta(
    spec: ArchSpec, preset: str | None, model_kwargs: Mapping[str, object]
) -> dict[str, object]:
    """The irformer metadata describing a model built from ``model_kwargs``.

    ``task`` is the preset's; a model built from an architecture name is
    ``sr`` when it upscales, else unknown (None) unless the caller records one
    (training does).
    """
    full = {**spec.defaults(), **model_kwargs}
    scale = int(full.get("upscale", 1) or 1)  # type: ignore[arg-type]
    return {
        "arch": spec.name,
        "preset": preset,
        "norm": str(full.get("norm", "ln")),
        "scale": scale,
        "task": _task(spec, preset, scale),
        "version": irformer.__version__,
        "model_kwargs": jsonable(dict(model_kwargs)),
    }


def _task(spec: ArchSpec, preset: str | None, scale: int) -> str | None:
    if preset is not None:
        return spec.preset_tasks[preset]
    return "sr" if scale > 1 else None


def instantiate(spec: ArchSpec, kwargs: Mapping[str, object]) -> nn.Module:
    """``spec.model_class(**kwargs)``; a wrong keyword names the valid ones."""
    try:
        return spec.model_class(**kwargs)
    except TypeError as exc:
        valid = ", ".join(spec.defaults())
        raise ValueError(f"{spec.name}: {exc}; valid keyword arguments: {valid}") from exc


def build_model(name: str, **overrides: object) -> nn.Module:
    """Build a preset or an architecture (with its defaults), overriding any kwarg.

    The model gets an ``irformer_meta`` dict (see :func:`model_meta`), which
    :func:`irformer.archs.checkpoints.save_model_weights` writes next to the weights.
    """
    spec, preset, kwargs = resolve(name)
    kwargs.update(overrides)
    model = instantiate(spec, kwargs)
    model.irformer_meta = make_meta(spec, preset, kwargs)
    return model


def model_meta(model: nn.Module) -> dict[str, object]:
    """The metadata recorded by :func:`build_model` / ``load_checkpoint_model``."""
    meta = getattr(model, "irformer_meta", None)
    if not isinstance(meta, Mapping):
        raise ValueError(
            f"{type(model).__name__} was not built by irformer.archs.build_model; "
            "pass its metadata explicitly"
        )
    return dict(meta)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
