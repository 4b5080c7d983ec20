"""HAT (Chen et al., CVPR 2023): Hybrid Attention Transformer, and the i-LN paper's variants.

Layout and parameter keys in ``ln`` mode equal the official implementation's
(XPixelGroup/HAT ``hat_arch.py``): ``conv_first``, ``patch_embed.norm``,
``layers.{i}`` = RHAG with ``residual_group.blocks.{j}`` (hybrid attention
blocks: window attention + channel-attention conv branch ``conv_block``) and
``residual_group.overlap_attn`` (the overlapping cross-attention block),
``layers.{i}.conv``, ``norm``, ``conv_after_body`` and the upsampler head, so
official checkpoints load unchanged. Differences that do not change outputs:

- the official model stores ``relative_position_index_SA`` / ``_OCA`` as
  persistent top-level buffers; here they are non-persistent (derived from
  ``window_size`` and ``overlap_ratio``), and the model's load hook
  (:mod:`irformer.archs.state`) checks an official file's copies against them
  and drops them;
- the shifted-window mask is cached per input size, attention runs through the
  fused SDPA kernel, and feature maps are channels-last so token <-> map
  transposes are views;
- inputs are reflect-padded to a window multiple inside the model (the
  official code pads in its test loop) and cropped back.

The official HAT only has the ``pixelshuffle`` head. Same-size restoration
(denoising, JPEG CAR, deraining: the i-LN paper trains HAT_1 on those) needs a
head the original does not define; ``upsampler=""`` uses SwinIR's (a residual
``conv_last`` added to the input), and ``pixelshuffledirect`` / ``nearest+conv``
are SwinIR's heads too, with SwinIR's key names (HAT's own docstring lists them).

i-LN (2minkyulee/i-LN, ``hat_iLN_arch.py``): every block norm is i-LN; the
hybrid block rescales ``attn + conv_scale * conv`` and the MLP output, the
overlapping block its projection output and its MLP output (all through
:func:`irformer.norms.merge_residual`); the post-embedding and final norms are
per-channel affines (``role="embed"/"final"``). ``stdnorm`` divides the input
by the DF2K RGB std after subtracting the mean (0.2842 for grey input, as in
the authors' code). How attention executes (fused kernels, the exact chunked
path, quantised operands) is :mod:`irformer.archs.attention`'s business. The
authors' names: ``HAT-mini`` is the paper's HAT_1, ``HAT-dagger`` its HAT†.

Stochastic depth: ``drop_path_rate`` (official default 0.1, which the official
and the i-LN training configs keep) ramps linearly over the hybrid blocks; the
OCABs have none and the CAB conv branch is added after the drop, as in the
official code (whose old timm copy draws ``floor(keep + rand)`` where irformer
uses ``bernoulli_``: the same masks' distribution, another random stream). Not
supported: absolute position
embedding (``ape``, no official config uses it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from irformer.archs.attention import AttentionOperands, mlp_residual, overlapping_window_attention
from irformer.archs.layers import (
    DF2K_RGB_STD,
    UPSAMPLERS,
    Mlp,
    PatchEmbed,
    PatchUnEmbed,
    ResidualGroup,
    RestorationTransformer,
    TransformerBlock,
    check_model_args,
    count_indexed,
    detect_head,
    init_linear_weights,
    residual_conv,
    stochastic_depth_rates,
    tokens_to_map,
)
from irformer.archs.spec import ArchSpec
from irformer.archs.swinir import SwinTransformerBlock
from irformer.archs.windows import overlap_relative_position_index, relative_position_index
from irformer.norms import TokenNorm, build_norm, merge_residual

RESI_CONNECTIONS: tuple[str, ...] = ("1conv", "identity")


# --------------------------------------------------------------------------- blocks


class ChannelAttention(nn.Module):
    """RCAN channel attention: x * sigmoid(MLP(avgpool(x))) (official ``attention.{0..4}``)."""

    def __init__(self, num_feat: int, squeeze_factor: int) -> None:
        super().__init__()
        hidden = num_feat // squeeze_factor
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, hidden, 1, padding=0),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, num_feat, 1, padding=0),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W)."""
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel attention block: conv (C -> C/compress) -> GELU -> conv -> channel attention."""

    def __init__(self, num_feat: int, *, compress_ratio: int, squeeze_factor: int) -> None:
        super().__init__()
        hidden = num_feat // compress_ratio
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, hidden, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(hidden, num_feat, 3, 1, 1),
            ChannelAttention(num_feat, squeeze_factor),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W)."""
        return self.cab(x)


