"""SRFormer: fidelity to the official code (stored fixtures), the norm matrix, presets.

spandrel has no SRFormer, so ``tests/fixtures/srformer/*.safetensors`` hold the
outputs of the official implementation, run once outside this repository:
``basicsr/archs/srformer_arch.py`` of github.com/HVision-NKU/SRFormer (the
authors' repository linked from the paper) at commit
d0c2da6e298a6170bd1466a05f2df305b24f4725, with ``basicsr.utils.registry`` and
``arch_util`` (``to_2tuple``, ``trunc_normal_``) stubbed out. For each tiny
config (stored as JSON in the file's ``config`` metadata: every upsampler,
in_chans 1 and 3, windows 6/8/12 -- 6 exercises the official ``-shift // 2``
mask quirk that the released window-22 models also hit --, img_range 1 and
255, 1conv/3conv, input sizes that are not window multiples, training sizes
equal to and different from the padded input), the official model got seeded
random weights on an int8 grid (``param.<key>`` = int8, value = int8 /
2**exponent, exponents in the ``exponents`` metadata; exact in float32 and
float64, and a quarter of the size), a seeded random input (``input``) and was
run in float64 (``expected``). ``aligned_relative_position_index`` (block 0)
and ``attn_mask`` (block 1, for the padded input size, int8 0/-100) are the
official buffers, to check ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from irformer.archs import SIZE_DEPENDENT_BUFFERS, drct, srformer, swinir
from irformer.archs.attention import AttentionOperands
from irformer.archs.srformer import PRESETS, SRFormer, detect
from irformer.archs.windows import aligned_relative_position_index, permuted_window_mask

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "srformer"
FIXTURE_NAMES = (
    "ps_x2_rgb",
    "psd_x3_gray",
    "nc_x4_rgb_w12",
    "same_gray_3conv",
    "same_rgb_w6_range255",
)
TINY: dict[str, object] = {
    "img_size": 16,
    "embed_dim": 16,
    "depths": (2,),
    "num_heads": (2,),
    "window_size": 8,
    "mlp_ratio": 2.0,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _load_fixture(name: str) -> tuple[dict[str, object], dict[str, torch.Tensor], dict]:
    """(official constructor config, float32 parameters, other tensors) of one fixture."""
    with safe_open(FIXTURES / f"{name}.safetensors", "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    config = json.loads(meta["config"])
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    exponents = json.loads(meta["exponents"])
    params = {
        key[len("param.") :]: value.float() / 2 ** exponents[key[len("param.") :]]
        for key, value in tensors.items()
        if key.startswith("param.")
    }
    others = {k: v for k, v in tensors.items() if not k.startswith("param.")}
    return config, params, others


def test_fixtures_are_small() -> None:
    files = sorted(FIXTURES.glob("*.safetensors"))
    assert {f.stem for f in files} == set(FIXTURE_NAMES)
    assert sum(f.stat().st_size for f in files) < 1_000_000


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_matches_official_outputs(name: str) -> None:
    config, params, tensors = _load_fixture(name)
    model = SRFormer(**config).eval()
    assert set(model.state_dict()) == set(params)
    for key, value in model.state_dict().items():
        assert value.shape == params[key].shape, key
    model.load_state_dict(params, strict=True)
    x, expected = tensors["input"], tensors["expected"]
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5
    # The body must shape the output, or the comparison proves little.
    baseline = x if config["upscale"] == 1 else expected.mean()
    assert (expected - baseline).abs().max().item() > 0.1


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_buffers_match_official(name: str) -> None:
    config, _, tensors = _load_fixture(name)
    ws = int(config["window_size"])
    assert torch.equal(
        aligned_relative_position_index(ws), tensors["aligned_relative_position_index"].long()
    )
    h, w = tensors["input"].shape[2:]
    mask = permuted_window_mask(h + (-h) % ws, w + (-w) % ws, ws, ws // 2, torch.device("cpu"))
    assert torch.equal(mask, tensors["attn_mask"].float())


def test_quantisable_path_equals_fused_path() -> None:
    config, params, tensors = _load_fixture("ps_x2_rgb")
    model = SRFormer(**config).eval()
    model.load_state_dict(params)

    class IdentityQuantizers(AttentionOperands):
        quantizes = True  # takes the explicit (quantisable) matmul path

    for module in model.modules():
        if isinstance(module, srformer.PermutedWindowAttention):
            module.operands = IdentityQuantizers()
    with torch.no_grad():
        got = model(tensors["input"])
    assert (got - tensors["expected"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_detect_reads_official_files(name: str) -> None:
    config, params, _ = _load_fixture(name)
    state = dict(params)
    # Official files also carry the size-dependent buffers (here for a 4x4-window patch).
    ws = int(config["window_size"])
    official_mask = permuted_window_mask(4 * ws, 4 * ws, ws, ws // 2, torch.device("cpu"))
    state["layers.0.residual_group.blocks.1.attn_mask"] = official_mask
    found = detect(state)
    assert found is not None
    for key in ("in_chans", "embed_dim", "depths", "num_heads", "window_size", "upscale"):
        assert found[key] == config[key], key
    assert found["upsampler"] == config["upsampler"]
    assert found["resi_connection"] == config["resi_connection"]
    assert found["img_size"] == 4 * ws
    SRFormer(**{**found, "img_range": config["img_range"]}).load_state_dict(params, strict=True)
    # Neither SwinIR's nor DRCT's detector claims an SRFormer file, nor ours theirs.
    assert swinir.detect(state) is None
    assert drct.detect(state) is None
    assert (
        detect(swinir.SwinIR(embed_dim=12, depths=(2,), num_heads=(2,), upscale=1).state_dict())
        is None
    )


def test_state_dict_has_no_size_dependent_buffers() -> None:
    keys = SRFormer(**TINY).state_dict().keys()
    assert not [k for k in keys if k.endswith((*SIZE_DEPENDENT_BUFFERS, "mean", "std"))]


@pytest.mark.parametrize("shift", [0, 4])
def test_iln_block_is_homogeneous(shift: int) -> None:
    """i-LN blocks: block(a*x) == a*block(x); LN* alone is not homogeneous."""
    torch.manual_seed(1)
    x = 10.0 * torch.randn(2, 16 * 16, 16)  # eps (1e-4) negligible against var
    outs = {}
    for norm in ("iln", "ln_star"):
        block = srformer.PSABlock(16, 2, window_size=8, shift_size=shift, mlp_ratio=2.0, norm=norm)
        torch.manual_seed(2)
        for p in block.parameters():
            nn.init.normal_(p, std=0.3)
        with torch.no_grad():
            outs[norm] = (block(3.0 * x, (16, 16)), 3.0 * block(x, (16, 16)))
    y1, y2 = outs["iln"]
    assert (y1 - y2).abs().max().item() < 1e-4 * y2.abs().max().item()
    z1, z2 = outs["ln_star"]
    assert (z1 - z2).abs().max().item() > 1e-2 * z2.abs().max().item()


@pytest.mark.parametrize(
    ("upsampler", "upscale", "in_chans", "size"),
    [("pixelshuffle", 3, 1, (9, 17)), ("nearest+conv", 4, 3, (8, 8)), ("", 1, 3, (5, 21))],
)
def test_any_input_size(upsampler: str, upscale: int, in_chans: int, size: tuple[int, int]) -> None:
    model = SRFormer(**TINY, upscale=upscale, upsampler=upsampler, in_chans=in_chans).eval()
    with torch.no_grad():
        out = model(torch.rand(1, in_chans, *size))
    assert out.shape == (1, in_chans, size[0] * upscale, size[1] * upscale)


@pytest.mark.parametrize("stdnorm", [False, True])
def test_same_size_head_is_a_residual_on_the_input(stdnorm: bool) -> None:
    model = SRFormer(**TINY, upscale=1, upsampler="", stdnorm=stdnorm).eval()
    nn.init.zeros_(model.conv_last.weight)
    nn.init.zeros_(model.conv_last.bias)
    x = torch.rand(1, 3, 11, 9)
    with torch.no_grad():
        assert torch.allclose(model(x), x, atol=1e-6)


def test_errors_name_the_offending_value() -> None:
    with pytest.raises(ValueError, match="window_size must be even"):
        SRFormer(**{**TINY, "window_size": 7})
    with pytest.raises(ValueError, match="dim 18"):
        SRFormer(**{**TINY, "embed_dim": 18})
    with pytest.raises(ValueError, match="x4 only"):
        SRFormer(**TINY, upsampler="nearest+conv", upscale=2)
    with pytest.raises(ValueError, match="unknown upsampler 'bicubic'"):
        SRFormer(**TINY, upsampler="bicubic")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        SRFormer(**TINY, in_chans=1, upscale=1)(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # SRFormer paper / README: 10.40M (x2); SRFormer-light: 853K, 861K, 873K.
        ("srformer_x2", 10.40e6),
        ("srformer_light_x2", 853e3),
        ("srformer_light_x3", 861e3),
        ("srformer_light_x4", 873e3),
    ],
)
def test_preset_param_counts(name: str, expected: float) -> None:
    count = sum(p.numel() for p in SRFormer(**PRESETS[name]).parameters())
    assert abs(count - expected) <= 0.0005 * expected + 500


def test_presets() -> None:
    assert set(srformer.PRESET_TASKS) == set(PRESETS)
    for name, kwargs in PRESETS.items():
        assert name.endswith(f"_x{kwargs['upscale']}"), name
    # i-LN Table 11: SRFormer_1 = embed 60, depths/heads (6,)*4, window 16, MLP 2,
    # the efficient-SR configuration (= SRFormer-light).
    assert PRESETS["srformer_1_x4"] == PRESETS["srformer_light_x4"]
    light = PRESETS["srformer_1_x4"]
    assert light["embed_dim"] == 60 and light["window_size"] == 16
    assert light["depths"] == (6,) * 4 and light["num_heads"] == (6,) * 4
    assert light["mlp_ratio"] == 2.0
    # The released DF2K checkpoints: window 22 -> a 21^2-row bias table.
    model = SRFormer(**{**PRESETS["srformer_df2k_x4"], "depths": (1,), "num_heads": (6,)})
    table = model.layers[0].residual_group.blocks[0].attn.relative_position_bias_table
    assert table.shape == (21 * 21, 6)


def test_official_file_loads_through_the_registry(tmp_path: Path) -> None:
    """A BasicSR-style file (params, with the official buffers) is detected and loads."""
    from irformer.archs import load_checkpoint_model

    config, params, tensors = _load_fixture("psd_x3_gray")
    state = dict(params)
    ws = int(config["window_size"])
    index = tensors["aligned_relative_position_index"].long()
    state["layers.0.residual_group.blocks.0.attn.aligned_relative_position_index"] = index
    state["layers.0.residual_group.blocks.1.attn.aligned_relative_position_index"] = index
    state["layers.0.residual_group.blocks.1.attn_mask"] = permuted_window_mask(
        3 * ws, 3 * ws, ws, ws // 2, torch.device("cpu")
    )
    path = tmp_path / "srformer_official.pth"
    torch.save({"params": state}, path)
    model, meta = load_checkpoint_model(path)
    assert meta["arch"] == "srformer"
    assert meta["scale"] == 3
    with torch.no_grad():
        got = model(tensors["input"])
    assert (got - tensors["expected"]).abs().max().item() < 1e-5
    # A wrong window layout in the file is refused, not silently re-derived.
    state["layers.0.residual_group.blocks.0.attn.aligned_relative_position_index"] = index.flip(0)
    torch.save({"params": state}, path)
    with pytest.raises(ValueError, match="aligned_relative_position_index"):
        load_checkpoint_model(path)
