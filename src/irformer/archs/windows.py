"""Window geometry of the Swin-style models: partitions, shifts, masks, position indices.

Pure functions of sizes (no parameters): the window partition and its inverse,
the relative-position indices (Swin's, HAT's overlapping cross-attention's and
SRFormer's "aligned" one), the additive masks of shifted windows (cached per
input size, unlike the reference code, which rebuilds them whenever the size
differs from the training patch), and the reflect padding to a window multiple.
Masks and padding are built from tensor ops on the sizes, so under graph
capture (:func:`irformer.execution.in_graph_capture`: trace, ``torch.compile``,
``torch.export``, ONNX export) they follow the symbolic input size instead of
being baked in at the size the graph was recorded with.
:mod:`irformer.archs.attention` runs attention on these windows.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from irformer.execution import in_graph_capture

MASK_VALUE = -100.0
"""The additive mask value of the official Swin code (not -inf), kept for parity."""

_CACHE_LIMIT = 64


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """x: (B, H, W, C) -> (B * nW, ws, ws, C), windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    # Always a copy: with one row/column of windows, reshape could return a view
    # whose (ws, ws) dims cannot be merged by the callers' .view(-1, ws * ws, C),
    # and contiguous() would have to ask whether there is one row/column, which
    # graph capture cannot answer for symbolic sizes.
    windows = x.permute(0, 1, 3, 2, 4, 5).clone(memory_format=torch.contiguous_format)
    return windows.view(-1, window_size, window_size, c)


