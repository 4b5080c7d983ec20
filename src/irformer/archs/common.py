"""Building blocks shared by the Swin-style architectures.

Window partitioning, relative-position bias, shifted-window masks (cached per
input size, unlike the reference code, which rebuilds them whenever the size
differs from the training patch), window attention with a fused path, the MLP,
patch (un)embedding, upsamplers, and the Swin Transformer block whose residual
merges go through :func:`irformer.norms.merge_residual`.

Parameter names follow the official SwinIR code so checkpoints load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irformer.cpu_kernels import fused_window_attention, use_fused_attention
from irformer.norms import BatchNorm, InstanceNorm, TokenNorm, build_norm, merge_residual

ActivationQuantizer = Callable[[Tensor], Tensor]

MASK_VALUE = -100.0
"""The additive mask value of the official Swin code (not -inf), kept for parity."""


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """x: (B, H, W, C) -> (B * nW, ws, ws, C), windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    # contiguous(): with one row/column of windows, reshape could return a view
    # whose (ws, ws) dims cannot be merged by the callers' .view(-1, ws * ws, C).
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)


def window_reverse(windows: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """windows: (B * nW, ws, ws, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    b = windows.shape[0] // ((h // window_size) * (w // window_size))
    x = windows.view(b, h // window_size, w // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


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


@lru_cache(maxsize=64)
def _shifted_window_mask_cpu(h: int, w: int, window_size: int, shift_size: int) -> Tensor:
    img_mask = torch.zeros(1, h, w, 1)
    slices = (
        slice(0, -window_size),
        slice(-window_size, -shift_size),
        slice(-shift_size, None),
    )
    region = 0
    for hs in slices:
        for ws in slices:
            img_mask[:, hs, ws, :] = region
            region += 1
    windows = window_partition(img_mask, window_size).view(-1, window_size * window_size)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.ne(0).float() * MASK_VALUE


_DEVICE_MASKS: dict[tuple[int, int, int, int, str], Tensor] = {}


def shifted_window_mask(
    h: int, w: int, window_size: int, shift_size: int, device: torch.device
) -> Tensor:
    """(nW, N, N) additive mask for shifted-window attention on an ``h x w`` map.

    Cached per (size, window, shift, device): every block of a model shares one.
    """
    if device.type == "cpu":
        return _shifted_window_mask_cpu(h, w, window_size, shift_size)
    key = (h, w, window_size, shift_size, str(device))
    mask = _DEVICE_MASKS.get(key)
    if mask is None:
        if len(_DEVICE_MASKS) > 64:
            _DEVICE_MASKS.clear()
        mask = _shifted_window_mask_cpu(h, w, window_size, shift_size).to(device)
        _DEVICE_MASKS[key] = mask
    return mask


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
        if len(_CHUNK_MASKS) > 64:
            _CHUNK_MASKS.clear()
        ws = window_size
        kinds = _shifted_window_mask_cpu(2 * ws, 2 * ws, ws, shift_size)
        in_last_row = (torch.arange(rows) == rows - 1) & last
        kind = 2 * in_last_row.long().view(-1, 1) + (torch.arange(cols) == cols - 1).view(1, -1)
        mask = _CHUNK_MASKS[key] = kinds[kind.reshape(-1)].to(device)
    return mask


_MASKED_WINDOWS: dict[tuple[int, tuple[int, ...], tuple[int, ...], str], tuple[Tensor, Tensor]] = {}


def masked_windows(mask: Tensor) -> Tensor:
    """Indices of the windows whose (nW, N, N) additive mask is not all zero.

    Cached per mask tensor (the masks are cached per size and never modified);
    the entry keeps the mask alive, so its address cannot be reused by another.
    """
    key = (mask.data_ptr(), tuple(mask.shape), tuple(mask.stride()), str(mask.device))
    entry = _MASKED_WINDOWS.get(key)
    if entry is None:
        if len(_MASKED_WINDOWS) > 256:
            _MASKED_WINDOWS.clear()
        idx = mask.reshape(mask.shape[0], -1).ne(0).any(dim=1).nonzero().flatten()
        entry = _MASKED_WINDOWS[key] = (mask, idx)
    return entry[1]


def window_mask_flags(mask: Tensor) -> Tensor:
    """uint8 (nW,): 1 for the windows whose additive mask is not all zero."""
    return torch.zeros(mask.shape[0], dtype=torch.uint8).index_fill_(0, masked_windows(mask), 1)


SCORE_ELEMENTS_PER_STEP = 48 * 64 * 64
"""Attention scores per step of :func:`window_sdpa`'s bf16 CPU path: 48 fp32
64x64 matrices, which stay in a 1 MB L2 cache."""
SMALL_WINDOW_SCORES = 64 * 64
"""Largest N_q * N_kv for that path: 8x8 windows gain ~1.6x; 16x16 windows
(HAT) measured no faster than the kernel, so they keep it."""


def window_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float) -> Tensor:
    """``scaled_dot_product_attention`` for many small windows; attn_mask is additive.

    q, k, v: (B, H, N, d); attn_mask: (1 or B, H, N, N) in any float dtype (cast
    to q's for the kernel). On CPU in bf16 without autograd, PyTorch's flash
    kernel is slower than in fp32 for small windows (N = 64, d = 10): there
    the attention runs in cache-sized steps of bf16 matmuls with the mask added
    and the softmax taken in fp32 (about 1.6x faster than fp32 attention, and
    as close to it as the bf16 kernel). In fp32 with several CPU threads the
    windows run as blocked GEMMs (:func:`_blocked_fp32_attention`). Everything
    else, and anything under autograd, goes to SDPA.
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

    With several threads this beats PyTorch's CPU flash kernel for 64-token
    windows with head dim 10 (12.8 vs 14.9 ms for 256 windows x 6 heads at 2
    threads: the kernel scales 1.3x from 1 to 2 threads, these batched GEMMs
    ~1.75x); with one thread the kernel is faster and is kept.
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


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with relative position bias.

    Fused path (inference): ``scaled_dot_product_attention`` with bias and mask
    folded into one additive mask, heads and windows merged so the CPU flash
    kernel applies (exact to float rounding). Under autograd, and when any of
    ``quant_q``/``quant_k``/``quant_attn``/``quant_v`` is set (compression), the
    explicit matmul path runs (faster to train through; and there both
    operands of both matmuls can be quantised).
    """

    chunk_windows: int | None = None
    """Windows per attention call (None: all at once). Set by
    :func:`irformer.engine.infer.chunked_attention` to bound the memory of the
    attention scores and mask on large images; the result is unchanged."""

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Derived from window_size alone: official files carry it, we validate it
        # on load instead of storing it.
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.quant_q: ActivationQuantizer | None = None
        self.quant_k: ActivationQuantizer | None = None
        self.quant_attn: ActivationQuantizer | None = None
        self.quant_v: ActivationQuantizer | None = None

    def position_bias(self) -> Tensor:
        """(heads, N, N) relative position bias."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    @property
    def quantized(self) -> bool:
        return any(
            q is not None for q in (self.quant_q, self.quant_k, self.quant_attn, self.quant_v)
        )

    def forward(self, x: Tensor, mask: Tensor | None = None, shift: int = 0) -> Tensor:
        """x: (B*nW, N, C) windows; mask: (nW, N, N) additive or None.

        Where :meth:`uses_cpu_kernel` holds, x may instead be the (B, H, W, C) map: the
        kernel then takes the windows of the map cyclically shifted by
        ``shift`` and returns the map (no roll or partition copies).
        """
        if x.dim() == 4 or self.uses_cpu_kernel(x):
            return self._attend_cpu_kernel(x, mask, shift)
        chunk = self.chunk_windows
        if chunk is not None and x.shape[0] > chunk:
            return self._attend_chunked(x, mask, chunk)
        return self._attend(x, mask)

    def _attend(self, x: Tensor, mask: Tensor | None) -> Tensor:
        bw, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.position_bias()
        if self.quantized or (torch.is_grad_enabled() and q.requires_grad):
            # Training: CPU SDPA's backward for 64-token windows is ~25% slower
            # than autograd through the explicit matmuls (the reference's path).
            out = self._explicit_attention(q, k, v, bias, mask)
        else:
            out = self._fused_attention(q, k, v, bias, mask)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))

    def uses_cpu_kernel(self, x: Tensor) -> bool:
        """Whether the fused CPU kernel serves input ``x`` (see :meth:`forward`)."""
        n = self.window_size * self.window_size
        return not self.quantized and use_fused_attention(x, n, self.dim // self.num_heads)

    def _attend_cpu_kernel(self, x: Tensor, mask: Tensor | None, shift: int) -> Tensor:
        """The fused kernel; it needs no score or mask tensors, so it ignores
        ``chunk_windows``."""
        flags = None if mask is None else window_mask_flags(mask)
        window = self.window_size if x.dim() == 4 else 0
        merged = fused_window_attention(
            self.qkv(x),
            self.position_bias(),
            mask,
            flags,
            self.num_heads,
            self.scale,
            window=window,
            shift=shift,
        )
        return self.proj(merged)

    def _attend_chunked(self, x: Tensor, mask: Tensor | None, chunk: int) -> Tensor:
        """:meth:`forward` over at most ``chunk`` windows at a time (same result).

        Chunks never straddle two images, so each takes the matching slice of
        the per-window mask.
        """
        bw = x.shape[0]
        nw = bw if mask is None else mask.shape[0]
        out = x.new_empty(bw, x.shape[1], self.proj.out_features)
        for start in range(0, bw, nw):
            for s in range(0, nw, chunk):
                e = min(nw, s + chunk)
                sub = None if mask is None else mask[s:e]
                out[start + s : start + e] = self._attend(x[start + s : start + e], sub)
        return out

    def _fused_attention(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None
    ) -> Tensor:
        """Every window with the bias alone, then the masked windows again with the mask.

        A shifted-window mask is zero except in the last row and column of
        windows (where the roll wrapped the map around), so only those are
        recomputed with ``bias + mask``; folding the mask into one additive
        tensor for all windows would materialise ``(nW, heads, N, N)`` floats
        on every call. Interior windows add an exact zero either way.
        """
        bw, heads, n, d = q.shape
        out = window_sdpa(q, k, v, bias.unsqueeze(0), self.scale)
        if mask is None:
            return out
        nw = mask.shape[0]
        idx = masked_windows(mask)
        if idx.numel() == 0:
            return out
        nb = idx.numel()

        def pick(t: Tensor) -> Tensor:
            return t.view(bw // nw, nw, heads, n, d)[:, idx].reshape(bw // nw, nb * heads, n, d)

        add = (bias.unsqueeze(0) + mask[idx].unsqueeze(1)).reshape(1, nb * heads, n, n)
        border = window_sdpa(pick(q), pick(k), pick(v), add, self.scale)
        # out of place: SDPA keeps ``out`` for its backward
        out = out.view(bw // nw, nw, heads, n, d).index_copy(
            1, idx, border.view(bw // nw, nb, heads, n, d)
        )
        return out.view(bw, heads, n, d)

    def _explicit_attention(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None
    ) -> Tensor:
        q = q * self.scale
        if self.quant_q is not None:
            q = self.quant_q(q)
        if self.quant_k is not None:
            k = self.quant_k(k)
        attn = q @ k.transpose(-2, -1) + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            bw, heads, n, _ = attn.shape
            attn = attn.view(bw // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(bw, heads, n, n)
        attn = attn.softmax(dim=-1)
        if self.quant_attn is not None:
            attn = self.quant_attn(attn)
        if self.quant_v is not None:
            v = self.quant_v(v)
        return attn @ v


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (official key names)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP; both merges via ``merge_residual``.

    ``conv_branch`` (HAT's channel-attention block) is an optional module run on
    the normalised input, whose output, times ``conv_scale``, joins the attention
    branch before the merge (the authors' i-LN HAT rescales the sum).

    With ``chunk_windows`` set (see :func:`irformer.engine.infer.chunked_attention`)
    the block runs the attention over rows of windows and the MLP over slices of
    tokens, with the norm statistics of the whole image, so large inputs fit in
    bounded memory and the output equals the unchunked one.
    """

    chunk_windows: int | None = None
    """Windows per attention chunk (None: the whole image at once)."""
    chunk_tokens: int | None = None
    """Tokens per MLP chunk (None: ``chunk_windows * window_size**2``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        norm: str,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        conv_branch: nn.Module | None = None,
        conv_scale: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.drop_path = drop_path
        """Stochastic-depth rate of both branches (training only; no parameters)."""
        self.norm1: TokenNorm = build_norm(norm, dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale
        )
        if conv_branch is not None:
            self.conv_block = conv_branch
        self.conv_scale = conv_scale
        self.norm2: TokenNorm = build_norm(norm, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        """x: (B, H*W, C) with ``x_size = (H, W)`` multiples of the window size."""
        if self.chunk_windows is not None:
            return self._forward_chunked(x, x_size, self.chunk_windows)
        h, w = x_size
        b, _, c = x.shape
        stats = self.norm1.statistics(x)
        y = self.norm1.normalize(x, stats)
        branch = self._window_attention(y.view(b, h, w, c), h, w)
        side = None
        if hasattr(self, "conv_block"):
            conv = self.conv_block(y.view(b, h, w, c).permute(0, 3, 1, 2))
            side = self.conv_scale * conv.permute(0, 2, 3, 1).reshape(b, h * w, c)
        x = merge_residual(x, branch, self.norm1, stats, drop_prob=self.drop_path, side=side)
        stats = self.norm2.statistics(x)
        branch = self.mlp(self.norm2.normalize(x, stats))
        return merge_residual(x, branch, self.norm2, stats, drop_prob=self.drop_path)

    def _window_attention(self, y: Tensor, h: int, w: int) -> Tensor:
        """y: (B, H, W, C) normalised tokens -> (B, H*W, C) attention branch."""
        b, _, _, c = y.shape
        ws, shift = self.window_size, self.shift_size
        if self.attn.uses_cpu_kernel(y):
            mask = shifted_window_mask(h, w, ws, shift, y.device) if shift else None
            return self.attn(y, mask, shift).view(b, h * w, c)
        mask = None
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(h, w, ws, shift, y.device)
        windows = window_partition(y, ws).view(-1, ws * ws, c)
        out = window_reverse(self.attn(windows, mask).view(-1, ws, ws, c), ws, h, w)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out.reshape(b, h * w, c)

    def _forward_chunked(self, x: Tensor, x_size: tuple[int, int], chunk: int) -> Tensor:
        """:meth:`forward` in bounded memory: equal output, peak ~3 feature maps.

        The norm statistics (whole-image for i-LN) come from the full input; the
        shifted-window roll is applied per chunk of window rows by indexing rows
        modulo H, so neither the rolled map nor the full (nW, N, N) mask exists.
        An inference path: stochastic depth (one draw per sample) is not applied.
        """
        h, w = x_size
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        n_rows, n_cols = h // ws, w // ws
        rows_per_chunk = max(1, chunk // max(1, b * n_cols))
        stats = self.norm1.statistics(x)
        y = self.norm1.normalize(x, stats).view(b, h, w, c)
        conv = None
        if hasattr(self, "conv_block"):
            conv = self.conv_block(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x4 = x.view(b, h, w, c)
        out = torch.empty_like(x)
        out4 = out.view(b, h, w, c)
        for r0 in range(0, n_rows, rows_per_chunk):
            r1 = min(n_rows, r0 + rows_per_chunk)
            rows: slice | Tensor = slice(r0 * ws, r1 * ws)
            mask = None
            if shift:
                rows = (torch.arange(r0 * ws, r1 * ws, device=x.device) + shift) % h
                part = torch.roll(y[:, rows], shifts=-shift, dims=2)
                mask = chunk_window_mask(r1 - r0, r1 == n_rows, n_cols, ws, shift, x.device)
            else:
                part = y[:, rows]
            windows = window_partition(part, ws).reshape(-1, ws * ws, c)
            attn = self.attn(windows, mask).view(-1, ws, ws, c)
            branch = window_reverse(attn, ws, (r1 - r0) * ws, w)
            if shift:
                branch = torch.roll(branch, shifts=shift, dims=2)
            if conv is not None:
                branch = branch + self.conv_scale * conv[:, rows]
            out4[:, rows] = merge_residual(x4[:, rows], branch, self.norm1, stats)
        del y, conv
        return self._mlp_chunked(out, self.chunk_tokens or chunk * ws * ws)

    def _mlp_chunked(self, x: Tensor, tokens: int) -> Tensor:
        """The MLP half of the block over slices of ``tokens`` tokens per image."""
        stats = self.norm2.statistics(x)
        # IN and BN pool over tokens inside normalize(): normalise the whole map.
        pooled = isinstance(self.norm2, (InstanceNorm, BatchNorm))
        y = self.norm2.normalize(x, stats) if pooled else None
        out = torch.empty_like(x)
        for s in range(0, x.shape[1], max(1, tokens)):
            e = s + max(1, tokens)
            part = y[:, s:e] if y is not None else self.norm2.normalize(x[:, s:e], stats)
            out[:, s:e] = merge_residual(x[:, s:e], self.mlp(part), self.norm2, stats)
        return out


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H*W, C) tokens, with the optional post-embedding norm."""

    def __init__(self, dim: int, norm: str | None) -> None:
        super().__init__()
        if norm is not None:
            self.norm = build_norm(norm, dim, role="embed")

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if hasattr(self, "norm") else x


class PatchUnEmbed(nn.Module):
    """(B, H*W, C) tokens -> (B, C, H, W), a channels-last view of contiguous tokens.

    Channels-last maps keep the convolutions between token stages in the fast
    channels-last kernels and make :class:`PatchEmbed` a view again; built via
    ``permute`` so that batch 1 gets proper channels-last strides too (a
    ``transpose + reshape`` view gives batch 1 a stride the conv reads as NCHW,
    which then turns the whole residual stream into a transposed layout).
    """

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        b, _, c = x.shape
        return x.reshape(b, x_size[0], x_size[1], c).permute(0, 3, 1, 2)


class Upsample(nn.Sequential):
    """Conv + PixelShuffle stages for scale 2^n or 3 (official key layout)."""

    def __init__(self, scale: int, num_feat: int) -> None:
        layers: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"upscale {scale} is not supported; expected 2^n or 3")
        super().__init__(*layers)


class UpsampleOneStep(nn.Sequential):
    """One conv + PixelShuffle straight to the output (lightweight models)."""

    def __init__(self, scale: int, num_feat: int, num_out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(num_feat, scale * scale * num_out_ch, 3, 1, 1), nn.PixelShuffle(scale)
        )


UPSAMPLERS: tuple[str, ...] = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")
"""Upsampler names of the originals ('' = same-size restoration)."""

DF2K_RGB_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)
DF2K_RGB_STD: tuple[float, float, float] = (0.2842, 0.2701, 0.2920)
"""Input mean of the originals and the std that the i-LN code's ``stdnorm`` divides by."""


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad (B, C, H, W) on the bottom/right to a multiple (as the originals do).

    Where one reflection cannot cover the padding (a side shorter than the pad
    plus one, which makes ``F.pad`` fail) it reflects again from the new border,
    and a one-pixel side is replicated; otherwise it is exactly ``F.pad``.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    while pad_h or pad_w:
        if (pad_h and h == 1) or (pad_w and w == 1):  # nothing to reflect yet
            step_h, step_w, mode = int(pad_h > 0 and h == 1), int(pad_w > 0 and w == 1), "replicate"
        else:
            step_h, step_w, mode = min(pad_h, h - 1), min(pad_w, w - 1), "reflect"
        x = F.pad(x, (0, step_w, 0, step_h), mode=mode)
        h, w, pad_h, pad_w = h + step_h, w + step_w, pad_h - step_h, pad_w - step_w
    return x


def check_channels(x: Tensor, expected: int, model_name: str) -> None:
    """Raise a clear error for a wrong channel count or rank."""
    if x.dim() != 4 or x.shape[1] != expected:
        raise ValueError(
            f"{model_name} expects input of shape (B, {expected}, H, W), got {tuple(x.shape)}"
        )


# --------------------------------------------------------------------------- model heads
# Shared by SwinIR, HAT, DRCT and SRFormer: their shallow/deep-feature wiring,
# input normalisation and reconstruction heads are the same in the originals.
# The heads are set as attributes of the model itself (not a sub-module) so the
# official state-dict keys (``conv_before_upsample``, ``upsample``, ``conv_up1``,
# ``conv_hr``, ``conv_last``) stay top-level.

DF2K_GREY_STD: float = sum(DF2K_RGB_STD) / 3
"""Grey-input std for ``stdnorm`` (SwinIR/DRCT/SRFormer: mean of the RGB stds)."""


def input_stats(
    in_chans: int, stdnorm: bool, *, grey_std: float = DF2K_GREY_STD
) -> tuple[Tensor, Tensor]:
    """(1, C, 1, 1) mean and std the input is normalised with.

    The originals subtract the DF2K RGB mean for colour input and nothing for
    grey. ``stdnorm`` divides by the DF2K RGB std, and grey input by
    ``grey_std`` (the i-LN code only defines it for RGB; its HAT code uses the
    red-channel std, the other models here the mean of the three).
    """
    if in_chans == 3:
        mean, std = torch.tensor(DF2K_RGB_MEAN), torch.tensor(DF2K_RGB_STD)
    else:
        mean, std = torch.zeros(1), torch.tensor([grey_std])
    if not stdnorm:
        std = torch.ones_like(std)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def normalize_input(
    x: Tensor, mean: Tensor, std: Tensor, *, stdnorm: bool, img_range: float
) -> Tensor:
    """x: (B, C, H, W) -> ``(x - mean) [/ std] * img_range``, the originals' input scaling."""
    x = x - mean
    if stdnorm:
        x = x / std
    return x * img_range


def denormalize_output(
    x: Tensor, mean: Tensor, std: Tensor, *, stdnorm: bool, img_range: float
) -> Tensor:
    """Inverse of :func:`normalize_input` (same operation order as the originals)."""
    x = x / img_range
    if stdnorm:
        x = x * std
    return x + mean


def residual_conv(dim: int, resi_connection: str, valid: tuple[str, ...]) -> nn.Module:
    """The conv closing each residual group and the body.

    '1conv' (all models), '3conv' (SwinIR/SRFormer: saves parameters for the
    large real-SR model), 'identity' (HAT/DRCT). ``valid`` is the calling
    model's subset, so a name the original does not know is rejected.
    """
    if resi_connection not in valid:
        raise ValueError(f"unknown resi_connection {resi_connection!r}; valid: {', '.join(valid)}")
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
            nn.LeakyReLU(negative_slope=0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    if resi_connection == "identity":
        return nn.Identity()
    raise ValueError(f"unknown resi_connection {resi_connection!r}; valid: 1conv, 3conv, identity")


def stochastic_depth_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Per-group, per-block drop-path rates: the originals' linear ramp from 0 to ``rate``.

    SwinIR, HAT, DRCT and SRFormer all take ``torch.linspace(0, rate, sum(depths))``
    and hand group ``i`` the slice of its ``depths[i]`` blocks; the float32 ramp is
    kept so the rates equal theirs bit for bit.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    ramp = torch.linspace(0, rate, sum(depths), device="cpu").tolist()  # also under meta
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [ramp[start : start + depth] for start, depth in zip(starts, depths, strict=True)]


def check_model_args(
    *,
    upsampler: str,
    valid_upsamplers: tuple[str, ...],
    in_chans: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    upscale: int,
) -> None:
    """Reject constructor arguments the four originals all reject (ValueError)."""
    if upsampler not in valid_upsamplers:
        raise ValueError(
            f"unknown upsampler {upsampler!r}; valid: {', '.join(map(repr, valid_upsamplers))}"
        )
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if len(depths) != len(num_heads):
        raise ValueError(
            f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length"
        )
    if upsampler == "" and upscale != 1:
        raise ValueError(f"upsampler '' (same-size restoration) needs upscale=1, got {upscale}")


def add_input_stem(
    model: nn.Module,
    *,
    in_chans: int,
    embed_dim: int,
    upscale: int,
    upsampler: str,
    img_range: float,
    norm: str,
    patch_norm: bool,
    stdnorm: bool,
    stats: tuple[Tensor, Tensor],
) -> None:
    """Set the settings :func:`restore_forward` reads and build the shallow stem.

    ``stats``: the (mean, std) from :func:`input_stats` (non-persistent buffers:
    the originals hard-code them). Adds ``conv_first``, ``patch_embed`` and
    ``patch_unembed`` under their official names.
    """
    model.in_chans = in_chans
    model.upscale = upscale
    model.upsampler = upsampler
    model.img_range = img_range
    model.norm_name = norm
    model.stdnorm = stdnorm
    model.register_buffer("mean", stats[0], persistent=False)
    model.register_buffer("std", stats[1], persistent=False)
    model.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
    model.patch_embed = PatchEmbed(embed_dim, norm if patch_norm else None)
    model.patch_unembed = PatchUnEmbed()


def add_reconstruction_head(
    model: nn.Module, upsampler: str, *, embed_dim: int, num_feat: int, in_chans: int, upscale: int
) -> None:
    """Attach the official upsampler head's modules to ``model`` (keys kept top-level).

    ``nearest+conv`` gets one ``conv_up{i}`` per x2 step (upscale 2, 4 or 8;
    callers validate the scales they support).
    """
    if upsampler == "pixelshuffle":
        model.conv_before_upsample = nn.Sequential(
            nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
        )
        model.upsample = Upsample(upscale, num_feat)
        model.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
    elif upsampler == "pixelshuffledirect":
        model.upsample = UpsampleOneStep(upscale, embed_dim, in_chans)
    elif upsampler == "nearest+conv":
        model.conv_before_upsample = nn.Sequential(
            nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
        )
        for i in range(1, int(math.log2(upscale)) + 1):
            setattr(model, f"conv_up{i}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
        model.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        model.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        model.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
    else:
        model.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)


def apply_reconstruction_head(model: nn.Module, upsampler: str, x: Tensor, res: Tensor) -> Tensor:
    """Image from deep features ``res`` (B, C, h, w) through the head built above.

    ``x`` is the normalised input; the same-size head ('') predicts a residual
    on it, as the originals do.
    """
    if upsampler == "":
        return x + model.conv_last(res)
    if upsampler == "pixelshuffle":
        return model.conv_last(model.upsample(model.conv_before_upsample(res)))
    if upsampler == "pixelshuffledirect":
        return model.upsample(res)
    y = model.conv_before_upsample(res)
    for name in ("conv_up1", "conv_up2", "conv_up3"):
        if hasattr(model, name):
            y = model.lrelu(getattr(model, name)(F.interpolate(y, scale_factor=2, mode="nearest")))
    return model.conv_last(model.lrelu(model.conv_hr(y)))


def deep_features(model: nn.Module, x: Tensor) -> Tensor:
    """x: (B, C, H, W) shallow features -> (B, C, H, W) deep features.

    The originals' ``forward_features``: tokens through ``model.layers`` (each
    called as ``layer(tokens, (H, W))``) and the final ``model.norm``, with
    SwinIR's optional ``absolute_pos_embed`` added after the patch embedding.
    """
    x_size = (x.shape[2], x.shape[3])
    x = model.patch_embed(x)
    pos_embed = getattr(model, "absolute_pos_embed", None)
    if pos_embed is not None:
        x = x + pos_embed
    for layer in model.layers:
        x = layer(x, x_size)
    return model.patch_unembed(model.norm(x), x_size)


def reconstruct_image(model: nn.Module, x: Tensor) -> Tensor:
    """x: (B, C, H, W) normalised input -> normalised output (B, C, s*H, s*W).

    Shallow conv, deep features with the long skip (``conv_after_body(...) +
    feat``), then the upsampler head, as in all four originals.
    """
    feat = model.conv_first(x)
    res = model.conv_after_body(model.forward_features(feat)) + feat
    return apply_reconstruction_head(model, model.upsampler, x, res)


def restore_forward(model: nn.Module, x: Tensor, model_name: str, *, channels_last: bool) -> Tensor:
    """x: (B, in_chans, H, W), any H and W -> (B, in_chans, s*H, s*W): the models' forward.

    Reflect-pad to a window multiple, normalise, reconstruct, undo the
    normalisation and crop the padding off (the originals' test-time wrapper,
    folded into the model). Padding before or after the per-channel
    normalisation is the same: padding copies values. ``channels_last`` makes
    every token <-> map transpose a view (SwinIR, HAT); the output is then
    made contiguous again.
    """
    check_channels(x, model.in_chans, model_name)
    h, w = x.shape[2:]
    x = pad_to_multiple(x, model.window_size)
    stats = {"stdnorm": model.stdnorm, "img_range": model.img_range}
    x = normalize_input(x, model.mean, model.std, **stats)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = denormalize_output(reconstruct_image(model, x), model.mean, model.std, **stats)
    s = model.upscale
    x = x[:, :, : h * s, : w * s]
    return x.contiguous() if channels_last else x


def init_linear_weights(module: nn.Module) -> None:
    """The originals' init (for ``Module.apply``): truncated-normal linears, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def count_indexed(keys: Sequence[str], prefix: str) -> int:
    """Number of consecutive ``prefix{i}.`` entries in state-dict keys (ModuleList length)."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in keys):
        n += 1
    return n
