"""Restoring images with a model: plain, tiled, exact in bounded memory, self-ensemble, precision.

Three ways to run one ``(B, C, H, W)`` tensor through a model:

* **plain**: ``model(x)``; memory grows with the image (the attention mask and
  scores of every window at once).
* **tiled** (:func:`forward_tiled`): overlapping tiles whose outputs are
  averaged where they overlap, as the SwinIR/HAT test scripts do. Fine for LN
  models far from tile borders, but a model that normalises with whole-image
  statistics (i-LN, LN*) sees different statistics per tile, so tiles disagree
  and leave seams.
* **exact** (:func:`forward_exact`): the whole image layer by layer with window
  attention in chunks of windows and the MLP in chunks of tokens (an
  :func:`~irformer.execution.execution_context` with ``windows_per_chunk``), so
  memory is a few feature maps and the output equals the plain forward pass
  for every norm.

Any of these can be wrapped in the x8 self-ensemble (:func:`self_ensemble`) and
run in fp32, bf16 or fp16 (:func:`run_with_precision`), which also counts
non-finite output pixels and names the first layer whose output went
non-finite (fp16 overflow is the "black dots" of the i-LN paper, Sec. 5).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from irformer.engine.memory import MemoryBudgetError, default_budget, plan_restore
from irformer.engine.precision import (
    AutocastDtype,
    Precision,
    autocast_context,
    check_precision_options,
    model_dtype,
    precision_dtype,
    prepare_model_for_precision,
)
from irformer.execution import execution_context
from irformer.progress import Progress
from irformer.progress import report as report_progress

__all__ = [
    "AlphaMode",
    "NonFiniteReport",
    "PrecisionModel",
    "RestoreFailure",
    "RestoreOptions",
    "RestoreResult",
    "RestoredFile",
    "count_nonfinite",
    "forward_exact",
    "forward_plain",
    "forward_tiled",
    "is_complete_output",
    "locate_first_nonfinite",
    "plan_outputs",
    "restore_files",
    "restore_tensor",
    "run_with_precision",
    "self_ensemble",
    "tiling_note",
]

logger = logging.getLogger(__name__)

DEFAULT_WINDOWS_PER_CHUNK = 256
"""Windows per attention chunk in the exact path: 256 windows of 8x8 tokens are
16k tokens, a few MB of scores per head, while keeping the GEMMs large."""

Blend = Literal["mean", "ramp"]
AlphaMode = Literal["keep", "drop"]
"""What :func:`restore_files` does with an alpha channel (see there)."""
ModelFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class NonFiniteReport:
    """Non-finite (NaN/inf) values in a model output, and where they started."""

    nonfinite_values: int
    """NaN/inf entries in the output."""
    nonfinite_pixels: int
    """Output pixels (over batch and positions) with at least one NaN/inf channel."""
    total_pixels: int
    first_layer: str | None = None
    """Qualified name of the first module (in execution order, innermost first)
    whose output held a NaN/inf; ``"<model>"`` when only the model's own forward
    produced them; None when the output is finite or the layer was not located."""
    first_layer_type: str | None = None

    @property
    def finite(self) -> bool:
        return self.nonfinite_values == 0

    def merge(self, other: NonFiniteReport) -> NonFiniteReport:
        """Sum counts over images; keep the first located layer."""
        return NonFiniteReport(
            self.nonfinite_values + other.nonfinite_values,
            self.nonfinite_pixels + other.nonfinite_pixels,
            self.total_pixels + other.total_pixels,
            self.first_layer or other.first_layer,
            self.first_layer_type or other.first_layer_type,
        )

    def summary(self) -> str:
        if self.finite:
            return f"all {self.total_pixels} output pixels finite"
        where = f"; first non-finite layer: {self.first_layer}" if self.first_layer else ""
        return (
            f"{self.nonfinite_pixels}/{self.total_pixels} output pixels non-finite "
            f"({self.nonfinite_values} values){where}"
        )


def count_nonfinite(out: Tensor) -> NonFiniteReport:
    """Counts for an output ``(B, C, H, W)``; no layer location."""
    bad = ~torch.isfinite(out)
    pixels = bad.any(dim=1) if out.dim() == 4 else bad
    return NonFiniteReport(
        nonfinite_values=int(bad.sum()),
        nonfinite_pixels=int(pixels.sum()),
        total_pixels=pixels.numel(),
    )


def _tensors(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def locate_first_nonfinite(model: nn.Module, fn: ModelFn, x: Tensor) -> tuple[str, str] | None:
    """Run ``fn(x)`` with forward hooks on every module of ``model``.

    Returns ``(name, type)`` of the first module whose output holds a NaN/inf
    (post-forward hooks fire innermost first, so a Linear inside an MLP is named
    rather than the MLP), ``("<model>", type)`` if only the top level did, or None.
    """
    found: list[tuple[str, str]] = []

    def hook(name: str) -> Callable[[nn.Module, object, object], None]:
        def check(module: nn.Module, inputs: object, output: object) -> None:
            if found:
                return
            if any(
                t.is_floating_point() and not bool(torch.isfinite(t).all())
                for t in _tensors(output)
            ):
                found.append((name or "<model>", type(module).__name__))

        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            out = fn(x)
    finally:
        for h in handles:
            h.remove()
    if found:
        return found[0]
    if not bool(torch.isfinite(out).all()):
        return ("<model>", type(model).__name__)
    return None


# --------------------------------------------------------------------------- execution paths


def forward_plain(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` without autograd."""
    with torch.no_grad():
        return model(x)


