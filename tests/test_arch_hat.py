"""HAT: fidelity against spandrel and the i-LN authors' code, i-LN semantics, norms, presets."""

from __future__ import annotations

import functools
import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from irformer.archs import (
    CheckpointMismatchError,
    build_model,
    load_checkpoint_model,
    save_model_weights,
)
from irformer.archs.attention import AttentionOperands
from irformer.archs.checkpoints import prepare_state_dict
from irformer.archs.hat import CAB, HAB, HAT, OCAB, PRESET_TASKS, PRESETS, detect
from irformer.archs.windows import overlap_relative_position_index, pad_to_multiple
from irformer.execution import current_execution, execution_context
from irformer.norms import ChannelAffine, HolisticLayerNorm

OFFICIAL_BUFFER_KEYS = ("relative_position_index_SA", "relative_position_index_OCA")
"""Top-level buffers official HAT files carry (derived, not stored, here)."""

FIXTURES = Path(__file__).resolve().parent / "fixtures"

TINY = {
    "embed_dim": 16,
    "depths": (2, 2),
    "num_heads": (2, 4),
    "window_size": 4,
    "compress_ratio": 2,
    "squeeze_factor": 4,
    "overlap_ratio": 0.5,
    "mlp_ratio": 2.0,
}

# (upscale, in_chans, extra kwargs) for spandrel's HAT (pixelshuffle is its only head)
PIXELSHUFFLE_CASES = [
    (2, 3, {}),
    (3, 1, {"embed_dim": 12, "num_heads": (3, 3), "window_size": 8, "compress_ratio": 3}),
    (4, 3, {"resi_connection": "identity", "patch_norm": False, "qkv_bias": False}),
    (1, 3, {"img_range": 255.0, "depths": (1,), "num_heads": (2,)}),
]


