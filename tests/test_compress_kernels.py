"""PyTorch's real int8 CPU kernels as a comparison row."""

from __future__ import annotations

import pytest
import torch

from irformer.archs import build_model
from irformer.compress.kernels import dynamic_int8, dynamic_int8_available


@pytest.mark.skipif(not dynamic_int8_available(), reason="no torch.ao dynamic int8 in this build")
def test_dynamic_int8_close_and_original_untouched() -> None:
    torch.manual_seed(0)
    model = build_model("swinir_light_x2", embed_dim=12, depths=(2,), num_heads=(2,)).eval()
    qmodel = dynamic_int8(model)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert float((out - ref).abs().max()) < 1e-3
    assert isinstance(model.layers[0].residual_group.blocks[0].attn.qkv, torch.nn.Linear)
    qkv = qmodel.layers[0].residual_group.blocks[0].attn.qkv
    assert "quantized" in type(qkv).__module__
