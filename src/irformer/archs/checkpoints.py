"""Weights files: reading, writing, recognising and describing them.

Official files (``params_ema`` / ``params`` / bare state dict, ``.pth`` or
``.safetensors``) and irformer's own, which carry metadata
``{"arch", "preset", "norm", "scale", "task", "version", "model_kwargs"}`` under
the key ``"irformer"`` (a dict entry in ``.pth``, a JSON string in the
safetensors metadata). i-LN keeps LayerNorm's key names, so without that marker
an i-LN file is indistinguishable from a vanilla one: marked files are always
rebuilt with their own norm, and loading one into a model with another norm is
an error. Files are read with ``weights_only=True`` or safetensors, and written
atomically (:func:`irformer.files.atomic_write`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import irformer
from irformer.archs.registry import (
    ARCHITECTURES,
    instantiate,
    jsonable,
    list_archs,
    make_meta,
    resolve,
    same_value,
)
from irformer.archs.spec import ArchSpec
from irformer.archs.state import (
    SIZE_DEPENDENT_BUFFERS,
    CheckpointMismatchError,
    drop_size_dependent_buffers,
    state_mismatch,
)
from irformer.files import atomic_write
from irformer.safe_load import json_metadata, read_safetensors, torch_load_weights_only
from irformer.tasks import LEGACY_TASK_NAMES

logger = logging.getLogger(__name__)

META_KEY = "irformer"
META_FIELDS: tuple[str, ...] = (
    "arch",
    "preset",
    "norm",
    "scale",
    "task",
    "version",
    "model_kwargs",
)
PARAM_KEYS: tuple[str, ...] = ("params_ema", "params", "state_dict", "model")
"""Where state dicts live in a checkpoint dict, in order of preference (BasicSR's
EMA weights first: they are the ones evaluated)."""


# --------------------------------------------------------------------------- writing


def save_model_weights(
    path: str | os.PathLike[str], model: nn.Module, meta: Mapping[str, object] | None = None
) -> Path:
    """Write inference weights with irformer metadata, atomically.

    ``meta`` defaults to the model's own (``model.irformer_meta``); given fields
    override it. ``.safetensors``: metadata key ``"irformer"`` holds the JSON;
    ``.pth``: ``{"params": state_dict, "irformer": meta}`` (BasicSR-readable).
    """
    path = Path(path)
    own = getattr(model, "irformer_meta", None)
    full = {**(own if isinstance(own, Mapping) else {}), **(meta or {})}
    missing = [k for k in ("arch", "norm", "scale", "model_kwargs") if k not in full]
    if missing:
        raise ValueError(f"metadata for {path} lacks {', '.join(missing)}")
    full.setdefault("version", irformer.__version__)
    full = {k: jsonable(v) for k, v in full.items()}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        metadata = {META_KEY: json.dumps(full, sort_keys=True)}
        return atomic_write(path, save(state, metadata=metadata))
    if path.suffix == ".pth":
        record = {"params": state, META_KEY: full}
        return atomic_write(path, lambda handle: torch.save(record, handle))
    raise ValueError(f"weights path {path}: expected a .safetensors or .pth suffix")


# --------------------------------------------------------------------------- reading


def read_state_dict(
    path: str | os.PathLike[str], *, param_key: str | None = None
) -> tuple[dict[str, Tensor], dict[str, object]]:
    """``(state_dict, irformer metadata or {})`` from a ``.pth`` or ``.safetensors`` file.

    Never unpickles arbitrary objects (``weights_only=True``). Picks
    ``param_key`` if given, else the first of :data:`PARAM_KEYS` present, else
    the file itself when it is a bare state dict; strips a DDP ``module.`` prefix.
    Task names of older irformer files are mapped to today's (``denoise`` -> ``dn``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    meta: dict[str, object] = {}
    if path.suffix == ".safetensors":
        state, file_meta = read_safetensors(path)
        if file_meta.get(META_KEY):
            meta = json_metadata(path, file_meta[META_KEY], META_KEY)
        if param_key is not None:
            raise ValueError(f"{path}: param_key={param_key!r} does not apply to safetensors")
    else:
        ckpt = torch_load_weights_only(path)
        state = _pick_state(ckpt, param_key, path)
        if isinstance(ckpt, Mapping) and isinstance(ckpt.get(META_KEY), Mapping):
            meta = dict(ckpt[META_KEY])
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if isinstance(meta.get("task"), str):
        meta["task"] = LEGACY_TASK_NAMES.get(str(meta["task"]), meta["task"])
    return state, meta


