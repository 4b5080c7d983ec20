"""Models out of irformer: ONNX, ``torch.export`` programs, weights, the official layout.

``irformer models export CKPT FILE --format F`` and :func:`export_model`:

* ``onnx`` (:mod:`irformer.export.onnx_file`): opset 18, batch/height/width
  dynamic with the reflect padding to the window multiple inside the graph,
  plain ops (MatMul/Softmax attention), fp32 or -- for fp16-safe models --
  fp16; metadata names arch, preset, norm, scale, task and irformer version;
  written only after ONNX Runtime matched PyTorch on two input sizes (fp32:
  max abs diff <= 1e-4). :class:`~irformer.export.onnx_runtime.OnnxRuntimeModel`
  runs such a file wherever irformer runs a model (``restore --backend onnx``).
* ``pt2`` (:mod:`irformer.export.graph`): the same captured program saved with
  :func:`torch.export.save`, dynamic batch/height/width, the metadata record
  inside; :func:`load_pt2` reads it back.
* ``safetensors`` (the default for ``.safetensors``/``.pth`` names): irformer
  weights with the metadata record (what ``irformer models export`` always wrote).
* ``official`` (:mod:`irformer.export.official`): LN models in the original
  key layout with the buffers spandrel needs; every other norm is refused, so
  an i-LN file can never be read as LayerNorm.

Every file irformer writes here records the fp16 verdict measured on a fixed
probe (``fp16_safe``, ``fp16_max_abs``, ``fp16_max_layer``:
:mod:`irformer.engine.fp16`), except ``official`` files, which hold nothing
but the official keys. Graph capture never sees irformer's C++ CPU kernels
(:func:`irformer.execution.in_graph_capture`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from irformer.export.graph import DTYPES, capture_program, load_pt2, save_pt2
from irformer.export.official import (
    OfficialFormatError,
    check_official_compatible,
    export_official,
    official_state_dict,
)
from irformer.export.onnx_file import (
    ONNX_DTYPES,
    PARITY_TOLERANCE,
    ExportParityError,
    ParityCheck,
    export_onnx,
    parity_inputs,
    read_onnx_metadata,
)

__all__ = [
    "EXPORT_FORMATS",
    "ExportParityError",
    "ExportResult",
    "OfficialFormatError",
    "OnnxRuntimeModel",
    "ParityCheck",
    "capture_program",
    "check_official_compatible",
    "export_model",
    "export_official",
    "export_onnx",
    "export_pt2",
    "format_for_path",
    "load_pt2",
    "official_state_dict",
    "read_onnx_metadata",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS: tuple[str, ...] = ("safetensors", "onnx", "pt2", "official")
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "safetensors": (".safetensors", ".pth"),
    "onnx": (".onnx",),
    "pt2": (".pt2",),
    "official": (".pth", ".safetensors"),
}
PT2_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
"""Largest ``|program - eager|`` accepted for a pt2 file (same kernels, other op order)."""


def __getattr__(name: str) -> object:
    if name == "OnnxRuntimeModel":  # imports onnxruntime: only when asked for
        from irformer.export.onnx_runtime import OnnxRuntimeModel

        return OnnxRuntimeModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote."""

    path: Path
    format: str
    dtype: str
    meta: dict[str, object]
    checks: tuple[ParityCheck, ...] = field(default_factory=tuple)
    """Comparisons with the PyTorch model (onnx, pt2)."""
    tolerance: float | None = None


