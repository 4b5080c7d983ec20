"""DRCT: fidelity to spandrel's independent implementation, the norm matrix, presets."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from irformer.archs import SIZE_DEPENDENT_BUFFERS, drct
from irformer.archs.drct import DRCT, PRESETS, detect

TINY: dict[str, object] = {
    "img_size": 32,
    "embed_dim": 16,
    "depths": (2, 2),
    "num_heads": (4, 4),
    "window_size": 8,
    "mlp_ratio": 2.0,
    # 16 + k*6 channels: the official head rule gives 4, 2, 4, 2, 4 heads.
    "gc": 6,
}
BUFFER_SUFFIXES = ("relative_position_index", "attn_mask")


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model: nn.Module, seed: int) -> None:
    """Non-trivial random weights (LN affine too), so every path shows in the output.

    Weights are scaled by fan-in so activations, and the output, stay O(1): the
    1e-5 tolerance is then about 1e-5 relative, as for an image in [0, 1].
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "relative_position_bias_table" in name:
                p.copy_(0.5 * noise)
            elif p.dim() >= 2:
                p.copy_(0.8 * noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.05 * noise)


def _params_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith(BUFFER_SUFFIXES)}


def _pair(
    spandrel_archs: types.ModuleType, seed: int, **overrides: object
) -> tuple[nn.Module, DRCT]:
    cfg = {**TINY, **overrides}
    ref = spandrel_archs.DRCT.DRCT(**cfg).eval()
    _randomize(ref, seed)
    ours = DRCT(**cfg).eval()
    ref_params = _params_only(ref.state_dict())
    assert set(ours.state_dict()) == set(ref_params)
    for key, value in ours.state_dict().items():
        assert value.shape == ref_params[key].shape, key
    ours.load_state_dict(ref_params, strict=True)
    return ref, ours