def _pick_state(ckpt: object, param_key: str | None, path: Path) -> dict[str, Tensor]:
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if param_key is not None:
        if not isinstance(ckpt.get(param_key), Mapping):
            raise ValueError(
                f"{path}: no state dict under {param_key!r}; keys: {', '.join(map(str, ckpt))}"
            )
        return dict(ckpt[param_key])
    for key in PARAM_KEYS:
        if isinstance(ckpt.get(key), Mapping) and ckpt[key]:
            return dict(ckpt[key])
    tensors = {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if tensors and len(tensors) >= len(ckpt) - (META_KEY in ckpt):
        return tensors
    raise ValueError(
        f"{path}: no state dict found (looked for {', '.join(PARAM_KEYS)} or a bare state dict); "
        f"keys: {', '.join(map(str, list(ckpt)[:10]))}"
    )


# --------------------------------------------------------------------------- matching


def prepare_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the size-dependent buffers official files carry (checked first).

    The same rule every model's own ``load_state_dict`` hook applies
    (:func:`irformer.archs.state.drop_size_dependent_buffers`).
    """
    return drop_size_dependent_buffers(model, state)


def _preview(keys: list[str], limit: int = 8) -> str:
    """The first ``limit`` keys, shallowest first (``upsample.0.weight`` says more
    about a wrong preset than the hundredth block key)."""
    keys = sorted(keys, key=lambda k: k.count("."))
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@dataclass(frozen=True)
class Detection:
    """An architecture recognised from a state dict's keys and shapes."""

    arch: str
    model_kwargs: dict[str, object]
    presets: tuple[str, ...]
    """Presets whose hyper-parameters agree with the file (first = best)."""
    exact: bool
    """True when a model built from ``model_kwargs`` has exactly the file's keys/shapes."""

    def describe(self) -> str:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in sorted(self.model_kwargs.items()))
        preset = f"preset {' or '.join(map(repr, self.presets))}" if self.presets else "no preset"
        return f"{self.arch} ({preset}; {kwargs})"


def _matching_presets(spec: ArchSpec, kwargs: Mapping[str, object]) -> tuple[str, ...]:
    """Presets agreeing with detected kwargs (those agreeing on img_size first)."""
    defaults = spec.defaults()
    exact, loose = [], []
    for name, preset in spec.presets.items():
        full = {**defaults, **preset}
        if all(same_value(full.get(k), v) for k, v in kwargs.items() if k != "img_size"):
            same_size = "img_size" not in kwargs or same_value(
                full.get("img_size"), kwargs["img_size"]
            )
            (exact if same_size else loose).append(name)
    return tuple(exact + loose)


def detect_architecture(state: Mapping[str, Tensor]) -> Detection | None:
    """Recognise the architecture and hyper-parameters of a state dict.

    Every architecture's ``detect`` is tried; a candidate is *exact* when a model
    built from it (on the meta device, nothing allocated) has exactly the file's
    keys and shapes. The first exact candidate wins, else the first candidate.
    """
    first: Detection | None = None
    for spec in ARCHITECTURES.values():
        try:
            kwargs = spec.detect(state)
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            logger.debug("%s.detect failed: %s", spec.name, exc)
            continue
        if kwargs is None:
            continue
        kwargs = dict(kwargs)
        exact = False
        try:
            with torch.device("meta"):
                probe = spec.model_class(**kwargs)
            exact = not any(state_mismatch(probe, prepare_state_dict(probe, state)))
        except (ValueError, TypeError, RuntimeError) as exc:
            logger.debug("%s detection %s does not build: %s", spec.name, kwargs, exc)
        found = Detection(spec.name, kwargs, _matching_presets(spec, kwargs), exact)
        if exact:
            return found
        first = first or found
    return first