def forward_exact(
    model: nn.Module,
    x: Tensor,
    *,
    windows_per_chunk: int = DEFAULT_WINDOWS_PER_CHUNK,
    tokens_per_chunk: int | None = None,
) -> Tensor:
    """Whole-image forward in bounded memory; equals :func:`forward_plain` (float rounding).

    Runs ``model`` under an execution context with ``windows_per_chunk`` /
    ``tokens_per_chunk`` (:mod:`irformer.execution`): window attention over rows
    of windows and MLPs over slices of tokens, with whole-image norm statistics.
    """
    with (
        execution_context(windows_per_chunk=windows_per_chunk, tokens_per_chunk=tokens_per_chunk),
        torch.no_grad(),
    ):
        return model(x)


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering ``size``; the last tile is flush with the border."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def _ramp(length: int, ramp: int, device: torch.device) -> Tensor:
    """1-D weights rising linearly over ``ramp`` pixels at both ends (never 0)."""
    i = torch.arange(length, device=device, dtype=torch.float32) + 0.5
    if ramp <= 0:
        return torch.ones(length, device=device)
    return torch.minimum(torch.clamp(i / ramp, max=1.0), torch.clamp((length - i) / ramp, max=1.0))


def forward_tiled(
    model: nn.Module | ModelFn,
    x: Tensor,
    *,
    tile: int,
    overlap: int = 32,
    blend: Blend = "mean",
) -> Tensor:
    """Tiled inference: ``tile x tile`` input tiles overlapping by ``overlap`` pixels.

    x: (B, C, H, W). Outputs are accumulated in fp32 and divided by the summed
    weights: ``mean`` weighs every tile pixel 1 (the SwinIR/HAT test scripts);
    ``ramp`` fades each tile linearly over the overlap, which hides seams when
    tiles disagree. The scale is read off the first tile's output.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    if blend not in ("mean", "ramp"):
        raise ValueError(f"unknown blend {blend!r}; expected 'mean' or 'ramp'")
    b, _, h, w = x.shape
    th, tw = min(tile, h), min(tile, w)
    out: Tensor | None = None
    weight: Tensor | None = None
    scale = 0
    with torch.no_grad():
        for top in _tile_starts(h, th, tile - overlap):
            for left in _tile_starts(w, tw, tile - overlap):
                patch = model(x[:, :, top : top + th, left : left + tw])
                if out is None:
                    scale = patch.shape[-1] // tw
                    if scale < 1 or patch.shape[-2:] != (th * scale, tw * scale):
                        raise ValueError(
                            f"tile {th}x{tw} gave output {tuple(patch.shape[-2:])}: "
                            "not an integer multiple of the tile size"
                        )
                    out = torch.zeros(b, patch.shape[1], h * scale, w * scale, device=x.device)
                    weight = torch.zeros(1, 1, h * scale, w * scale, device=x.device)
                assert weight is not None
                if blend == "ramp":
                    ramp = overlap * scale
                    wt = _ramp(th * scale, ramp, x.device)[:, None] * _ramp(
                        tw * scale, ramp, x.device
                    )
                else:
                    wt = torch.ones(th * scale, tw * scale, device=x.device)
                region = (
                    slice(None),
                    slice(None),
                    slice(top * scale, (top + th) * scale),
                    slice(left * scale, (left + tw) * scale),
                )
                out[region] += patch.float() * wt
                weight[region] += wt
    assert out is not None and weight is not None
    return out / weight


_ENSEMBLE_SIZE = 8


def _augment(x: Tensor, k: int) -> Tensor:
    """The k-th of the 8 dihedral transforms: optional horizontal flip, then k%4 rot90."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def _deaugment(y: Tensor, k: int) -> Tensor:
    y = torch.rot90(y, -(k % 4), dims=(-2, -1))
    return y.flip(-1) if k >= 4 else y


