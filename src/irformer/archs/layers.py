"""What SwinIR, HAT, DRCT and SRFormer share: the frame around their bodies.

All four originals wrap their Transformer body the same way: pad the input to a
window multiple, subtract the DF2K mean (and, in the i-LN code, divide by its
std), a shallow 3x3 conv, the deep features (tokens through the residual
groups and a final norm) with a long skip, then a reconstruction head (pixel
shuffle, direct pixel shuffle, nearest+conv, or a same-size residual conv),
and undo the normalisation. :class:`RestorationTransformer` is that frame; an
architecture subclasses it, builds its residual groups as ``self.layers`` and
its ``norm`` / ``conv_after_body``, and calls :meth:`~RestorationTransformer.
add_reconstruction_head`. Module names are the originals' (``conv_first``,
``patch_embed.norm``, ``conv_before_upsample``, ``upsample``, ``conv_last``...),
so official checkpoints load with ``load_state_dict``.

Also here: the base classes that mark a Transformer block and a residual group
(what training, the probes and compression iterate over), the MLP, patch
(un)embedding, upsamplers and the originals' initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from irformer.archs.state import register_size_dependent_buffer_hook
from irformer.archs.windows import crop_top_left, pad_to_multiple
from irformer.execution import in_graph_capture
from irformer.norms import build_norm

UPSAMPLERS: tuple[str, ...] = ("pixelshuffle", "pixelshuffledirect", "nearest+conv", "")
"""Upsampler names of the originals ('' = same-size restoration)."""

DF2K_RGB_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)
DF2K_RGB_STD: tuple[float, float, float] = (0.2842, 0.2701, 0.2920)
"""Input mean of the originals and the std that the i-LN code's ``stdnorm`` divides by."""
DF2K_GREY_STD: float = sum(DF2K_RGB_STD) / 3
"""Grey-input std for ``stdnorm`` (SwinIR/DRCT/SRFormer: mean of the RGB stds)."""


class TransformerBlock(nn.Module):
    """Marks a pre-norm Transformer block: ``x + attn(norm1(x))``, then ``+ mlp(norm2(x))``,
    both merged by :func:`irformer.norms.merge_residual`.

    What training (the KL feature loss), the analysis probes and compression
    iterate over: :func:`transformer_blocks`.
    """


class ResidualGroup(nn.Module):
    """Marks a residual group (SwinIR's RSTB, HAT's RHAG, DRCT's RDG, SRFormer's
    PSA group): Transformer blocks closed by a conv, with a skip around them."""


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, block)`` of every :class:`TransformerBlock`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TransformerBlock)]


def residual_groups(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, group)`` of every :class:`ResidualGroup`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualGroup)]


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (official key names)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


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
        return tokens_to_map(x, x_size)