def load_state_into(
    model: nn.Module, state: Mapping[str, Tensor], *, source: str = "state dict"
) -> None:
    """Strictly load ``state`` into ``model``; a mismatch names keys and the right preset."""
    cleaned = prepare_state_dict(model, state)
    missing, unexpected, reshaped = state_mismatch(model, cleaned)
    if missing or unexpected or reshaped:
        lines = [f"{source} does not fit {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if reshaped:
            lines.append(f"  shape mismatches ({len(reshaped)}): {_preview(reshaped, 4)}")
        found = detect_architecture(state)
        if found is not None:
            lines.append(f"  the file looks like {found.describe()}")
            if found.presets:
                lines.append(f"  try: build_model({found.presets[0]!r})")
        else:
            lines.append("  no known architecture matches the file's keys")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(cleaned, strict=True)


# --------------------------------------------------------------------------- loading


def _model_norm(model: nn.Module) -> str | None:
    meta = getattr(model, "irformer_meta", None)
    if isinstance(meta, Mapping) and "norm" in meta:
        return str(meta["norm"])
    norm = getattr(model, "norm_name", None)
    return str(norm) if isinstance(norm, str) else None


def check_meta_compatible(model: nn.Module, file_meta: Mapping[str, object], source: str) -> None:
    """Refuse to load a marked file into a model of another arch, norm or scale."""
    if not file_meta:
        return
    own = getattr(model, "irformer_meta", None)
    own = own if isinstance(own, Mapping) else {}
    norm = _model_norm(model)
    if norm is None:
        if file_meta.get("norm", "ln") != "ln":
            raise ValueError(
                f"{source} was trained with norm {file_meta['norm']!r}; the model's norm is "
                "unknown (build it with build_model or use load_checkpoint_model)"
            )
    elif "norm" in file_meta and file_meta["norm"] != norm:
        raise ValueError(
            f"{source} was trained with norm {file_meta['norm']!r} but the model uses "
            f"{norm!r}; its outputs would be wrong (i-LN keeps LayerNorm's key names)"
        )
    for key in ("arch", "scale"):
        if key in own and key in file_meta and not same_value(own[key], file_meta[key]):
            raise ValueError(
                f"{source} is {key}={file_meta[key]!r} but the model is {key}={own[key]!r}"
            )
    file_kwargs = file_meta.get("model_kwargs")
    own_kwargs = own.get("model_kwargs")
    if isinstance(file_kwargs, Mapping) and isinstance(own_kwargs, Mapping):
        spec = ARCHITECTURES.get(str(own.get("arch")))
        defaults = spec.defaults() if spec is not None else {}
        a, b = {**defaults, **file_kwargs}, {**defaults, **own_kwargs}
        differ = sorted(k for k in set(a) | set(b) if not same_value(a.get(k), b.get(k)))
        if differ:
            detail = ", ".join(f"{k}: file {a.get(k)!r} vs model {b.get(k)!r}" for k in differ)
            raise ValueError(f"{source} was built with other hyper-parameters: {detail}")


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], *, param_key: str | None = None
) -> dict[str, object]:
    """Load a weights file into an existing model (checked against its metadata)."""
    state, meta = read_state_dict(path, param_key=param_key)
    check_meta_compatible(model, meta, str(path))
    load_state_into(model, state, source=str(path))
    return meta