def self_ensemble(fn: ModelFn, x: Tensor) -> Tensor:
    """x8 self-ensemble: mean of ``fn`` over flips and 90-degree rotations, undone.

    Accumulates in fp32 (whatever ``fn`` returns); each transform is run on
    its own so memory is that of one forward pass.
    """
    total: Tensor | None = None
    for k in range(_ENSEMBLE_SIZE):
        y = _deaugment(fn(_augment(x, k).contiguous()), k).float()
        # Never accumulate into fn's output: it may alias the input.
        total = y.clone() if total is None else total.add_(y)
    assert total is not None
    return total / _ENSEMBLE_SIZE


# --------------------------------------------------------------------------- one door in


@dataclass(frozen=True)
class RestoreOptions:
    """How :func:`restore_tensor` runs a model (CLI ``irformer restore`` flags)."""

    tile: int | None = None
    """Tile size for tiled inference (None: whole image)."""
    tile_overlap: int = 32
    tile_blend: Blend = "mean"
    chunk_windows: int | None = None
    """Windows per chunk for the exact bounded-memory path (None: plain forward)."""
    chunk_tokens: int | None = None
    ensemble: bool = False
    precision: Precision = "fp32"
    """Cast weights and features to this dtype (:mod:`irformer.engine.precision`)."""
    autocast: AutocastDtype | None = None
    """Run fp32 weights under ``torch.autocast`` in this dtype (precision must be fp32)."""
    locate_nonfinite: bool = True
    """Re-run with hooks to name the first non-finite layer when the output has NaN/inf."""
    sanitize: bool = True
    """Return NaN as 0 and +-inf as 1/0 (the black dots), counted in the report."""

    def __post_init__(self) -> None:
        check_precision_options(self.precision, self.autocast)
        if self.tile is not None and self.chunk_windows is not None:
            raise ValueError(
                f"choose tiling (tile={self.tile}) or the exact chunked path "
                f"(chunk_windows={self.chunk_windows}), not both"
            )
        if self.tile is not None and not 0 <= self.tile_overlap < self.tile:
            raise ValueError(
                f"tile overlap must be in [0, tile={self.tile}), got {self.tile_overlap}"
            )
        if self.tile is not None and self.tile < 1:
            raise ValueError(f"tile must be >= 1, got {self.tile}")
        if self.chunk_windows is not None and self.chunk_windows < 1:
            raise ValueError(f"chunk_windows must be >= 1, got {self.chunk_windows}")


def _single_pass(model: nn.Module, options: RestoreOptions) -> ModelFn:
    if options.tile is not None:
        tile, overlap, blend = options.tile, options.tile_overlap, options.tile_blend
        return lambda x: forward_tiled(model, x, tile=tile, overlap=overlap, blend=blend)
    if options.chunk_windows is not None:
        chunk, tokens = options.chunk_windows, options.chunk_tokens
        return lambda x: forward_exact(model, x, windows_per_chunk=chunk, tokens_per_chunk=tokens)
    return lambda x: forward_plain(model, x)