def _randomize(model: torch.nn.Module) -> None:
    """Random (not init) values everywhere, so every parameter matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)


def _spandrel_hat(spandrel_archs: types.ModuleType, scale: int, in_chans: int, kw: dict):
    ref = spandrel_archs.HAT.HAT(
        in_chans=in_chans,
        upscale=scale,
        embed_dim=kw["embed_dim"],
        depths=list(kw["depths"]),
        num_heads=list(kw["num_heads"]),
        window_size=kw["window_size"],
        compress_ratio=kw["compress_ratio"],
        squeeze_factor=kw["squeeze_factor"],
        overlap_ratio=kw["overlap_ratio"],
        mlp_ratio=kw["mlp_ratio"],
        resi_connection=kw.get("resi_connection", "1conv"),
        patch_norm=kw.get("patch_norm", True),
        qkv_bias=kw.get("qkv_bias", True),
        img_range=kw.get("img_range", 1.0),
        drop_path_rate=0.0,
    ).eval()
    _randomize(ref)
    return ref


@pytest.mark.parametrize(("scale", "in_chans", "extra"), PIXELSHUFFLE_CASES)
def test_matches_spandrel(spandrel_archs, scale, in_chans, extra) -> None:
    kw = {**TINY, **extra}
    ref = _spandrel_hat(spandrel_archs, scale, in_chans, kw)
    ours = HAT(in_chans=in_chans, upscale=scale, **kw).eval()
    ref_state = ref.state_dict()
    assert set(OFFICIAL_BUFFER_KEYS) <= set(ref_state)
    state = prepare_state_dict(ours, ref_state)
    # Same keys, same order, same shapes as the official layout.
    assert [(k, tuple(v.shape)) for k, v in state.items()] == [
        (k, tuple(v.shape)) for k, v in ours.state_dict().items()
    ]
    ours.load_state_dict(state, strict=True)
    w = kw["window_size"]
    for h, wd in [(2 * w, 2 * w), (2 * w - 3, 3 * w + 1)]:
        x = torch.rand(2, in_chans, h, wd)
        with torch.no_grad():
            expected, got = ref(x), ours(x)
        assert got.shape == (2, in_chans, h * scale, wd * scale)
        assert (got - expected).abs().max().item() < 1e-5


def test_matches_spandrel_backward(spandrel_archs) -> None:
    ref = _spandrel_hat(spandrel_archs, 2, 3, TINY)
    ours = HAT(upscale=2, drop_path_rate=0.0, **TINY)  # train mode: as deterministic as ref
    ours.load_state_dict(prepare_state_dict(ours, ref.state_dict()))
    ref.train()
    x = torch.rand(1, 3, 8, 8)
    ref(x).square().mean().backward()
    ours(x).square().mean().backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


# SwinIR's heads (HAT's docstring lists them; official HAT only builds pixelshuffle).
OTHER_HEADS = [
    ("", 1, 3),
    ("pixelshuffledirect", 3, 1),
    ("nearest+conv", 4, 3),
    ("nearest+conv", 2, 3),
]


@pytest.mark.parametrize(("upsampler", "scale", "in_chans"), OTHER_HEADS)
def test_other_heads_match_spandrel_swinir_heads(
    spandrel_archs, upsampler, scale, in_chans
) -> None:
    """HAT body (spandrel HAT) + SwinIR head (spandrel SwinIR) == our HAT with that head."""
    hat = _spandrel_hat(spandrel_archs, 2, in_chans, TINY)
    swin = spandrel_archs.SwinIR.SwinIR(
        in_chans=in_chans,
        embed_dim=TINY["embed_dim"],
        depths=[1],
        num_heads=[2],
        window_size=TINY["window_size"],
        upscale=scale,
        upsampler=upsampler,
    ).eval()
    _randomize(swin)
    # Run spandrel's SwinIR forward with the HAT body swapped in.
    swin.conv_first = hat.conv_first
    swin.conv_after_body = hat.conv_after_body
    swin.forward_features = hat.forward_features
    ours = HAT(in_chans=in_chans, upscale=scale, upsampler=upsampler, **TINY).eval()
    head_prefixes = ("conv_before_upsample.", "upsample.", "conv_last.", "conv_up", "conv_hr.")
    state = {k: v for k, v in hat.state_dict().items() if not k.startswith(head_prefixes)}
    state.update({k: v for k, v in swin.state_dict().items() if k.startswith(head_prefixes)})
    ours.load_state_dict(prepare_state_dict(ours, state), strict=True)
    for h, w in [(8, 8), (7, 10)]:
        x = torch.rand(2, in_chans, h, w)
        with torch.no_grad():
            expected, got = swin(x), ours(x)
        assert got.shape == (2, in_chans, h * scale, w * scale)
        assert (got - expected).abs().max().item() < 1e-5


# --------------------------------------------------------------------------- i-LN


def _formula_weight(index: int, key: str, shape: torch.Size) -> torch.Tensor:
    """The fixture generator's RNG-free weights (see the fixture's metadata)."""
    t = torch.arange(shape.numel(), dtype=torch.float64)
    v = 0.05 * torch.sin(0.9 * t + 0.37 * index + 0.1)
    if key.endswith(".gamma"):
        v = v + 1.0
    return v.float().reshape(shape)


def _authors_key(key: str) -> str:
    """The authors' i-LN/Affine modules call weight/bias gamma/beta."""
    if key.endswith(".gamma"):
        return key.removesuffix(".gamma") + ".weight"
    if key.endswith(".beta"):
        return key.removesuffix(".beta") + ".bias"
    return key


def test_iln_matches_authors_code() -> None:
    """Outputs of the authors' HAT_iLN (run once, stored) on the same weights and inputs."""
    path = FIXTURES / "hat_iln_reference.safetensors"
    with safe_open(str(path), "pt") as f:
        cases = json.loads(f.metadata()["cases"])
        for name, cfg in cases.items():
            kwargs = {k: v for k, v in cfg.items() if k not in ("n_inputs", "param_keys")}
            model = HAT(**kwargs, norm="iln", stdnorm=True).eval()
            # Holistic LN without the rescale: what the fixture must tell apart.
            no_rescale = HAT(**kwargs, norm="ln_star", stdnorm=True).eval()
            own = model.state_dict()
            state = {}
            for i, key in enumerate(cfg["param_keys"]):
                ours = _authors_key(key)
                state[ours] = _formula_weight(i, key, own[ours].shape)
            for key in OFFICIAL_BUFFER_KEYS:
                state[key] = f.get_tensor(f"{name}.buffer.{key}")
            state = prepare_state_dict(model, state)
            model.load_state_dict(state, strict=True)
            no_rescale.load_state_dict(state, strict=True)
            for j in range(cfg["n_inputs"]):
                x = f.get_tensor(f"{name}.input{j}")
                expected = f.get_tensor(f"{name}.output{j}")
                with torch.no_grad():
                    got, other = model(x), no_rescale(x)
                assert (got - expected).abs().max().item() < 1e-5, (name, j)
                assert (other - expected).abs().max().item() > 1e-4, (name, j)