def _reference_padded(ref: nn.Module, x: torch.Tensor, multiple: int, scale: int) -> torch.Tensor:
    """The official test pipeline: reflect-pad to the window multiple, run, crop."""
    h, w = x.shape[2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    out = ref(F.pad(x, (0, pad_w, 0, pad_h), mode="reflect"))
    return out[:, :, : h * scale, : w * scale]


@pytest.mark.parametrize(
    ("in_chans", "upscale", "resi", "seed"),
    [(3, 2, "1conv", 0), (1, 3, "1conv", 1), (3, 4, "identity", 2)],
)
def test_matches_spandrel(
    spandrel_archs: types.ModuleType, in_chans: int, upscale: int, resi: str, seed: int
) -> None:
    ref, ours = _pair(
        spandrel_archs,
        seed,
        in_chans=in_chans,
        upscale=upscale,
        upsampler="pixelshuffle",
        resi_connection=resi,
    )
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        # 32x32 uses the reference's stored mask; 16x24 its recomputed one.
        for size in ((32, 32), (16, 24)):
            x = torch.rand(2, in_chans, *size, generator=gen)
            expected = ref(x)
            got = ours(x)
            assert got.shape == (2, in_chans, size[0] * upscale, size[1] * upscale)
            assert (got - expected).abs().max().item() < 1e-5
            # The output must depend on the body, or the comparison proves little.
            assert expected.std().item() > 1e-2
        x = torch.rand(1, in_chans, 13, 21, generator=gen)
        expected = _reference_padded(ref, x, 8, upscale)
        got = ours(x)
        assert got.shape == expected.shape == (1, in_chans, 13 * upscale, 21 * upscale)
        assert (got - expected).abs().max().item() < 1e-5


def test_small_img_size_quirk_matches_spandrel(spandrel_archs: types.ModuleType) -> None:
    """img_size <= window: official blocks use one img_size window and no shift."""
    ref, ours = _pair(
        spandrel_archs, 3, img_size=8, window_size=16, upscale=2, upsampler="pixelshuffle"
    )
    assert ours.window_size == 8
    x = torch.rand(1, 3, 16, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-5


def test_spandrel_loader_reads_irformer_keys(spandrel_archs: types.ModuleType) -> None:
    """Our ln state dict (plus the buffers official files carry) is a DRCT file to spandrel."""
    ref, ours = _pair(spandrel_archs, 4, upscale=2, upsampler="pixelshuffle")
    state = ref.state_dict()  # keys include the buffers the official files carry
    state.update(ours.state_dict())
    desc = spandrel_archs.DRCT.DRCTArch().load(state)
    assert desc.scale == 2
    assert desc.model.embed_dim == 16


@pytest.mark.parametrize(
    "overrides",
    [
        {"upscale": 2, "upsampler": "pixelshuffle"},
        {"upscale": 3, "upsampler": "pixelshuffle", "in_chans": 1, "resi_connection": "identity"},
        {"upscale": 4, "upsampler": "pixelshuffledirect"},
        {"upscale": 1, "upsampler": "", "in_chans": 1, "patch_norm": False, "qkv_bias": False},
    ],
)
def test_detect_round_trip(overrides: dict[str, object]) -> None:
    model = DRCT(**{**TINY, **overrides})
    state = model.state_dict()
    state["layers.0.swin2.attn_mask"] = torch.zeros(16, 64, 64)  # as official files carry
    found = detect(state)
    assert found is not None
    expected = {"in_chans": 3, "qkv_bias": True, "patch_norm": True, **TINY, **overrides}
    for key in ("in_chans", "embed_dim", "window_size", "num_heads", "gc", "upscale", "qkv_bias"):
        assert found[key] == expected[key], key
    assert found["upsampler"] == expected["upsampler"]
    assert found["mlp_ratio"] == pytest.approx(2.0)
    assert found["img_size"] == 32
    rebuilt = DRCT(**found)
    rebuilt.load_state_dict(_params_only(state), strict=True)


def test_detect_rejects_other_archs() -> None:
    assert detect({"conv_first.weight": torch.zeros(8, 3, 3, 3)}) is None


def test_state_dict_has_no_size_dependent_buffers() -> None:
    keys = DRCT(**TINY).state_dict().keys()
    assert not [k for k in keys if k.endswith((*SIZE_DEPENDENT_BUFFERS, "mean", "std"))]


def test_iln_rescales_every_block_branch() -> None:
    """i-LN blocks are homogeneous of degree 1: block(a*x) == a*block(x)."""
    model = DRCT(**TINY, upscale=2, norm="iln").eval()
    _randomize(model, 6)
    block = model.layers[0].swin2
    # Large inputs: eps (1e-4) is negligible against var, so the identity is exact.
    x = 10.0 * torch.randn(2, 32 * 32, 22)
    with torch.no_grad():
        y1 = block(3.0 * x, (32, 32))
        y2 = 3.0 * block(x, (32, 32))
    assert (y1 - y2).abs().max().item() < 1e-4 * y2.abs().max().item()
    plain = DRCT(**TINY, upscale=2, norm="ln_star").eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        z1 = plain.layers[0].swin2(3.0 * x, (32, 32))
        z2 = 3.0 * plain.layers[0].swin2(x, (32, 32))
    # Without the rescale (LN*), the block is not homogeneous.
    assert (z1 - z2).abs().max().item() > 1e-2 * z2.abs().max().item()


@pytest.mark.parametrize("stdnorm", [False, True])
def test_same_size_head_is_a_residual_on_the_input(stdnorm: bool) -> None:
    """With conv_last zeroed the '' head returns the input exactly (mean/std undone)."""
    model = DRCT(**TINY, upscale=1, upsampler="", stdnorm=stdnorm).eval()
    nn.init.zeros_(model.conv_last.weight)
    nn.init.zeros_(model.conv_last.bias)
    x = torch.rand(1, 3, 11, 9)
    with torch.no_grad():
        assert torch.allclose(model(x), x, atol=1e-6)


def test_stdnorm_changes_the_input_scale() -> None:
    torch.manual_seed(0)
    a = DRCT(**TINY, upscale=2).eval()
    b = DRCT(**TINY, upscale=2, stdnorm=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max().item() > 1e-3


def test_errors_name_the_offending_value() -> None:
    with pytest.raises(ValueError, match="nearest\\+conv"):
        DRCT(**TINY, upsampler="nearest+conv")
    with pytest.raises(ValueError, match="in_chans"):
        DRCT(**TINY, in_chans=4)
    with pytest.raises(ValueError, match="swin4 has width 37"):
        DRCT(**{**TINY, "gc": 7})
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        DRCT(**TINY, upscale=2)(torch.rand(1, 1, 16, 16))


@pytest.mark.parametrize(
    ("name", "expected_m"),
    # Official README (x4): DRCT 14.13M, DRCT-L 27.58M (truncated to 2 decimals).
    [("drct_x4", 14.13), ("drct_l_x4", 27.58)],
)
def test_preset_param_counts(name: str, expected_m: float) -> None:
    count = sum(p.numel() for p in DRCT(**PRESETS[name]).parameters())
    assert int(count / 1e4) / 100 == expected_m


def test_presets() -> None:
    assert {"drct_x2", "drct_x3", "drct_x4", "drct_l_x4", "drct_1_x2", "drct_1_x4"} <= set(PRESETS)
    assert set(drct.PRESET_TASKS) == set(PRESETS)
    for name, kwargs in PRESETS.items():
        assert name.endswith(f"_x{kwargs['upscale']}"), name
        assert kwargs["upsampler"] == "pixelshuffle", name
    light = DRCT(**PRESETS["drct_1_x4"])
    # i-LN Table 10: DRCT_1 = embed 96, 6 groups, 6 heads, window 16, MLP ratio 2.
    assert light.conv_first.weight.shape[0] == 96
    assert len(light.layers) == 6
    assert light.window_size == 16
    assert light.layers[0].swin1.attn.num_heads == 6
    assert light.layers[0].swin1.mlp.fc1.weight.shape[0] == 192
    assert light.upsample[0].weight.shape[0] == 4 * 64


def test_official_file_loads_through_the_registry(
    spandrel_archs: types.ModuleType, tmp_path: Path
) -> None:
    """A BasicSR-style file (params_ema, with the official buffers) is detected and loads."""
    from irformer.archs import load_checkpoint_model

    ref, _ = _pair(spandrel_archs, 7, upscale=2, upsampler="pixelshuffle")
    path = tmp_path / "drct_official.pth"
    torch.save({"params_ema": ref.state_dict()}, path)
    model, meta = load_checkpoint_model(path)
    assert meta["arch"] == "drct"
    assert meta["norm"] == "ln"
    assert meta["scale"] == 2
    x = torch.rand(1, 3, 19, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = _reference_padded(ref, x, 8, 2)
        assert (model(x) - expected).abs().max().item() < 1e-5
