"""Registry: presets, build_model, official/irformer checkpoint loading, metadata safety."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from irformer.archs import (
    CheckpointMismatchError,
    build_model,
    describe_checkpoint,
    detect_architecture,
    list_archs,
    list_presets,
    load_checkpoint_model,
    load_weights,
    model_meta,
    read_state_dict,
    registry,
    save_model_weights,
)

TINY = {
    "img_size": 16,
    "embed_dim": 12,
    "depths": (2, 2),
    "num_heads": (2, 3),
    "window_size": 4,
    "mlp_ratio": 2.0,
}


def _official_swinir(spandrel_archs: types.ModuleType, **kwargs) -> torch.nn.Module:
    """A spandrel (official-layout) SwinIR with random weights; its state dict keeps
    the attn_mask and relative_position_index buffers the official files carry."""
    torch.manual_seed(0)
    full = {**TINY, "upscale": 2, "upsampler": "pixelshuffledirect", **kwargs}
    full["depths"] = list(full["depths"])
    full["num_heads"] = list(full["num_heads"])
    model = spandrel_archs.SwinIR.SwinIR(drop_path_rate=0.0, **full).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model


def _write(path: Path, container: str, state: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif container == "bare":
        torch.save(state, path)
    elif container == "params_ema":
        torch.save({"params": {k: v * 0 for k, v in state.items()}, "params_ema": state}, path)
    else:
        torch.save({container: state}, path)
    return path


@pytest.mark.parametrize(
    ("suffix", "container"),
    [(".pth", "params"), (".pth", "params_ema"), (".pth", "bare"), (".safetensors", "bare")],
)
def test_official_file_loads_without_missing_or_unexpected(
    spandrel_archs, tmp_path, suffix, container
) -> None:
    ref = _official_swinir(spandrel_archs)
    state = ref.state_dict()
    assert any(k.endswith("attn_mask") for k in state)  # buffers really are in the file
    assert any(k.endswith("relative_position_index") for k in state)
    path = _write(tmp_path / f"official{suffix}", container, state)
    model, meta = load_checkpoint_model(path)
    assert meta["arch"] == "swinir" and meta["norm"] == "ln" and meta["scale"] == 2
    assert meta["model_kwargs"]["img_size"] == 16  # read from the attn_mask
    x = torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() < 1e-5
    # the same file through a named arch + explicit hyper-parameters
    named, _ = load_checkpoint_model(
        path, "swinir", upscale=2, upsampler="pixelshuffledirect", **TINY
    )
    with torch.no_grad():
        assert (named(x) - ref(x)).abs().max().item() < 1e-5


def test_official_preset_is_recognised(spandrel_archs, tmp_path) -> None:
    """Full-size official layouts are matched to their presets (training patch ignored)."""
    cases = {
        "swinir_light_x3": {"img_size": 64, "upscale": 3},
        "swinir_light_x2": {"img_size": 48, "upscale": 2},  # trained on 48 px patches
        "swinir_1_derain": {"img_size": 128, "upscale": 1, "upsampler": ""},
    }
    for preset, extra in cases.items():
        kwargs = {k: v for k, v in registry.preset_kwargs(preset).items() if k != "img_size"}
        kwargs.update(extra)
        kwargs["depths"], kwargs["num_heads"] = list(kwargs["depths"]), list(kwargs["num_heads"])
        ref = spandrel_archs.SwinIR.SwinIR(**kwargs)  # spandrel cannot build on "meta"
        found = detect_architecture(ref.state_dict())
        assert found is not None and found.exact, preset
        assert found.presets[0] == preset, found


def test_ddp_prefix_is_stripped(spandrel_archs, tmp_path) -> None:
    ref = _official_swinir(spandrel_archs)
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    path = _write(tmp_path / "ddp.pth", "params", state)
    model, _ = load_checkpoint_model(path)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_metadata_round_trip(tmp_path, suffix) -> None:
    torch.manual_seed(0)
    model = build_model("swinir", upscale=2, upsampler="pixelshuffledirect", norm="iln", **TINY)
    model.eval()
    path = save_model_weights(tmp_path / f"m{suffix}", model, {"task": "sr"})
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    _, meta = read_state_dict(path)
    assert meta == {**registry.make_meta(registry.ARCHITECTURES["swinir"], None, {
        **TINY, "upscale": 2, "upsampler": "pixelshuffledirect", "norm": "iln"})}  # fmt: skip
    assert meta["norm"] == "iln" and meta["arch"] == "swinir" and meta["scale"] == 2
    loaded, loaded_meta = load_checkpoint_model(path)
    assert loaded_meta["norm"] == "iln"
    assert loaded.norm_name == "iln"
    x = torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_iln_file_never_loads_as_ln(tmp_path) -> None:
    model = build_model("swinir", upscale=2, upsampler="pixelshuffledirect", norm="iln", **TINY)
    path = save_model_weights(tmp_path / "iln.safetensors", model)
    with pytest.raises(ValueError, match=r"norm='ln' \(file: 'iln'\)"):
        load_checkpoint_model(path, norm="ln")
    ln_model = build_model("swinir", upscale=2, upsampler="pixelshuffledirect", norm="ln", **TINY)
    with pytest.raises(ValueError, match="trained with norm 'iln' but the model uses 'ln'"):
        load_weights(ln_model, path)
    # a model built outside the registry: its norm is read from norm_name
    del ln_model.irformer_meta
    with pytest.raises(ValueError, match="trained with norm 'iln'"):
        load_weights(ln_model, path)
    # matching model: fine
    same = build_model("swinir", upscale=2, upsampler="pixelshuffledirect", norm="iln", **TINY)
    assert load_weights(same, path)["norm"] == "iln"


@pytest.mark.parametrize(("saved", "other"), [("ln_rs", "ln"), ("ln", "ln_rs"), ("ln_rs", "iln")])
def test_ln_rs_file_never_loads_as_another_norm(tmp_path, saved: str, other: str) -> None:
    """ln_rs keeps LN's key names (its embed/final affines too), so only the metadata
    tells it apart: a marked file refuses to load under any other norm."""
    model = build_model("swinir", upscale=2, upsampler="pixelshuffledirect", norm=saved, **TINY)
    path = save_model_weights(tmp_path / f"{saved}.safetensors", model)
    with pytest.raises(ValueError, match=rf"norm='{other}' \(file: '{saved}'\)"):
        load_checkpoint_model(path, norm=other)
    wrong = build_model("swinir", upscale=2, upsampler="pixelshuffledirect", norm=other, **TINY)
    with pytest.raises(ValueError, match=f"trained with norm '{saved}' but the model uses"):
        load_weights(wrong, path)
    loaded, meta = load_checkpoint_model(path)
    assert meta["norm"] == saved and loaded.norm_name == saved
    x = torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_marked_file_rejects_other_hyper_parameters(tmp_path) -> None:
    model = build_model(
        "swinir_light_x2", norm="ln_star", embed_dim=12, depths=(1,), num_heads=(2,)
    )
    path = save_model_weights(tmp_path / "m.pth", model)
    with pytest.raises(ValueError, match=r"holds a 'swinir' model, not 'drct'|unknown model name"):
        load_checkpoint_model(path, "drct" if "drct" in list_archs() else "nonexistent")
    with pytest.raises(ValueError, match=r"upscale=4 \(file: 2\)"):
        load_checkpoint_model(path, "swinir_light_x4")
    _, meta = load_checkpoint_model(path, "swinir_light_x2", norm="ln_star")
    assert meta["preset"] == "swinir_light_x2" and meta["norm"] == "ln_star"


def test_wrong_preset_lists_keys_and_suggests_match(spandrel_archs, tmp_path) -> None:
    ref = _official_swinir(spandrel_archs, upscale=3)
    path = _write(tmp_path / "x3.pth", "params", ref.state_dict())
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_model(path, "swinir", upscale=4, upsampler="pixelshuffledirect", **TINY)
    text = str(info.value)
    assert "shape mismatches (2)" in text and "upsample.0.weight" in text
    assert "upscale=3" in text  # the detected hyper-parameters
    # an official light x2 file loaded as a same-size model: missing/unexpected keys + hint
    kwargs = registry.preset_kwargs("swinir_light_x2")
    kwargs["depths"], kwargs["num_heads"] = list(kwargs["depths"]), list(kwargs["num_heads"])
    light = spandrel_archs.SwinIR.SwinIR(**kwargs)
    path = _write(tmp_path / "light.pth", "params", light.state_dict())
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_model(path, "swinir_1_dn")
    text = str(info.value)
    assert "missing keys (2): conv_last.weight, conv_last.bias" in text
    assert "unexpected keys (2): upsample.0.weight, upsample.0.bias" in text
    assert "try: build_model('swinir_light_x2')" in text


def test_relative_position_index_is_validated(spandrel_archs, tmp_path) -> None:
    ref = _official_swinir(spandrel_archs)
    state = ref.state_dict()
    key = "layers.0.residual_group.blocks.0.attn.relative_position_index"
    state[key] = state[key].flip(0)
    path = _write(tmp_path / "bad.pth", "params", state)
    with pytest.raises(CheckpointMismatchError, match=f"buffer {key!r}"):
        load_checkpoint_model(path)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model name 'swinir_huge'.*swinir_light_x4"):
        build_model("swinir_huge")
    with pytest.raises(ValueError, match=r"unexpected keyword argument 'embed_dims'.*embed_dim"):
        build_model("swinir_light_x4", embed_dims=64)
    with pytest.raises(ValueError, match="unknown arch 'vit'"):
        list_presets("vit")


def test_presets_build_and_count(monkeypatch) -> None:
    """Every SwinIR preset builds; headline sizes match the published models."""
    assert "swinir" in list_archs()
    names = list_presets("swinir")
    assert {"swinir_light_x4", "swinir_classical_x4", "swinir_1_dn", "swinir_car_gray"} <= set(
        names
    )
    with torch.device("meta"):
        light = build_model("swinir_light_x4")
        classical = build_model("swinir_classical_x4")
    assert registry.count_parameters(light) == 929_628  # = the official code's count
    assert 11.8e6 < registry.count_parameters(classical) < 12.0e6
    assert model_meta(light)["task"] == "sr"
    with torch.device("meta"):
        assert model_meta(build_model("swinir_car_color"))["task"] == "car"


def test_architecture_table_is_explicit() -> None:
    """The four architectures are listed by name (no import-time discovery), each
    preset with its task in the one task vocabulary."""
    from irformer.tasks import TASKS

    assert list(registry.ARCHITECTURES) == ["swinir", "hat", "drct", "srformer"]
    for spec in registry.ARCHITECTURES.values():
        assert set(spec.preset_tasks) == set(spec.presets)
        assert set(spec.preset_tasks.values()) <= set(TASKS)
    source = Path(registry.__file__).read_text()
    assert "importlib" not in source and "getattr(module" not in source


def test_describe_checkpoint(spandrel_archs, tmp_path) -> None:
    ref = _official_swinir(spandrel_archs)
    path = _write(tmp_path / "o.pth", "params", ref.state_dict())
    info = describe_checkpoint(path)
    assert info["meta"] == {}
    assert info["detected"]["arch"] == "swinir" and info["detected"]["exact"]
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())


def test_save_rejects_bad_suffix_and_leaves_nothing(tmp_path) -> None:
    model = build_model("swinir", upscale=2, upsampler="pixelshuffledirect", **TINY)
    with pytest.raises(ValueError, match=r"expected a \.safetensors or \.pth suffix"):
        save_model_weights(tmp_path / "m.bin", model)
    with pytest.raises(ValueError, match="lacks arch"):
        save_model_weights(tmp_path / "m.pth", torch.nn.Linear(2, 2))
    assert list(tmp_path.iterdir()) == []


def test_unreadable_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable PyTorch file"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save({"optimizer": {"lr": 1}}, tmp_path / "opt.pth")
    with pytest.raises(ValueError, match="no state dict found"):
        read_state_dict(tmp_path / "opt.pth")


def test_cli_models_list_and_info(tmp_path, capsys) -> None:
    from irformer.cli import main

    assert main(["models", "list", "--arch", "swinir", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["swinir_light_x4"]["params"] == 929_628
    assert rows["swinir_car_gray"]["task"] == "car"
    model = build_model("swinir", upscale=2, upsampler="pixelshuffledirect", norm="iln", **TINY)
    path = save_model_weights(tmp_path / "m.safetensors", model)
    assert main(["models", "info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["meta"]["norm"] == "iln" and info["detected"]["arch"] == "swinir"
    assert info["parameters"] == registry.count_parameters(model)
    assert main(["models", "info", str(tmp_path / "absent.pth")]) == 2


def test_cli_models_export_picks_weights_and_never_overwrites(tmp_path, capsys) -> None:
    from irformer.cli import main

    model = build_model("swinir", upscale=2, upsampler="pixelshuffledirect", norm="iln", **TINY)
    ema = build_model("swinir", upscale=2, upsampler="pixelshuffledirect", norm="iln", **TINY)
    ckpt = tmp_path / "train.pth"
    torch.save(
        {
            "params": model.state_dict(),
            "params_ema": ema.state_dict(),
            "irformer": registry.model_meta(model),
        },
        ckpt,
    )
    out = tmp_path / "raw.safetensors"
    assert main(["models", "export", str(ckpt), str(out), "--param-key", "params"]) == 0
    loaded, meta = load_checkpoint_model(out)
    assert meta["norm"] == "iln"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    before = out.read_bytes()
    assert main(["models", "export", str(ckpt), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == before
