"""State-dict conventions shared by the models and checkpoint I/O.

Official Swin-style files carry buffers that only depend on sizes (the
training patch's ``attn_mask``, relative-position indices). irformer derives
them instead of storing them (non-persistent buffers, or per-size caches), so
they are never in irformer's state dicts. Every model drops them on load in its
own ``load_state_dict`` pre-hook (:func:`register_size_dependent_buffer_hook`),
after checking that the ones it derives match the file (a different
relative-position index means a different window layout), so plain
``model.load_state_dict(official_state_dict)`` works as timm/spandrel users expect.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from irformer.errors import IrformerError

SIZE_DEPENDENT_BUFFERS: tuple[str, ...] = (
    "attn_mask",
    "relative_position_index",
    "relative_position_index_SA",
    "relative_position_index_OCA",
    "aligned_relative_position_index",
)
"""Names (last key component) of the buffers official files carry that depend only
on the window/patch sizes; never learned, never in irformer's files."""


class CheckpointMismatchError(IrformerError, ValueError):
    """A state dict does not fit the model: names missing/unexpected/reshaped keys."""


def drop_size_dependent_buffers(
    model: nn.Module, state: Mapping[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """``state`` without the size-dependent buffers official files carry, checked first.

    A key under ``prefix`` that is not in ``model.state_dict()`` but names one
    of the model's non-persistent buffers must equal it (else
    :class:`CheckpointMismatchError`); other keys whose last component is in
    :data:`SIZE_DEPENDENT_BUFFERS` (``attn_mask`` of the training patch) are
    dropped; everything else is kept, so the strict load reports it.
    """
    own = set(model.state_dict())
    buffers = dict(model.named_buffers())
    kept: dict[str, Any] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            kept[key] = value
            continue
        name = key[len(prefix) :]
        if name in own:
            kept[key] = value
            continue
        if name in buffers and isinstance(value, Tensor):
            buf = buffers[name]
            if buf.device.type != "meta" and (
                buf.shape != value.shape or not torch.equal(buf.cpu(), value.to(buf.dtype))
            ):
                raise CheckpointMismatchError(
                    f"buffer {name!r} in the file (shape {tuple(value.shape)}) differs from the "
                    f"model's (shape {tuple(buf.shape)}): a different window size?"
                )
            continue
        if name.rsplit(".", 1)[-1] in SIZE_DEPENDENT_BUFFERS:
            continue
        kept[key] = value
    return kept


def _drop_hook(
    module: nn.Module,
    state_dict: MutableMapping[str, Any],
    prefix: str,
    *args: object,
) -> None:
    kept = drop_size_dependent_buffers(module, state_dict, prefix)
    for key in [k for k in state_dict if k not in kept]:
        del state_dict[key]


def register_size_dependent_buffer_hook(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` accept official files (see the module docstring)."""
    model.register_load_state_dict_pre_hook(_drop_hook)


def state_mismatch(
    model: nn.Module, state: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, shape mismatches)`` of ``state`` against ``model``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, reshaped