def format_for_path(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The export format for ``path``: ``fmt`` if given (checked against the suffix),
    else from the suffix (``.onnx``, ``.pt2``; ``.safetensors``/``.pth`` -> weights)."""
    suffix = Path(path).suffix.lower()
    if fmt is None:
        for name in ("onnx", "pt2", "safetensors"):
            if suffix in _SUFFIXES[name]:
                return name
        raise ValueError(
            f"{path}: cannot tell the export format from {suffix or 'no suffix'!r}; "
            f"use .onnx, .pt2, .safetensors or .pth, or --format {'|'.join(EXPORT_FORMATS)}"
        )
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected {', '.join(EXPORT_FORMATS)}")
    if suffix not in _SUFFIXES[fmt]:
        raise ValueError(
            f"{path}: a {fmt} file needs the suffix {' or '.join(_SUFFIXES[fmt])}, not "
            f"{suffix or 'none'!r}"
        )
    return fmt


def export_pt2(
    model: nn.Module,
    path: str | os.PathLike[str],
    meta: dict[str, object],
    *,
    dtype: str = "fp32",
    check: bool = True,
) -> ExportResult:
    """Write the ``torch.export`` program (dynamic B/H/W) of ``model`` with ``meta``.

    With ``check``, the program is run on the two parity inputs first and the
    file is only written when it matches the eager model (:data:`PT2_TOLERANCE`).
    """
    import copy

    import torch

    if dtype == "fp16" and meta.get("fp16_safe") is not True:
        raise ValueError(
            f"fp16 export refused for {Path(path).name}: the model is not marked fp16-safe "
            f"(measured max |x| {meta.get('fp16_max_abs', '?')} at "
            f"{meta.get('fp16_max_layer', '?')}); export fp32 or bf16"
        )
    program = capture_program(model, dtype=dtype)
    record = {**meta, "dtype": dtype, "exporter": f"torch.export torch {torch.__version__}"}
    checks: list[ParityCheck] = []
    if check:
        reference = copy.deepcopy(model).eval().to(DTYPES[dtype])
        module = program.module()
        for x in parity_inputs(model):
            x = x.to(DTYPES[dtype])
            with torch.no_grad():
                diff = (module(x).float() - reference(x).float()).abs().max().item()
            checks.append(ParityCheck(tuple(x.shape), diff))
        worst = max(c.max_abs_diff for c in checks)
        if not worst <= PT2_TOLERANCE[dtype]:
            raise ExportParityError(
                f"{path}: the exported program differs from the eager model by {worst:.3g} "
                f"> {PT2_TOLERANCE[dtype]:g}; file not written"
            )
    written = save_pt2(program, path, record)
    return ExportResult(written, "pt2", dtype, record, tuple(checks), PT2_TOLERANCE[dtype])


def export_model(
    model: nn.Module,
    meta: dict[str, object],
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    dtype: str = "fp32",
    check: bool = True,
    fp16_probe: object = None,
) -> ExportResult:
    """Write ``model`` (with its irformer ``meta``) to ``path`` in format ``fmt``.

    ``fmt`` defaults to the one the suffix names (:func:`format_for_path`).
    The fp16 verdict (:func:`irformer.engine.fp16.measure_fp16_safety`, on
    ``fp16_probe`` or the default probe) is added to the metadata of every
    format but ``official``. ``dtype`` applies to ``onnx`` (fp32, fp16) and
    ``pt2`` (fp32, fp16, bf16); weights keep the model's own dtype.
    """
    from irformer.archs import save_model_weights
    from irformer.engine.fp16 import measure_fp16_safety

    fmt = format_for_path(path, fmt)
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if fmt in ("safetensors", "official") and dtype != "fp32":
        raise ValueError(f"--dtype applies to onnx and pt2 exports, not {fmt}")
    if fmt == "onnx" and dtype not in ONNX_DTYPES:
        raise ValueError(
            f"ONNX precision {dtype!r} is not offered (choose {', '.join(ONNX_DTYPES)}): bf16 "
            "Conv needs opset 22 and ONNX Runtime's CPU provider has no bf16 kernels to verify it"
        )
    model = model.eval()
    if fmt == "official":
        written = export_official(model, path, meta)
        return ExportResult(written, fmt, "fp32", dict(meta))
    verdict = measure_fp16_safety(model, fp16_probe)  # type: ignore[arg-type]
    record = {**meta, **verdict.record()}
    logger.info("%s", verdict.describe())
    if fmt == "safetensors":
        written = save_model_weights(path, model, record)
        return ExportResult(written, fmt, "fp32", record)
    if fmt == "pt2":
        return export_pt2(model, path, record, dtype=dtype, check=check)
    done = export_onnx(model, path, record, dtype=dtype, check=check)
    return ExportResult(
        done.path, fmt, dtype, done.meta, done.checks, PARITY_TOLERANCE[dtype] if check else None
    )
