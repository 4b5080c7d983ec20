"""Packed quantised models: bit packing, exact save/load, file size = accounting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from irformer.archs import build_model
from irformer.compress.methods import method_config, quantize_model
from irformer.compress.methods.base import quant_linears
from irformer.compress.pack import (
    header_bytes,
    load_packed,
    load_packed_model,
    pack_bits,
    read_packed_metadata,
    save_packed,
    storage_report,
    unpack_bits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(norm: str = "ln") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        "swinir_light_x2", norm=norm, embed_dim=12, depths=(2,), num_heads=(2,)
    ).eval()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_bits_round_trip(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in (1, 7, 8, 1001):
        v = rng.integers(0, 2**bits, n)
        packed = pack_bits(v, bits)
        assert packed.dtype == np.uint8
        assert packed.size == -(-n * bits // 8)
        np.testing.assert_array_equal(unpack_bits(packed, bits, n), v)


def test_pack_bits_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="4-bit"):
        pack_bits(np.array([0, 16]), 4)


def test_pack_bits_layout_is_lsb_first() -> None:
    assert pack_bits(np.array([1, 2]), 4).tolist() == [0x21]
    # 7 = 111, 0 = 000, 1 = 100 (LSB first): bits 0-8 are 1,1,1,0,0,0,1,0 | 0.
    assert pack_bits(np.array([7, 0, 1]), 3).tolist() == [0b01000111, 0]


CASES = [
    ("minmax", 4, {}),
    ("minmax", 8, {}),
    ("compsrt", 3, {"prune": 0.4, "dqc_iters": 0}),
    ("compsrt", 2, {"rotation": "exact", "dqc_iters": 0}),
    ("noisyquant", 4, {}),
    ("ptq4vit", 4, {}),
]


@pytest.mark.parametrize(("method", "bits", "over"), CASES)
def test_save_load_reproduces_outputs_and_size(
    tmp_path: Path, method: str, bits: int, over: dict
) -> None:
    model = tiny_model()
    torch.manual_seed(1)
    calib = torch.rand(2, 3, 16, 16)
    cfg = method_config(method, wbits=bits, abits=bits, **over)
    qmodel = quantize_model(model, cfg, calib).model
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        expected = qmodel(x)
    path = tmp_path / "q.safetensors"
    report = save_packed(qmodel, cfg, path)
    # The file is the accounting plus the safetensors header, to the byte.
    assert path.stat().st_size == header_bytes(path) + report.total_bytes
    loaded = load_packed(path, tiny_model())
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, expected)
    assert storage_report(loaded).total_bytes == report.total_bytes
    meta = read_packed_metadata(path)
    assert meta["quant_config"]["method"] == method
    # The skeleton can also come from the stored irformer metadata.
    with torch.no_grad():
        assert torch.equal(load_packed_model(path)(x), expected)


def test_pruned_accounting_and_zeros(tmp_path: Path) -> None:
    model = tiny_model()
    calib = torch.rand(2, 3, 16, 16)
    cfg = method_config("compsrt", wbits=4, abits=4, prune=0.4, dqc_iters=0)
    qmodel = quantize_model(model, cfg, calib).model
    report = storage_report(qmodel)
    assert report.nominal_bits_per_param == pytest.approx(3.4, abs=0.01)
    for name, ql in quant_linears(qmodel):
        wq = ql.weight_quantizer
        dom = wq.quantizer.dequantize(wq.indices(ql.weight)) * wq.mask
        # 40% of the rotated weight is exactly zero after quantisation.
        assert float((dom == 0).float().mean()) >= 0.4 - 1e-3, name
        layer = next(s for s in report.layers if s.name == name)
        assert layer.kept == int(wq.mask.sum())
        # 4 bits per kept index + 1 mask bit per entry of the padded domain.
        assert layer.index_bytes == -(-layer.kept * 4 // 8)
        assert layer.mask_bytes == -(-layer.domain_numel // 8)
    # 12 -> 16 padding costs 16/12: stored bits/param = 3.4 * 16/12 (+ byte rounding).
    assert report.bits_per_quantized_param == pytest.approx(3.4 * 16 / 12, rel=0.01)
    path = tmp_path / "p.safetensors"
    save_packed(qmodel, cfg, path)
    loaded = load_packed(path, tiny_model())
    for (_, a), (_, b) in zip(quant_linears(qmodel), quant_linears(loaded), strict=True):
        assert torch.equal(a.weight_quantizer.mask, b.weight_quantizer.mask)


def test_unpruned_bits_per_param_exact_hadamard(tmp_path: Path) -> None:
    model = tiny_model()
    cfg = method_config("compsrt", wbits=4, abits=4, rotation="exact", dqc_iters=0)
    qmodel = quantize_model(model, cfg, torch.rand(2, 3, 16, 16)).model
    report = storage_report(qmodel)
    # 12 and 24 are Hadamard orders: no padding, exactly 4 bits per weight.
    assert report.bits_per_quantized_param == 4.0
    assert report.nominal_bits_per_param == 4.0


def test_load_rejects_wrong_skeleton(tmp_path: Path) -> None:
    model = tiny_model()
    cfg = method_config("minmax", wbits=4, abits=4)
    qmodel = quantize_model(model, cfg, torch.rand(2, 3, 16, 16)).model
    path = tmp_path / "q.safetensors"
    save_packed(qmodel, cfg, path)
    other = build_model("swinir_light_x2", embed_dim=12, depths=(2, 2), num_heads=(2, 2))
    with pytest.raises(ValueError, match="quantised layers differ"):
        load_packed(path, other)
    with pytest.raises(FileNotFoundError):
        read_packed_metadata(tmp_path / "missing.safetensors")


def test_save_rejects_loaded_model(tmp_path: Path) -> None:
    model = tiny_model()
    cfg = method_config("minmax", wbits=4, abits=4)
    qmodel = quantize_model(model, cfg, torch.rand(2, 3, 16, 16)).model
    path = tmp_path / "q.safetensors"
    save_packed(qmodel, cfg, path)
    with pytest.raises(ValueError, match="already dequantised"):
        save_packed(load_packed(path, tiny_model()), cfg, tmp_path / "again.safetensors")


def test_channel_pruning_packs_a_row_mask(tmp_path: Path) -> None:
    """Channel pruning (CompSRT section 7.3): whole rows of the rotated weight are
    zero, the file keeps one bit per row instead of a dense mask, and the packed
    model reproduces the outputs."""
    model = tiny_model()
    cfg = method_config("compsrt", wbits=2, abits=2, prune=0.5, prune_mode="channel", dqc_iters=0)
    qmodel = quantize_model(model, cfg, torch.rand(2, 3, 16, 16)).model
    report = storage_report(qmodel)
    for name, ql in quant_linears(qmodel):
        wq = ql.weight_quantizer
        dom = wq.quantizer.dequantize(wq.indices(ql.weight)) * wq.mask
        zero_rows = (dom == 0).all(dim=1)
        assert float(zero_rows.float().mean()) == pytest.approx(0.5), name
        layer = next(s for s in report.layers if s.name == name)
        assert layer.mask_kind == "rows"
        assert layer.mask_bytes == -(-layer.domain_shape[0] // 8)
    # 2 bits on half the entries + 1 bit per 16-entry row.
    assert report.nominal_bits_per_param == pytest.approx(1.0 + 1 / 16)
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        expected = qmodel(x)
    path = tmp_path / "ch.safetensors"
    save_packed(qmodel, cfg, path)
    assert path.stat().st_size == header_bytes(path) + report.total_bytes
    loaded = load_packed(path, tiny_model())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    for (_, a), (_, b) in zip(quant_linears(qmodel), quant_linears(loaded), strict=True):
        assert torch.equal(a.weight_quantizer.mask, b.weight_quantizer.mask)


def test_official_pruning_is_refused_by_the_packer(tmp_path: Path) -> None:
    model = tiny_model()
    cfg = method_config("compsrt", wbits=3, abits=3, prune=0.4, prune_mode="official", dqc_iters=0)
    qmodel = quantize_model(model, cfg, torch.rand(2, 3, 16, 16)).model
    with pytest.raises(ValueError, match="'official' cannot be packed"):
        save_packed(qmodel, cfg, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_split_qkv_inputs_pack_and_reload(tmp_path: Path) -> None:
    model = tiny_model()
    cfg = method_config("compsrt", wbits=4, abits=4, qkv_inputs="split", dqc_iters=0)
    qmodel = quantize_model(model, cfg, torch.rand(2, 3, 16, 16)).model
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        expected = qmodel(x)
    path = tmp_path / "s.safetensors"
    save_packed(qmodel, cfg, path)
    with torch.no_grad():
        assert torch.equal(load_packed(path, tiny_model())(x), expected)
