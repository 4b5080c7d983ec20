"""``irformer restore``: files and folders, output rules, exact/tiled/ensemble/precision flags."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from irformer.archs import build_model, save_model_weights, zoo
from irformer.cli import main as cli_main
from irformer.data.io import read_image

TINY = {
    "img_size": 16,
    "embed_dim": 12,
    "depths": (2,),
    "num_heads": (2,),
    "window_size": 4,
    "mlp_ratio": 2.0,
    "upscale": 2,
    "upsampler": "pixelshuffledirect",
}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny i-LN x2 checkpoint and an input folder: 8-bit RGB, grey, 16-bit RGB."""
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_iln.safetensors"
    save_model_weights(ckpt, build_model("swinir", **TINY, norm="iln"))
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(src / "rgb.png"), rng.integers(0, 256, (18, 22, 3), dtype=np.uint8))
    cv2.imwrite(str(src / "grey.png"), rng.integers(0, 256, (16, 12), dtype=np.uint8))
    cv2.imwrite(str(src / "deep.png"), rng.integers(0, 65536, (12, 16, 3), dtype=np.uint16))
    return ckpt, src


def restore(*args: object) -> int:
    return cli_main(["restore", *map(str, args)])


def test_restore_folder_and_file(setup: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    ckpt, src = setup
    out = tmp_path / "out"
    assert restore(src, "--model", ckpt, "-o", out) == 0
    printed = capsys.readouterr()
    assert "restored 3 image(s)" in printed.err and "norm=iln" in printed.err
    rgb = read_image(out / "rgb.png", channels="keep")
    grey = read_image(out / "grey.png", channels="keep")
    deep = read_image(out / "deep.png", channels="keep")
    assert rgb.shape == (36, 44, 3) and rgb.dtype == np.uint8
    assert grey.shape == (32, 24, 1)  # grey in, grey out
    assert deep.shape == (24, 32, 3) and deep.dtype == np.uint16  # bit depth kept
    assert rgb.std() > 5  # a real image, not a constant

    # A single file, and the exact chunked path gives the same pixels.
    exact = tmp_path / "exact"
    assert restore(src / "rgb.png", "--model", ckpt, "-o", exact, "--exact-chunk", 2) == 0
    assert np.array_equal(read_image(exact / "rgb.png", channels="keep"), rgb)
    assert sorted(p.name for p in exact.iterdir()) == ["rgb.png"]


def test_restore_output_rules(setup: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    ckpt, src = setup
    out = tmp_path / "out"
    assert restore(src / "rgb.png", "--model", ckpt, "-o", out) == 0
    before = (out / "rgb.png").read_bytes()
    # Existing output: refused before anything runs, unless --overwrite.
    assert restore(src, "--model", ckpt, "-o", out) == 2
    assert "exists" in capsys.readouterr().err
    assert not (out / "grey.png").exists()
    assert restore(src / "rgb.png", "--model", ckpt, "-o", out, "--overwrite") == 0
    assert (out / "rgb.png").read_bytes() == before  # deterministic
    # Inputs are never overwritten, even with --overwrite.
    snapshot = {p.name: p.read_bytes() for p in src.iterdir()}
    assert restore(src, "--model", ckpt, "-o", src, "--overwrite") == 2
    assert "overwrite the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == snapshot
    # Two inputs mapping to one output name.
    other = tmp_path / "other"
    other.mkdir()
    (other / "rgb.jpg").write_bytes(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1])
    assert restore(src / "rgb.png", other / "rgb.jpg", "--model", ckpt, "-o", tmp_path / "x") == 2
    assert "both be written" in capsys.readouterr().err


def test_restore_errors(setup: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    ckpt, src = setup
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    # An unreadable input is reported and the run exits 1 (the others would be restored).
    assert restore(bad, "--model", ckpt, "-o", tmp_path / "o1") == 1
    assert f"{bad}: not a readable image" in capsys.readouterr().err
    assert restore(tmp_path / "missing.png", "--model", ckpt, "-o", tmp_path / "o2") == 2
    assert "input not found" in capsys.readouterr().err
    assert restore(src, "--model", tmp_path / "nope.pth", "-o", tmp_path / "o3") == 2
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # tiling and the exact path exclude each other
        restore(src, "--model", ckpt, "-o", tmp_path / "o4", "--tile", 8, "--exact-chunk", 4)
    capsys.readouterr()
    assert (
        restore(src, "--model", ckpt, "-o", tmp_path / "o5", "--tile", 8, "--tile-overlap", 8) == 2
    )
    assert "overlap" in capsys.readouterr().err
    # No --model and no shipped reference checkpoint.
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "no_weights")
    assert restore(src, "-o", tmp_path / "o6") == 2
    assert "--model" in capsys.readouterr().err
    # --scale must match the model's.
    assert restore(src, "--model", ckpt, "--scale", 4, "-o", tmp_path / "o7") == 2
    assert "--scale 4 but" in capsys.readouterr().err


def test_default_weights_choice(tmp_path: Path) -> None:
    assert zoo.default_weights(weights_dir=tmp_path / "absent") is None
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert zoo.default_weights(weights_dir=tmp_path) is None  # only the task's own file
    preferred = tmp_path / "swinir_light_x2_iln.safetensors"
    preferred.write_bytes(b"")
    assert zoo.default_weights(weights_dir=tmp_path) == preferred
    assert zoo.default_weights(scale=4, weights_dir=tmp_path) is None
    x4 = tmp_path / "swinir_light_x4_iln.safetensors"
    x4.write_bytes(b"")
    assert zoo.default_weights(scale=4, weights_dir=tmp_path) == x4
    assert zoo.default_weights("sr", weights_dir=tmp_path) == preferred
    assert zoo.default_weights("dn", weights_dir=tmp_path) is None
    with pytest.raises(ValueError, match="no shipped model for task 'dr'"):
        zoo.default_weights("dr", weights_dir=tmp_path)


def test_restore_tile_ensemble_precision(setup: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, src = setup
    base = tmp_path / "base"
    assert restore(src / "rgb.png", "--model", ckpt, "-o", base) == 0
    ref = read_image(base / "rgb.png").astype(int)
    runs = {
        "tile": ["--tile", 12, "--tile-overlap", 4, "--tile-blend", "ramp"],
        "ens": ["--ensemble"],
        "bf16": ["--precision", "bf16"],
    }
    diffs = {}
    for name, flags in runs.items():
        assert restore(src / "rgb.png", "--model", ckpt, "-o", tmp_path / name, *flags) == 0
        out = read_image(tmp_path / name / "rgb.png").astype(int)
        assert out.shape == ref.shape
        diffs[name] = np.abs(out - ref)
    # i-LN tiles see other statistics, and the ensemble averages 8 passes of a
    # random model on a noise image: different, though the same picture.
    assert 0 < diffs["tile"].mean() < 40
    assert 0 < diffs["ens"].mean() < 40
    assert diffs["bf16"].max() <= 3  # bf16 within a few grey levels of fp32


def test_restore_fp16_guard_and_black_dots(
    setup: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    from irformer.analysis.magnitudes import Fp16OverflowWarning

    _, src = setup
    torch.manual_seed(0)
    model = build_model("swinir", **TINY, norm="ln")
    with torch.no_grad():
        model.layers[0].residual_group.blocks[1].mlp.fc2.weight.mul_(1e7)
    ckpt = tmp_path / "hot_ln.safetensors"
    save_model_weights(ckpt, model)
    out = tmp_path / "fp16"
    fp16 = ("--precision", "fp16")
    # Default: refused before any image runs, naming where the overflow starts.
    assert restore(src / "rgb.png", "--model", ckpt, "-o", out, *fp16) == 2
    refused = capsys.readouterr().err
    assert "fp16 would overflow from layers.0.residual_group.blocks.1.mlp.fc2" in refused
    assert not (out / "rgb.png").exists()
    # Fallback: bf16 (fp32's range), finite output.
    assert restore(src / "rgb.png", "--model", ckpt, "-o", out, *fp16, "--fp16-unsafe", "bf16") == 0
    capsys.readouterr()
    assert int(read_image(out / "rgb.png").max()) > 0
    # Run anyway: the black dots, with the warning.
    with pytest.warns(Fp16OverflowWarning, match="would overflow"):
        assert (
            restore(
                src / "rgb.png",
                "--model",
                ckpt,
                "-o",
                out,
                *fp16,
                "--fp16-unsafe",
                "run",
                "--overwrite",
            )
            == 0
        )
    printed = capsys.readouterr()
    assert "non-finite" in printed.out and "blocks.1.mlp.fc2" in printed.out
    assert "1 with non-finite pixels" in printed.err
    img = read_image(out / "rgb.png")
    assert img.shape == (36, 44, 3) and int(img.max()) == 0  # every pixel a black dot


TINY_1 = {**TINY, "upscale": 1, "upsampler": ""}


@pytest.mark.parametrize("task", ["dn", "car"])
def test_task_picks_the_shipped_model_and_grey_stays_grey(
    task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # A weights folder like the package's: SR x2 and one dn and one car model (tiny, i-LN).
    weights = tmp_path / "weights"
    torch.manual_seed(0)
    for stem, preset, kwargs in (
        ("swinir_light_x2_iln", "swinir", TINY),
        ("swinir_1_dn_iln", "swinir_1_dn", TINY_1),
        ("swinir_1_car_iln", "swinir_1_car", TINY_1),
    ):
        model = build_model(preset, **{**kwargs, "norm": "iln"})
        save_model_weights(weights / f"{stem}.safetensors", model)
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", weights)
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (20, 18), dtype=np.uint8)
    cv2.imwrite(str(src / "grey.png"), grey)
    cv2.imwrite(str(src / "rgb.png"), rng.integers(0, 256, (20, 18, 3), dtype=np.uint8))
    out = tmp_path / "out"
    assert restore(src, "--task", task, "-o", out) == 0
    assert f"swinir_1_{task}_iln.safetensors" in capsys.readouterr().err
    assert read_image(out / "rgb.png", channels="keep").shape == (20, 18, 3)  # scale 1
    # Grey into the colour model: replicated in, channel mean out (the documented conversion).
    restored = read_image(out / "grey.png", channels="keep")
    assert restored.shape == (20, 18, 1)
    model = zoo.load_model(None, task=task).model
    x = torch.from_numpy(grey.astype(np.float32) / 255)[None, None].expand(1, 3, 20, 18)
    with torch.inference_mode():
        expected = model(x.contiguous()).mean(dim=1).clamp(0, 1).mul(255).round()
    assert np.abs(restored[..., 0].astype(int) - expected[0].numpy().astype(int)).max() <= 1
    # A checkpoint of another task, or a scale, is refused with the reason.
    other = "car" if task == "dn" else "dn"
    ckpt = weights / f"swinir_1_{other}_iln.safetensors"
    assert restore(src, "--task", task, "--model", ckpt, "-o", tmp_path / "o2") == 2
    assert f"--task {task} but" in capsys.readouterr().err
    assert restore(src, "--task", task, "--scale", 2, "-o", tmp_path / "o3") == 2
    assert "restores at scale 1" in capsys.readouterr().err
    # Without --task: SR x2, as before.
    assert restore(src / "rgb.png", "-o", tmp_path / "o4") == 0
    assert "swinir_light_x2_iln" in capsys.readouterr().err
    assert read_image(tmp_path / "o4" / "rgb.png", channels="keep").shape == (40, 36, 3)
