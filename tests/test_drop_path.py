"""Stochastic depth: the originals' per-block rates, draws and merge semantics.

The train-mode comparisons seed the global generator identically before each
forward, so equal outputs prove the same masks are drawn in the same order and
applied to the same branches (HAT's conv branch is never dropped).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from irformer.archs import build_model
from irformer.archs.checkpoints import prepare_state_dict
from irformer.archs.drct import DRCT
from irformer.archs.hat import HAT
from irformer.archs.layers import stochastic_depth_rates
from irformer.archs.srformer import PSABlock
from irformer.archs.swinir import SwinIR, SwinTransformerBlock
from irformer.norms import build_norm, drop_path, merge_residual

SWINIR_TINY = {
    "img_size": 16,
    "embed_dim": 12,
    "depths": (2, 3),
    "num_heads": (2, 3),
    "window_size": 4,
    "mlp_ratio": 2.0,
}
HAT_TINY = {
    "embed_dim": 16,
    "depths": (2, 3),
    "num_heads": (2, 4),
    "window_size": 4,
    "compress_ratio": 2,
    "squeeze_factor": 4,
    "overlap_ratio": 0.5,
    "mlp_ratio": 2.0,
}
DRCT_TINY = {
    "img_size": 16,
    "embed_dim": 16,
    "depths": (2, 3),
    "num_heads": (4, 4),
    "window_size": 4,
    "mlp_ratio": 2.0,
    "gc": 6,
}


def _pair(spandrel_archs: types.ModuleType, arch: str, rate: float) -> tuple[nn.Module, nn.Module]:
    """(spandrel model, irformer model) with equal random weights and drop-path rate."""
    if arch == "swinir":
        kw = {**SWINIR_TINY, "depths": list(SWINIR_TINY["depths"])}
        kw["num_heads"] = list(SWINIR_TINY["num_heads"])
        ref = spandrel_archs.SwinIR.SwinIR(
            upscale=2, upsampler="pixelshuffledirect", drop_path_rate=rate, **kw
        )
        ours: nn.Module = SwinIR(
            upscale=2, upsampler="pixelshuffledirect", drop_path_rate=rate, **SWINIR_TINY
        )
    elif arch == "hat":
        kw = {**HAT_TINY, "depths": list(HAT_TINY["depths"])}
        kw["num_heads"] = list(HAT_TINY["num_heads"])
        ref = spandrel_archs.HAT.HAT(upscale=2, drop_path_rate=rate, **kw)
        ours = HAT(upscale=2, drop_path_rate=rate, **HAT_TINY)
    else:
        kw = {"upscale": 2, "upsampler": "pixelshuffle", "drop_path_rate": rate}
        ref = spandrel_archs.DRCT.DRCT(**kw, **DRCT_TINY)
        ours = DRCT(**kw, **DRCT_TINY)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    ours.load_state_dict(prepare_state_dict(ours, ref.state_dict()))
    return ref, ours


def _official_rates(model: nn.Module) -> dict[str, float]:
    """Block name -> drop probability of an official-layout model (Identity = 0)."""
    rates = {}
    for name, module in model.named_modules():
        child = getattr(module, "drop_path", None)
        if isinstance(child, nn.Module) and not name.endswith("overlap_attn"):
            rates[name] = float(getattr(child, "drop_prob", 0.0))
    return rates


def _our_rates(model: nn.Module) -> dict[str, float]:
    return {
        name: module.drop_path
        for name, module in model.named_modules()
        if isinstance(module, (SwinTransformerBlock, PSABlock))
    }


@pytest.mark.parametrize("arch", ["swinir", "hat", "drct"])
def test_block_rates_equal_the_originals(spandrel_archs: types.ModuleType, arch: str) -> None:
    ref, ours = _pair(spandrel_archs, arch, 0.3)
    expected, got = _official_rates(ref), _our_rates(ours)
    assert expected and set(got) == set(expected)
    assert got == expected  # bit-equal floats: the same float32 ramp
    assert max(got.values()) > 0.0


@pytest.mark.parametrize("arch", ["swinir", "hat", "drct"])
def test_train_mode_matches_the_originals(
    spandrel_archs: types.ModuleType, arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if arch == "hat":
        # Official HAT keeps an old timm copy drawing floor(keep + rand): the same
        # Bernoulli masks from another stream. Give it timm's current draw (ours).
        module = sys.modules[spandrel_archs.HAT.HAT.__module__]
        monkeypatch.setattr(
            module,
            "drop_path",
            lambda x, p=0.0, training=False: drop_path(x, p) if training and p else x,
        )
    ref, ours = _pair(spandrel_archs, arch, 0.5)
    ref.train()
    ours.train()
    x = torch.rand(6, 3, 16, 16)
    outputs = []
    for model in (ref, ours):
        torch.manual_seed(11)
        out = model(x)
        out.square().mean().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # The draws matter: another seed gives another output.
    torch.manual_seed(12)
    with torch.no_grad():
        assert not torch.allclose(ours(x), outputs[1])


def test_srformer_rates_follow_the_ramp() -> None:
    model = build_model("srformer_light_x2", drop_path_rate=0.2)
    rates = _our_rates(model)
    ramp = torch.linspace(0, 0.2, sum(model_depths(model))).tolist()
    assert list(rates.values()) == ramp


def model_depths(model: nn.Module) -> list[int]:
    return [len(layer.residual_group.blocks) for layer in model.layers]


@pytest.mark.parametrize("norm", ["ln", "iln"])
def test_merge_drops_whole_samples_and_keeps_the_expectation(norm: str) -> None:
    torch.manual_seed(0)
    nrm = build_norm(norm, 4)
    x = torch.randn(256, 5, 4)
    branch = torch.randn(256, 5, 4)
    side = torch.randn(256, 5, 4)
    stats = nrm.statistics(x)
    full = merge_residual(x, branch, nrm, stats, side=side)
    no_branch = merge_residual(x, torch.zeros_like(branch), nrm, stats, side=side)
    nrm.train()
    out = merge_residual(x, branch, nrm, stats, drop_prob=0.25, side=side)
    # Each sample either lost its whole branch (side kept) or kept it scaled by 1/0.75.
    dropped = torch.isclose(out, no_branch, atol=1e-6).flatten(1).all(1)
    kept_value = no_branch + (full - no_branch) / 0.75
    kept = torch.isclose(out, kept_value, atol=1e-5).flatten(1).all(1)
    assert bool((dropped ^ kept).all())
    assert 0.15 < dropped.float().mean().item() < 0.35
    nrm.eval()
    assert torch.equal(merge_residual(x, branch, nrm, stats, drop_prob=0.25, side=side), full)


def test_rates_and_probabilities_are_validated() -> None:
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.0"):
        stochastic_depth_rates(1.0, (2, 2))
    with pytest.raises(ValueError, match=r"got -0\.1"):
        drop_path(torch.ones(2, 3), -0.1)
    assert stochastic_depth_rates(0.0, (1, 2)) == [[0.0], [0.0, 0.0]]
