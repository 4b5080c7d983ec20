"""DRCT (Hsu et al., 2024): Swin blocks with dense connections inside each group.

Each residual dense group (RDG) runs five Swin blocks; block ``k`` sees the
group input concatenated with the ``gc``-channel outputs of the blocks before
it (squeezed by 1x1 ``adjust`` convs), so the block widths grow
``dim, dim+gc, ..., dim+4gc``. As in the official code, block ``k`` uses
``num_heads - (width % num_heads)`` heads, blocks 4 and 5 an MLP ratio of 1,
only ``len(depths)`` matters (every RDG has five blocks), and the group output
is ``0.2 * adjust5(...) + input``.

Parameter keys and shapes in ``ln`` mode equal the official implementation's
(``layers.{i}.swin{k}``, ``layers.{i}.adjust{k}``, ``patch_embed.norm``,
``norm``, ``conv_after_body``, the upsampler heads), so official checkpoints
load unchanged; ``attn_mask`` and ``relative_position_index`` are
non-persistent and cached per input size.

The official code has only the ``pixelshuffle`` head (its ``upsampler=''``
path returns the input unchanged). irformer adds SwinIR's
``pixelshuffledirect`` head (lightweight SR) and ``''`` head (same-size
restoration: the network predicts a residual added to the input), with
SwinIR's key names. Input is reflect-padded to a window multiple and the
output cropped back, as the official test pipeline does around the network.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from irformer.archs.layers import (
    PatchEmbed,
    PatchUnEmbed,
    ResidualGroup,
    RestorationTransformer,
    check_model_args,
    count_indexed,
    detect_head,
    init_linear_weights,
    residual_conv,
    stochastic_depth_rates,
)
from irformer.archs.spec import ArchSpec
from irformer.archs.swinir import SwinTransformerBlock
from irformer.norms import build_norm

DRCT_UPSAMPLERS: tuple[str, ...] = ("pixelshuffle", "pixelshuffledirect", "")
"""Reconstruction heads: the official one plus SwinIR's light and same-size heads."""
RESI_CONNECTIONS: tuple[str, ...] = ("1conv", "identity")
BLOCKS_PER_GROUP = 5
GROUP_RESIDUAL_SCALE = 0.2
"""The official RDG output: ``0.2 * dense branch + input`` (ESRGAN's residual scaling)."""


def dense_block_heads(width: int, num_heads: int) -> int:
    """Heads of a DRCT block of ``width`` channels: the official ``h - width % h`` rule."""
    return num_heads - width % num_heads