def restore_tensor(
    model: nn.Module, x: Tensor, options: RestoreOptions | None = None
) -> tuple[Tensor, NonFiniteReport]:
    """Run ``model`` on ``x`` (B, C, H, W) as ``options`` say; returns fp32 output and report.

    The model is cast to ``options.precision`` in place (a no-op when it already
    is; see :func:`prepare_model_for_precision`) and ``x`` is moved to the
    model's device and dtype; ``options.autocast`` runs it under ``torch.autocast``.
    """
    options = options or RestoreOptions()
    dtype = precision_dtype(options.precision)
    if model_dtype(model) != dtype:
        prepare_model_for_precision(model, options.precision)
    model.eval()
    device = next((p.device for p in model.parameters()), x.device)
    x = x.to(device=device, dtype=dtype)
    single = _single_pass(model, options)
    ensembled: ModelFn = (lambda t: self_ensemble(single, t)) if options.ensemble else single

    def fn(t: Tensor) -> Tensor:
        with autocast_context(device, options.autocast):
            return ensembled(t)

    with torch.no_grad():
        out = fn(x).float()
    report = count_nonfinite(out)
    if not report.finite:
        if options.locate_nonfinite:
            located = locate_first_nonfinite(model, fn, x)
            if located is not None:
                report = NonFiniteReport(
                    report.nonfinite_values,
                    report.nonfinite_pixels,
                    report.total_pixels,
                    *located,
                )
        logger.warning("%s: %s", options.autocast or options.precision, report.summary())
        if options.sanitize:
            out = torch.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0)
    return out, report


def run_with_precision(
    model: nn.Module,
    x: Tensor,
    precision: str = "fp32",
    *,
    tile: int | None = None,
    tile_overlap: int = 32,
    chunk_windows: int | None = None,
    ensemble: bool = False,
    sanitize: bool = True,
    autocast: AutocastDtype | None = None,
) -> tuple[Tensor, NonFiniteReport]:
    """:func:`restore_tensor` with the precision and path as keyword arguments.

    x: (B, C, H, W) float in [0, 1]. Returns the fp32 output (NaN -> 0 when
    ``sanitize``) and the :class:`NonFiniteReport`. The model is cast in place.
    """
    options = RestoreOptions(
        tile=tile,
        tile_overlap=tile_overlap,
        chunk_windows=chunk_windows,
        ensemble=ensemble,
        precision=precision,  # type: ignore[arg-type]
        autocast=autocast,
        sanitize=sanitize,
    )
    return restore_tensor(model, x, options)


# --------------------------------------------------------------------------- files


class PrecisionModel(nn.Module):
    """Wraps a model so that ``forward`` runs :func:`restore_tensor` with ``options``.

    Lets code that only calls ``model(x)`` (e.g. :func:`irformer.engine.evaluate.
    evaluate_benchmark`) use tiling, the exact path, the ensemble and a cast
    precision; the non-finite counts of every call accumulate in :attr:`report`.
    ``in_chans`` is forwarded for channel checks.
    """

    def __init__(self, model: nn.Module, options: RestoreOptions) -> None:
        super().__init__()
        self.model = model
        self.options = options
        self.report = NonFiniteReport(0, 0, 0)
        self.nonfinite_calls = 0
        """Calls (images, for batch-1 evaluation) whose output had a NaN/inf."""
        in_chans = getattr(model, "in_chans", None)
        if isinstance(in_chans, int):
            self.in_chans = in_chans
        prepare_model_for_precision(model, options.precision)

    def forward(self, x: Tensor) -> Tensor:
        out, report = restore_tensor(self.model, x, self.options)
        self.report = self.report.merge(report)
        self.nonfinite_calls += not report.finite
        return out


@dataclass(frozen=True)
class RestoredFile:
    """One image written by :func:`restore_files`."""

    source: Path
    output: Path
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    seconds: float
    report: NonFiniteReport


