"""``--format official``: LN models spandrel 0.4.2 reads and runs identically; i-LN never.

spandrel (chaiNNer's model loader) is the independent reader: it detects the
architecture from the keys, builds its own copy of the original code and loads
the file strictly. Its outputs must equal irformer's. Files it must never run
as a LayerNorm model -- an i-LN model in any irformer format -- are refused by
the exporter or rejected by spandrel.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from irformer.archs import build_model, save_model_weights
from irformer.archs.windows import build_permuted_window_mask
from irformer.export import OfficialFormatError, export_model, official_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

SWIN = {"embed_dim": 12, "depths": (2,), "num_heads": (2,), "mlp_ratio": 2.0}
CASES: dict[str, tuple[str, dict[str, object]]] = {
    "swinir_light_x2": (
        "swinir",
        {**SWIN, "img_size": 16, "window_size": 4, "upscale": 2, "upsampler": "pixelshuffledirect"},
    ),
    "swinir_classical_x3_grey": (
        "swinir",
        {
            **SWIN,
            "img_size": 16,
            "in_chans": 1,
            "window_size": 4,
            "upscale": 3,
            "upsampler": "pixelshuffle",
        },
    ),
    "swinir_car_w7": (
        "swinir",
        {
            **SWIN,
            "img_size": 14,
            "window_size": 7,
            "img_range": 255.0,
            "upscale": 1,
            "upsampler": "",
        },
    ),
    "swinir_realsr_x4": (
        "swinir",
        {**SWIN, "img_size": 16, "window_size": 4, "upscale": 4, "upsampler": "nearest+conv"},
    ),
    "hat_x2": (
        "hat",
        {
            "embed_dim": 16,
            "depths": (2,),
            "num_heads": (2,),
            "window_size": 4,
            "compress_ratio": 2,
            "squeeze_factor": 4,
            "mlp_ratio": 2.0,
            "upscale": 2,
        },
    ),
    "drct_x2": (
        "drct",
        {
            "img_size": 32,
            "embed_dim": 16,
            "depths": (1,),
            "num_heads": (4,),
            "window_size": 8,
            "gc": 6,
            "mlp_ratio": 2.0,
            "upscale": 2,
        },
    ),
}


def perturbed(arch: str, kwargs: dict[str, object], norm: str = "ln") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, norm=norm, drop_path_rate=0.0, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model_loader(spandrel_archs):
    from spandrel import ModelLoader

    return ModelLoader()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("case", list(CASES))
def test_spandrel_reads_official_export(case: str, suffix: str, model_loader, tmp_path: Path):
    arch, kwargs = CASES[case]
    model = perturbed(arch, kwargs)
    path = tmp_path / f"{case}{suffix}"
    export_model(model, dict(model.irformer_meta), path, fmt="official")
    descriptor = model_loader.load_from_file(path)
    assert descriptor.architecture.id.lower() == arch
    assert descriptor.scale == model.upscale
    assert descriptor.input_channels == model.in_chans
    reference = descriptor.model.eval()
    ws = model.window_size
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, model.in_chans, 2 * ws, 3 * ws, generator=gen)
    with torch.no_grad():
        assert (reference(x) - model(x)).abs().max().item() < 1e-5
    if arch != "drct":  # the original DRCT pads in its test loop, not in forward
        x = torch.rand(1, model.in_chans, 2 * ws + 3, ws + 1, generator=gen)
        with torch.no_grad():
            assert (reference(x) - model(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("norm", ["iln", "ln_star", "rms"])
def test_official_export_refuses_other_norms(norm: str, tmp_path: Path) -> None:
    arch, kwargs = CASES["swinir_light_x2"]
    model = perturbed(arch, kwargs, norm=norm)
    path = tmp_path / "x.pth"
    with pytest.raises(OfficialFormatError, match=f"norm '{norm}'.*run it as a LayerNorm model"):
        export_model(model, dict(model.irformer_meta), path, fmt="official")
    assert not path.exists()


@pytest.mark.parametrize(
    ("case", "override", "reason"),
    [
        ("swinir_light_x2", {"stdnorm": True}, "stdnorm"),
        ("hat_x2", {"upscale": 1, "upsampler": ""}, "upsampler ''"),
        ("swinir_classical_x3_grey", {"num_feat": 32}, "num_feat=32"),
        ("hat_x2", {"conv_scale": 0.1}, "conv_scale"),
        ("swinir_car_w7", {"img_range": 1.0}, "img_range"),
    ],
)
def test_official_export_refuses_what_readers_would_misread(
    case: str, override: dict[str, object], reason: str, tmp_path: Path
) -> None:
    arch, kwargs = CASES[case]
    model = perturbed(arch, {**kwargs, **override})
    with pytest.raises(OfficialFormatError, match=reason):
        export_model(model, dict(model.irformer_meta), tmp_path / "x.pth", fmt="official")


@pytest.mark.parametrize("norm", ["iln", "ln"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_spandrel_rejects_irformer_native_files(
    norm: str, suffix: str, model_loader, tmp_path: Path
) -> None:
    """irformer's own files hold no size-dependent buffers, so spandrel cannot mistake
    an i-LN file (whose keys are LayerNorm's) for an official LayerNorm model."""
    from spandrel import UnsupportedModelError

    for case in ("swinir_light_x2", "hat_x2", "drct_x2"):
        arch, kwargs = CASES[case]
        path = tmp_path / f"{case}_{norm}{suffix}"
        save_model_weights(path, perturbed(arch, kwargs, norm=norm))
        with pytest.raises(UnsupportedModelError):
            model_loader.load_from_file(path)


def test_srformer_official_layout_matches_the_original_registration(tmp_path: Path) -> None:
    """No SRFormer in spandrel: the keys follow the original code (``PSA`` registers
    ``aligned_relative_position_index``, ``PSA_Block`` an ``attn_mask`` for shifted
    blocks only, computed at the training patch) and irformer's own strict load of
    the official layout checks the index buffers and reproduces the model."""
    kwargs = {"img_size": 16, "embed_dim": 16, "depths": (2,), "num_heads": (2,),
              "window_size": 8, "mlp_ratio": 2.0, "upscale": 2,
              "upsampler": "pixelshuffledirect"}  # fmt: skip
    model = perturbed("srformer", kwargs)
    state = official_state_dict(model, model.irformer_meta)
    blocks = "layers.0.residual_group.blocks"
    assert f"{blocks}.0.attn_mask" not in state
    assert torch.equal(state[f"{blocks}.1.attn_mask"], build_permuted_window_mask(16, 16, 8, 4))
    assert state[f"{blocks}.0.attn.aligned_relative_position_index"].shape == (64, 16)
    fresh = build_model("srformer", **kwargs, drop_path_rate=0.0).eval()
    fresh.load_state_dict(state)  # strict: every key is the original's
    x = torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