class RDG(ResidualGroup):
    """Residual dense group: five densely connected Swin blocks (tokens in and out)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        window_size: int,
        shifted: bool,
        mlp_ratio: float,
        gc: int,
        qkv_bias: bool,
        qk_scale: float | None,
        norm: str,
        drop_path: float,
    ) -> None:
        super().__init__()
        for k in range(BLOCKS_PER_GROUP):
            width = dim + k * gc
            heads = dense_block_heads(width, num_heads)
            if width % heads:
                raise ValueError(
                    f"DRCT block swin{k + 1} has width {width} = embed_dim {dim} + {k} * gc {gc}, "
                    f"which its {heads} heads (num_heads {num_heads} - {width} % {num_heads}) "
                    "do not divide; choose embed_dim/gc/num_heads that satisfy the official rule"
                )
            block = SwinTransformerBlock(
                width,
                heads,
                window_size=window_size,
                shift_size=window_size // 2 if (shifted and k % 2) else 0,
                mlp_ratio=mlp_ratio if k < 3 else 1.0,
                norm=norm,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop_path=drop_path,
            )
            self.add_module(f"swin{k + 1}", block)
            out = dim if k == BLOCKS_PER_GROUP - 1 else gc
            self.add_module(f"adjust{k + 1}", nn.Conv2d(width, out, 1))
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        self.pe = PatchEmbed(dim, None)
        self.pue = PatchUnEmbed()

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        """x: (B, H*W, C) -> (B, H*W, C)."""
        features = [x]
        for k in range(1, BLOCKS_PER_GROUP + 1):
            inp = features[0] if k == 1 else torch.cat(features, dim=-1)
            y = getattr(self, f"swin{k}")(inp, x_size)
            y = getattr(self, f"adjust{k}")(self.pue(y, x_size))
            if k < BLOCKS_PER_GROUP:
                y = self.lrelu(y)
            features.append(self.pe(y))
        return features[-1] * GROUP_RESIDUAL_SCALE + x


class DRCT(RestorationTransformer):
    """DRCT with a pluggable norm; keyword arguments follow the official constructor.

    ``img_size`` is the training patch size; as in the official code, a patch
    no larger than the window makes every block use one window of that size
    and no shift. ``depths`` only counts the groups and sizes the drop-path ramp:
    all five blocks of group ``i`` share the ramp's value at ``sum(depths[:i])``
    (official quirks).
    """

    channels_last = False

    def __init__(
        self,
        *,
        img_size: int = 64,
        in_chans: int = 3,
        embed_dim: int = 180,
        depths: Sequence[int] = (6, 6, 6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6),
        window_size: int = 16,
        mlp_ratio: float = 2.0,
        gc: int = 32,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        patch_norm: bool = True,
        upscale: int = 4,
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
            valid_upsamplers=DRCT_UPSAMPLERS,
            in_chans=in_chans,
            depths=depths,
            num_heads=num_heads,
            upscale=upscale,
        )
        shifted = img_size > window_size
        super().__init__(
            in_chans=in_chans,
            embed_dim=embed_dim,
            upscale=upscale,
            upsampler=upsampler,
            img_range=img_range,
            norm=norm,
            patch_norm=patch_norm,
            stdnorm=stdnorm,
            window_size=window_size if shifted else img_size,
        )
        self.layers = nn.ModuleList(
            RDG(
                embed_dim,
                heads,
                window_size=self.window_size,
                shifted=shifted,
                mlp_ratio=mlp_ratio,
                gc=gc,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                norm=norm,
                drop_path=rates[0],
            )
            for heads, rates in zip(
                num_heads, stochastic_depth_rates(drop_path_rate, depths), strict=True
            )
        )
        self.norm = build_norm(norm, embed_dim, role="final")
        self.conv_after_body = residual_conv(embed_dim, resi_connection, RESI_CONNECTIONS)
        self.add_reconstruction_head(embed_dim=embed_dim, num_feat=num_feat)
        self.apply(init_linear_weights)


# --------------------------------------------------------------------------- presets

_DRCT: dict[str, object] = {
    "img_size": 64,
    "embed_dim": 180,
    "depths": (6,) * 6,
    "num_heads": (6,) * 6,
    "window_size": 16,
    "mlp_ratio": 2.0,
    "gc": 32,
    "upsampler": "pixelshuffle",
    "resi_connection": "1conv",
}
# i-LN paper Table 10: DRCT_1, embed_dim reduced to 96 to match HAT_1; the
# paper's "lightweight DRCT" (the official repo has no light model).
_DRCT_1: dict[str, object] = {**_DRCT, "embed_dim": 96}

PRESETS: dict[str, dict[str, object]] = {
    # Official DRCT (14.13M params at x4) and DRCT-L (12 groups, 27.58M at x4).
    **{f"drct_x{s}": {**_DRCT, "upscale": s} for s in (2, 3, 4)},
    **{
        f"drct_l_x{s}": {**_DRCT, "depths": (6,) * 12, "num_heads": (6,) * 12, "upscale": s}
        for s in (2, 3, 4)
    },
    # i-LN paper's DRCT_1 (x2 and x4 SR, Table 10).
    **{f"drct_1_x{s}": {**_DRCT_1, "upscale": s} for s in (2, 4)},
}
"""Preset name -> constructor kwargs (``norm``/``stdnorm`` are left to the caller)."""

PRESET_TASKS: dict[str, str] = dict.fromkeys(PRESETS, "sr")
"""Preset name -> task (every DRCT preset is bicubic SR)."""


# --------------------------------------------------------------------------- detection

_BLOCK0 = "layers.0.swin1."


def detect(state_dict: Mapping[str, Tensor]) -> dict[str, object] | None:
    """Constructor kwargs of an official/irformer DRCT state dict, or None.

    Reads the hyper-parameters from key names and shapes. ``img_size`` is only
    known when the file carries an ``attn_mask``; the norm cannot be told apart
    from LN (same keys), so it is never returned.
    """
    needed = (
        "conv_first.weight",
        _BLOCK0 + "attn.relative_position_bias_table",
        "layers.0.adjust1.weight",
        "layers.0.adjust5.weight",
    )
    if not all(k in state_dict for k in needed):
        return None
    keys = list(state_dict)
    first = state_dict["conv_first.weight"]
    embed_dim, in_chans = int(first.shape[0]), int(first.shape[1])
    table = state_dict[_BLOCK0 + "attn.relative_position_bias_table"]
    window = (math.isqrt(int(table.shape[0])) + 1) // 2
    n_layers = count_indexed(keys, "layers.")
    kwargs: dict[str, object] = {
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "window_size": window,
        "depths": (6,) * n_layers,
        "num_heads": tuple(
            int(state_dict[f"layers.{i}.swin1.attn.relative_position_bias_table"].shape[1])
            for i in range(n_layers)
        ),
        "mlp_ratio": float(state_dict[_BLOCK0 + "mlp.fc1.weight"].shape[0] / embed_dim),
        "gc": int(state_dict["layers.0.adjust1.weight"].shape[0]),
        "qkv_bias": _BLOCK0 + "attn.qkv.bias" in state_dict,
        "patch_norm": "patch_embed.norm.weight" in state_dict,
        "resi_connection": "1conv" if "conv_after_body.weight" in state_dict else "identity",
    }
    mask = state_dict.get("layers.0.swin2.attn_mask")
    if mask is not None:
        kwargs["img_size"] = math.isqrt(int(mask.shape[0])) * window
    kwargs.update(detect_head(state_dict, in_chans))
    return kwargs


SPEC = ArchSpec(
    name="drct",
    model_class=DRCT,
    presets=PRESETS,
    preset_tasks=PRESET_TASKS,
    detect=detect,
)
