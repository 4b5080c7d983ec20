"""SRFormer (Zhou et al., ICCV 2023): SwinIR with permuted self-attention (PSA).

PSA keeps every pixel of a ``ws x ws`` window as a query but builds the keys
and values at half resolution: a linear layer compresses each pixel to ``C/4``
key and ``C/4`` value channels, and every 2x2 pixel block is folded into one
``C``-channel token (pixel-shuffle style), so a query attends to ``(ws/2)^2``
tokens. The relative position bias is indexed between the full-resolution
query grid and the half-resolution key grid (``aligned_relative_position_index``),
and the shifted-window mask compares query regions (shift ``ws/2``) with key
regions at half resolution (shift ``ceil(ws/4)``, as in the official code; the
two only line up when ``ws % 4 == 0``, and the quirk is reproduced). The
MLP is a ConvFFN: ``fc2(h + dwconv5x5(h))`` with ``h = GELU(fc1(x))``.

Constraints: ``window_size`` even and >= 4, ``embed_dim`` divisible by 4 and by
every ``num_heads`` entry. Any input size works: it is reflect-padded to a
window multiple (as the official ``check_image_size``) and cropped back.

Parameter keys and shapes in ``ln`` mode equal the official implementation's
(``layers.{i}.residual_group.blocks.{j}.attn.{q,kv,proj,relative_position_bias_table}``,
``...mlp.dwconv.depthwise_conv.0``, SwinIR's head and tails), so official
checkpoints load with ``load_state_dict``; ``attn_mask`` and
``aligned_relative_position_index`` are derived per size instead of stored.
Both residual merges of every PSA block go through
:func:`irformer.norms.merge_residual` (i-LN), the post-embedding and final
norms through ``build_norm(role="embed"/"final")``. The PSA geometry and its
execution live in :func:`irformer.archs.attention.permuted_window_attention`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from irformer.archs.attention import AttentionOperands, permuted_window_attention
from irformer.archs.layers import (
    UPSAMPLERS,
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
from irformer.archs.swinir import RSTB
from irformer.archs.windows import aligned_relative_position_index
from irformer.execution import in_graph_capture
from irformer.norms import TokenNorm, build_norm, merge_residual

RESI_CONNECTIONS: tuple[str, ...] = ("1conv", "3conv")
"""SwinIR's group/body closing convs (the official SRFormer reuses them)."""
FFN_KERNEL = 5
"""Depthwise kernel of the ConvFFN (official)."""