def plan_outputs(
    inputs: Sequence[str | Path], out_dir: str | Path, *, ext: str | None = ".png"
) -> list[tuple[Path, Path]]:
    """``(source, output)`` pairs for files and folders (a folder's images, not recursive).

    Outputs are ``out_dir/<stem><ext>`` (``ext=None`` keeps the input's suffix).
    Two inputs with the same output name are an error, as is an output that
    would be one of the inputs.
    """
    from irformer.data.io import IMAGE_SUFFIXES, list_images

    if ext is not None and ext.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"output extension {ext!r}: expected one of {', '.join(IMAGE_SUFFIXES)}")
    if ext is None:  # the input's own suffix: irformer must be able to write it
        unwritable = sorted(
            {Path(i).suffix.lower() for i in inputs if Path(i).is_file()} - set(IMAGE_SUFFIXES)
        )
        if unwritable:
            raise ValueError(
                f"cannot write {', '.join(unwritable)} files (keeping the input's suffix); "
                f"choose an output suffix, e.g. --ext .png"
            )
    sources: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            listed = list_images(path)
            if ext is None and any(p.suffix.lower() not in IMAGE_SUFFIXES for p in listed):
                raise ValueError(
                    f"{path} holds images irformer reads but cannot write in their own format "
                    "(.webp); choose an output suffix, e.g. --ext .png"
                )
            sources.extend(listed)
        elif path.is_file():
            sources.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not sources:
        raise ValueError("no input images given")
    out_dir = Path(out_dir)
    pairs: list[tuple[Path, Path]] = []
    seen: dict[Path, Path] = {}
    resolved_inputs = {s.resolve() for s in sources}
    for source in sources:
        output = out_dir / (source.stem + (ext if ext is not None else source.suffix))
        key = output.resolve()
        if key in seen and seen[key].resolve() != source.resolve():
            raise ValueError(f"inputs {seen[key]} and {source} would both be written to {output}")
        if key in resolved_inputs:
            raise ValueError(f"output {output} would overwrite the input {source}")
        if key not in seen:
            seen[key] = source
            pairs.append((source, output))
    return pairs


@dataclass(frozen=True)
class RestoreFailure:
    """An input :func:`restore_files` could not read or fit in memory (it went on with the
    others)."""

    source: Path
    output: Path
    error: str


@dataclass
class RestoreResult:
    """What :func:`restore_files` did with each input."""

    restored: list[RestoredFile]
    skipped: list[tuple[Path, Path]]
    """``(source, output)`` pairs whose complete output already existed (``skip_existing``)."""
    failed: list[RestoreFailure]
    alpha_dropped: list[Path] = field(default_factory=list)
    """Inputs whose alpha channel is not in the output (``alpha="drop"``, or an output
    format without alpha such as JPEG)."""

    @property
    def ok(self) -> bool:
        """Every input restored or skipped."""
        return not self.failed


def is_complete_output(output: Path, source: Path, scale: int | None) -> bool:
    """Whether ``output`` is a finished restoration of ``source``: a file that decodes
    and is ``scale`` times the source's size (an interrupted write leaves a
    truncated file that does not decode). ``scale`` None checks decoding only."""
    from irformer.data.io import ImageReadError, image_size, read_image

    if not output.is_file():
        return False
    try:
        out = read_image(output, channels="keep")
        if scale is None:
            return True
        h, w = image_size(source)
    except (ImageReadError, OSError):
        return False
    return out.shape[:2] == (h * scale, w * scale)


