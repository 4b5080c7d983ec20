"""ONNX files of irformer models: dynamic sizes, plain ops, metadata, checked in ONNX Runtime.

:func:`export_onnx` converts the captured program (:mod:`irformer.export.graph`)
with PyTorch's dynamo-based exporter at opset :data:`OPSET`: input ``input``
(B, C, H, W) and output ``output`` (B, C, s*H, s*W), batch, height and width
dynamic, the reflect padding to a window multiple, the shifted-window masks
and the crop inside the graph. Attention is MatMul + Softmax (no custom op, no
fused attention op), i-LN is ReduceMean/ReduceL2 arithmetic, LayerNorm is
ONNX's LayerNormalization.

Before anything is written the model is run in ONNX Runtime (CPU) on two
inputs -- batch 1 at ``2ws x 3ws`` and batch 2 at a size that is not a window
multiple -- and compared with the PyTorch model: the largest ``|ONNX -
PyTorch|`` must stay within :data:`PARITY_TOLERANCE` (fp32: 1e-4), else
:class:`ExportParityError` and no file.

Precisions: ``fp32``, and ``fp16`` only for a model whose measured feature
magnitudes leave fp16 a safe margin (:func:`irformer.engine.fp16.
measure_fp16_safety`; the fp16 file is compared with the same model run in
fp16 by PyTorch). bf16 is refused: ONNX's Conv accepts bfloat16 only from
opset 22 and ONNX Runtime's CPU provider has no bf16 kernels for these graphs,
so such a file could not be checked here.

Metadata (``metadata_props``): ``irformer`` holds the whole record as JSON
(arch, preset, norm, scale, task, version, model_kwargs, fp16 verdict, dtype,
opset, exporter); the main fields are repeated as flat keys (``arch``,
``norm``, ``scale``...) for tools that show the property list.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import irformer
from irformer.errors import CheckpointReadError, IrformerError
from irformer.export.graph import DTYPES, capture_program
from irformer.files import atomic_write

__all__ = [
    "FLAT_KEYS",
    "INPUT_NAME",
    "ONNX_DTYPES",
    "OPSET",
    "OUTPUT_NAME",
    "PARITY_TOLERANCE",
    "ExportParityError",
    "OnnxExport",
    "ParityCheck",
    "export_onnx",
    "onnx_parity",
    "parity_inputs",
    "read_onnx_metadata",
]

logger = logging.getLogger(__name__)

OPSET = 18
"""ONNX opset of exported files (>= 17 for LayerNormalization; 18 is the
exporter's native opset in PyTorch 2.13, so no version conversion runs)."""
INPUT_NAME = "input"
OUTPUT_NAME = "output"
ONNX_DTYPES: tuple[str, ...] = ("fp32", "fp16")
PARITY_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2}
"""Largest allowed ``|ONNX Runtime - PyTorch|`` per precision (outputs in [0, 1]
scale). fp16 is compared with PyTorch running the same fp16 model, whose
kernels round differently (fp16 has ~3 decimal digits)."""
FLAT_KEYS: tuple[str, ...] = ("arch", "preset", "norm", "scale", "task", "version")


class ExportParityError(IrformerError, ValueError):
    """An exported file's outputs differ from the PyTorch model's beyond the tolerance."""


@dataclass(frozen=True)
class ParityCheck:
    """One comparison of an exported file with the PyTorch model."""

    shape: tuple[int, ...]
    """Input shape (B, C, H, W)."""
    max_abs_diff: float


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    dtype: str
    checks: tuple[ParityCheck, ...]
    meta: dict[str, object]

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff for c in self.checks), default=0.0)


def parity_inputs(model: nn.Module) -> list[Tensor]:
    """Two inputs: (1, C, 2ws, 3ws) and (2, C, 2ws+3, ws+5) -- the second not a
    window multiple, so the padding inside the graph is exercised."""
    ws = int(getattr(model, "window_size", 8))
    chans = int(getattr(model, "in_chans", 3))
    gen = torch.Generator().manual_seed(1)
    return [
        torch.rand(1, chans, 2 * ws, 3 * ws, generator=gen),
        torch.rand(2, chans, 2 * ws + 3, ws + 5, generator=gen),
    ]