def tokens_to_map(x: Tensor, x_size: tuple[int, int]) -> Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) map for a conv.

    Eagerly a channels-last view (see :class:`PatchUnEmbed`). A captured graph
    gets a plain NCHW copy instead: how a conv lays out a channels-last input
    depends on whether the batch is 1, which symbolic sizes cannot tell, so
    the exported graph would be fixed to batches of one kind.
    """
    b, _, c = x.shape
    fmap = x.reshape(b, x_size[0], x_size[1], c).permute(0, 3, 1, 2)
    return fmap.contiguous() if in_graph_capture() else fmap


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
    return nn.Identity()


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
    if upsampler == "nearest+conv" and upscale not in (2, 4, 8):
        raise ValueError(f"nearest+conv supports upscale 2, 4 or 8, got {upscale}")


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


def detect_head(state_dict: Mapping[str, Tensor], in_chans: int) -> dict[str, object]:
    """``upsampler``, ``upscale`` (and ``num_feat``) of the reconstruction head in an
    official/irformer state dict, read from its key names and shapes (all four
    architectures use SwinIR's head key layout)."""
    if "conv_before_upsample.0.weight" in state_dict:
        num_feat = int(state_dict["conv_before_upsample.0.weight"].shape[0])
        if "conv_up1.weight" in state_dict:
            steps = sum(f"conv_up{i}.weight" in state_dict for i in (1, 2, 3))
            return {"num_feat": num_feat, "upsampler": "nearest+conv", "upscale": 2**steps}
        convs = [
            state_dict[k]
            for k in sorted(state_dict)
            if k.startswith("upsample.") and k.endswith(".weight")
        ]
        if len(convs) == 1 and int(convs[0].shape[0]) == 9 * num_feat:
            upscale = 3
        else:
            upscale = 2 ** len(convs)
        return {"num_feat": num_feat, "upsampler": "pixelshuffle", "upscale": upscale}
    if "upsample.0.weight" in state_dict:
        out = int(state_dict["upsample.0.weight"].shape[0])
        return {"upsampler": "pixelshuffledirect", "upscale": math.isqrt(out // in_chans)}
    return {"upsampler": "", "upscale": 1}


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


class RestorationTransformer(nn.Module):
    """The frame of SwinIR, HAT, DRCT and SRFormer (see the module docstring).

    The constructor sets what :meth:`forward` reads and builds the shallow stem
    (``conv_first``, ``patch_embed``, ``patch_unembed``); the subclass builds
    ``layers``, ``norm``, ``conv_after_body`` and the head. ``mean``/``std``
    are non-persistent buffers (the originals hard-code them).
    """

    channels_last: bool = True
    """Channels-last feature maps between token stages (every token <-> map
    transpose a view; faster convs): SwinIR, HAT, SRFormer. DRCT concatenates
    token features, which a channels-last map would turn into copies."""

    def __init__(
        self,
        *,
        in_chans: int,
        embed_dim: int,
        upscale: int,
        upsampler: str,
        img_range: float,
        norm: str,
        patch_norm: bool,
        stdnorm: bool,
        window_size: int,
        grey_std: float = DF2K_GREY_STD,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.in_chans = in_chans
        self.upscale = upscale
        self.upsampler = upsampler
        self.img_range = img_range
        self.norm_name = norm
        self.stdnorm = stdnorm
        mean, std = input_stats(in_chans, stdnorm, grey_std=grey_std)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim, norm if patch_norm else None)
        self.patch_unembed = PatchUnEmbed()
        register_size_dependent_buffer_hook(self)

    def add_reconstruction_head(self, *, embed_dim: int, num_feat: int) -> None:
        """Build the official head of ``self.upsampler`` (module names kept top-level).

        ``nearest+conv`` gets one ``conv_up{i}`` per x2 step (upscale 2, 4 or 8).
        """
        in_chans, upscale = self.in_chans, self.upscale
        if self.upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
            self.upsample = Upsample(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        elif self.upsampler == "pixelshuffledirect":
            self.upsample = UpsampleOneStep(upscale, embed_dim, in_chans)
        elif self.upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True)
            )
            for i in range(1, int(math.log2(upscale)) + 1):
                setattr(self, f"conv_up{i}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
            self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
            self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        else:
            self.conv_last = nn.Conv2d(embed_dim, in_chans, 3, 1, 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) shallow features -> (B, C, H, W) deep features.

        The originals' ``forward_features``: tokens through ``self.layers`` (each
        called as ``layer(tokens, (H, W))``) and the final ``self.norm``, with
        SwinIR's optional ``absolute_pos_embed`` added after the patch embedding.
        """
        x_size = (x.shape[2], x.shape[3])
        x = self.patch_embed(x)
        pos_embed = getattr(self, "absolute_pos_embed", None)
        if pos_embed is not None:
            x = x + pos_embed
        for layer in self.layers:
            x = layer(x, x_size)
        return self.patch_unembed(self.norm(x), x_size)

    def reconstruct(self, x: Tensor, res: Tensor) -> Tensor:
        """Image from deep features ``res`` (B, C, h, w) through the head.

        ``x`` is the normalised input; the same-size head ('') predicts a residual
        on it, as the originals do.
        """
        if self.upsampler == "":
            return x + self.conv_last(res)
        if self.upsampler == "pixelshuffle":
            return self.conv_last(self.upsample(self.conv_before_upsample(res)))
        if self.upsampler == "pixelshuffledirect":
            return self.upsample(res)
        y = self.conv_before_upsample(res)
        for name in ("conv_up1", "conv_up2", "conv_up3"):
            if hasattr(self, name):
                y = self.lrelu(
                    getattr(self, name)(F.interpolate(y, scale_factor=2, mode="nearest"))
                )
        return self.conv_last(self.lrelu(self.conv_hr(y)))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_chans, H, W) in [0, 1], any H and W -> (B, in_chans, s*H, s*W).

        Reflect-pad to a window multiple, normalise, shallow conv, deep features
        with the long skip (``conv_after_body(...) + feat``), head, undo the
        normalisation and crop the padding off (the originals' test-time wrapper,
        folded into the model). ``img_range=255`` (the official JPEG models)
        rescales internally only.
        """
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {self.in_chans}, H, W), "
                f"got {tuple(x.shape)}"
            )
        h, w = x.shape[2:]
        # Memory layout is an eager speed choice; a captured graph (symbolic
        # sizes) gets none, so the exporters see no layout-dependent branches.
        channels_last = self.channels_last and not in_graph_capture()
        x = pad_to_multiple(x, self.window_size)
        x = x - self.mean
        if self.stdnorm:
            x = x / self.std
        x = x * self.img_range
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feat = self.conv_first(x)
        res = self.conv_after_body(self.forward_features(feat)) + feat
        out = self.reconstruct(x, res) / self.img_range
        if self.stdnorm:
            out = out * self.std
        out = out + self.mean
        s = self.upscale
        out = crop_top_left(out, h * s, w * s)
        return out.contiguous() if channels_last else out