def restore_files(
    model: nn.Module,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    options: RestoreOptions | None = None,
    *,
    overwrite: bool = False,
    skip_existing: bool = False,
    ext: str | None = ".png",
    guard: bool = True,
    alpha: AlphaMode = "keep",
    on_done: Callable[[RestoredFile], None] | None = None,
    on_error: Callable[[RestoreFailure], None] | None = None,
    progress: Progress | None = None,
    max_memory: int | Literal["default"] | None = "default",
    fp16_unsafe: str = "refuse",
) -> RestoreResult:
    """Restore image files and folders into ``out_dir``, one image at a time.

    Before the first image runs, ``out_dir`` must be writable and every output
    path is checked: inputs are never overwritten, existing outputs only with
    ``overwrite``; with ``skip_existing`` an existing output that is complete
    (:func:`is_complete_output`) is skipped and an incomplete one redone. An
    input that cannot be read (not an image, truncated, too large, vanished)
    is recorded in :attr:`RestoreResult.failed` (and passed to ``on_error``)
    and the run goes on. Images keep their bit depth (8/16-bit); a greyscale
    image (or an RGB one with three equal channels) meeting a 3-channel model
    is replicated in and averaged out, so grey stays grey. For fp16, ``guard``
    first measures feature magnitudes on a 64x64 crop of the first readable
    image in fp32 (``precision`` or ``autocast`` fp16); where they exceed fp16's
    safe margin it refuses (:class:`irformer.engine.fp16.Fp16UnsafeError`, naming
    the layer) or, with ``fp16_unsafe="bf16"``, runs in bf16 instead
    (:func:`irformer.engine.fp16.resolve_fp16_options`). ``on_done`` is called
    after each image, ``progress`` (:mod:`irformer.progress`) before the first and
    after each.

    Memory: each image's path is planned within ``max_memory`` bytes
    (:func:`irformer.engine.memory.plan_restore`; ``"default"``: half the memory
    available, None: no limit). A path set in ``options`` (tile or exact) is
    kept and an image it would not fit is refused like an unreadable one (named
    at the end, with the estimates and the options that would fit); otherwise
    the planner picks plain, exact or (for per-token norms) tiled.

    Alpha channels (``alpha``): ``"keep"`` (default) restores the colour channels with
    the model and resizes the alpha channel by the model's scale with MATLAB bicubic
    (:func:`~irformer.data.degradations.matlab_imresize`, rounded and clipped), as the
    bicubic baseline upscales an image; ``"drop"`` writes colour only. Inputs whose
    alpha is not written (``drop``, or a JPEG output) are listed in
    :attr:`RestoreResult.alpha_dropped` and named in one warning. Tiling a model that
    normalises with whole-image statistics (i-LN, LN*, InstanceNorm) on request
    (``options.tile``) logs one warning: each tile is normalised with its own
    statistics; ``chunk_windows`` (the exact path) is the bounded-memory way that keeps
    the model's output.
    """
    from irformer.data.io import (
        ChannelMode,
        ImageReadError,
        check_folder_writable,
        check_writable,
        convert_channels,
        image_to_tensor,
        read_image,
        split_alpha,
        write_image,
    )

    if overwrite and skip_existing:
        raise ValueError("overwrite and skip_existing contradict each other: pick one")
    if alpha not in ("keep", "drop"):
        raise ValueError(f"alpha must be 'keep' or 'drop', got {alpha!r}")
    options = options or RestoreOptions()
    note = tiling_note(model, options)
    if note is not None:
        logger.warning("%s", note)
    pairs = plan_outputs(inputs, out_dir, ext=ext)
    protected = [source for source, _ in pairs]
    check_folder_writable(out_dir)
    scale = getattr(model, "upscale", None)
    scale = int(scale) if isinstance(scale, int) else None
    pending: list[tuple[Path, Path, bool]] = []
    skipped: list[tuple[Path, Path]] = []
    for source, output in pairs:
        redo = False
        if skip_existing and output.exists():
            if is_complete_output(output, source, scale):
                skipped.append((source, output))
                continue
            redo = True  # an interrupted earlier run's output: replace it
            logger.info("%s exists but is incomplete; restoring it again", output)
        check_writable(output, overwrite=overwrite or redo, protected=protected)
        pending.append((source, output, redo))
    in_chans = getattr(model, "in_chans", 3)
    channels: ChannelMode = "grey" if in_chans == 1 else "rgb"
    result = RestoreResult(restored=[], skipped=skipped, failed=[])

    def read(source: Path) -> tuple[np.ndarray, np.ndarray | None]:
        colour, alpha_channel = split_alpha(read_image(source, channels="keep"))
        return convert_channels(colour, channels, source=source), alpha_channel

    def fail(source: Path, output: Path, exc: Exception) -> None:
        failure = RestoreFailure(source, output, str(exc))
        logger.warning("skipping %s: %s", source, exc)
        result.failed.append(failure)
        if on_error is not None:
            on_error(failure)

    unreadable = (ImageReadError, OSError)
    if "fp16" in (options.precision, options.autocast) and guard:
        from irformer.engine.fp16 import resolve_fp16_options

        for source, _, _ in pending:
            try:
                image, _ = read(source)
            except unreadable:
                continue  # reported when its turn comes
            probe = image_to_tensor(_centre_crop(image, 64))
            precision, autocast = resolve_fp16_options(
                model,
                options.precision,
                options.autocast,
                probe=probe[None],
                on_unsafe=fp16_unsafe,  # type: ignore[arg-type]
            )
            options = dataclasses.replace(options, precision=precision, autocast=autocast)  # type: ignore[arg-type]
            break
    prepare_model_for_precision(model, options.precision)
    budget = default_budget() if max_memory == "default" else max_memory
    explicit = options.tile is not None or options.chunk_windows is not None
    report_progress(progress, 0, len(pending), "restore")
    for done_count, (source, output, redo) in enumerate(pending, 1):
        try:
            image, alpha_channel = read(source)
        except unreadable as exc:
            fail(source, output, exc)
            report_progress(progress, done_count, len(pending), "restore")
            continue
        run_options = options
        if budget is not None:
            try:
                run_options = plan_restore(
                    model, image.shape[:2], options, max_memory=budget, explicit=explicit
                )
            except MemoryBudgetError as exc:
                fail(source, output, exc)
                report_progress(progress, done_count, len(pending), "restore")
                continue
        grey = image.shape[2] == 3 and bool(
            np.array_equal(image[..., 0], image[..., 1])
            and np.array_equal(image[..., 0], image[..., 2])
        )
        start = time.perf_counter()
        out, report = restore_tensor(model, image_to_tensor(image)[None], run_options)
        seconds = time.perf_counter() - start
        if grey:
            out = out.mean(dim=1, keepdim=True)
        restored = _to_image(out, image.dtype)
        if alpha_channel is not None:
            if alpha == "keep" and output.suffix.lower() not in (".jpg", ".jpeg"):
                restored = _with_alpha(restored, alpha_channel)
            else:
                result.alpha_dropped.append(source)
        write_image(output, restored, overwrite=overwrite or redo, protected=protected)
        done = RestoredFile(
            source=source,
            output=output,
            input_size=(image.shape[0], image.shape[1]),
            output_size=(restored.shape[0], restored.shape[1]),
            seconds=seconds,
            report=report,
        )
        # Debug only: the caller reports each image (on_done), so it is reported once.
        logger.debug("%s -> %s (%.2f s; %s)", source, output, seconds, report.summary())
        result.restored.append(done)
        if on_done is not None:
            on_done(done)
        report_progress(progress, done_count, len(pending), "restore")
    if result.alpha_dropped:
        first = result.alpha_dropped[0]
        more = f" and {len(result.alpha_dropped) - 1} more" if len(result.alpha_dropped) > 1 else ""
        reason = "alpha='drop'" if alpha == "drop" else "the output format has no alpha"
        logger.warning("alpha channel not written (%s) for %s%s", reason, first, more)
    return result


