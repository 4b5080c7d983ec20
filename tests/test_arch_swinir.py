"""SwinIR: fidelity against spandrel's independent implementation, norm matrix, errors."""

from __future__ import annotations

import types

import pytest
import torch

from irformer.archs.swinir import PRESETS, SwinIR, detect

TINY = {
    "img_size": 16,
    "embed_dim": 12,
    "depths": (2, 2),
    "num_heads": (2, 3),
    "window_size": 4,
    "mlp_ratio": 2.0,
}
BUFFER_SUFFIXES = ("attn_mask", "relative_position_index")

# (upsampler, upscale, in_chans, resi_connection, extra kwargs)
CASES = [
    ("pixelshuffle", 2, 3, "1conv", {}),
    ("pixelshuffle", 3, 3, "1conv", {}),
    ("pixelshuffle", 4, 1, "3conv", {}),
    ("pixelshuffledirect", 4, 3, "1conv", {}),
    ("pixelshuffledirect", 3, 1, "1conv", {}),
    ("nearest+conv", 4, 3, "3conv", {}),
    ("nearest+conv", 2, 3, "1conv", {}),
    ("", 1, 3, "1conv", {}),  # colour denoising
    ("", 1, 1, "1conv", {"img_range": 255.0, "window_size": 3, "img_size": 12}),  # JPEG CAR
    ("pixelshuffledirect", 2, 3, "1conv", {"ape": True}),
    ("pixelshuffle", 2, 3, "1conv", {"patch_norm": False, "qkv_bias": False}),
]


def _reference_pair(
    spandrel_archs: types.ModuleType, upsampler: str, scale: int, in_chans: int, resi: str, extra
) -> tuple[torch.nn.Module, SwinIR]:
    kwargs = {**TINY, **extra}
    torch.manual_seed(0)
    ref = spandrel_archs.SwinIR.SwinIR(
        img_size=kwargs["img_size"],
        in_chans=in_chans,
        embed_dim=kwargs["embed_dim"],
        depths=list(kwargs["depths"]),
        num_heads=list(kwargs["num_heads"]),
        window_size=kwargs["window_size"],
        mlp_ratio=kwargs["mlp_ratio"],
        upscale=scale,
        upsampler=upsampler,
        resi_connection=resi,
        img_range=extra.get("img_range", 1.0),
        ape=extra.get("ape", False),
        patch_norm=extra.get("patch_norm", True),
        qkv_bias=extra.get("qkv_bias", True),
        drop_path_rate=0.0,
    ).eval()
    # Random (not init) values everywhere, so every parameter matters.
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    ours = SwinIR(
        in_chans=in_chans, upscale=scale, upsampler=upsampler, resi_connection=resi, **kwargs
    ).eval()
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith(BUFFER_SUFFIXES)}
    ours.load_state_dict(state, strict=True)
    return ref, ours


@pytest.mark.parametrize(("upsampler", "scale", "in_chans", "resi", "extra"), CASES)
def test_matches_spandrel(spandrel_archs, upsampler, scale, in_chans, resi, extra) -> None:
    ref, ours = _reference_pair(spandrel_archs, upsampler, scale, in_chans, resi, extra)
    size = extra.get("img_size", 16)
    sizes = [(size, size), (13, 19)] if not extra.get("ape") else [(size, size)]
    for h, w in sizes:
        x = torch.rand(2, in_chans, h, w)
        with torch.no_grad():
            expected = ref(x)
            got = ours(x)
        assert got.shape == (2, in_chans, h * scale, w * scale)
        assert got.shape == expected.shape
        err = (got - expected).abs().max().item()
        assert err < 1e-5, (h, w, err)
        assert expected.abs().max() > 0.1  # a non-trivial output


def test_matches_spandrel_backward(spandrel_archs) -> None:
    """Gradients agree too (training uses the same graph)."""
    ref, ours = _reference_pair(spandrel_archs, "pixelshuffledirect", 2, 3, "1conv", {})
    x = torch.rand(1, 3, 16, 16)
    ref(x).square().sum().backward()
    ours(x).square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        diff = (p.grad - ref_grads[name].grad).abs().max().item()
        assert diff < 1e-4 * max(1.0, ref_grads[name].grad.abs().max().item()), name


def test_official_quirk_small_img_size(spandrel_archs) -> None:
    """img_size == window: the official code drops the shift (window covers the patch)."""
    kwargs = {**TINY, "img_size": 4}
    torch.manual_seed(1)
    ref = spandrel_archs.SwinIR.SwinIR(
        img_size=4, embed_dim=12, depths=[2], num_heads=[2], window_size=4, mlp_ratio=2.0,
        upscale=2, upsampler="pixelshuffledirect", drop_path_rate=0.0,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    kwargs.update(depths=(2,), num_heads=(2,))
    ours = SwinIR(upscale=2, upsampler="pixelshuffledirect", **kwargs).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.endswith(
        BUFFER_SUFFIXES)})  # fmt: skip
    assert all(b.shift_size == 0 for b in ours.layers[0].residual_group.blocks)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-5


def test_iln_keys_match_ln() -> None:
    """i-LN keeps LN's key names (the final/embed norms become affines of the same shape)."""
    ln = SwinIR(upscale=2, upsampler="pixelshuffledirect", norm="ln", **TINY).state_dict()
    iln = SwinIR(upscale=2, upsampler="pixelshuffledirect", norm="iln", **TINY).state_dict()
    assert {k: v.shape for k, v in ln.items()} == {k: v.shape for k, v in iln.items()}


