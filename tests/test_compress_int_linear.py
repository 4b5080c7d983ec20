"""Integer Linears (irformer.compress.int_linear): int8 matmuls on the grid indices give the
fake-quantised model's outputs up to float rounding, from a model or from a packed file."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from irformer.archs import build_model
from irformer.compress.fused import fused_kernel_available, rotated_indices
from irformer.compress.int_linear import IntegerLinear, integer_linears_
from irformer.compress.methods import method_config, quantize_model
from irformer.compress.methods.base import quant_linears
from irformer.compress.pack import load_packed, read_packed_indices, save_packed

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        shutil.which("c++") is None and shutil.which("g++") is None,
        reason="no C++ compiler on PATH: the fused kernel cannot be built here",
    ),
]


@pytest.fixture(scope="module", autouse=True)
def kernel_built() -> None:
    if not fused_kernel_available():
        pytest.fail("the fused kernel did not build on a machine with a compiler")


def tiny_swinir() -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        "swinir_light_x2", norm="ln", embed_dim=12, depths=(2, 2), num_heads=(2, 2)
    ).eval()


CASES = [
    ("compsrt", 4, {}),  # rotated, 12 -> 16 padded (the rank-4 correction)
    ("compsrt", 2, {"rotation": "exact"}),  # dense Paley rotation, no padding
    ("compsrt", 8, {}),  # 8-bit indices shifted into int8
    ("compsrt", 3, {"prune": 0.4}),  # pruned: mask matmul, zeros kept
    ("dquant2d", 4, {}),  # no rotation; qkv with three bound groups
]


@pytest.mark.parametrize(("method", "bits", "over"), CASES)
def test_integer_model_equals_fake_quantised(method: str, bits: int, over: dict) -> None:
    model = tiny_swinir()
    calib = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = method_config(method, wbits=bits, abits=bits, dqc_iters=0, **over)
    qmodel = quantize_model(model, cfg, calib).model
    integer = copy.deepcopy(qmodel)
    names = integer_linears_(integer)
    assert len(names) == 16 and all(
        isinstance(integer.get_submodule(n), IntegerLinear) for n in names
    )
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, out = qmodel(x), integer(x)
    # Same grid indices; a value within float rounding of a rounding boundary may
    # take the neighbouring level (the fused transform sums in another order).
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert float((out - ref).abs().mean()) < 1e-6


def test_integer_layer_alone_matches(tmp_path: Path) -> None:
    """One layer, exactly the QuantLinear's function; and from a packed file's indices."""
    model = tiny_swinir()
    calib = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = method_config("compsrt", wbits=4, abits=4, dqc_iters=0, prune=0.4)
    qmodel = quantize_model(model, cfg, calib).model
    name, ql = quant_linears(qmodel)[0]
    x = torch.randn(50, ql.in_features)
    with torch.no_grad():
        torch.testing.assert_close(IntegerLinear(ql)(x), ql(x), rtol=0, atol=1e-5)
    path = tmp_path / "m.safetensors"
    save_packed(qmodel, cfg, path)
    loaded = load_packed(path, model)
    with pytest.raises(ValueError, match="already dequantised"):
        IntegerLinear(dict(quant_linears(loaded))[name])
    integer_linears_(loaded, read_packed_indices(path))
    y = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(y), qmodel(y), rtol=0, atol=1e-4)


def test_indices_kernel() -> None:
    x = torch.randn(7, 10)
    idx = rotated_indices(x, 0.25, -1.0, 3, None)
    ref = torch.clamp(torch.round((x + 1.0) / 0.25), 0, 7).to(torch.int8)
    assert idx.dtype == torch.int8 and torch.equal(idx, ref)
    eight = rotated_indices(x, 0.01, -1.0, 8, None)
    assert torch.equal(eight.int() + 128, torch.clamp(torch.round((x + 1.0) / 0.01), 0, 255).int())


def test_layers_without_an_integer_form_stay_fake_quantised() -> None:
    model = tiny_swinir()
    calib = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    noisy = quantize_model(model, method_config("noisyquant", wbits=4, abits=4), calib).model
    assert integer_linears_(noisy) == []
    ptq = quantize_model(model, method_config("ptq4vit", wbits=4, abits=4), calib).model
    names = integer_linears_(ptq)
    assert names and not any(n.endswith("fc2") for n in names)  # twin-uniform post-GELU
