"""SwinIR (Liang et al., 2021): classical, lightweight, real-world SR, denoising, JPEG CAR.

The blocks as in the official ``network_swinir.py``: :class:`WindowAttention`
(window multi-head self-attention with relative position bias),
:class:`SwinTransformerBlock` (pre-norm, alternately shifted windows, MLP),
:class:`BasicLayer` (a stack of blocks), :class:`RSTB` (blocks -> conv -> +
input) and :class:`SwinIR`. Where the official block writes
``shortcut + drop_path(x)``, irformer's calls the one residual-merge point
:func:`irformer.norms.merge_residual`, which is where i-LN rescales the branch;
how the attention and MLP halves execute (fused kernels, the exact chunked
path, quantised operands) is :mod:`irformer.archs.attention`'s business.

Parameter keys and shapes in ``ln`` mode equal the official implementation's
(``conv_first``, ``patch_embed.norm``, ``layers.{i}.residual_group.blocks.{j}``,
``layers.{i}.conv``, ``norm``, ``conv_after_body``, the upsampler heads), so
official checkpoints load with ``load_state_dict``. Differences that do not
change outputs: the shifted-window mask and the relative position index are
derived per input size instead of stored; the token <-> feature-map
transposes are views (channels-last feature maps).

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

from irformer.archs.attention import AttentionOperands, mlp_residual, shifted_window_attention
from irformer.archs.layers import (
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
)
from irformer.archs.spec import ArchSpec
from irformer.archs.windows import relative_position_index
from irformer.norms import TokenNorm, build_norm, merge_residual

RESI_CONNECTIONS: tuple[str, ...] = ("1conv", "3conv")


class WindowAttention(nn.Module):
    """Multi-head self-attention within (shifted) windows, with relative position bias."""

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
        self.key_tokens = window_size * window_size
        """Keys each query attends to (the post-softmax row length)."""
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.operands = AttentionOperands()

    def position_bias(self) -> Tensor:
        """(heads, N, N) relative position bias."""
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, x_size: tuple[int, int], shift: int = 0) -> Tensor:
        """x: (B, H*W, C) normalised tokens -> (B, H*W, C); windows shifted by ``shift``."""
        return shifted_window_attention(
            x,
            x_size,
            qkv=self.qkv,
            proj=self.proj,
            bias=self.position_bias(),
            heads=self.num_heads,
            scale=self.scale,
            window_size=self.window_size,
            shift_size=shift,
            operands=self.operands,
        )


class SwinTransformerBlock(TransformerBlock):
    """Pre-norm (shifted) window attention + MLP; both merges via ``merge_residual``."""

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
        drop_path: float = 0.0,
        conv_block: nn.Module | None = None,
    ) -> None:
        """``conv_block``: HAT's channel-attention branch (see :class:`irformer.archs.hat.HAB`),
        registered between ``attn`` and ``norm2`` as in the official HAT key order."""
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
        if conv_block is not None:
            self.conv_block = conv_block
        self.norm2: TokenNorm = build_norm(norm, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def parallel_branch(self, y: Tensor, x_size: tuple[int, int]) -> Tensor | None:
        """A branch run beside the attention on the same normalised tokens, joining
        it before the merge (None here; HAT's hybrid block adds its conv branch)."""
        return None

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        """x: (B, H*W, C) with ``x_size = (H, W)`` multiples of the window size."""
        stats = self.norm1.statistics(x)
        y = self.norm1.normalize(x, stats)
        side = self.parallel_branch(y, x_size)
        branch = self.attn(y, x_size, self.shift_size)
        del y  # the exact path's memory bound counts on it
        x = merge_residual(x, branch, self.norm1, stats, drop_prob=self.drop_path, side=side)
        return mlp_residual(
            x, self.norm2, self.mlp, drop_prob=self.drop_path, window_size=self.window_size
        )


class BasicLayer(nn.Module):
    """A stack of ``block`` blocks alternating regular and shifted windows.

    ``block`` is SwinIR's :class:`SwinTransformerBlock`; SRFormer passes its PSA block.
    """

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
        block: type[TransformerBlock] = SwinTransformerBlock,
    ) -> None:
        super().__init__()
        if len(drop_path) != depth:
            raise ValueError(f"{depth} blocks need {depth} drop-path rates, got {len(drop_path)}")
        self.blocks = nn.ModuleList(
            block(
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


class RSTB(ResidualGroup):
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
        block: type[TransformerBlock] = SwinTransformerBlock,
        resi_connections: tuple[str, ...] = RESI_CONNECTIONS,
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
            block=block,
        )
        self.conv = residual_conv(dim, resi_connection, resi_connections)
        self.patch_embed = PatchEmbed(dim, None)
        self.patch_unembed = PatchUnEmbed()

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        """x: (B, H*W, C) -> (B, H*W, C)."""
        y = self.residual_group(x, x_size)
        return self.patch_embed(self.conv(self.patch_unembed(y, x_size))) + x


class SwinIR(RestorationTransformer):
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
        self.conv_after_body = residual_conv(embed_dim, resi_connection, RESI_CONNECTIONS)
        self.add_reconstruction_head(embed_dim=embed_dim, num_feat=num_feat)
        self.apply(init_linear_weights)


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


PRESET_TASKS: dict[str, str] = {
    **{name: "sr" for name in PRESETS if name.startswith(("swinir_classical", "swinir_light"))},
    "swinir_realsr_x4": "sr",
    "swinir_realsr_large_x4": "sr",
    "swinir_dn_color": "dn",
    "swinir_dn_gray": "dn",
    "swinir_car_color": "car",
    "swinir_car_gray": "car",
    "swinir_1_dn": "dn",
    "swinir_1_derain": "dr",
    "swinir_1_car": "car",
}
"""Preset name -> task (:data:`irformer.tasks.TASKS`; real-world SR is ``sr``)."""


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

    kwargs.update(detect_head(state_dict, in_chans))
    return kwargs


SPEC = ArchSpec(
    name="swinir",
    model_class=SwinIR,
    presets=PRESETS,
    preset_tasks=PRESET_TASKS,
    detect=detect,
)