def load_checkpoint_model(
    path: str | os.PathLike[str],
    name: str | None = None,
    *,
    param_key: str | None = None,
    **overrides: object,
) -> tuple[nn.Module, dict[str, object]]:
    """Build the model a checkpoint needs and load it: ``(model in eval mode, meta)``.

    - irformer files: rebuilt from their metadata (arch, kwargs, norm). ``name``
      and ``overrides`` may only repeat what the file says; a different norm,
      scale or any other hyper-parameter is an error.
    - official files (no metadata): ``name`` (preset or arch) + ``overrides``
      if given, else the architecture detected from the keys and shapes. They
      are taken as ``norm="ln"`` unless ``norm`` is overridden.
    A file that does not fit raises :class:`CheckpointMismatchError` listing the
    missing/unexpected keys and the preset that matches the file.
    """
    source = str(path)
    state, file_meta = read_state_dict(path, param_key=param_key)
    if file_meta:
        spec, preset, kwargs = _from_meta(file_meta, source)
        _check_request(spec, name, overrides, kwargs, preset, source)
        kwargs = {**kwargs, **overrides}
        meta = {**make_meta(spec, preset, kwargs), **_kept_fields(file_meta)}
    elif name is not None:
        spec, preset, kwargs = resolve(name)
        kwargs.update(overrides)
        meta = make_meta(spec, preset, kwargs)
    else:
        found = detect_architecture(state)
        if found is None:
            raise CheckpointMismatchError(
                f"{source}: no known architecture matches its keys "
                f"({_preview(list(state), 5)}); known: {', '.join(list_archs())}"
            )
        spec = ARCHITECTURES[found.arch]
        kwargs = {**found.model_kwargs, **overrides}
        meta = make_meta(spec, found.presets[0] if found.presets else None, kwargs)
    if not file_meta and meta["norm"] != "ln":
        logger.warning(
            "%s has no irformer metadata; loading it as norm=%r on your word", source, meta["norm"]
        )
    model = instantiate(spec, kwargs)
    model.irformer_meta = meta
    load_state_into(model, state, source=source)
    return model.eval(), meta


def _kept_fields(file_meta: Mapping[str, object]) -> dict[str, object]:
    """File metadata worth carrying over (task/version as written at save time)."""
    return {k: file_meta[k] for k in ("task", "version") if file_meta.get(k) is not None}


def _from_meta(
    meta: Mapping[str, object], source: str
) -> tuple[ArchSpec, str | None, dict[str, object]]:
    arch = meta.get("arch")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{source}: metadata arch {arch!r} is unknown; known: {', '.join(ARCHITECTURES)}"
        )
    spec = ARCHITECTURES[str(arch)]
    kwargs = meta.get("model_kwargs")
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{source}: irformer metadata lacks model_kwargs")
    kwargs = dict(kwargs)
    if "norm" in meta and kwargs.get("norm", spec.defaults().get("norm")) != meta["norm"]:
        raise ValueError(
            f"{source}: metadata norm {meta['norm']!r} disagrees with model_kwargs norm "
            f"{kwargs.get('norm')!r}"
        )
    preset = meta.get("preset")
    return spec, str(preset) if preset else None, kwargs


def _check_request(
    spec: ArchSpec,
    name: str | None,
    overrides: Mapping[str, object],
    file_kwargs: Mapping[str, object],
    file_preset: str | None,
    source: str,
) -> None:
    """A marked file decides its own architecture: the caller may only agree.

    ``name`` agrees when it is the file's own preset (whatever was overridden
    at build time) or a preset/arch whose kwargs equal the file's.
    """
    defaults = spec.defaults()
    file_full = {**defaults, **file_kwargs}
    wanted: dict[str, object] = dict(overrides)
    if name is not None and name != file_preset:
        req_spec, _, req_kwargs = resolve(name)
        if req_spec.name != spec.name:
            raise ValueError(f"{source} holds a {spec.name!r} model, not {req_spec.name!r}")
        wanted = {**req_kwargs, **wanted}
    differ = sorted(k for k, v in wanted.items() if not same_value(file_full.get(k), v))
    if differ:
        detail = ", ".join(f"{k}={wanted[k]!r} (file: {file_full.get(k)!r})" for k in differ)
        raise ValueError(f"{source} was saved with other settings than requested: {detail}")


def describe_checkpoint(
    path: str | os.PathLike[str], *, param_key: str | None = None
) -> dict[str, Any]:
    """What a weights file holds: metadata, detected arch, parameter count."""
    state, meta = read_state_dict(path, param_key=param_key)
    found = detect_architecture(state)
    n_params = sum(
        v.numel()
        for k, v in state.items()
        if isinstance(v, Tensor) and k.rsplit(".", 1)[-1] not in SIZE_DEPENDENT_BUFFERS
    )
    return {
        "path": str(path),
        "meta": meta,
        "detected": None
        if found is None
        else {
            "arch": found.arch,
            "presets": list(found.presets),
            "exact": found.exact,
            "model_kwargs": jsonable(found.model_kwargs),
        },
        "tensors": len(state),
        "parameters": n_params,
        "megabytes": sum(v.numel() * v.element_size() for v in state.values()) / 2**20,
    }
