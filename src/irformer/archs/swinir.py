"""SwinIR (Liang et al., 2021): classical, lightweight, real-world SR, denoising, JPEG CAR.

Parameter keys and shapes in ``ln`` mode equal the official implementation's
(``conv_first``, ``patch_embed.norm``, ``layers.{i}.residual_group.blocks.{j}``,
``layers.{i}.conv``, ``norm``, ``conv_after_body``, the upsampler heads), so
official checkpoints load unchanged. Differences that do not change outputs:

- the shifted-window mask and the relative position index are non-persistent
  and cached per input size (the official code stores the mask for its
  training patch size and rebuilds it for every other size on every call);
- the token <-> feature-map transposes are views (channels-last feature maps),
  so the convolutions between the residual groups run in channels-last.

``norm`` picks any :data:`irformer.norms.NORM_NAMES` entry; in ``iln`` and ``ln_rs``
mode the post-embedding and final norms become per-channel affines (see
:func:`irformer.norms.build_norm`). ``stdnorm`` additionally divides the input
by the DF2K RGB std after subtracting the mean, as the i-LN code does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from irformer.archs.common import (
    UPSAMPLERS,
    PatchEmbed,
    PatchUnEmbed,
    SwinTransformerBlock,
    add_input_stem,
    add_reconstruction_head,
    check_model_args,
    count_indexed,
    deep_features,
    init_linear_weights,
    input_stats,
    restore_forward,
    stochastic_depth_rates,
)
from irformer.archs.common import residual_conv as shared_residual_conv
from irformer.norms import build_norm

ARCH_NAME = "swinir"
RESI_CONNECTIONS: tuple[str, ...] = ("1conv", "3conv")


def residual_conv(dim: int, resi_connection: str) -> nn.Module:
    """The conv closing each residual group and the body (official '1conv'/'3conv')."""
    return shared_residual_conv(dim, resi_connection, RESI_CONNECTIONS)


class BasicLayer(nn.Module):
    """A stack of Swin blocks alternating regular and shifted windows.

    ``block_class`` is the one thing other Swin-style groups change (SRFormer's PSA blocks).
    """

    block_class: type[nn.Module] = SwinTransformerBlock

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        window_size: int,
        shifted: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        norm: str,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        if len(drop_path) != depth:
            raise ValueError(f"{depth} blocks need {depth} drop-path rates, got {len(drop_path)}")
        self.blocks = nn.ModuleList(
            self.block_class(
                dim,
                num_heads,
                window_size=window_size,
                shift_size=window_size // 2 if (shifted and i % 2) else 0,
                mlp_ratio=mlp_ratio,
                norm=norm,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        for block in self.blocks:
            x = block(x, x_size)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer Block: blocks -> conv -> + input (tokens in and out)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        window_size: int,
        shifted: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        norm: str,
        resi_connection: str,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        self.residual_group = BasicLayer(
            dim,
            depth,
            num_heads,
            window_size=window_size,
            shifted=shifted,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            norm=norm,
            drop_path=drop_path,
        )
        self.conv = residual_conv(dim, resi_connection)
        self.patch_embed = PatchEmbed(dim, None)
        self.patch_unembed = PatchUnEmbed()

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        """x: (B, H*W, C) -> (B, H*W, C)."""
        y = self.residual_group(x, x_size)
        return self.patch_embed(self.conv(self.patch_unembed(y, x_size))) + x


class SwinIR(nn.Module):
    """SwinIR with a pluggable norm; keyword arguments follow the official constructor.

    ``upsampler``: ``pixelshuffle`` (classical SR), ``pixelshuffledirect``
    (lightweight SR), ``nearest+conv`` (real-world SR), ``""`` (same-size
    restoration: denoising, JPEG CAR, deraining; the network predicts a residual
    added to the input). ``img_size`` is the training patch size; it only sizes
    the absolute position embedding (``ape``) and, as in the official code,
    disables shifting (window = img_size) when it is not larger than the window.
    """

    def __init__(
        self,
        *,
        img_size: int = 64,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        ape: bool = False,
        patch_norm: bool = True,
        upscale: int = 2,
        img_range: float = 1.0,
        upsampler: str = "",
        resi_connection: str = "1conv",
        num_feat: int = 64,
        norm: str = "ln",
        stdnorm: bool = False,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        check_model_args(
            upsampler=upsampler,
            valid_upsamplers=UPSAMPLERS,
            in_chans=in_chans,
            depths=depths,
            num_heads=num_heads,
            upscale=upscale,
        )
        # Official quirk: with a training patch no larger than the window, every
        # block uses one window covering the patch and no shift.
        shifted = img_size > window_size
        self.window_size = window_size if shifted else img_size

        add_input_stem(
            self,
            in_chans=in_chans,
            embed_dim=embed_dim,
            upscale=upscale,
            upsampler=upsampler,
            img_range=img_range,
            norm=norm,
            patch_norm=patch_norm,
            stdnorm=stdnorm,
            stats=input_stats(in_chans, stdnorm),
        )
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, img_size * img_size, embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.layers = nn.ModuleList(
            RSTB(
                embed_dim,
                depth,
                heads,
                window_size=self.window_size,
                shifted=shifted,
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
        self.conv_after_body = residual_conv(embed_dim, resi_connection)

        if upsampler == "nearest+conv" and upscale not in (2, 4, 8):
            raise ValueError(f"nearest+conv supports upscale 2, 4 or 8, got {upscale}")
        add_reconstruction_head(
            self,
            upsampler,
            embed_dim=embed_dim,
            num_feat=num_feat,
            in_chans=in_chans,
            upscale=upscale,
        )
        self.apply(init_linear_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) shallow features -> (B, C, H, W) deep features."""
        return deep_features(self, x)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_chans, H, W) in [0, 1], any H and W -> (B, in_chans, s*H, s*W).

        ``img_range=255`` (the official JPEG models) rescales internally only.
        """
        return restore_forward(self, x, "SwinIR", channels_last=True)


# --------------------------------------------------------------------------- presets

_CLASSICAL: dict[str, object] = {
    "img_size": 64,
    "embed_dim": 180,
    "depths": (6, 6, 6, 6, 6, 6),
    "num_heads": (6, 6, 6, 6, 6, 6),
    "window_size": 8,
    "mlp_ratio": 2.0,
    "resi_connection": "1conv",
}
_LIGHT: dict[str, object] = {
    "img_size": 64,
    "embed_dim": 60,
    "depths": (6, 6, 6, 6),
    "num_heads": (6, 6, 6, 6),
    "window_size": 8,
    "mlp_ratio": 2.0,
    "resi_connection": "1conv",
}

PRESETS: dict[str, dict[str, object]] = {
    # Official classical SR (DF2K, s64w8; the DIV2K s48 models differ only in
    # the training patch, i.e. in the attn_mask buffer the loader drops).
    **{
        f"swinir_classical_x{s}": {**_CLASSICAL, "upscale": s, "upsampler": "pixelshuffle"}
        for s in (2, 3, 4, 8)
    },
    # Official lightweight SR (the i-LN paper's SwinIR_1 architecture for SR).
    **{
        f"swinir_light_x{s}": {**_LIGHT, "upscale": s, "upsampler": "pixelshuffledirect"}
        for s in (2, 3, 4)
    },
    # Official real-world SR (x4, nearest+conv; the large model uses 3conv).
    "swinir_realsr_x4": {**_CLASSICAL, "upscale": 4, "upsampler": "nearest+conv"},
    "swinir_realsr_large_x4": {
        **_CLASSICAL,
        "embed_dim": 240,
        "depths": (6,) * 9,
        "num_heads": (8,) * 9,
        "upscale": 4,
        "upsampler": "nearest+conv",
        "resi_connection": "3conv",
    },
    # Official denoising (img_size 128) and JPEG CAR (window 7, img_range 255).
    "swinir_dn_color": {**_CLASSICAL, "img_size": 128, "upscale": 1, "upsampler": ""},
    "swinir_dn_gray": {
        **_CLASSICAL,
        "img_size": 128,
        "in_chans": 1,
        "upscale": 1,
        "upsampler": "",
    },
    "swinir_car_color": {
        **_CLASSICAL,
        "img_size": 126,
        "window_size": 7,
        "img_range": 255.0,
        "upscale": 1,
        "upsampler": "",
    },
    "swinir_car_gray": {
        **_CLASSICAL,
        "img_size": 126,
        "window_size": 7,
        "img_range": 255.0,
        "in_chans": 1,
        "upscale": 1,
        "upsampler": "",
    },
    # i-LN paper, Table 9: SwinIR_1 (= SwinIR-light body) for DN / DR / CAR.
    "swinir_1_dn": {**_LIGHT, "upscale": 1, "upsampler": ""},
    "swinir_1_derain": {**_LIGHT, "img_size": 128, "upscale": 1, "upsampler": ""},
    "swinir_1_car": {**_LIGHT, "upscale": 1, "upsampler": ""},
}
"""Preset name -> constructor kwargs (``norm``/``stdnorm`` are left to the caller)."""


def _preset_task(name: str) -> str:
    for marker, task in (
        ("realsr", "real_sr"),
        ("_dn", "denoise"),
        ("car", "jpeg_car"),
        ("derain", "derain"),
    ):
        if marker in name:
            return task
    return "sr"


PRESET_TASKS: dict[str, str] = {name: _preset_task(name) for name in PRESETS}
"""Preset name -> task (``sr``, ``real_sr``, ``denoise``, ``jpeg_car``, ``derain``)."""

MODEL_CLASS = SwinIR


# --------------------------------------------------------------------------- detection

_BLOCK0 = "layers.0.residual_group.blocks.0."


def detect(state_dict: Mapping[str, Tensor]) -> dict[str, object] | None:
    """Constructor kwargs of an official/irformer SwinIR state dict, or None.

    Reads the hyper-parameters from key names and shapes (as spandrel does).
    ``img_size`` is only known when the file carries an ``attn_mask`` or an
    absolute position embedding; the norm cannot be told apart from LN (same
    keys), so it is never returned.
    """
    keys = list(state_dict)
    needed = ("conv_first.weight", _BLOCK0 + "attn.relative_position_bias_table")
    if not all(k in state_dict for k in needed):
        return None
    # HAT/DRCT/SRFormer share the prefix but have their own block modules.
    if any(
        marker in k
        for k in keys
        for marker in (".conv_block.", "overlap_attn", ".swin1.", "adjust1", ".attn.q.")
    ):
        return None
    if _BLOCK0 + "attn.qkv.weight" not in state_dict:
        return None
    kwargs: dict[str, object] = {}
    first = state_dict["conv_first.weight"]
    embed_dim, in_chans = int(first.shape[0]), int(first.shape[1])
    kwargs["in_chans"] = in_chans
    kwargs["embed_dim"] = embed_dim
    table = state_dict[_BLOCK0 + "attn.relative_position_bias_table"]
    window = (math.isqrt(int(table.shape[0])) + 1) // 2
    kwargs["window_size"] = window
    n_layers = count_indexed(keys, "layers.")
    kwargs["depths"] = tuple(
        count_indexed(keys, f"layers.{i}.residual_group.blocks.") for i in range(n_layers)
    )
    kwargs["num_heads"] = tuple(
        int(
            state_dict[
                f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"
            ].shape[1]
        )
        for i in range(n_layers)
    )
    kwargs["mlp_ratio"] = float(state_dict[_BLOCK0 + "mlp.fc1.weight"].shape[0] / embed_dim)
    kwargs["qkv_bias"] = _BLOCK0 + "attn.qkv.bias" in state_dict
    kwargs["patch_norm"] = "patch_embed.norm.weight" in state_dict
    kwargs["resi_connection"] = "1conv" if "conv_after_body.weight" in state_dict else "3conv"
    if "absolute_pos_embed" in state_dict:
        kwargs["ape"] = True
        kwargs["img_size"] = math.isqrt(int(state_dict["absolute_pos_embed"].shape[1]))
    mask_key = "layers.0.residual_group.blocks.1.attn_mask"
    if mask_key in state_dict and state_dict[mask_key] is not None:
        kwargs["img_size"] = math.isqrt(int(state_dict[mask_key].shape[0])) * window
    # The official JPEG CAR models are the only ones with window 7, and they
    # work on [0, 255] (spandrel uses the same rule).
    kwargs["img_range"] = 255.0 if window == 7 else 1.0

    if "conv_before_upsample.0.weight" in state_dict:
        kwargs["num_feat"] = int(state_dict["conv_before_upsample.0.weight"].shape[0])
        if "conv_up1.weight" in state_dict:
            kwargs["upsampler"] = "nearest+conv"
            kwargs["upscale"] = 2 ** sum(f"conv_up{i}.weight" in state_dict for i in (1, 2, 3))
        else:
            kwargs["upsampler"] = "pixelshuffle"
            convs = [
                state_dict[k]
                for k in sorted(keys)
                if k.startswith("upsample.") and k.endswith(".weight")
            ]
            num_feat = int(kwargs["num_feat"])
            if len(convs) == 1 and int(convs[0].shape[0]) == 9 * num_feat:
                kwargs["upscale"] = 3
            else:
                kwargs["upscale"] = 2 ** len(convs)
    elif "upsample.0.weight" in state_dict:
        kwargs["upsampler"] = "pixelshuffledirect"
        out = int(state_dict["upsample.0.weight"].shape[0])
        kwargs["upscale"] = math.isqrt(out // in_chans)
    else:
        kwargs["upsampler"] = ""
        kwargs["upscale"] = 1
    return kwargs