def test_stdnorm_changes_input_scaling_only() -> None:
    """With stdnorm the body sees (x - mean) / std: an identity body returns x."""
    model = SwinIR(upscale=1, upsampler="", stdnorm=True, **TINY).eval()
    with torch.no_grad():
        model.conv_last.weight.zero_()
        model.conv_last.bias.zero_()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), x, atol=1e-6)
    assert model.std.flatten().tolist() == pytest.approx([0.2842, 0.2701, 0.2920])


def test_wrong_channel_count_is_clear() -> None:
    model = SwinIR(upscale=2, upsampler="pixelshuffledirect", **TINY)
    with pytest.raises(
        ValueError, match=r"expects input of shape \(B, 3, H, W\), got \(1, 1, 8, 8\)"
    ):
        model(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="expects input"):
        model(torch.rand(3, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"upsampler": "bilinear"}, "unknown upsampler 'bilinear'"),
        ({"norm": "groupnorm"}, "unknown norm 'groupnorm'; valid norms: ln"),
        ({"in_chans": 2}, "in_chans must be 1 or 3"),
        ({"resi_connection": "2conv"}, "unknown resi_connection '2conv'"),
        ({"upsampler": "", "upscale": 2}, "needs upscale=1"),
        ({"upsampler": "pixelshuffle", "upscale": 5}, "upscale 5 is not supported"),
    ],
)
def test_constructor_errors(kwargs, match) -> None:
    full = {"upscale": 2, "upsampler": "pixelshuffle", **TINY, **kwargs}
    with pytest.raises(ValueError, match=match):
        SwinIR(**full)


def test_detect_recovers_every_preset() -> None:
    """detect() reads back each official preset's hyper-parameters from keys/shapes."""
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = SwinIR(**preset)
        found = detect(model.state_dict())
        assert found is not None, name
        for key, value in found.items():
            if key == "img_size":
                continue  # only readable from attn_mask / ape
            expected = preset.get(key, SwinIR.__init__.__kwdefaults__[key])
            if isinstance(expected, tuple | list):
                expected = tuple(expected)
            assert value == expected, (name, key, value, expected)


def test_detect_rejects_other_layouts() -> None:
    assert detect({"conv_first.weight": torch.zeros(1)}) is None
    with torch.device("meta"):
        state = SwinIR(**PRESETS["swinir_light_x2"]).state_dict()
    state["layers.0.residual_group.blocks.0.conv_block.cab.0.weight"] = torch.zeros(1)
    assert detect(state) is None


def test_fused_shifted_attention_equals_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused inference path (all windows with the bias, masked border windows
    redone) equals the explicit softmax path that training and quantisation use,
    for a batch of images; autograd selects the explicit one."""
    from irformer.archs import attention
    from irformer.archs.swinir import WindowAttention
    from irformer.archs.windows import masked_windows, shifted_window_mask

    torch.manual_seed(3)
    attn = WindowAttention(12, 4, 3)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    mask = shifted_window_mask(12, 16, 4, 2, torch.device("cpu"))
    # last window row and column of the 3 x 4 window grid
    assert masked_windows(mask).tolist() == [3, 7, 8, 9, 10, 11]
    x = torch.randn(2 * 12, 16, 12)
    calls = []
    explicit_fn = attention._explicit_attention
    monkeypatch.setattr(
        attention, "_explicit_attention", lambda *a: calls.append(1) or explicit_fn(*a)
    )

    def run(windows: torch.Tensor) -> torch.Tensor:
        return attention._project_attend(
            windows,
            mask,
            attn.operands,
            attn.qkv,
            attn.proj,
            attn.position_bias(),
            attn.num_heads,
            attn.scale,
        )

    with torch.no_grad():
        fused = run(x)
    assert not calls
    explicit = run(x.requires_grad_(True))
    assert calls
    explicit.square().sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0
    assert (fused - explicit).abs().max().item() < 1e-5


def test_inputs_smaller_than_the_padding() -> None:
    """Reflect padding is repeated (1-pixel sides replicated) where F.pad would fail;
    wherever F.pad works the result is F.pad's."""
    import torch.nn.functional as F

    from irformer.archs.windows import pad_to_multiple

    x = torch.rand(2, 3, 13, 19)
    assert torch.equal(pad_to_multiple(x, 8), F.pad(x, (0, 5, 0, 3), mode="reflect"))
    tiny = torch.arange(3.0).view(1, 1, 1, 3)
    assert pad_to_multiple(tiny, 8)[0, 0, :, :].tolist() == [[0, 1, 2, 1, 0, 1, 2, 1]] * 8
    model = SwinIR(upscale=2, upsampler="pixelshuffledirect", **TINY).eval()
    for h, w in [(1, 1), (1, 6), (3, 2), (5, 9)]:
        with torch.no_grad():
            y = model(torch.rand(1, 3, h, w))
        assert y.shape == (1, 3, 2 * h, 2 * w) and torch.isfinite(y).all()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("norm", ["ln", "iln"])
def test_token_stream_stays_contiguous(batch: int, norm: str) -> None:
    """Channels-last maps keep every token tensor contiguous (batch 1 included), so no
    linear or norm pays for a transposed residual stream."""
    model = SwinIR(upscale=2, upsampler="pixelshuffledirect", norm=norm, **TINY).eval()
    layouts = []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        layouts.append(args[0].is_contiguous())

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(record)
    with torch.no_grad():
        model(torch.rand(batch, 3, 16, 16))
    assert layouts and all(layouts)