def tiling_note(model: nn.Module, options: RestoreOptions) -> str | None:
    """The warning that tiled inference of ``model`` is not its output (None when
    ``options`` do not tile or the model's norms are per token)."""
    if options.tile is None:
        return None
    from irformer.norms import image_statistics_norms

    # A model without norm modules (an ONNX file: OnnxRuntimeModel) names its own.
    norms = image_statistics_norms(model) or list(getattr(model, "image_statistics_norms", ()))
    if not norms:
        return None
    return (
        f"tiling a model with whole-image normalisation ({', '.join(norms)}): each "
        f"{options.tile}px tile is normalised with its own statistics, so tiles disagree "
        "with the whole image and may leave seams; --exact-chunk K gives the model's own "
        "output in bounded memory"
    )


def _with_alpha(restored: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``restored`` (H, W, 1|3) with ``alpha`` (h, w, 1) resized to (H, W) by MATLAB
    bicubic (``imresize`` on the integer image: rounded and clipped as MATLAB does);
    grey becomes RGB (no grey+alpha output format is written)."""
    from irformer.data.degradations import matlab_imresize
    from irformer.data.io import quantize, to_float32

    h, w = restored.shape[:2]
    resized = alpha
    if alpha.shape[:2] != (h, w):
        resized = np.asarray(matlab_imresize(alpha[..., 0], size=(h, w)))[..., None]
    if resized.dtype != restored.dtype:
        resized = quantize(to_float32(resized), restored.dtype.type)
    colour = np.repeat(restored, 3, axis=2) if restored.shape[2] == 1 else restored
    return np.concatenate([colour, resized], axis=2)


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[top : top + size, left : left + size]


def _to_image(out: Tensor, dtype: np.dtype) -> np.ndarray:
    from irformer.data.io import tensor_to_image

    return tensor_to_image(out, np.uint16 if dtype == np.uint16 else np.uint8)