def _zero_eps(module: torch.nn.Module) -> None:
    """eps = 0 makes holistic normalisation exactly scale-invariant."""
    for m in module.modules():
        if isinstance(m, HolisticLayerNorm):
            m.eps = 0.0


def _hab(norm: str) -> HAB:
    block = HAT(norm=norm, **TINY).layers[0].residual_group.blocks[1]  # the shifted one
    assert isinstance(block.conv_block, CAB)
    return block


def _ocab(norm: str) -> OCAB:
    return HAT(norm=norm, **TINY).layers[0].residual_group.overlap_attn


@pytest.mark.parametrize("make_block", [_hab, _ocab])
def test_iln_blocks_are_homogeneous(make_block) -> None:
    """i-LN: block(a * x) == a * block(x) (paper Eq. 5); LN and LN* are not."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 16) * 3 + 1
    size = (8, 8)
    for norm, homogeneous in (("iln", True), ("ln_star", False), ("ln", False)):
        block = make_block(norm).eval()
        _randomize(block)
        _zero_eps(block)
        with torch.no_grad():
            base = block(x, size)
            for a in (0.01, 37.0):
                err = (block(a * x, size) - a * base).abs().max().item() / (a * base.abs().max())
                assert (err < 1e-5) == homogeneous, (norm, a, err)


def test_iln_embed_and_final_norms_are_channel_affine() -> None:
    model = HAT(norm="iln", **TINY)
    assert isinstance(model.patch_embed.norm, ChannelAffine)
    assert isinstance(model.norm, ChannelAffine)
    block = model.layers[0].residual_group.blocks[0]
    ocab = model.layers[0].residual_group.overlap_attn
    for norm in (block.norm1, block.norm2, ocab.norm1, ocab.norm2):
        assert isinstance(norm, HolisticLayerNorm) and norm.rescale
    # Same keys as LN, so the norm must come from checkpoint metadata.
    assert list(model.state_dict()) == list(HAT(norm="ln", **TINY).state_dict())


def test_stdnorm_input_statistics() -> None:
    rgb = HAT(stdnorm=True, **TINY)
    torch.testing.assert_close(rgb.std.flatten(), torch.tensor([0.2842, 0.2701, 0.2920]))
    grey = HAT(in_chans=1, stdnorm=True, **TINY)
    # The authors' code: red-channel std for grey input, zero mean.
    assert grey.std.flatten().tolist() == pytest.approx([0.2842])
    assert grey.mean.flatten().tolist() == [0.0]
    assert HAT(**TINY).std.flatten().tolist() == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- norms, sizes


@pytest.mark.parametrize(("h", "w"), [(1, 1), (3, 5), (4, 17), (16, 16)])
def test_any_input_size(h: int, w: int) -> None:
    model = HAT(upscale=3, **{**TINY, "window_size": 8}).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, h, w)).shape == (1, 3, 3 * h, 3 * w)


def test_reflect_pad_equals_torch_reflect_when_defined() -> None:
    x = torch.rand(1, 2, 5, 7)
    torch.testing.assert_close(
        pad_to_multiple(x, 8), F.pad(x, (0, 1, 0, 3), mode="reflect"), rtol=0, atol=0
    )
    small = pad_to_multiple(x, 16)
    assert small.shape == (1, 2, 16, 16)
    torch.testing.assert_close(small[..., :5, :7], x, rtol=0, atol=0)


def test_wrong_channel_count_is_clear() -> None:
    with pytest.raises(ValueError, match=r"HAT expects input of shape \(B, 1, H, W\)"):
        HAT(in_chans=1, **TINY)(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"upsampler": "bicubic"}, "unknown upsampler 'bicubic'"),
        ({"upsampler": "", "upscale": 2}, "needs upscale=1"),
        ({"upsampler": "nearest+conv", "upscale": 3}, "nearest\\+conv supports"),
        ({"in_chans": 2}, "in_chans must be 1 or 3"),
        ({"window_size": 6, "overlap_ratio": 0.5}, "must be even"),
        ({"resi_connection": "3conv"}, "unknown resi_connection '3conv'"),
        ({"norm": "group"}, "unknown norm 'group'"),
        ({"num_heads": (2,)}, "differ in length"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HAT(**{**TINY, **kwargs})


# --------------------------------------------------------------------------- presets, loading

# Parameter counts, cross-checked once against spandrel's HAT built from the same
# kwargs (equal for every pixelshuffle preset). Published: HAT-S x4 9.6M and
# HAT x4 20.8M (XPixelGroup/HAT README), HAT-L x4 40.8M (HAT paper, Table 5 of
# the TPAMI version). The i-LN paper states no counts for HAT_1/HAT_2.
PARAM_COUNTS = {
    "hat_s_x2": 9_473_471,
    "hat_s_x3": 9_658_111,
    "hat_s_x4": 9_621_183,
    "hat_x2": 20_624_795,
    "hat_x3": 20_809_435,
    "hat_x4": 20_772_507,
    "hat_l_x2": 40_698_863,
    "hat_l_x3": 40_883_503,
    "hat_l_x4": 40_846_575,
    "hat_1_x2": 4_476_095,
    "hat_1_x4": 4_623_807,
    "hat_1_dn": 4_273_887,
    "hat_1_derain": 4_273_887,
    "hat_1_car": 4_270_429,
    "hat_2_x4": 9_621_183,
    "hat_dagger_x2": 20_624_795,
    "hat_dagger_x4": 20_772_507,
}
PUBLISHED_MILLIONS = {"hat_s_x4": 9.6, "hat_x4": 20.8, "hat_l_x4": 40.8}


@functools.cache
def _meta_model(name: str) -> HAT:
    """Presets built on the meta device: shapes without memory or init cost."""
    with torch.device("meta"):
        return HAT(**PRESETS[name])


def test_presets_build_with_published_parameter_counts() -> None:
    assert set(PRESETS) == set(PARAM_COUNTS)
    for name in PRESETS:
        model = _meta_model(name)
        count = sum(p.numel() for p in model.parameters())
        assert count == PARAM_COUNTS[name], name
        if name in PUBLISHED_MILLIONS:
            assert round(count / 1e6, 1) == PUBLISHED_MILLIONS[name], name
    assert PRESETS["hat_dagger_x4"]["norm"] == "iln" and PRESETS["hat_dagger_x4"]["stdnorm"]
    assert PRESET_TASKS["hat_1_dn"] == "dn" and PRESET_TASKS["hat_1_car"] == "car"
    assert PRESET_TASKS["hat_1_derain"] == "dr" and PRESET_TASKS["hat_x4"] == "sr"


def test_hat_1_matches_table_12() -> None:
    kw = PRESETS["hat_1_x4"]
    assert kw["embed_dim"] == 96 and kw["depths"] == (6,) * 6 and kw["num_heads"] == (6,) * 6
    assert kw["window_size"] == 16 and kw["mlp_ratio"] == 2.0
    assert kw["compress_ratio"] == 24 and kw["squeeze_factor"] == 24
    assert kw["overlap_ratio"] == 0.5 and kw["conv_scale"] == 0.01


def test_detect_recovers_every_preset() -> None:
    for name, kwargs in PRESETS.items():
        found = detect(_meta_model(name).state_dict())
        assert found is not None, name
        arch = {k: v for k, v in kwargs.items() if k not in ("conv_scale", "norm", "stdnorm")}
        for key, value in arch.items():
            assert found[key] == value, (name, key, found[key], value)


def test_detect_reads_norm_and_rejects_other_layouts(spandrel_archs) -> None:
    assert detect(HAT(norm="bn", **TINY).state_dict())["norm"] == "bn"
    assert detect(HAT(norm="rms", **TINY).state_dict())["norm"] == "rms"
    assert "norm" not in detect(HAT(norm="iln", **TINY).state_dict())
    swinir = spandrel_archs.SwinIR.SwinIR(embed_dim=12, depths=[1], num_heads=[2], window_size=4)
    assert detect(swinir.state_dict()) is None
    official = _spandrel_hat(spandrel_archs, 2, 3, TINY).state_dict()
    found = detect(official)
    assert found is not None and found["window_size"] == 4 and found["compress_ratio"] == 2


def test_official_buffers_are_validated(spandrel_archs) -> None:
    official = _spandrel_hat(spandrel_archs, 2, 3, TINY).state_dict()
    other_window = HAT(upscale=2, **{**TINY, "window_size": 8})
    with pytest.raises(CheckpointMismatchError, match="relative_position_index_SA"):
        prepare_state_dict(other_window, official)
    other_overlap = HAT(upscale=2, **{**TINY, "overlap_ratio": 1.0})
    tampered = dict(official)
    tampered.pop("relative_position_index_SA")
    with pytest.raises(CheckpointMismatchError, match="relative_position_index_OCA"):
        prepare_state_dict(other_overlap, tampered)
    assert not any(k in HAT(**TINY).state_dict() for k in OFFICIAL_BUFFER_KEYS)


def test_official_file_loads_through_registry(spandrel_archs, tmp_path) -> None:
    """An official-layout HAT file (params_ema, with its index buffers) is detected and loads."""
    ref = _spandrel_hat(spandrel_archs, 3, 3, {**TINY, "window_size": 8})
    path = tmp_path / "HAT_official.pth"
    torch.save({"params_ema": ref.state_dict()}, path)
    model, meta = load_checkpoint_model(path)
    assert isinstance(model, HAT) and meta["arch"] == "hat" and meta["norm"] == "ln"
    x = torch.rand(1, 3, 10, 13)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() < 1e-5


def test_iln_checkpoint_round_trip(tmp_path) -> None:
    """irformer's metadata keeps an i-LN HAT from loading as LN (same keys)."""
    model = build_model("hat", norm="iln", stdnorm=True, upscale=2, **TINY).eval()
    _randomize(model)
    path = save_model_weights(tmp_path / "hat_iln.safetensors", model)
    loaded, meta = load_checkpoint_model(path)
    assert meta["norm"] == "iln" and loaded.norm_name == "iln" and loaded.stdnorm
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="norm"):
        load_checkpoint_model(path, norm="ln")