def _session(model_bytes: bytes, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def onnx_parity(
    model_bytes: bytes,
    model: nn.Module,
    dtype: str,
    inputs: list[Tensor] | None = None,
) -> list[ParityCheck]:
    """Max ``|ONNX Runtime - PyTorch|`` of the serialized model on each input.

    The PyTorch reference is ``model`` cast to ``dtype`` (in a copy) in eager
    mode, as users run it.
    """
    import copy

    session = _session(model_bytes)
    reference = copy.deepcopy(model).eval().to(DTYPES[dtype])
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    checks = []
    for x in inputs if inputs is not None else parity_inputs(model):
        with torch.no_grad():
            want = reference(x.to(DTYPES[dtype])).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy().astype(np_dtype)})[0]
        if got.shape != want.shape:
            raise ExportParityError(
                f"ONNX output shape {got.shape} for input {tuple(x.shape)}; PyTorch gives "
                f"{want.shape}"
            )
        diff = float(np.abs(got.astype(np.float32) - want).max())
        checks.append(ParityCheck(tuple(x.shape), diff if np.isfinite(diff) else float("inf")))
    return checks


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    meta: Mapping[str, object],
    *,
    dtype: str = "fp32",
    check: bool = True,
) -> OnnxExport:
    """Write ``model`` as an ONNX file at ``path`` (see the module docstring).

    ``meta`` is the irformer record to embed (it should carry the fp16 verdict:
    :meth:`irformer.engine.fp16.Fp16Safety.record`); ``dtype='fp16'`` is
    refused unless ``meta['fp16_safe']`` is true. With ``check`` (default) the
    file is only written when the ONNX Runtime parity check passes.
    """
    path = Path(path)
    if dtype not in ONNX_DTYPES:
        raise ValueError(
            f"ONNX precision {dtype!r} is not offered (choose {', '.join(ONNX_DTYPES)}): "
            "bf16 Conv needs opset 22 and ONNX Runtime's CPU provider has no bf16 kernels, "
            "so a bf16 file could not be verified"
        )
    if dtype == "fp16" and meta.get("fp16_safe") is not True:
        raise ValueError(
            f"fp16 export refused for {path.name}: the model is not marked fp16-safe "
            f"(measured max |x| {meta.get('fp16_max_abs', '?')} at "
            f"{meta.get('fp16_max_layer', '?')}); export fp32"
        )
    program = capture_program(model, dtype=dtype)
    onnx_program = torch.onnx.export(
        program,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    proto = onnx_program.model_proto
    record = {
        **{k: v for k, v in meta.items()},
        "dtype": dtype,
        "opset": OPSET,
        "exporter": f"torch.onnx (dynamo, torch.export) torch {torch.__version__}",
        "irformer_version": irformer.__version__,
        "input": f"{INPUT_NAME}: (batch, {getattr(model, 'in_chans', 3)}, height, width) "
        "in [0, 1], any size",
    }
    _set_metadata(proto, record)
    data = proto.SerializeToString()
    checks: list[ParityCheck] = []
    if check:
        checks = onnx_parity(data, model, dtype)
        worst = max(c.max_abs_diff for c in checks)
        limit = PARITY_TOLERANCE[dtype]
        if not worst <= limit:
            detail = ", ".join(f"{c.shape}: {c.max_abs_diff:.3g}" for c in checks)
            raise ExportParityError(
                f"{path}: ONNX Runtime differs from PyTorch by {worst:.3g} > {limit:g} "
                f"({detail}); file not written"
            )
    atomic_write(path, data)
    logger.info("wrote %s (%s, opset %d)", path, dtype, OPSET)
    return OnnxExport(path, dtype, tuple(checks), record)


def _set_metadata(proto: object, record: Mapping[str, object]) -> None:
    import onnx

    entries = {"irformer": json.dumps(dict(record), sort_keys=True, default=str)}
    for key in (*FLAT_KEYS, "in_chans", "window_size", "dtype", "fp16_safe", "fp16_max_abs"):
        if key in record and record[key] is not None:
            entries[key] = str(record[key])
    model_kwargs = record.get("model_kwargs")
    if isinstance(model_kwargs, Mapping):
        for key in ("in_chans", "window_size"):
            if key in model_kwargs and key not in entries:
                entries[key] = str(model_kwargs[key])
    del proto.metadata_props[:]  # type: ignore[attr-defined]
    onnx.helper.set_model_props(proto, entries)
    proto.doc_string = (  # type: ignore[attr-defined]
        f"irformer {record.get('arch')} ({record.get('preset') or 'custom'}), "
        f"norm {record.get('norm')}, x{record.get('scale')} {record.get('task')}"
    )


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """The irformer record of an ONNX file (``{}`` for a file irformer did not write)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise CheckpointReadError(f"{path}: not a readable ONNX file ({exc})") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    text = props.get("irformer")
    if not text:
        return {}
    try:
        return dict(json.loads(text))
    except json.JSONDecodeError as exc:
        raise CheckpointReadError(f"{path}: unreadable irformer metadata ({exc})") from exc