class HAB(SwinTransformerBlock):
    """Hybrid attention block: a Swin block whose attention branch is joined by
    ``conv_scale * CAB(norm1(x))`` before the merge (the i-LN HAT rescales the sum)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        norm: str,
        compress_ratio: int,
        squeeze_factor: int,
        conv_scale: float,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            window_size=window_size,
            shift_size=shift_size,
            mlp_ratio=mlp_ratio,
            norm=norm,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop_path=drop_path,
            # Built before the block's own layers (the random initialisation draws
            # in irformer's original order); registered where the official HAB has it.
            conv_block=CAB(dim, compress_ratio=compress_ratio, squeeze_factor=squeeze_factor),
        )
        self.conv_scale = conv_scale

    def parallel_branch(self, y: Tensor, x_size: tuple[int, int]) -> Tensor:
        """``conv_scale * CAB(y)`` as tokens; y: (B, H*W, C)."""
        h, w = x_size
        b, _, c = y.shape
        conv = self.conv_block(tokens_to_map(y, x_size))
        return self.conv_scale * conv.permute(0, 2, 3, 1).reshape(b, h * w, c)


class OCAB(TransformerBlock):
    """Overlapping cross-attention block: windowed queries attend to enlarged key/value windows.

    Queries come from ``ws x ws`` windows, keys/values from the co-centred
    ``ows x ows`` windows (``ows = ws + int(ws * overlap_ratio)``), zero-padded at
    the border *after* the qkv projection as the official ``nn.Unfold`` does.
    Both residual merges go through :func:`merge_residual` (i-LN rescales the
    projection output and the MLP output).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int,
        overlap_ratio: float,
        mlp_ratio: float,
        norm: str,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        overlap = int(window_size * overlap_ratio)
        if overlap % 2:
            # Official unfold would then yield fewer key windows than query windows.
            raise ValueError(
                f"int(window_size * overlap_ratio) = int({window_size} * {overlap_ratio}) = "
                f"{overlap} must be even (the overlap is split evenly on both sides)"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.overlap_win_size = window_size + overlap
        self.key_tokens = self.overlap_win_size**2
        """Keys each query attends to (the post-softmax row length)."""
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        table_side = window_size + self.overlap_win_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_side**2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index",
            overlap_relative_position_index(window_size, self.overlap_win_size),
            persistent=False,
        )
        self.norm1: TokenNorm = build_norm(norm, dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2: TokenNorm = build_norm(norm, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.operands = AttentionOperands()

    def position_bias(self) -> Tensor:
        """(heads, ws*ws, ows*ows) relative position bias."""
        n_q, n_kv = self.window_size**2, self.overlap_win_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n_q, n_kv, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        """x: (B, H*W, C) with ``x_size = (H, W)`` multiples of the window size."""
        stats = self.norm1.statistics(x)
        y = self.norm1.normalize(x, stats)
        branch = overlapping_window_attention(
            y,
            x_size,
            qkv=self.qkv,
            proj=self.proj,
            bias=self.position_bias(),
            heads=self.num_heads,
            scale=self.scale,
            window_size=self.window_size,
            overlap_window_size=self.overlap_win_size,
            operands=self.operands,
        )
        del y  # the exact path's memory bound counts on it
        x = merge_residual(x, branch, self.norm1, stats)
        return mlp_residual(x, self.norm2, self.mlp, drop_prob=0.0, window_size=self.window_size)


class AttenBlocks(nn.Module):
    """``depth`` hybrid attention blocks (alternately shifted) followed by one OCAB."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        window_size: int,
        compress_ratio: int,
        squeeze_factor: int,
        conv_scale: float,
        overlap_ratio: float,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        norm: str,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        if len(drop_path) != depth:
            raise ValueError(f"{depth} blocks need {depth} drop-path rates, got {len(drop_path)}")
        # The OCAB has no stochastic depth (as in the official code).
        self.blocks = nn.ModuleList(
            HAB(
                dim,
                num_heads,
                window_size=window_size,
                shift_size=window_size // 2 if i % 2 else 0,
                mlp_ratio=mlp_ratio,
                norm=norm,
                compress_ratio=compress_ratio,
                squeeze_factor=squeeze_factor,
                conv_scale=conv_scale,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.overlap_attn = OCAB(
            dim,
            num_heads,
            window_size=window_size,
            overlap_ratio=overlap_ratio,
            mlp_ratio=mlp_ratio,
            norm=norm,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
        )

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        for block in self.blocks:
            x = block(x, x_size)
        return self.overlap_attn(x, x_size)


class RHAG(ResidualGroup):
    """Residual hybrid attention group: blocks -> conv -> + input (tokens in and out)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        window_size: int,
        compress_ratio: int,
        squeeze_factor: int,
        conv_scale: float,
        overlap_ratio: float,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        norm: str,
        resi_connection: str,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        self.residual_group = AttenBlocks(
            dim,
            depth,
            num_heads,
            window_size=window_size,
            compress_ratio=compress_ratio,
            squeeze_factor=squeeze_factor,
            conv_scale=conv_scale,
            overlap_ratio=overlap_ratio,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            norm=norm,
            drop_path=drop_path,
        )
        self.conv = residual_conv(dim, resi_connection, RESI_CONNECTIONS)
        self.patch_embed = PatchEmbed(dim, None)
        self.patch_unembed = PatchUnEmbed()

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        """x: (B, H*W, C) -> (B, H*W, C)."""
        y = self.residual_group(x, x_size)
        return self.patch_embed(self.conv(self.patch_unembed(y, x_size))) + x


# --------------------------------------------------------------------------- model


class HAT(RestorationTransformer):
    """HAT with a pluggable norm; keyword arguments follow the official constructor.

    ``upsampler``: ``pixelshuffle`` (HAT's only head; upscale 2^n or 3, or 1),
    ``pixelshuffledirect`` / ``nearest+conv`` (SwinIR's lightweight and
    real-world heads), ``""`` (same-size restoration, upscale 1: SwinIR's head,
    the network predicts a residual added to the input). Any input size: the
    input is reflect-padded to a multiple of ``window_size`` and cropped back.
    With ``stdnorm``, grey input is divided by 0.2842 (the red-channel std, as
    the authors' i-LN HAT code does).
    """

    def __init__(
        self,
        *,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6),
        window_size: int = 7,
        compress_ratio: int = 3,
        squeeze_factor: int = 30,
        conv_scale: float = 0.01,
        overlap_ratio: float = 0.5,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        patch_norm: bool = True,
        upscale: int = 2,
        img_range: float = 1.0,
        upsampler: str = "pixelshuffle",
        resi_connection: str = "1conv",
        num_feat: int = 64,
        norm: str = "ln",
        stdnorm: bool = False,
        drop_path_rate: float = 0.1,
    ) -> None:
        check_model_args(
            upsampler=upsampler,
            valid_upsamplers=UPSAMPLERS,
            in_chans=in_chans,
            depths=depths,
            num_heads=num_heads,
            upscale=upscale,
        )
        if window_size < 2:
            raise ValueError(
                f"window_size must be >= 2 (shifts are window_size // 2), got {window_size}"
            )
        super().__init__(
            in_chans=in_chans,
            embed_dim=embed_dim,
            upscale=upscale,
            upsampler=upsampler,
            img_range=img_range,
            norm=norm,
            patch_norm=patch_norm,
            stdnorm=stdnorm,
            window_size=window_size,
            grey_std=DF2K_RGB_STD[0],
        )
        self.overlap_ratio = overlap_ratio
        # Official files carry these two (persistent there); kept here only so
        # the load hook can validate a file's copies against this configuration.
        self.register_buffer(
            "relative_position_index_SA", relative_position_index(window_size), persistent=False
        )
        self.register_buffer(
            "relative_position_index_OCA",
            overlap_relative_position_index(
                window_size, window_size + int(window_size * overlap_ratio)
            ),
            persistent=False,
        )
        self.layers = nn.ModuleList(
            RHAG(
                embed_dim,
                depth,
                heads,
                window_size=window_size,
                compress_ratio=compress_ratio,
                squeeze_factor=squeeze_factor,
                conv_scale=conv_scale,
                overlap_ratio=overlap_ratio,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                norm=norm,
                resi_connection=resi_connection,
                drop_path=rates,
            )
            for depth, heads, rates in zip(
                depths, num_heads, stochastic_depth_rates(drop_path_rate, depths), strict=True
            )
        )
        self.norm = build_norm(norm, embed_dim, role="final")
        self.conv_after_body = residual_conv(embed_dim, resi_connection, RESI_CONNECTIONS)
        self.add_reconstruction_head(embed_dim=embed_dim, num_feat=num_feat)
        self.apply(init_linear_weights)


# --------------------------------------------------------------------------- presets

_HAT: dict[str, object] = {
    "embed_dim": 180,
    "depths": (6,) * 6,
    "num_heads": (6,) * 6,
    "window_size": 16,
    "compress_ratio": 3,
    "squeeze_factor": 30,
    "conv_scale": 0.01,
    "overlap_ratio": 0.5,
    "mlp_ratio": 2.0,
    "upsampler": "pixelshuffle",
    "resi_connection": "1conv",
}
_HAT_S: dict[str, object] = {**_HAT, "embed_dim": 144, "compress_ratio": 24, "squeeze_factor": 24}
_HAT_L: dict[str, object] = {**_HAT, "depths": (6,) * 12, "num_heads": (6,) * 12}
# i-LN paper Table 12 (authors' "HAT-mini"): HAT-S hyper-parameters at width 96.
_HAT_1: dict[str, object] = {**_HAT_S, "embed_dim": 96}
_ILN: dict[str, object] = {"norm": "iln", "stdnorm": True}
_SAME_SIZE: dict[str, object] = {"upscale": 1, "upsampler": ""}

PRESETS: dict[str, dict[str, object]] = {
    # Official HAT-S / HAT / HAT-L classical SR (XPixelGroup/HAT options).
    **{f"hat_s_x{s}": {**_HAT_S, "upscale": s} for s in (2, 3, 4)},
    **{f"hat_x{s}": {**_HAT, "upscale": s} for s in (2, 3, 4)},
    **{f"hat_l_x{s}": {**_HAT_L, "upscale": s} for s in (2, 3, 4)},
    # i-LN paper Table 12: HAT_1 for SR x2/x4, colour denoising, deraining and
    # JPEG CAR (grey, as SwinIR's CAR and Classic5). Baselines: norm left to
    # the caller (``ln`` by default; the authors' i-LN runs add stdnorm=True).
    **{f"hat_1_x{s}": {**_HAT_1, "upscale": s} for s in (2, 4)},
    "hat_1_dn": {**_HAT_1, **_SAME_SIZE},
    "hat_1_derain": {**_HAT_1, **_SAME_SIZE},
    "hat_1_car": {**_HAT_1, **_SAME_SIZE, "in_chans": 1},
    # Table 13: HAT_2 = the HAT-S architecture with a reduced budget (x4 SR).
    "hat_2_x4": {**_HAT_S, "upscale": 4},
    # Table 14: HAT† = full HAT trained with i-LN (authors' configs: stdnorm).
    **{f"hat_dagger_x{s}": {**_HAT, "upscale": s, **_ILN} for s in (2, 4)},
}
"""Preset name -> constructor kwargs. ``norm``/``stdnorm`` are left to the caller
except for ``hat_dagger_*``, which is i-LN by definition."""


PRESET_TASKS: dict[str, str] = {
    **{name: "sr" for name in PRESETS},
    "hat_1_dn": "dn",
    "hat_1_derain": "dr",
    "hat_1_car": "car",
}
"""Preset name -> task (:data:`irformer.tasks.TASKS`)."""


# --------------------------------------------------------------------------- detection

_BLOCK0 = "layers.0.residual_group.blocks.0."
_OCAB0 = "layers.0.residual_group.overlap_attn."


def _divisor_for(total: int, quotient: int, key: str) -> int:
    """An integer ratio r with ``total // r == quotient`` (official ``dim // ratio``).

    The exact divisor when there is one (HAT-S: 144 // 24 == 6, not 144 // 21),
    else the smallest ratio that reproduces the channel count.
    """
    if quotient and total % quotient == 0:
        return total // quotient
    for ratio in range(1, total + 1):
        if total // ratio == quotient:
            return ratio
    raise ValueError(f"{key}: {quotient} channels cannot be {total} // an integer ratio")


def _norm_from_keys(state_dict: Mapping[str, Tensor]) -> str | None:
    """The norm when the block-norm keys tell it; None for LN-shaped keys (ln, ln_star, iln,
    ln_rs, in)."""
    prefix = _BLOCK0 + "norm1."
    if prefix + "bn.weight" in state_dict:
        return "bn"
    if prefix + "layer_scale" in state_dict:
        return "layerscale"
    if prefix + "rezero_alpha" in state_dict:
        return "rezero"
    if prefix + "weight" in state_dict and prefix + "bias" not in state_dict:
        return "rms"
    if not any(k.startswith(prefix) for k in state_dict):
        return "none"
    return None


def detect(state_dict: Mapping[str, Tensor]) -> dict[str, object] | None:
    """Constructor kwargs of an official/irformer HAT state dict, or None if it is not HAT.

    Hyper-parameters come from key names and shapes (as spandrel's loader does).
    ``norm`` is returned only when the keys tell it (bn, layerscale, rezero,
    rms, none); ln, ln_star, iln, ln_rs and in share LayerNorm's keys, so irformer
    checkpoints carry the norm in their metadata. Not recoverable: conv_scale,
    qk_scale, img_range and stdnorm (the preset or metadata supplies them).
    """
    keys = list(state_dict)
    needed = (
        "conv_first.weight",
        _BLOCK0 + "attn.relative_position_bias_table",
        _BLOCK0 + "conv_block.cab.0.weight",
        _OCAB0 + "relative_position_bias_table",
    )
    if not all(k in state_dict for k in needed):
        return None
    if "absolute_pos_embed" in state_dict:
        raise ValueError("absolute_pos_embed: HAT with ape=True is not supported")
    kwargs: dict[str, object] = {}
    first = state_dict["conv_first.weight"]
    embed_dim, in_chans = int(first.shape[0]), int(first.shape[1])
    kwargs["in_chans"] = in_chans
    kwargs["embed_dim"] = embed_dim
    table = state_dict[_BLOCK0 + "attn.relative_position_bias_table"]
    window = (math.isqrt(int(table.shape[0])) + 1) // 2
    kwargs["window_size"] = window
    ocab_side = math.isqrt(int(state_dict[_OCAB0 + "relative_position_bias_table"].shape[0]))
    overlap = ocab_side + 1 - 2 * window  # ows - ws
    kwargs["overlap_ratio"] = next(
        (r for r in (0.5, 0.25, 0.75, 1.0, 0.0) if int(window * r) == overlap), overlap / window
    )
    n_layers = count_indexed(keys, "layers.")
    kwargs["depths"] = tuple(
        count_indexed(keys, f"layers.{i}.residual_group.blocks.") for i in range(n_layers)
    )
    kwargs["num_heads"] = tuple(
        int(
            state_dict[
                f"layers.{i}.residual_group.overlap_attn.relative_position_bias_table"
            ].shape[1]
        )
        for i in range(n_layers)
    )
    key = _BLOCK0 + "conv_block.cab.0.weight"
    kwargs["compress_ratio"] = _divisor_for(embed_dim, int(state_dict[key].shape[0]), key)
    key = _BLOCK0 + "conv_block.cab.3.attention.1.weight"
    kwargs["squeeze_factor"] = _divisor_for(embed_dim, int(state_dict[key].shape[0]), key)
    kwargs["mlp_ratio"] = float(state_dict[_BLOCK0 + "mlp.fc1.weight"].shape[0] / embed_dim)
    kwargs["qkv_bias"] = _BLOCK0 + "attn.qkv.bias" in state_dict
    kwargs["patch_norm"] = any(k.startswith("patch_embed.norm.") for k in keys)
    kwargs["resi_connection"] = "1conv" if "conv_after_body.weight" in state_dict else "identity"
    norm = _norm_from_keys(state_dict)
    if norm is not None:
        kwargs["norm"] = norm

    kwargs.update(detect_head(state_dict, in_chans))
    return kwargs


SPEC = ArchSpec(
    name="hat",
    model_class=HAT,
    presets=PRESETS,
    preset_tasks=PRESET_TASKS,
    detect=detect,
)
