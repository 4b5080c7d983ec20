"""Real packed quantised models: b-bit integers in bytes, bounds, FP for the rest.

A fake-quantised model (from :func:`irformer.compress.methods.quantize_model`)
is saved as a safetensors file holding

- for every quantised Linear ``P``: ``P.weight.packed`` (uint8), the grid
  indices of the weight in its quantised domain (rotated and padded for
  CompSRT) packed ``b`` bits each, little-endian bit order, row-major; with
  pruning only the kept entries, plus ``P.weight.mask`` (uint8), the 1-bit
  keep-mask of the whole domain (``P.weight.row_mask``, one bit per output
  row, for channel pruning);
- every other state entry (convs, norms, biases, position bias, quantiser
  bounds, alpha/beta, NoisyQuant noise, twin-uniform steps) at its own dtype;
- metadata: the :class:`QuantConfig`, per-layer shapes and a caller-supplied
  model description (how to rebuild the FP skeleton).

:func:`storage_report` computes the same byte count from the fake-quantised
model, so the file's tensor payload equals the accounting exactly (the
safetensors header comes on top). Loading dequantises with the same function
the fake quantiser uses, so outputs are reproduced bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from irformer.compress.methods import attach_for_config
from irformer.compress.methods.base import QuantConfig, QuantLinear, quant_linears
from irformer.compress.prune import bits_per_param, megabytes

__all__ = [
    "PACK_FORMAT",
    "LayerStorage",
    "StorageReport",
    "load_packed",
    "load_packed_model",
    "pack_bits",
    "read_packed_indices",
    "read_packed_metadata",
    "save_packed",
    "storage_report",
    "unpack_bits",
]

PACK_FORMAT = "irformer.packed/1"


def pack_bits(values: Tensor | np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers ``< 2^bits`` (``bits <= 8``) into uint8, LSB first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits supports 1..8 bits, got {bits}")
    v = np.asarray(values.cpu().numpy() if isinstance(values, Tensor) else values).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values span [{v.min()}, {v.max()}], outside the {bits}-bit range")
    v = v.astype(np.uint8)
    if bits == 8:
        return v.copy()
    planes = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` integers as int64."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[:count].astype(np.int64)
    planes = np.unpackbits(packed, bitorder="little", count=count * bits).reshape(count, bits)
    return (planes.astype(np.int64) << np.arange(bits)).sum(axis=1)


@dataclass(frozen=True)
class LayerStorage:
    """Storage of one quantised weight."""

    name: str
    shape: tuple[int, int]
    """(out, in) of the Linear."""
    domain_shape: tuple[int, int]
    """(out, padded in) of what is quantised (differs when rotation pads)."""
    bits: int
    kept: int
    pruned: bool
    mask_kind: str = "dense"
    """With ``pruned``: ``dense`` (one bit per domain entry) or ``rows`` (one per row)."""

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def domain_numel(self) -> int:
        return self.domain_shape[0] * self.domain_shape[1]

    @property
    def index_bytes(self) -> int:
        return math.ceil(self.kept * self.bits / 8)

    @property
    def mask_entries(self) -> int:
        if not self.pruned:
            return 0
        return self.domain_shape[0] if self.mask_kind == "rows" else self.domain_numel

    @property
    def mask_bytes(self) -> int:
        return math.ceil(self.mask_entries / 8)


@dataclass
class StorageReport:
    """Bytes of a packed model and bits per quantised parameter."""

    layers: list[LayerStorage] = field(default_factory=list)
    fp_bytes: int = 0
    """Every unquantised state entry (convs, norms, biases, bounds, ...)."""
    fp_params: int = 0
    fp32_model_bytes: int = 0
    """The original model's parameters in fp32, for the compression ratio."""

    @property
    def quantized_params(self) -> int:
        return sum(s.numel for s in self.layers)

    @property
    def quantized_bytes(self) -> int:
        return sum(s.index_bytes + s.mask_bytes for s in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.fp_bytes

    @property
    def megabytes(self) -> float:
        return megabytes(self.total_bytes)

    @property
    def bits_per_quantized_param(self) -> float:
        """Stored bits (indices + masks, padding included) per original weight."""
        return 8 * self.quantized_bytes / max(self.quantized_params, 1)

    @property
    def nominal_bits_per_param(self) -> float:
        """The papers' figure, ``b`` or ``(1 - p) b + 1`` (no padding, no byte rounding;
        a row mask costs ``1 / cols`` bits per weight instead of 1)."""
        if not self.layers:
            return 0.0
        s = self.layers[0]
        prune = 1.0 - s.kept / s.domain_numel if s.pruned else 0.0
        return bits_per_param(s.bits, prune, mask_bits=s.mask_entries / s.domain_numel)

    def as_dict(self) -> dict[str, Any]:
        return {
            "megabytes": self.megabytes,
            "total_bytes": self.total_bytes,
            "quantized_bytes": self.quantized_bytes,
            "fp_bytes": self.fp_bytes,
            "quantized_params": self.quantized_params,
            "fp_params": self.fp_params,
            "bits_per_quantized_param": self.bits_per_quantized_param,
            "nominal_bits_per_param": self.nominal_bits_per_param,
            "fp32_model_bytes": self.fp32_model_bytes,
        }


def _mask_key(name: str, kind: str) -> str:
    """The file key of a layer's keep-mask: dense (one bit per entry) or per row."""
    return f"{name}.weight.row_mask" if kind == "rows" else f"{name}.weight.mask"


def _excluded_keys(model: nn.Module) -> set[str]:
    """State keys replaced by packed data: quantised weights and their masks."""
    keys = set()
    for name, _ in quant_linears(model):
        keys.add(f"{name}.weight")
        keys.add(f"{name}.weight_quantizer.mask")
    return keys


def _layer_storage(name: str, ql: QuantLinear) -> LayerStorage:
    wq = ql.weight_quantizer
    n_in = wq.rotate_size or ql.in_features
    mask = wq.mask
    domain = (ql.out_features, n_in)
    kept = int(mask.sum()) if mask is not None else domain[0] * domain[1]
    return LayerStorage(
        name=name,
        shape=(ql.out_features, ql.in_features),
        domain_shape=domain,
        bits=wq.bits,
        kept=kept,
        pruned=mask is not None,
        mask_kind="rows" if wq.prune_mode == "channel" else "dense",
    )


def storage_report(model: nn.Module) -> StorageReport:
    """Storage accounting of a fake-quantised (or packed-loaded) model."""
    report = StorageReport()
    excluded = _excluded_keys(model)
    for name, ql in quant_linears(model):
        report.layers.append(_layer_storage(name, ql))
    for key, value in model.state_dict().items():
        if key in excluded:
            continue
        report.fp_bytes += value.numel() * value.element_size()
        report.fp_params += value.numel()
    n_params = sum(p.numel() for p in model.parameters())
    report.fp32_model_bytes = 4 * n_params
    return report


def save_packed(
    model: nn.Module,
    cfg: QuantConfig,
    path: str | Path,
    *,
    model_spec: dict[str, Any] | None = None,
) -> StorageReport:
    """Write ``model`` (fake-quantised with ``cfg``) as a packed safetensors file.

    ``model_spec``: JSON-serialisable description of the FP skeleton; by default
    the model's ``irformer_meta`` (registry arch + kwargs), which
    :func:`load_packed_model` rebuilds the skeleton from.
    """
    path = Path(path)
    report = storage_report(model)
    excluded = _excluded_keys(model)
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for (name, ql), info in zip(quant_linears(model), report.layers, strict=True):
            if ql.weight_prequantized:
                raise ValueError(
                    f"{name}: weight is already dequantised (a loaded packed model); "
                    "save the fake-quantised model instead"
                )
            wq = ql.weight_quantizer
            if wq.official_pruning:
                raise ValueError(
                    f"{name}: prune_mode 'official' cannot be packed (its pruned entries are "
                    "quantised to non-zeros and its mask changes per forward); use 'magnitude'"
                )
            idx = wq.indices(ql.weight).to(torch.int64)
            if wq.mask is not None:
                kept = idx[wq.mask]
                bits = wq.mask[:, 0] if info.mask_kind == "rows" else wq.mask
                tensors[_mask_key(name, info.mask_kind)] = torch.from_numpy(
                    pack_bits(bits.to(torch.uint8), 1)
                )
            else:
                kept = idx
            tensors[f"{name}.weight.packed"] = torch.from_numpy(pack_bits(kept, wq.bits))
            layers[name] = {
                "shape": list(info.shape),
                "domain_shape": list(info.domain_shape),
                "bits": info.bits,
                "kept": info.kept,
                "pruned": info.pruned,
                "mask": info.mask_kind if info.pruned else "none",
            }
        for key, value in model.state_dict().items():
            if key not in excluded:
                tensors[key] = value.detach().cpu().contiguous()
    if model_spec is None:
        model_spec = getattr(model, "irformer_meta", None)
    metadata = {
        "format": PACK_FORMAT,
        "quant_config": json.dumps(cfg.to_dict()),
        "layers": json.dumps(layers),
        "model": json.dumps(model_spec or {}),
        "storage": json.dumps(report.as_dict()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return report


def read_packed_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of a packed file: ``quant_config`` (dict), ``layers``, ``model``, ``storage``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"packed model {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != PACK_FORMAT:
        raise ValueError(
            f"{path} is not an irformer packed model (format {meta.get('format')!r}, "
            f"expected {PACK_FORMAT!r})"
        )
    return {k: (v if k == "format" else json.loads(v)) for k, v in meta.items()}


def header_bytes(path: str | Path) -> int:
    """Size of the safetensors header (8-byte length + JSON), for size checks."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def read_packed_indices(path: str | Path) -> dict[str, Tensor]:
    """Every packed weight's grid indices in its quantisation domain, (out, m) int64 per
    layer name (0 where pruned): the integer operand of
    :class:`irformer.compress.int_linear.IntegerLinear`."""
    from safetensors.torch import load_file

    meta = read_packed_metadata(path)
    tensors = load_file(str(path))
    return {name: _layer_indices(tensors, name, info)[0] for name, info in meta["layers"].items()}


def _layer_indices(
    tensors: dict[str, Tensor], name: str, info: dict[str, Any]
) -> tuple[Tensor, Tensor | None]:
    """(indices (out, m) int64, keep-mask or None) of one packed layer."""
    out, n_in = info["domain_shape"]
    numel = out * n_in
    packed = tensors[f"{name}.weight.packed"].numpy()
    kept = torch.from_numpy(unpack_bits(packed, info["bits"], info["kept"]))
    if not info["pruned"]:
        return kept.reshape(out, n_in), None
    kind = info.get("mask", "dense")
    if kind == "rows":
        rows = unpack_bits(tensors[_mask_key(name, kind)].numpy(), 1, out)
        mask = torch.from_numpy(rows.astype(bool))[:, None].expand(out, n_in).clone()
    else:
        mask_bits = unpack_bits(tensors[_mask_key(name, kind)].numpy(), 1, numel)
        mask = torch.from_numpy(mask_bits.astype(bool)).reshape(out, n_in)
    idx = torch.zeros(out, n_in, dtype=torch.int64)
    idx[mask] = kept
    return idx, mask


def load_packed(path: str | Path, skeleton: nn.Module) -> nn.Module:
    """Rebuild the quantised model from a packed file and an FP ``skeleton`` of the
    same architecture (its weights are not used for quantised layers).

    The quantised Linears get their dequantised weights (``weight_prequantized``),
    activation quantisers are ready in ``quant`` mode.
    """
    meta = read_packed_metadata(path)
    cfg = QuantConfig.from_dict(meta["quant_config"])
    layers: dict[str, dict[str, Any]] = meta["layers"]
    qmodel = attach_for_config(copy.deepcopy(skeleton).eval(), cfg)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    qls = dict(quant_linears(qmodel))
    if set(qls) != set(layers):
        raise ValueError(
            f"{path}: quantised layers differ from the skeleton's: "
            f"only in file {sorted(set(layers) - set(qls))[:5]}, "
            f"only in skeleton {sorted(set(qls) - set(layers))[:5]}"
        )
    indices: dict[str, Tensor] = {}
    for name, info in layers.items():
        wq = qls[name].weight_quantizer
        idx, mask = _layer_indices(tensors, name, info)
        tensors.pop(f"{name}.weight.packed")
        if mask is not None:
            tensors.pop(_mask_key(name, info.get("mask", "dense")))
            wq.mask = mask.to(qls[name].weight.device)
        indices[name] = idx
        wq.calibrated = True
    missing, unexpected = qmodel.load_state_dict(tensors, strict=False)
    expected_missing = {f"{n}.weight" for n in layers} | {
        f"{n}.weight_quantizer.mask" for n in layers
    }
    if unexpected or set(missing) - expected_missing:
        raise ValueError(
            f"{path}: state does not fit the skeleton: missing "
            f"{sorted(set(missing) - expected_missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        for name, idx in indices.items():
            ql = qls[name]
            idx = idx.to(device=ql.weight.device, dtype=ql.weight.dtype)
            w_hat = ql.weight_quantizer.dequantize(idx, ql.in_features)
            ql.weight = nn.Parameter(w_hat.contiguous(), requires_grad=False)
            ql.weight_prequantized = True
    for m in qmodel.modules():
        if hasattr(m, "mode") and hasattr(m, "finish_calibration"):
            m.mode = "quant"
    return qmodel


def load_packed_model(path: str | Path) -> nn.Module:
    """Load a packed file whose metadata carries the irformer model description."""
    from irformer.archs import build_model

    spec = read_packed_metadata(path)["model"]
    if not spec or "arch" not in spec or "model_kwargs" not in spec:
        raise ValueError(
            f"{path} carries no irformer model description (arch, model_kwargs); "
            "build the FP skeleton yourself and call load_packed(path, skeleton)"
        )
    skeleton = build_model(str(spec["arch"]), **dict(spec["model_kwargs"]))
    skeleton.irformer_meta = spec
    qmodel = load_packed(path, skeleton)
    return qmodel
