"""An ONNX file as a model: ONNX Runtime behind ``model(x)``.

:class:`OnnxRuntimeModel` wraps an ONNX Runtime session in an ``nn.Module``
without parameters, so everything in :mod:`irformer.engine.infer` that calls
``model(x)`` -- tiling, the x8 self-ensemble, folder restoration, non-finite
counts -- runs an exported file unchanged (``irformer restore --backend onnx``).
It reads the irformer metadata of the file for ``upscale``, ``in_chans`` and
``window_size``, feeds the session the file's own input precision (fp32 or
fp16) and returns outputs in the caller's dtype.

The exact bounded-memory path (``--exact-chunk``) does not apply: it is a way
of *executing* the PyTorch model (attention over chunks of windows under an
execution context), and an ONNX graph always computes the whole image at once
-- the same output as the exact path, without its memory bound.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from irformer.errors import CheckpointReadError
from irformer.export.onnx_file import read_onnx_metadata

__all__ = ["OnnxRuntimeModel"]

IMAGE_STATISTICS_NORMS: tuple[str, ...] = ("iln", "ln_star", "in")
"""Norm names (irformer metadata) whose statistics span the whole image."""
_NUMPY_INPUTS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxRuntimeModel(nn.Module):
    """``model(x)`` through ONNX Runtime; x: (B, C, H, W) float in [0, 1], any size.

    ``threads``: ONNX Runtime's intra-op threads (default: torch's thread count).
    ``providers``: ONNX Runtime execution providers (default: CPU).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        self.irformer_meta = read_onnx_metadata(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped errors for bad files
            raise CheckpointReadError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type not in _NUMPY_INPUTS:
            found = ", ".join(f"{i.name}: {i.type}" for i in inputs)
            raise CheckpointReadError(
                f"{self.path}: expected one float/float16 image input, found {found}"
            )
        self.input_name = inputs[0].name
        # Any single-image-in, image-out file works (other exporters' names too).
        self.output_name = self.session.get_outputs()[0].name
        self.input_dtype = _NUMPY_INPUTS[inputs[0].type]
        meta = self.irformer_meta
        kwargs = meta.get("model_kwargs") if isinstance(meta.get("model_kwargs"), dict) else {}
        self.upscale = int(meta.get("scale", 1) or 1)
        channels = inputs[0].shape[1]
        self.in_chans = (
            int(channels)
            if isinstance(channels, int)
            else int(
                kwargs.get("in_chans", 3)  # type: ignore[union-attr]
            )
        )
        self.window_size = int(kwargs.get("window_size", 8))  # type: ignore[union-attr]
        self.norm_name = str(meta.get("norm", "unknown"))
        self.image_statistics_norms: tuple[str, ...] = (
            (self.norm_name,) if self.norm_name in IMAGE_STATISTICS_NORMS else ()
        )
        """The file's norm when it pools whole-image statistics (tiling then changes
        the output: :func:`irformer.engine.infer.tiling_note`)."""

    @property
    def precision(self) -> str:
        """The file's own input precision (``fp32`` or ``fp16``)."""
        return "fp16" if self.input_dtype == np.float16 else "fp32"

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, s*H, s*W) in x's dtype and device."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self.path.name} expects input of shape (B, {self.in_chans}, H, W), "
                f"got {tuple(x.shape)}"
            )
        feed = x.detach().float().cpu().numpy().astype(self.input_dtype, copy=False)
        out = self.session.run([self.output_name], {self.input_name: feed})[0]
        return torch.from_numpy(np.ascontiguousarray(out)).to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"{self.path.name}, {self.precision}, x{self.upscale}, norm={self.norm_name}"
