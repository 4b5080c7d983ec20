"""Every architecture of the registry x every norm: one matrix, driven by the table.

Also: plain ``model.load_state_dict(official_state_dict)`` for every architecture
(the size-dependent buffers official files carry are checked and dropped by the
model's own load hook, as timm/spandrel users expect).
"""

from __future__ import annotations

import pytest
import torch

from irformer.archs import (
    ARCHITECTURES,
    SIZE_DEPENDENT_BUFFERS,
    CheckpointMismatchError,
    build_model,
)
from irformer.norms import NORM_NAMES, ChannelAffine, HolisticLayerNorm, RescaledLayerNorm

pytestmark = pytest.mark.usefixtures("one_thread")

TINY: dict[str, dict[str, object]] = {
    "swinir": {
        "img_size": 16,
        "embed_dim": 12,
        "depths": (2, 2),
        "num_heads": (2, 3),
        "window_size": 4,
        "mlp_ratio": 2.0,
        "upsampler": "pixelshuffledirect",
        "stdnorm": True,
    },
    "hat": {
        "embed_dim": 16,
        "depths": (2, 2),
        "num_heads": (2, 4),
        "window_size": 4,
        "compress_ratio": 2,
        "squeeze_factor": 4,
        "overlap_ratio": 0.5,
        "mlp_ratio": 2.0,
    },
    "drct": {
        "img_size": 32,
        "embed_dim": 16,
        "depths": (1,),
        "num_heads": (4,),
        "window_size": 8,
        "mlp_ratio": 2.0,
        "gc": 6,
    },
    "srformer": {
        "img_size": 16,
        "embed_dim": 16,
        "depths": (2,),
        "num_heads": (2,),
        "window_size": 8,
        "mlp_ratio": 2.0,
        "upsampler": "pixelshuffledirect",
    },
}
"""Small hyper-parameters per architecture: a new architecture must add a row."""


def test_every_architecture_has_a_row() -> None:
    assert set(TINY) == set(ARCHITECTURES)


@pytest.mark.parametrize("norm", NORM_NAMES)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_arch_norm_matrix(arch: str, norm: str) -> None:
    """Builds, trains one step (forward, backward: finite, non-zero gradients for every
    parameter and the input), keeps the output shape for odd sizes, runs in eval;
    i-LN and ln_rs turn the embedding and final norms into per-channel affines."""
    torch.manual_seed(0)
    model = build_model(arch, norm=norm, upscale=2, **TINY[arch]).train()
    x = torch.rand(2, 3, 11, 17, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 3, 22, 34)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert model.conv_first.weight.grad.abs().sum().item() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    if norm == "iln":
        assert isinstance(model.patch_embed.norm, ChannelAffine)
        assert isinstance(model.norm, ChannelAffine)
        branch_norms = [m for m in model.modules() if isinstance(m, HolisticLayerNorm)]
        assert branch_norms and all(m.rescale for m in branch_norms)
    if norm == "ln_rs":  # Table 3 idx 2: i-LN's roles with per-token statistics
        assert type(model.patch_embed.norm) is ChannelAffine and type(model.norm) is ChannelAffine
        assert any(isinstance(m, RescaledLayerNorm) for m in model.modules())
        assert not any(isinstance(m, HolisticLayerNorm) for m in model.modules())


def _official_state(arch: str, spandrel_archs) -> tuple[torch.nn.Module, dict, dict]:
    """An independent reference model and its state dict as official files hold it
    (with the size-dependent buffers), plus our constructor kwargs."""
    if arch == "swinir":
        kw = {"img_size": 16, "embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4}
        ref = spandrel_archs.SwinIR.SwinIR(**kw, upscale=2, upsampler="pixelshuffledirect")
        ours = {**kw, "upscale": 2, "upsampler": "pixelshuffledirect", "mlp_ratio": 4.0}
    elif arch == "hat":
        kw = {"embed_dim": 16, "depths": [2], "num_heads": [2], "window_size": 4}
        kw |= {"compress_ratio": 2, "squeeze_factor": 4, "mlp_ratio": 2.0}
        ref = spandrel_archs.HAT.HAT(**kw, upscale=2, upsampler="pixelshuffle")
        ours = {**kw, "upscale": 2}
    elif arch == "drct":
        kw = {"img_size": 32, "embed_dim": 16, "depths": [1], "num_heads": [4], "window_size": 8}
        kw |= {"gc": 6, "mlp_ratio": 2.0}
        ref = spandrel_archs.DRCT.DRCT(**kw, upscale=2, upsampler="pixelshuffle")
        ours = {**kw, "upscale": 2}
    else:
        return None, {}, {}  # type: ignore[return-value]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    return ref.eval(), dict(ref.state_dict()), ours


@pytest.mark.parametrize("arch", ["swinir", "hat", "drct"])
def test_plain_load_state_dict_of_official_files(arch: str, spandrel_archs) -> None:
    ref, state, kwargs = _official_state(arch, spandrel_archs)
    assert any(k.rsplit(".", 1)[-1] in SIZE_DEPENDENT_BUFFERS for k in state)
    model = build_model(arch, **kwargs).eval()
    result = model.load_state_dict(state)  # strict, no preprocessing
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() < 1e-5


def test_plain_load_state_dict_srformer_with_official_buffers() -> None:
    """SRFormer (no spandrel model): our weights plus the buffers official files carry."""
    from irformer.archs.windows import aligned_relative_position_index, permuted_window_mask

    model = build_model("srformer", **TINY["srformer"], upscale=2).eval()
    state = dict(model.state_dict())
    ws = 8
    for name, _ in model.named_modules():
        if name.endswith("attn") and ".blocks." in name:
            block = name.removesuffix(".attn")
            state[f"{name}.aligned_relative_position_index"] = aligned_relative_position_index(ws)
            state[f"{block}.attn_mask"] = permuted_window_mask(
                16, 16, ws, ws // 2, torch.device("cpu")
            )
    fresh = build_model("srformer", **TINY["srformer"], upscale=2).eval()
    fresh.load_state_dict(state)
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    state["layers.0.residual_group.blocks.0.attn.aligned_relative_position_index"] = (
        aligned_relative_position_index(4)
    )
    with pytest.raises(CheckpointMismatchError, match="aligned_relative_position_index"):
        fresh.load_state_dict(state)
