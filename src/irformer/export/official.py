"""Weights in the official layout, for tools that read official files (spandrel, chaiNNer).

irformer's own files keep only learned tensors and carry an ``irformer``
metadata record; readers of official checkpoints (spandrel 0.4.2, hence
chaiNNer) recognise an architecture by keys that official files always hold:
the size-dependent buffers ``relative_position_index`` / ``attn_mask``
(SwinIR, DRCT), ``relative_position_index_SA`` / ``_OCA`` (HAT),
``aligned_relative_position_index`` / ``attn_mask`` (SRFormer). Without them
spandrel refuses an irformer file outright. :func:`official_state_dict`
adds exactly the buffers the official code registers, derived from the model
(masks at the training patch ``img_size``, shifted blocks only, as the
originals register ``None`` for the others), so a strict
``load_state_dict`` into the original architecture succeeds.

Only a model the official architecture computes identically is written
(:func:`check_official_compatible`). Above all the norm: i-LN (and every norm
but ``ln``) keeps LayerNorm's key names, so an official-layout i-LN file
would be read and run as a LayerNorm model, silently wrong. Such an export is
refused with :class:`OfficialFormatError`; so are ``stdnorm`` (the originals
do not divide by the std), heads the original lacks (HAT and DRCT:
``pixelshuffle`` only) or sizes differently (``num_feat``: the originals
hard-code 64) and settings a reader cannot recover from the keys
(``qk_scale``, HAT's ``conv_scale``, ``img_range`` other than the readers' rule).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from irformer.archs import ARCHITECTURES, transformer_blocks
from irformer.archs.windows import build_permuted_window_mask, build_shifted_window_mask
from irformer.errors import IrformerError
from irformer.files import atomic_write

__all__ = [
    "OFFICIAL_HEADS",
    "OfficialFormatError",
    "check_official_compatible",
    "export_official",
    "official_state_dict",
]

OFFICIAL_HEADS: dict[str, tuple[str, ...]] = {
    "swinir": ("pixelshuffle", "pixelshuffledirect", "nearest+conv", ""),
    "hat": ("pixelshuffle",),
    "drct": ("pixelshuffle",),
    "srformer": ("pixelshuffle", "pixelshuffledirect", "nearest+conv", ""),
}
"""Reconstruction heads each original defines (irformer adds the others)."""

DEFAULT_CONV_SCALE = 0.01
"""HAT's ``conv_scale``: not in the keys, so readers assume the official value."""


class OfficialFormatError(IrformerError, ValueError):
    """The model cannot be written in the official layout without being misread."""


def _full_kwargs(meta: Mapping[str, object]) -> tuple[str, dict[str, object]]:
    arch = str(meta.get("arch"))
    if arch not in ARCHITECTURES:
        raise OfficialFormatError(f"unknown arch {arch!r}; known: {', '.join(ARCHITECTURES)}")
    kwargs = meta.get("model_kwargs")
    kwargs = dict(kwargs) if isinstance(kwargs, Mapping) else {}
    return arch, {**ARCHITECTURES[arch].defaults(), **kwargs}


def check_official_compatible(meta: Mapping[str, object]) -> None:
    """Raise :class:`OfficialFormatError` when an official-layout file of the model
    described by ``meta`` (irformer metadata) would be read as another model."""
    arch, kw = _full_kwargs(meta)
    norm = str(meta.get("norm", kw.get("norm", "ln")))
    if norm != "ln":
        raise OfficialFormatError(
            f"norm {norm!r} cannot be written in the official {arch} layout: it keeps "
            "LayerNorm's key names, so spandrel/chaiNNer and the official code would run it "
            "as a LayerNorm model and produce wrong images. Export it as onnx, pt2 or "
            "safetensors (irformer metadata) instead"
        )
    problems = []
    if kw.get("stdnorm"):
        problems.append("stdnorm=True (the original does not divide the input by the std)")
    heads = OFFICIAL_HEADS[arch]
    if kw.get("upsampler") not in heads:
        problems.append(
            f"upsampler {kw.get('upsampler')!r} (the original {arch} has "
            f"{', '.join(map(repr, heads))})"
        )
    if kw.get("upsampler") in ("pixelshuffle", "nearest+conv") and int(kw["num_feat"]) != 64:
        problems.append(f"num_feat={kw['num_feat']} (the original's heads hard-code 64 features)")
    if kw.get("qk_scale") is not None:
        problems.append(f"qk_scale={kw['qk_scale']} (not recoverable from the keys)")
    if arch == "hat" and float(kw.get("conv_scale", DEFAULT_CONV_SCALE)) != DEFAULT_CONV_SCALE:
        problems.append(f"conv_scale={kw['conv_scale']} (readers assume {DEFAULT_CONV_SCALE})")
    expected_range = 255.0 if arch == "swinir" and int(kw["window_size"]) == 7 else 1.0
    if float(kw.get("img_range", 1.0)) != expected_range:
        problems.append(
            f"img_range={kw.get('img_range')} (readers infer {expected_range:g} for this "
            f"{arch}{' (window 7)' if expected_range == 255 else ''})"
        )
    if problems:
        raise OfficialFormatError(
            f"this {arch} model cannot be written in the official layout without being "
            f"misread: {'; '.join(problems)}"
        )


def official_state_dict(model: nn.Module, meta: Mapping[str, object]) -> dict[str, Tensor]:
    """The model's state dict plus the buffers the official architecture registers.

    Checks :func:`check_official_compatible` first.
    """
    check_official_compatible(meta)
    arch, kw = _full_kwargs(meta)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    window = int(getattr(model, "window_size", kw["window_size"]))
    img_size = int(kw.get("img_size", 64))
    if arch == "hat":
        for name in ("relative_position_index_SA", "relative_position_index_OCA"):
            state[name] = getattr(model, name).clone()
        return state
    for name, block in transformer_blocks(model):
        shift = int(getattr(block, "shift_size", 0))
        if arch == "srformer":
            index = block.attn.aligned_relative_position_index
            state[f"{name}.attn.aligned_relative_position_index"] = index.clone()
            if shift:
                state[f"{name}.attn_mask"] = build_permuted_window_mask(
                    img_size, img_size, window, shift
                )
            continue
        state[f"{name}.attn.relative_position_index"] = block.attn.relative_position_index.clone()
        if shift:
            if img_size % window:
                raise OfficialFormatError(
                    f"img_size {img_size} is not a multiple of window_size {window}: the "
                    "official attn_mask of the training patch is undefined"
                )
            state[f"{name}.attn_mask"] = build_shifted_window_mask(
                img_size, img_size, window, shift
            )
    return state


def export_official(
    model: nn.Module, path: str | os.PathLike[str], meta: Mapping[str, object]
) -> Path:
    """Write the official-layout weights: ``.pth`` as ``{"params": state}`` (BasicSR),
    ``.safetensors`` as the bare state dict; atomically, nothing else in the file."""
    path = Path(path)
    state = official_state_dict(model, meta)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        return atomic_write(path, save(state, metadata={"format": "pt"}))
    if path.suffix == ".pth":
        return atomic_write(path, lambda handle: torch.save({"params": state}, handle))
    raise ValueError(f"official weights path {path}: expected a .pth or .safetensors suffix")