class PermutedWindowAttention(nn.Module):
    """PSA (official class ``PSA``): full-resolution queries, 2x2-folded keys/values."""

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
        if dim % num_heads or dim % 4:
            raise ValueError(
                f"PSA needs dim divisible by 4 and by num_heads; got dim {dim}, "
                f"num_heads {num_heads}"
            )
        self.dim = dim
        self.window_size = window_size
        self.permuted_window_size = window_size // 2
        self.key_tokens = self.permuted_window_size**2
        """Keys each query attends to (the post-softmax row length)."""
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        p = self.permuted_window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * p - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "aligned_relative_position_index",
            aligned_relative_position_index(window_size),
            persistent=False,
        )
        self.kv = nn.Linear(dim, dim // 2, bias=qkv_bias)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.operands = AttentionOperands()

    def position_bias(self) -> Tensor:
        """(heads, ws*ws, (ws/2)^2) relative position bias."""
        n = self.window_size * self.window_size
        index = self.aligned_relative_position_index.reshape(-1)
        bias = self.relative_position_bias_table[index]
        return bias.view(n, n // 4, -1).permute(2, 0, 1)

    def forward(self, x: Tensor, x_size: tuple[int, int], shift: int = 0) -> Tensor:
        """x: (B, H*W, C) normalised tokens -> (B, H*W, C); windows shifted by ``shift``."""
        return permuted_window_attention(
            x,
            x_size,
            q_proj=self.q,
            kv_proj=self.kv,
            proj=self.proj,
            bias=self.position_bias(),
            heads=self.num_heads,
            scale=self.scale,
            window_size=self.window_size,
            shift_size=shift,
            operands=self.operands,
        )


class DepthwiseConv(nn.Module):
    """5x5 depthwise conv + GELU on the token map (official class ``dwconv``)."""

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(
                hidden_dim,
                hidden_dim,
                FFN_KERNEL,
                padding=FFN_KERNEL // 2,
                groups=hidden_dim,
            ),
            nn.GELU(),
        )

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        """x: (B, H*W, C) -> (B, H*W, C)."""
        b, _, c = x.shape
        fmap = x.transpose(1, 2).reshape(b, c, *x_size)
        # A plain NCHW copy in a captured graph (see irformer.archs.layers.tokens_to_map).
        y = self.depthwise_conv(fmap.contiguous() if in_graph_capture() else fmap)
        return y.flatten(2).transpose(1, 2)


class ConvFFN(nn.Module):
    """fc1 -> GELU -> (+ depthwise conv) -> fc2 (official key names)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.dwconv = DepthwiseConv(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        x = self.act(self.fc1(x))
        return self.fc2(x + self.dwconv(x, x_size))


class PSABlock(TransformerBlock):
    """Pre-norm (shifted) permuted window attention + ConvFFN; merges via ``merge_residual``.

    The ConvFFN's depthwise conv needs whole rows of the map, so the exact
    path runs it whole (it chunks only token-wise MLPs).
    """

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
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.drop_path = drop_path
        """Stochastic-depth rate of both branches (training only; no parameters)."""
        self.norm1: TokenNorm = build_norm(norm, dim)
        self.attn = PermutedWindowAttention(
            dim, window_size, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale
        )
        self.norm2: TokenNorm = build_norm(norm, dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        """x: (B, H*W, C) with ``x_size = (H, W)`` multiples of the window size."""
        stats = self.norm1.statistics(x)
        branch = self.attn(self.norm1.normalize(x, stats), x_size, self.shift_size)
        x = merge_residual(x, branch, self.norm1, stats, drop_prob=self.drop_path)
        stats = self.norm2.statistics(x)
        branch = self.mlp(self.norm2.normalize(x, stats), x_size)
        return merge_residual(x, branch, self.norm2, stats, drop_prob=self.drop_path)


class SRFormer(RestorationTransformer):
    """SRFormer with a pluggable norm; keyword arguments follow the official constructor.

    ``upsampler``: ``pixelshuffle`` (classical SR), ``pixelshuffledirect``
    (SRFormer-light), ``nearest+conv`` (real-world SR, x4 only as in the
    official code), ``""`` (same-size restoration; the network predicts a
    residual added to the input). ``img_size`` is the training patch size: as in
    the official code, one no larger than the window disables shifting. The
    residual groups (official ``PSA_Group``) are SwinIR's RSTB with PSA blocks.
    """

    channels_last = False

    def __init__(
        self,
        *,
        img_size: int = 64,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6),
        window_size: int = 16,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        patch_norm: bool = True,
        upscale: int = 1,
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
        if window_size % 2 or window_size < 4:
            raise ValueError(
                f"SRFormer window_size must be even and >= 4 (PSA folds 2x2 pixels), "
                f"got {window_size}"
            )
        if upsampler == "nearest+conv" and upscale != 4:
            raise ValueError(f"SRFormer's nearest+conv upsampler is x4 only, got upscale {upscale}")
        # Official quirk: the training patch is padded to a window multiple, and
        # a patch of one window disables the shift (the window itself stays).
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
            window_size=window_size,
        )
        self.layers = nn.ModuleList(
            RSTB(
                embed_dim,
                depth,
                heads,
                window_size=window_size,
                shifted=shifted,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                norm=norm,
                resi_connection=resi_connection,
                drop_path=rates,
                block=PSABlock,
                resi_connections=RESI_CONNECTIONS,
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

# Official classical SR (training configs: DF2K, 48x48 patches, window 24).
_CLASSICAL: dict[str, object] = {
    "img_size": 48,
    "embed_dim": 180,
    "depths": (6,) * 6,
    "num_heads": (6,) * 6,
    "window_size": 24,
    "mlp_ratio": 2.0,
    "upsampler": "pixelshuffle",
    "resi_connection": "1conv",
}
# Official SRFormer-light (DIV2K, 64x64 patches, window 16); also the i-LN
# paper's SRFormer_1 (Table 11: embed 60, depths/heads 6x4, window 16, MLP 2).
_LIGHT: dict[str, object] = {
    "img_size": 64,
    "embed_dim": 60,
    "depths": (6,) * 4,
    "num_heads": (6,) * 4,
    "window_size": 16,
    "mlp_ratio": 2.0,
    "upsampler": "pixelshuffledirect",
    "resi_connection": "1conv",
}

PRESETS: dict[str, dict[str, object]] = {
    **{f"srformer_x{s}": {**_CLASSICAL, "upscale": s} for s in (2, 3, 4)},
    # The released DF2K checkpoints' test configs use window 22 (bias tables of
    # 21^2 rows), not the training configs' 24.
    **{
        f"srformer_df2k_x{s}": {**_CLASSICAL, "img_size": 64, "window_size": 22, "upscale": s}
        for s in (2, 3, 4)
    },
    **{f"srformer_light_x{s}": {**_LIGHT, "upscale": s} for s in (2, 3, 4)},
    "srformer_1_x4": {**_LIGHT, "upscale": 4},
}
"""Preset name -> constructor kwargs (``norm``/``stdnorm`` are left to the caller)."""

PRESET_TASKS: dict[str, str] = dict.fromkeys(PRESETS, "sr")
"""Preset name -> task (every SRFormer preset is bicubic SR)."""


# --------------------------------------------------------------------------- detection

_BLOCK0 = "layers.0.residual_group.blocks.0."


def detect(state_dict: Mapping[str, Tensor]) -> dict[str, object] | None:
    """Constructor kwargs of an official/irformer SRFormer state dict, or None.

    Reads the hyper-parameters from key names and shapes (PSA's separate ``q``
    and ``kv`` linears tell it from SwinIR). ``img_size`` is only known when the
    file carries an ``attn_mask``; the norm cannot be told apart from LN (same
    keys), so it is never returned.
    """
    needed = (
        "conv_first.weight",
        _BLOCK0 + "attn.relative_position_bias_table",
        _BLOCK0 + "attn.q.weight",
        _BLOCK0 + "attn.kv.weight",
    )
    if not all(k in state_dict for k in needed):
        return None
    keys = list(state_dict)
    first = state_dict["conv_first.weight"]
    embed_dim, in_chans = int(first.shape[0]), int(first.shape[1])
    table = state_dict[_BLOCK0 + "attn.relative_position_bias_table"]
    window = 2 * ((math.isqrt(int(table.shape[0])) + 1) // 2)
    n_layers = count_indexed(keys, "layers.")
    kwargs: dict[str, object] = {
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "window_size": window,
        "depths": tuple(
            count_indexed(keys, f"layers.{i}.residual_group.blocks.") for i in range(n_layers)
        ),
        "num_heads": tuple(
            int(
                state_dict[
                    f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"
                ].shape[1]
            )
            for i in range(n_layers)
        ),
        "mlp_ratio": float(state_dict[_BLOCK0 + "mlp.fc1.weight"].shape[0] / embed_dim),
        "qkv_bias": _BLOCK0 + "attn.q.bias" in state_dict,
        "patch_norm": "patch_embed.norm.weight" in state_dict,
        "resi_connection": "1conv" if "conv_after_body.weight" in state_dict else "3conv",
    }
    mask = state_dict.get("layers.0.residual_group.blocks.1.attn_mask")
    if mask is not None:
        kwargs["img_size"] = math.isqrt(int(mask.shape[0])) * window
    kwargs.update(detect_head(state_dict, in_chans))
    return kwargs


SPEC = ArchSpec(
    name="srformer",
    model_class=SRFormer,
    presets=PRESETS,
    preset_tasks=PRESET_TASKS,
    detect=detect,
)
