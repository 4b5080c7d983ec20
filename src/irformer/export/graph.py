"""One graph capture for every export: ``torch.export`` with dynamic batch, height, width.

The models pad their input to a window multiple, build shifted-window masks and
crop the output inside ``forward``; under graph capture
(:func:`irformer.execution.in_graph_capture`) all of that is written in tensor
ops on the symbolic sizes, the attention takes the explicit matmul/softmax
path and no C++ kernel, chunking or channels-last layout is used. So one
captured program serves every input size, 1x1 included, and its outputs equal
the eager model's (float rounding).

Two settings make the capture size-generic (both checked by the export tests,
which run the program and its ONNX file at sizes it was not captured with):

* ``backed_size_oblivious``: PyTorch's shape checks inside ``view`` /
  ``contiguous`` ask "is this size 1?" for every symbolic size (one row of
  windows, a batch of one), and each answer would become a guard that narrows
  the exported range. Size-oblivious reasoning lets them assume "not 1"; the
  ops recorded are the same either way (reshapes and copies), which the tests
  confirm on 1x1, 4x4 and batch-1 inputs.
* the example input is a batch of 2 with sides that are not window multiples
  (a batch or side of 1 would be specialised as a constant).

The :mod:`torch.onnx` exporter (dynamo-based, the default since PyTorch 2.9)
converts this program; ``pt2`` files save it with :func:`torch.export.save`.
The TorchScript-based ONNX exporter is not used: it traces with Python
integers, so the padding, masks and crop would be fixed at the export size
(SwinIR#145).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from irformer.files import atomic_write

__all__ = [
    "DTYPES",
    "PT2_META_FILE",
    "capture_program",
    "example_input",
    "load_pt2",
    "save_pt2",
]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
PT2_META_FILE = "irformer.json"
"""Name of the metadata record inside a ``.pt2`` archive (``extra_files``)."""


def example_input(model: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """(2, C, ws + 3, ws + 5): the input the capture traces with (see the module docstring)."""
    ws = int(getattr(model, "window_size", 8))
    chans = int(getattr(model, "in_chans", 3))
    gen = torch.Generator().manual_seed(0)
    return torch.rand(2, chans, ws + 3, ws + 5, generator=gen).to(dtype)


def capture_program(model: nn.Module, *, dtype: str = "fp32") -> ExportedProgram:
    """``torch.export`` of ``model`` (cast to ``dtype`` in a copy, eval mode).

    The program takes ``x`` of shape (B, C, H, W) with B, H and W dynamic
    (>= 1) and returns the restored (B, C, s*H, s*W).
    """
    import copy

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    work = copy.deepcopy(model).eval().to(DTYPES[dtype])
    for p in work.parameters():
        p.requires_grad_(False)
    x = example_input(work, DTYPES[dtype])
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=1), 3: Dim("width", min=1)}
    with fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(work, (x,), dynamic_shapes={"x": dims})


def save_pt2(
    program: ExportedProgram, path: str | os.PathLike[str], meta: Mapping[str, object]
) -> Path:
    """Write ``program`` with the metadata record (``irformer.json`` inside), atomically."""
    buffer = io.BytesIO()
    extra = {PT2_META_FILE: json.dumps(dict(meta), sort_keys=True)}
    torch.export.save(program, buffer, extra_files=extra)
    return atomic_write(path, buffer.getvalue())


def load_pt2(path: str | os.PathLike[str]) -> tuple[ExportedProgram, dict[str, object]]:
    """``(program, metadata)`` of a ``.pt2`` file written by :func:`save_pt2`.

    Run it with ``program.module()(x)``; x of any batch and size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pt2 file not found: {path}")
    extra = {PT2_META_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    text = extra.get(PT2_META_FILE) or "{}"
    return program, dict(json.loads(text))
