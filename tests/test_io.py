"""Image reading, conversions, validation errors and safe writing."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from irformer.data.io import (
    AlphaDroppedWarning,
    ImageReadError,
    OutputExistsError,
    check_writable,
    image_size,
    image_to_tensor,
    list_images,
    quantize,
    read_image,
    tensor_to_image,
    to_float32,
    write_image,
)


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (21, 34, 3)).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_roundtrip_rgb_and_grey(tmp_path: Path, rgb: np.ndarray, suffix: str) -> None:
    p = write_image(tmp_path / f"a{suffix}", rgb)
    back = read_image(p)
    assert back.dtype == np.uint8 and back.shape == rgb.shape
    np.testing.assert_array_equal(back, rgb)
    g = write_image(tmp_path / f"g{suffix}", rgb[..., :1])
    np.testing.assert_array_equal(read_image(g, channels="keep"), rgb[..., :1])


def test_jpeg_roundtrip_is_close(tmp_path: Path) -> None:
    smooth = np.tile(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], (30, 1, 3))
    p = write_image(tmp_path / "a.jpg", smooth, jpeg_quality=98)
    back = read_image(p)
    assert back.shape == smooth.shape
    assert np.abs(back.astype(int) - smooth).max() <= 4


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grey_and_colour_keep_their_depth(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(1)
    colour = rng.integers(0, 65536, (9, 13, 3)).astype(np.uint16)
    grey = rng.integers(0, 65536, (9, 13, 1)).astype(np.uint16)
    pc = write_image(tmp_path / f"c{suffix}", colour)
    pg = write_image(tmp_path / f"g{suffix}", grey)
    # Pillow alone would reduce 16-bit colour to 8 bits; values must survive exactly.
    np.testing.assert_array_equal(read_image(pc), colour)
    np.testing.assert_array_equal(read_image(pg, channels="keep"), grey)
    assert read_image(pg).shape == (9, 13, 3)
    f = to_float32(read_image(pc))
    assert f.dtype == np.float32 and f.max() <= 1.0
    np.testing.assert_allclose(f * 65535, colour, atol=0.02)


def test_16bit_colour_written_by_opencv_is_rgb_ordered(tmp_path: Path) -> None:
    px = np.zeros((4, 4, 3), np.uint16)
    px[..., 0] = 60000  # red
    cv2.imwrite(str(tmp_path / "r.png"), px[..., ::-1].copy())  # OpenCV writes BGR
    assert read_image(tmp_path / "r.png")[0, 0].tolist() == [60000, 0, 0]


def test_channel_conversions(tmp_path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    g3 = read_image(tmp_path / "g.png")
    assert g3.shape == (21, 34, 3)
    np.testing.assert_array_equal(g3[..., 2], rgb[..., 0])
    Image.fromarray(rgb).save(tmp_path / "c.png")
    grey = read_image(tmp_path / "c.png", channels="grey")
    expected = np.floor(rgb.astype(float) @ [0.299, 0.587, 0.114] + 0.5)
    assert grey.shape == (21, 34, 1)
    assert np.abs(grey[..., 0].astype(float) - expected).max() <= 1
    with pytest.raises(ValueError, match="channels"):
        read_image(tmp_path / "c.png", channels="bgr")  # type: ignore[arg-type]


def test_alpha_is_dropped_with_a_warning(tmp_path: Path, rgb: np.ndarray) -> None:
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    with pytest.warns(AlphaDroppedWarning, match=r"a\.png"):
        out = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out, rgb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "a.png", channels="keep").shape == (21, 34, 4)
    la = Image.fromarray(rgba[..., :2].copy(), mode="LA")
    la.save(tmp_path / "la.png")
    with pytest.warns(AlphaDroppedWarning):
        assert read_image(tmp_path / "la.png").shape == (21, 34, 3)


def test_palette_and_bilevel_images(tmp_path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (21, 34, 3)
    Image.fromarray(rgb[..., 0] > 128).save(tmp_path / "b.png")
    b = read_image(tmp_path / "b.png", channels="keep")
    assert b.shape == (21, 34, 1) and set(np.unique(b)) <= {0, 255}


def test_errors_name_the_path(tmp_path: Path, rgb: np.ndarray) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        read_image(missing)
    empty = tmp_path / "empty.png"
    empty.touch()
    with pytest.raises(ImageReadError, match=r"empty file.*empty\.png"):
        read_image(empty)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    with pytest.raises(ImageReadError, match=r"notes\.png"):
        read_image(text)
    with pytest.raises(ImageReadError, match=r"notes\.png"):
        image_size(text)
    folder = tmp_path / "dir.png"
    folder.mkdir()
    with pytest.raises(ImageReadError, match=r"dir\.png"):
        read_image(folder)
    Image.fromarray(rgb).save(tmp_path / "anim.gif")
    with pytest.raises(ImageReadError, match=r"GIF.*anim\.gif"):
        read_image(tmp_path / "anim.gif")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_truncated_files_raise(tmp_path: Path, suffix: str) -> None:
    big = np.random.default_rng(2).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    full = write_image(tmp_path / f"full{suffix}", big)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    # OpenCV would return a half-grey JPEG here; the read must fail instead.
    with pytest.raises(ImageReadError, match=re.escape(f"cut{suffix}")):
        read_image(cut)


def test_corrupt_png_raises(tmp_path: Path, rgb: np.ndarray) -> None:
    p = write_image(tmp_path / "ok.png", rgb)
    data = bytearray(p.read_bytes())
    data[60:80] = b"\x00" * 20  # inside the compressed IDAT stream
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        read_image(bad)


def test_write_refuses_to_overwrite(tmp_path: Path, rgb: np.ndarray) -> None:
    p = write_image(tmp_path / "deep" / "er" / "out.png", rgb)  # folders created
    assert p.is_file()
    with pytest.raises(OutputExistsError, match=r"out\.png") as info:
        write_image(p, rgb)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, ValueError)
    flipped = rgb[::-1].copy()
    write_image(p, flipped, overwrite=True)
    np.testing.assert_array_equal(read_image(p), flipped)


def test_write_never_replaces_an_input(tmp_path: Path, rgb: np.ndarray) -> None:
    src = write_image(tmp_path / "input.png", rgb)
    before = src.read_bytes()
    with pytest.raises(OutputExistsError, match="input file"):
        write_image(
            tmp_path / "sub" / ".." / "input.png", rgb[::-1], overwrite=True, protected=[src]
        )
    assert src.read_bytes() == before
    with pytest.raises(OutputExistsError, match="folder"):
        check_writable(tmp_path, overwrite=True)


def test_write_validates_its_input(tmp_path: Path, rgb: np.ndarray) -> None:
    with pytest.raises(TypeError, match="quantise"):
        write_image(tmp_path / "f.png", rgb.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="16-bit"):
        write_image(tmp_path / "a.jpg", rgb.astype(np.uint16))
    with pytest.raises(ValueError, match="suffix"):
        write_image(tmp_path / "a.webp", rgb)
    with pytest.raises(ValueError, match="alpha"):
        write_image(tmp_path / "a.jpg", np.zeros((4, 4, 4), np.uint8))
    assert not any(tmp_path.iterdir())


def test_list_images(tmp_path: Path, rgb: np.ndarray) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path)
    for name in ("10.png", "2.png", "1.jpg", "B.bmp", "a.TIF"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["1.jpg", "2.png", "10.png", "a.TIF", "B.bmp"]


def test_image_size_reads_the_header(tmp_path: Path, rgb: np.ndarray) -> None:
    assert image_size(write_image(tmp_path / "a.png", rgb)) == (21, 34)


def test_quantize_rounds_half_up_and_clips() -> None:
    x = np.array([2.5, 3.5, -4.0, 300.0, 254.49]) / 255.0
    np.testing.assert_array_equal(quantize(x), [3, 4, 0, 255, 254])  # np.round: 2, 4
    assert quantize(np.array([1.0]), np.uint16)[0] == 65535
    np.testing.assert_array_equal(quantize(np.array([np.nan, np.inf, -np.inf])), [0, 255, 0])
    with pytest.raises(ValueError, match="uint8 and uint16"):
        quantize(x, np.uint32)


def test_tensor_conversions_roundtrip(rgb: np.ndarray) -> None:
    t = image_to_tensor(rgb)
    assert t.shape == (3, 21, 34) and t.dtype == torch.float32
    assert float(t.max()) <= 1.0
    np.testing.assert_array_equal(tensor_to_image(t), rgb)
    np.testing.assert_array_equal(tensor_to_image(t[None]), rgb)
    with pytest.raises(ValueError, match="tensor"):
        tensor_to_image(torch.zeros(2, 3, 4, 4))
