"""Numeric precision of inference: two options, one meaning each.

* ``precision`` (:data:`Precision`): the dtype the model's weights *and* features
  are cast to (``fp32``, ``bf16``, ``fp16``). This is what the i-LN paper's
  Table 4 measures ("W+F"): an fp16 LN model overflows here. Used the same way
  by ``irformer eval``, ``restore`` and ``lowprec``.
* ``autocast`` (:data:`AutocastDtype` or None): the weights stay fp32 and
  matmuls/convolutions run in ``bf16``/``fp16`` under :func:`torch.autocast`
  (what mixed-precision GPU inference usually means). Combined with
  ``precision="fp32"`` only.

i-LN's statistics stay fp32 under both (:func:`irformer.norms.holistic_stats`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal, get_args

import torch
from torch import nn

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
AutocastDtype = Literal["bf16", "fp16"]
AUTOCAST_DTYPES: tuple[str, ...] = get_args(AutocastDtype)
_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def precision_dtype(precision: str) -> torch.dtype:
    """``fp32|bf16|fp16`` -> torch dtype; unknown names raise ``ValueError``."""
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ValueError(
            f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}"
        ) from None


def check_precision_options(precision: str, autocast: str | None) -> None:
    """Validate a (precision, autocast) pair: known names, autocast only over fp32 weights."""
    precision_dtype(precision)
    if autocast is None:
        return
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast {autocast!r}; expected one of {AUTOCAST_DTYPES}")
    if precision != "fp32":
        raise ValueError(
            f"autocast {autocast} runs fp32 weights in {autocast}; it does not combine with "
            f"precision {precision} (which casts the weights): choose one"
        )


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (fp32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def prepare_model_for_precision(
    model: nn.Module, precision: str, *, channels_last: bool = True
) -> nn.Module:
    """Cast weights and buffers to ``precision`` in place, eval mode; returns ``model``.

    Features follow the weights (the caller casts the input); i-LN's holistic
    statistics are still computed in fp32, and attention masks are cast per
    call. Conv weights go channels-last, matching the channels-last feature maps
    of the Swin models, so oneDNN needs no layout reorders (fastest bf16 on CPU).
    Copy the model first (``copy.deepcopy``) to keep an fp32 original.
    """
    dtype = precision_dtype(precision)
    model.eval()
    model.to(dtype=dtype)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


@contextmanager
def autocast_context(device: torch.device, autocast: str | None) -> Iterator[None]:
    """``torch.autocast`` to ``autocast``'s dtype on ``device``; nothing when None."""
    if autocast is None:
        with nullcontext():
            yield
        return
    with torch.autocast(device_type=device.type, dtype=precision_dtype(autocast)):
        yield