@pytest.mark.parametrize("norm", ["ln", "iln", "in", "bn", "ln_rs"])
def test_chunked_exact_path_equals_plain(norm: str) -> None:
    """engine.infer's bounded-memory path chunks HABs and OCABs; the output is unchanged."""
    model = HAT(norm=norm, upscale=2, **TINY).eval()
    _randomize(model)
    x = torch.rand(2, 3, 13, 18)
    with torch.no_grad():
        plain = model(x)
        for windows, tokens in ((1, None), (3, 20)):
            with execution_context(windows_per_chunk=windows, tokens_per_chunk=tokens):
                assert current_execution().windows_per_chunk == windows
                chunked = model(x)
            torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    assert current_execution().windows_per_chunk is None


@pytest.mark.parametrize(("ws", "ows"), [(16, 24), (4, 6), (8, 12)])
def test_overlap_index_quirk_is_a_bijection(ws: int, ows: int) -> None:
    """The official OCA index has negative entries (wrapping around the table), yet maps
    each relative offset to its own table entry: nothing is shared or left unused."""
    idx = overlap_relative_position_index(ws, ows)
    table = (ws + ows - 1) ** 2
    assert idx.shape == (ws * ws, ows * ows) and idx.min() < 0 and idx.max() < table
    axis_q, axis_k = torch.arange(ws), torch.arange(ows)
    dy = axis_k.repeat_interleave(ows)[None, :] - axis_q.repeat_interleave(ws)[:, None]
    dx = axis_k.repeat(ows)[None, :] - axis_q.repeat(ws)[:, None]
    pairs = set(zip((dy * 1000 + dx).flatten().tolist(), (idx % table).flatten().tolist()))
    offsets = {p[0] for p in pairs}
    entries = {p[1] for p in pairs}
    assert len(pairs) == len(offsets) == len(entries) == table


class _RecordingOperands(AttentionOperands):
    """Quantising operands that only record the shapes they see."""

    quantizes = True

    def __init__(self, seen: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.seen = seen

    def q(self, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(t.shape))
        return t

    k = attn = v = q


def test_ocab_quant_hooks_use_the_explicit_path() -> None:
    """Identity quantisers on q/k/attn/v: the explicit matmul path equals the fused one."""
    model = HAT(upscale=2, **TINY).eval()
    _randomize(model)
    x = torch.rand(1, 3, 8, 12)
    with torch.no_grad():
        fused = model(x)
        seen: list[tuple[int, ...]] = []
        for layer in model.layers:
            layer.residual_group.overlap_attn.operands = _RecordingOperands(seen)
        explicit = model(x)
    # q (6 windows, 2 heads, 16, 8), k/v (.., 36, 8), attn (.., 16, 36) in the first OCAB
    assert seen[:4] == [(6, 2, 16, 8), (6, 2, 36, 8), (6, 2, 16, 36), (6, 2, 36, 8)]
    assert len(seen) == 8
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-6)