def window_reverse(windows: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """windows: (B * nW, ws, ws, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    b = windows.shape[0] // ((h // window_size) * (w // window_size))
    x = windows.view(b, h // window_size, w // window_size, window_size, window_size, -1)
    # A copy always (see window_partition): reshape would ask whether it can view.
    x = x.permute(0, 1, 3, 2, 4, 5).clone(memory_format=torch.contiguous_format)
    return x.view(b, h, w, -1)


def reflect_indices(size: int, padded: int, device: torch.device | None = None) -> Tensor:
    """(padded,) source indices that reflect a side of ``size`` out to ``padded``.

    Index ``i`` reads ``i`` inside the side and mirrors back from the border
    beyond it (``F.pad``'s ``reflect``), bouncing off both ends again where one
    reflection cannot cover the padding; a one-pixel side is replicated. Built
    from tensor ops on the (possibly symbolic) sizes, so a traced or exported
    graph pads inputs of any size.
    """
    # The period as a tensor (ONNX converters take a Python divisor as a constant),
    # from an int, a SymInt (export, compile) or the 0-dim tensor a size is
    # under torch.jit.trace.
    period = 2 * size - 2
    if isinstance(period, Tensor):
        period = period.to(device=device, dtype=torch.long)
    else:
        period = torch.full((), period, dtype=torch.long, device=device)
    i = torch.arange(padded, device=device) % period.clamp(min=1)
    return torch.where(i < size, i, period.clamp(min=1) - i)


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad (B, C, H, W) on the bottom/right to a multiple (as the originals do).

    Exactly ``F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")`` where one
    reflection covers the padding; a side shorter than the pad plus one
    (where ``F.pad`` fails) reflects again from the far border, and a one-pixel
    side is replicated (:func:`reflect_indices`). The padded size is written
    ``multiple * ceil(H / multiple)``, so under graph capture (symbolic sizes)
    the window partitions that follow divide it exactly; eagerly an input that
    needs no padding is returned as is.
    """
    h, w = x.shape[-2:]
    capture = in_graph_capture()
    padded_h = ((h + multiple - 1) // multiple) * multiple
    padded_w = ((w + multiple - 1) // multiple) * multiple
    if capture or padded_h != h:
        x = x.index_select(-2, reflect_indices(h, padded_h, x.device))
    if capture or padded_w != w:
        x = x.index_select(-1, reflect_indices(w, padded_w, x.device))
    return x


def crop_top_left(x: Tensor, h: int, w: int) -> Tensor:
    """x[..., :h, :w] for (B, C, H', W') with h <= H', w <= W' (undoes :func:`pad_to_multiple`).

    Under graph capture the crop is a gather of the first ``h`` rows and ``w``
    columns: a slice would make the exporters prove ``h <= H'`` for symbolic
    sizes, which they cannot for ``H' = m * ceil(h / m)``.
    """
    if not in_graph_capture():
        return x[..., :h, :w]
    x = x.index_select(-2, torch.arange(h, device=x.device))
    return x.index_select(-1, torch.arange(w, device=x.device))


# --------------------------------------------------------------------------- position indices


def relative_position_index(window_h: int, window_w: int | None = None) -> Tensor:
    """(Wh*Ww, Wh*Ww) index into a ``(2Wh-1)(2Ww-1)`` bias table (Swin convention)."""
    window_w = window_h if window_w is None else window_w
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_h), torch.arange(window_w), indexing="ij")
    ).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += window_h - 1
    rel[:, :, 1] += window_w - 1
    rel[:, :, 0] *= 2 * window_w - 1
    return rel.sum(-1)


def _grid_coords(side: int) -> Tensor:
    """(2, side*side) row/column coordinates in row-major order."""
    axis = torch.arange(side)
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij")).flatten(1)


def overlap_relative_position_index(window_size: int, overlap_size: int) -> Tensor:
    """(ws*ws, ows*ows) index into HAT's OCAB ``(ws + ows - 1)**2`` bias table.

    Reproduces the official ``calculate_rpi_oca`` exactly, including its offset
    (``ws - ows + 1``), which leaves some indices negative: they wrap around the
    table, one distinct entry per relative offset, and trained tables depend on it.
    """
    ws, ows = window_size, overlap_size
    ori = _grid_coords(ws)
    ext = _grid_coords(ows)
    rel = (ext[:, None, :] - ori[:, :, None]).permute(1, 2, 0) + (ws - ows + 1)
    return rel[:, :, 0] * (ws + ows - 1) + rel[:, :, 1]


def aligned_relative_position_index(window_size: int) -> Tensor:
    """(ws*ws, (ws/2)^2) index into SRFormer's ``(ws-1)^2``-row bias table.

    Every full-resolution query pixel takes the relative position of the 2x2
    block it belongs to (the official "aligned" index).
    """
    p = window_size // 2
    index = relative_position_index(p)  # (p*p, p*p) between half-resolution tokens
    # Query pixel (2i + a, 2j + b) shares the row of half-resolution token (i, j).
    index = index.view(p, 1, p, 1, p * p).expand(p, 2, p, 2, p * p)
    return index.reshape(window_size * window_size, p * p)


# --------------------------------------------------------------------------- shifted-window masks


def _region_labels(size: int, window: int, shift: int, device: torch.device | None) -> Tensor:
    """(size,) labels 0, 1, 2 of the three bands a cyclic shift wraps together along
    one side (Swin's ``slice(0, -window)``, ``slice(-window, -shift)``, ``slice(-shift, None)``)."""
    i = torch.arange(size, device=device)
    return (i >= size - window).long() + (i >= size - shift).long()


def _window_labels(h: int, w: int, window: int, shift: int, device: torch.device | None) -> Tensor:
    """(nW, window*window) region label of every token of every window (Swin's 3x3 regions)."""
    rows = _region_labels(h, window, shift, device)
    cols = _region_labels(w, window, shift, device)
    labels = (3 * rows.view(-1, 1) + cols.view(1, -1)).view(1, h, w, 1)
    return window_partition(labels, window).view(-1, window * window)


def build_shifted_window_mask(
    h: int, w: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> Tensor:
    """(nW, N, N) additive mask of shifted-window attention on an ``h x w`` map, uncached.

    Tensor ops on the sizes only, so graph capture (trace, compile, export)
    builds it for whatever size the graph runs at instead of baking one in.
    """
    windows = _window_labels(h, w, window_size, shift_size, device)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.ne(0).float() * MASK_VALUE


def build_permuted_window_mask(
    h: int, w: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> Tensor:
    """(nW, ws*ws, (ws/2)^2) additive mask of SRFormer's shifted PSA, uncached
    (see :func:`permuted_window_mask`; tensor ops on the sizes, as
    :func:`build_shifted_window_mask`)."""
    n = window_size * window_size
    p = window_size // 2
    queries = _window_labels(h, w, window_size, shift_size, device)
    # The official code writes ``-shift // 2``, i.e. ``-ceil(shift / 2)``.
    keys = _window_labels(h // 2, w // 2, p, (shift_size + 1) // 2, device)
    diff = queries.view(-1, n, 1) - keys.view(-1, 1, p * p)
    return diff.ne(0).float() * MASK_VALUE


@lru_cache(maxsize=_CACHE_LIMIT)
def _shifted_window_mask_cpu(h: int, w: int, window_size: int, shift_size: int) -> Tensor:
    return build_shifted_window_mask(h, w, window_size, shift_size)


@lru_cache(maxsize=_CACHE_LIMIT)
def _permuted_window_mask_cpu(h: int, w: int, window_size: int, shift_size: int) -> Tensor:
    return build_permuted_window_mask(h, w, window_size, shift_size)


_DEVICE_MASKS: dict[tuple[str, int, int, int, int, str], Tensor] = {}


def _on_device(kind: str, h: int, w: int, window_size: int, shift_size: int, device) -> Tensor:
    if in_graph_capture():  # symbolic sizes: build in the graph, never cache
        uncached = build_shifted_window_mask if kind == "shifted" else build_permuted_window_mask
        return uncached(h, w, window_size, shift_size, device)
    build = _shifted_window_mask_cpu if kind == "shifted" else _permuted_window_mask_cpu
    if device.type == "cpu":
        return build(h, w, window_size, shift_size)
    key = (kind, h, w, window_size, shift_size, str(device))
    mask = _DEVICE_MASKS.get(key)
    if mask is None:
        if len(_DEVICE_MASKS) > _CACHE_LIMIT:
            _DEVICE_MASKS.clear()
        mask = _DEVICE_MASKS[key] = build(h, w, window_size, shift_size).to(device)
    return mask


def shifted_window_mask(
    h: int, w: int, window_size: int, shift_size: int, device: torch.device
) -> Tensor:
    """(nW, N, N) additive mask for shifted-window attention on an ``h x w`` map.

    Cached per (size, window, shift, device): every block of a model shares one.
    """
    return _on_device("shifted", h, w, window_size, shift_size, device)


def permuted_window_mask(
    h: int, w: int, window_size: int, shift_size: int, device: torch.device
) -> Tensor:
    """(nW, ws*ws, (ws/2)^2) additive mask for SRFormer's shifted PSA on an ``h x w`` map.

    Queries are compared at full resolution (shift ``ws/2``), keys at half
    resolution (shift ``ceil(ws/4)``, as in the official code; the two only line
    up when ``ws % 4 == 0``, and the quirk is reproduced). Cached like
    :func:`shifted_window_mask`.
    """
    return _on_device("permuted", h, w, window_size, shift_size, device)


_CHUNK_MASKS: dict[tuple[int, bool, int, int, int, str], Tensor] = {}


def chunk_window_mask(
    rows: int, last: bool, cols: int, window_size: int, shift_size: int, device: torch.device
) -> Tensor:
    """(rows * cols, N, N) shifted-window mask of ``rows`` window rows of a map
    ``cols`` windows wide; ``last``: the rows end at the bottom of the map.

    The exact path's chunks of one image need at most two distinct masks, so they
    are cached (the mask of the whole map is never built). The 4 window kinds of
    a shifted map (interior, last column, last row, corner) are the 4 windows of
    a 2ws x 2ws map.
    """
    key = (rows, last, cols, window_size, shift_size, str(device))
    mask = _CHUNK_MASKS.get(key)
    if mask is None:
        if len(_CHUNK_MASKS) > _CACHE_LIMIT:
            _CHUNK_MASKS.clear()
        ws = window_size
        kinds = _shifted_window_mask_cpu(2 * ws, 2 * ws, ws, shift_size)
        in_last_row = (torch.arange(rows) == rows - 1) & last
        kind = 2 * in_last_row.long().view(-1, 1) + (torch.arange(cols) == cols - 1).view(1, -1)
        mask = _CHUNK_MASKS[key] = kinds[kind.reshape(-1)].to(device)
    return mask


_MASKED_WINDOWS: dict[tuple[int, tuple[int, ...], tuple[int, ...], str], tuple[Tensor, Tensor]] = {}


def masked_windows(mask: Tensor) -> Tensor:
    """Indices of the windows whose (nW, N, M) additive mask is not all zero.

    Cached per mask tensor (the masks are cached per size and never modified);
    the entry keeps the mask alive, so its address cannot be reused by another.
    """
    key = (mask.data_ptr(), tuple(mask.shape), tuple(mask.stride()), str(mask.device))
    entry = _MASKED_WINDOWS.get(key)
    if entry is None:
        if len(_MASKED_WINDOWS) > 4 * _CACHE_LIMIT:
            _MASKED_WINDOWS.clear()
        idx = mask.reshape(mask.shape[0], -1).ne(0).any(dim=1).nonzero().flatten()
        entry = _MASKED_WINDOWS[key] = (mask, idx)
    return entry[1]


def window_mask_flags(mask: Tensor) -> Tensor:
    """uint8 (nW,): 1 for the windows whose additive mask is not all zero."""
    return torch.zeros(mask.shape[0], dtype=torch.uint8).index_fill_(0, masked_windows(mask), 1)
