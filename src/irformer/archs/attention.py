"""How the blocks' attention and MLP halves execute: every path, and the one dispatch.

The architecture files say *what* a block computes (norm, attention, residual
merge, MLP: :mod:`irformer.archs.swinir`, ``hat``, ``drct``, ``srformer``); the
functions here say *how*, chosen per call from the tensors and the execution
context (:mod:`irformer.execution`), never from settings stored on modules:

* :func:`attend` -- softmax attention on formed windows, ``softmax(scale q k^T +
  bias + mask) v``. The explicit matmul path under autograd (faster to train
  through than CPU SDPA for these small windows) and whenever the attention
  operands are quantised (:class:`AttentionOperands`: the one quantised
  attention of every arch); otherwise a fused path (:func:`window_sdpa`: SDPA,
  blocked fp32 GEMMs with several CPU threads, cache-sized bf16 steps),
  recomputing only the windows a shifted-window mask touches.
* :func:`shifted_window_attention` (SwinIR, HAT, DRCT),
  :func:`overlapping_window_attention` (HAT's OCAB) and
  :func:`permuted_window_attention` (SRFormer's PSA) -- the window geometry of
  each model (:mod:`irformer.archs.windows`) around :func:`attend`, or the
  C++ CPU kernel (:mod:`irformer.cpu_kernels`) on the whole feature map where
  the context allows it, or rows of windows at a time on the exact
  bounded-memory path (``windows_per_chunk``).
* :func:`mlp_residual` -- a block's MLP half, over slices of tokens on the
  exact path.

Every path computes the same function; they differ in speed, memory and float
rounding (the tests compare them, and pin the outputs of each).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irformer import cpu_kernels
from irformer.archs.windows import (
    chunk_window_mask,
    masked_windows,
    permuted_window_mask,
    shifted_window_mask,
    window_mask_flags,
    window_partition,
    window_reverse,
)
from irformer.execution import current_execution, in_graph_capture
from irformer.norms import BatchNorm, InstanceNorm, TokenNorm, merge_residual

Projection = Callable[[Tensor], Tensor]
"""A linear projection applied over the last dim (an ``nn.Linear`` or its quantised form)."""


class AttentionOperands(nn.Module):
    """What happens to the four operands of an attention's two matmuls: nothing.

    Every attention module owns one (``operands``), and :func:`attend` passes q
    (after the ``1/sqrt(d)`` scaling), k, the post-softmax map and v through it.
    Post-training quantisation (:mod:`irformer.compress`) swaps it for a
    subclass with ``quantizes = True`` that fake-quantises each operand, as it
    swaps ``nn.Linear`` for ``QuantLinear``; :func:`attend` then takes the
    explicit matmul path, the only one whose operands can be quantised.
    No parameters, no state-dict keys.
    """

    quantizes: bool = False

    def q(self, t: Tensor) -> Tensor:
        return t

    def k(self, t: Tensor) -> Tensor:
        return t

    def attn(self, t: Tensor) -> Tensor:
        return t

    def v(self, t: Tensor) -> Tensor:
        return t


PLAIN_OPERANDS = AttentionOperands()


# --------------------------------------------------------------------------- attend


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    mask: Tensor | None,
    scale: float,
    operands: AttentionOperands = PLAIN_OPERANDS,
) -> Tensor:
    """``softmax(scale * q k^T + bias + mask) v`` for every window and head.

    q: (B*nW, heads, N, d); k, v: (B*nW, heads, M, d); bias: (heads, N, M);
    mask: (nW, N, M) additive (window ``i`` of each image takes ``mask[i]``) or
    None. Returns (B*nW, heads, N, d). Graph capture (trace, compile, export)
    always records the explicit matmul/softmax path: plain ops every exporter
    and runtime knows, no data-dependent window selection.
    """
    if operands.quantizes or (torch.is_grad_enabled() and q.requires_grad) or in_graph_capture():
        return _explicit_attention(q, k, v, bias, mask, scale, operands)
    return _fused_attention(q, k, v, bias, mask, scale)


def _explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor,
    mask: Tensor | None,
    scale: float,
    operands: AttentionOperands,
) -> Tensor:
    """The reference implementations' matmuls, with each operand through ``operands``."""
    q = operands.q(q * scale)
    k = operands.k(k)
    attn = q @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        bw, heads, n, m = attn.shape
        # The mask is fp32 (cached once); in a model cast to fp16/bf16 the sum must
        # stay in the model's dtype for the second matmul.
        mask = mask.to(attn.dtype)
        attn = attn.view(bw // nw, nw, heads, n, m) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(bw, heads, n, m)
    attn = operands.attn(attn.softmax(dim=-1))
    return attn @ operands.v(v)


def _fused_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None, scale: float
) -> Tensor:
    """Every window with the bias alone, then the masked windows again with the mask.

    A shifted-window mask is zero except in the last row and column of
    windows (where the roll wrapped the map around), so only those are
    recomputed with ``bias + mask``; folding the mask into one additive
    tensor for all windows would materialise ``(nW, heads, N, M)`` floats
    on every call. Interior windows add an exact zero either way.
    """
    bw, heads, n, d = q.shape
    m = k.shape[2]
    out = window_sdpa(q, k, v, bias.unsqueeze(0), scale)
    if mask is None:
        return out
    nw = mask.shape[0]
    idx = masked_windows(mask)
    if idx.numel() == 0:
        return out
    nb = idx.numel()

    def pick(t: Tensor, tokens: int) -> Tensor:
        return t.view(bw // nw, nw, heads, tokens, -1)[:, idx].reshape(
            bw // nw, nb * heads, tokens, -1
        )

    add = (bias.unsqueeze(0) + mask[idx].unsqueeze(1)).reshape(1, nb * heads, n, m)
    border = window_sdpa(pick(q, n), pick(k, m), pick(v, m), add, scale)
    # out of place: SDPA keeps ``out`` for its backward
    out = out.view(bw // nw, nw, heads, n, d).index_copy(
        1, idx, border.view(bw // nw, nb, heads, n, d)
    )
    return out.view(bw, heads, n, d)


SCORE_ELEMENTS_PER_STEP = 48 * 64 * 64
"""Attention scores per step of :func:`window_sdpa`'s CPU paths: 48 fp32 64x64
matrices, which stay in a 1 MB L2 cache."""
SMALL_WINDOW_SCORES = 64 * 64
"""Largest N_q * N_kv for the stepped CPU paths (8x8 windows gain; 16x16 windows
measured no faster than SDPA, so they keep it)."""


def window_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    """``scaled_dot_product_attention`` for many small windows; attn_mask is additive.

    q, k, v: (B, H, N, d); attn_mask: (1 or B, H, N, M) in any float dtype (cast
    to q's for the kernel). On CPU in bf16 without autograd, PyTorch's flash
    kernel is slower than in fp32 for small windows (N = 64, d = 10): there
    the attention runs in cache-sized steps of bf16 matmuls with the mask added
    and the softmax taken in fp32 (faster than fp32 attention, and as close to
    it as the bf16 kernel). In fp32 with several CPU threads the windows run as
    blocked GEMMs (:func:`_blocked_fp32_attention`). Everything else, and
    anything under autograd, goes to SDPA. (Timings: BENCHMARKS.md.)
    """
    b, h, n = q.shape[:3]
    small_cpu = (
        q.device.type == "cpu"
        and n * k.shape[2] <= SMALL_WINDOW_SCORES
        and not torch.is_grad_enabled()
    )
    if small_cpu and q.dtype == torch.float32 and torch.get_num_threads() > 1:
        return _blocked_fp32_attention(q, k, v, attn_mask, scale)
    if not small_cpu or q.dtype != torch.bfloat16:
        mask = None if attn_mask is None else attn_mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    dim = 0 if b > 1 else 1
    matrices = max(1, SCORE_ELEMENTS_PER_STEP // (n * k.shape[2]))
    step = max(1, matrices // h) if dim == 0 else matrices
    mask = None if attn_mask is None else attn_mask.float()
    # One contiguous copy each up front: per-step slices of the permuted qkv
    # views would be copied by every matmul.
    q = torch.mul(q, scale, out=q.new_empty(q.shape))
    k_t = k.contiguous().transpose(-2, -1)
    v = v.contiguous()
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for start in range(0, q.shape[dim], step):
        part = (
            (slice(start, start + step),) if dim == 0 else (slice(None), slice(start, start + step))
        )
        scores = torch.matmul(q[part], k_t[part])
        # bf16 + fp32 mask promotes to fp32: the softmax input is never rounded again.
        scores = (
            scores.float()
            if mask is None
            else scores + (mask if mask.shape[dim] == 1 else mask[part])
        )
        torch.matmul(torch.softmax(scores, -1).to(v.dtype), v[part], out=out[part])
    return out


def _blocked_fp32_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float
) -> Tensor:
    """fp32 window attention as ``baddbmm`` (mask fused) + softmax + ``bmm`` over
    cache-sized steps of (window, head) matrices.

    With several threads these batched GEMMs scale better than PyTorch's CPU
    flash kernel for 64-token windows with head dim 10; with one thread the
    flash kernel is faster and is kept.
    """
    b, h, n, d = q.shape
    m = k.shape[2]
    q = torch.mul(q, scale, out=q.new_empty(q.shape)).view(b * h, n, d)
    k_t = k.contiguous().view(b * h, m, d).transpose(1, 2)
    v = v.contiguous().view(b * h, m, v.shape[-1])
    out = q.new_empty(b * h, n, v.shape[-1])
    step = max(h, (SCORE_ELEMENTS_PER_STEP // (n * m)) // h * h)  # whole windows per step
    if attn_mask is None:
        mask = None
    elif attn_mask.shape[0] == 1:
        # Steps start on window boundaries, so one step-sized tiling serves them all.
        mask = attn_mask.to(q.dtype).expand(step // h, h, n, m).reshape(step, n, m)
    else:
        mask = attn_mask.to(q.dtype).expand(b, h, n, m).reshape(b * h, n, m)
    for s in range(0, b * h, step):
        e = min(s + step, b * h)
        if mask is None:
            scores = torch.bmm(q[s:e], k_t[s:e])
        else:
            part = mask[: e - s] if mask.shape[0] == step else mask[s:e]
            scores = torch.baddbmm(part, q[s:e], k_t[s:e])
        torch.bmm(torch.softmax(scores, -1), v[s:e], out=out[s:e])
    return out.view(b, h, n, -1)


# --------------------------------------------------------------------------- Swin windows


def _kernel_serves(
    x: Tensor, operands: AttentionOperands, tokens: int, head_dim: int, kv_tokens: int = 0
) -> bool:
    return not operands.quantizes and cpu_kernels.use_fused_attention(
        x, tokens, head_dim, kv_tokens
    )


def shifted_window_attention(
    y: Tensor,
    x_size: tuple[int, int],
    *,
    qkv: Projection,
    proj: Projection,
    bias: Tensor,
    heads: int,
    scale: float,
    window_size: int,
    shift_size: int,
    operands: AttentionOperands = PLAIN_OPERANDS,
) -> Tensor:
    """(Shifted) window multi-head self-attention of Swin: ``proj(attention(qkv(y)))``.

    y: (B, H*W, C) normalised tokens of an ``x_size = (H, W)`` map (multiples of
    the window); bias: (heads, N, N) relative position bias. Returns the
    (B, H*W, C) attention branch. Paths: the C++ kernel on the whole map (it
    shifts and partitions by address), the exact path's rows of windows, or
    roll + partition + :func:`attend`.
    """
    h, w = x_size
    b, _, c = y.shape
    ws, shift = window_size, shift_size
    y = y.view(b, h, w, c)
    context = current_execution()
    geometry = {"qkv": qkv, "proj": proj, "bias": bias, "heads": heads, "scale": scale}
    if context.windows_per_chunk is not None:
        return _shifted_rows_chunked(y, ws, shift, context.windows_per_chunk, operands, geometry)
    if _kernel_serves(y, operands, ws * ws, c // heads):
        mask = shifted_window_mask(h, w, ws, shift, y.device) if shift else None
        flags = None if mask is None else window_mask_flags(mask)
        merged = cpu_kernels.fused_window_attention(
            qkv(y), bias, mask, flags, heads, scale, window=ws, shift=shift
        )
        return proj(merged).view(b, h * w, c)
    mask = None
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        mask = shifted_window_mask(h, w, ws, shift, y.device)
    windows = window_partition(y, ws).view(-1, ws * ws, c)
    out = _attend_windows(windows, mask, None, operands, **geometry)
    out = window_reverse(out.view(-1, ws, ws, c), ws, h, w)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out.reshape(b, h * w, c)


def _attend_windows(
    x: Tensor,
    mask: Tensor | None,
    chunk: int | None,
    operands: AttentionOperands,
    *,
    qkv: Projection,
    proj: Projection,
    bias: Tensor,
    heads: int,
    scale: float,
) -> Tensor:
    """x: (B*nW, N, C) window tokens -> (B*nW, N, C); mask: (nW, N, N) or None.

    The C++ kernel on the windows where it serves, else at most ``chunk``
    windows per :func:`attend` call (chunks never straddle two images, so
    each takes the matching slice of the per-window mask).
    """
    bw, n, c = x.shape
    if _kernel_serves(x, operands, n, c // heads):
        flags = None if mask is None else window_mask_flags(mask)
        return proj(cpu_kernels.fused_window_attention(qkv(x), bias, mask, flags, heads, scale))
    if chunk is None or bw <= chunk:
        return _project_attend(x, mask, operands, qkv, proj, bias, heads, scale)
    nw = bw if mask is None else mask.shape[0]
    out = x.new_empty(bw, n, c)
    for start in range(0, bw, nw):
        for s in range(0, nw, chunk):
            e = min(nw, s + chunk)
            sub = None if mask is None else mask[s:e]
            part = x[start + s : start + e]
            out[start + s : start + e] = _project_attend(
                part, sub, operands, qkv, proj, bias, heads, scale
            )
    return out


def _project_attend(
    x: Tensor,
    mask: Tensor | None,
    operands: AttentionOperands,
    qkv: Projection,
    proj: Projection,
    bias: Tensor,
    heads: int,
    scale: float,
) -> Tensor:
    """``proj(attend(q, k, v))`` with q, k, v split from one qkv projection of x (B*nW, N, C)."""
    bw, n, c = x.shape
    q, k, v = qkv(x).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = attend(q, k, v, bias, mask, scale, operands)
    return proj(out.transpose(1, 2).reshape(bw, n, c))


def _shifted_rows_chunked(
    y: Tensor,
    ws: int,
    shift: int,
    chunk: int,
    operands: AttentionOperands,
    geometry: dict,
) -> Tensor:
    """The exact path: whole rows of windows at a time, at most ``chunk`` windows
    per call where a row allows it; the output equals the whole-map attention.

    The shifted-window roll is applied per chunk of window rows by indexing rows
    modulo H, so neither the rolled map nor the full (nW, N, N) mask exists.
    """
    b, h, w, c = y.shape
    n_rows, n_cols = h // ws, w // ws
    rows_per_chunk = max(1, chunk // max(1, b * n_cols))
    out = y.new_empty(b, h, w, c)
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        rows: slice | Tensor = slice(r0 * ws, r1 * ws)
        mask = None
        if shift:
            rows = (torch.arange(r0 * ws, r1 * ws, device=y.device) + shift) % h
            part = torch.roll(y[:, rows], shifts=-shift, dims=2)
            mask = chunk_window_mask(r1 - r0, r1 == n_rows, n_cols, ws, shift, y.device)
        else:
            part = y[:, rows]
        windows = window_partition(part, ws).reshape(-1, ws * ws, c)
        attended = _attend_windows(windows, mask, chunk, operands, **geometry)
        branch = window_reverse(attended.view(-1, ws, ws, c), ws, (r1 - r0) * ws, w)
        if shift:
            branch = torch.roll(branch, shifts=shift, dims=2)
        out[:, rows] = branch
    return out.view(b, h * w, c)


# --------------------------------------------------------------------------- HAT's OCAB


def overlapping_window_attention(
    y: Tensor,
    x_size: tuple[int, int],
    *,
    qkv: Projection,
    proj: Projection,
    bias: Tensor,
    heads: int,
    scale: float,
    window_size: int,
    overlap_window_size: int,
    operands: AttentionOperands = PLAIN_OPERANDS,
) -> Tensor:
    """HAT's overlapping cross-attention: ``ws x ws`` query windows attend to the
    co-centred ``ows x ows`` key/value windows.

    y: (B, H*W, C) normalised tokens; bias: (heads, ws², ows²). Returns the
    (B, H*W, C) branch after ``proj``. Keys and values outside the image are
    zeros after the projection, as the official ``nn.Unfold`` padding makes them
    (kept for fidelity). Paths: the C++ kernel on the whole map, all query rows
    at once, or (exact path) a slab of window rows at a time.
    """
    h, w = x_size
    b, _, c = y.shape
    ws = window_size
    y = y.view(b, h, w, c)
    n_rows = h // ws
    chunk = current_execution().windows_per_chunk
    rows_per_chunk = n_rows if chunk is None else max(1, chunk // max(1, b * (w // ws)))
    kv_tokens = overlap_window_size**2
    if chunk is None and _kernel_serves(y, operands, ws * ws, c // heads, kv_tokens):
        attended = cpu_kernels.fused_window_attention(
            qkv(y), bias, None, None, heads, scale, window=ws, kv_window=overlap_window_size
        )
        return proj(attended).view(b, h * w, c)

    def rows(r0: int, r1: int) -> Tensor:
        return proj(
            _overlap_rows(
                y, r0, r1, r1 == n_rows, qkv, bias, heads, scale, ws, overlap_window_size, operands
            )
        )

    if rows_per_chunk >= n_rows:
        return rows(0, n_rows).view(b, h * w, c)
    out = y.new_empty(b, h, w, c)
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        out[:, r0 * ws : r1 * ws] = rows(r0, r1)
    return out.view(b, h * w, c)


def _overlap_rows(
    y: Tensor,
    r0: int,
    r1: int,
    last: bool,
    qkv: Projection,
    bias: Tensor,
    heads: int,
    scale: float,
    ws: int,
    ows: int,
    operands: AttentionOperands,
) -> Tensor:
    """Cross-attention of query window rows ``r0:r1``: y (B, H, W, C) -> (B, n, W, C).

    Only the rows the enlarged windows reach are projected; rows and columns
    outside the image are zeros after the projection. ``last``: the rows end at
    the bottom of the map (said by the caller, so that under graph capture no
    ``min``/``max`` of symbolic sizes is needed; ``r0`` is always a plain int).
    """
    b, h, w, c = y.shape
    d = c // heads
    pad = (ows - ws) // 2
    top, bottom = r0 * ws - pad, r1 * ws + pad
    below = pad if last else max(0, bottom - h)  # zero rows past the bottom
    projected = qkv(y[:, max(top, 0) : bottom - below]).view(b, -1, w, 3, c)
    n = (r1 - r0) * ws
    first = r0 * ws - max(top, 0)
    q = window_partition(projected[:, first : first + n, :, 0], ws)
    q = q.view(-1, ws * ws, heads, d).transpose(1, 2)
    kv = F.pad(projected[..., 1:, :], (0, 0, 0, 0, pad, pad, max(0, -top), below))
    # (B, nH, nW, 2, C, ows, ows): overlapping windows as a strided view.
    kv = kv.unfold(1, ows, ws).unfold(2, ows, ws)
    kv = kv.permute(3, 0, 1, 2, 5, 6, 4).reshape(2, -1, ows * ows, heads, d)
    k, v = kv.transpose(2, 3).unbind(0)
    out = attend(q, k, v, bias, None, scale, operands)
    return window_reverse(out.transpose(1, 2).reshape(-1, ws, ws, c), ws, n, w)


# --------------------------------------------------------------------------- SRFormer's PSA


def permuted_window_attention(
    y: Tensor,
    x_size: tuple[int, int],
    *,
    q_proj: Projection,
    kv_proj: Projection,
    proj: Projection,
    bias: Tensor,
    heads: int,
    scale: float,
    window_size: int,
    shift_size: int,
    operands: AttentionOperands = PLAIN_OPERANDS,
) -> Tensor:
    """SRFormer's permuted self-attention on (shifted) windows.

    Every pixel of a ``ws x ws`` window is a query; keys and values come from
    ``kv_proj`` (``C/4`` key and ``C/4`` value channels per pixel) with every
    2x2 pixel block folded into one ``C``-channel token, so a query attends to
    ``(ws/2)^2`` tokens. y: (B, H*W, C); bias: (heads, ws², (ws/2)²). Returns
    the (B, H*W, C) branch after ``proj``.
    """
    h, w = x_size
    b, _, c = y.shape
    ws, shift = window_size, shift_size
    y = y.view(b, h, w, c)
    mask = None
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        mask = permuted_window_mask(h, w, ws, shift, y.device)
    x = window_partition(y, ws).reshape(-1, ws * ws, c)
    bw, n, _ = x.shape
    p = ws // 2
    # kv channels are [k (C/4) | v (C/4)]; each 2x2 pixel block folds into one token.
    kv = kv_proj(x).view(bw, p, 2, p, 2, 2, c // 4).permute(0, 1, 3, 5, 2, 4, 6)
    kv = kv.reshape(bw, n // 4, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    q = q_proj(x).view(bw, n, heads, c // heads).transpose(1, 2)
    out = attend(q, k, v, bias, mask, scale, operands)
    out = proj(out.transpose(1, 2).reshape(bw, n, c))
    out = window_reverse(out.view(-1, ws, ws, c), ws, h, w)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out.reshape(b, h * w, c)


# --------------------------------------------------------------------------- MLP half


def mlp_residual(
    x: Tensor,
    norm: TokenNorm,
    mlp: Callable[[Tensor], Tensor],
    *,
    drop_prob: float,
    window_size: int,
) -> Tensor:
    """A block's second half, ``merge_residual(x, mlp(norm(x)))``; x: (B, L, C).

    On the exact path (see :meth:`~irformer.execution.ExecutionContext.mlp_tokens`)
    the MLP runs over slices of tokens per image, with the norm statistics of
    the whole image, so its hidden features never exist for the whole map; an
    inference path, so stochastic depth (one draw per sample) is not applied there.
    """
    stats = norm.statistics(x)
    tokens = current_execution().mlp_tokens(window_size)
    if tokens is None or tokens >= x.shape[1]:
        branch = mlp(norm.normalize(x, stats))
        return merge_residual(x, branch, norm, stats, drop_prob=drop_prob)
    # IN and BN pool over tokens inside normalize(): normalise the whole map.
    pooled = isinstance(norm, (InstanceNorm, BatchNorm))
    y = norm.normalize(x, stats) if pooled else None
    out = torch.empty_like(x)
    for s in range(0, x.shape[1], tokens):
        e = s + tokens
        part = y[:, s:e] if y is not None else norm.normalize(x[:, s:e], stats)
        out[:, s:e] = merge_residual(x[:, s:e], mlp(part), norm, stats)
    return out
