"""Datasets (paired, degraded on the fly, rain) and the benchmark registry."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from irformer.data.benchmarks import (
    BENCHMARKS,
    BenchmarkDataset,
    find_benchmark_dir,
    get_benchmark,
    load_benchmark,
)
from irformer.data.datasets import (
    DegradedImageDataset,
    PairedImageDataset,
    RainPairDataset,
    augment_pair,
    match_pairs,
)
from irformer.data.degradations import (
    BicubicDownsample,
    GaussianNoise,
    JpegCompression,
    add_gaussian_noise,
    derive_seed,
    jpeg_compress,
    matlab_imresize,
    mod_crop,
)
from irformer.data.io import read_image, write_image


def _rand(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c)).astype(np.uint8)


def _nearest_up(lq: np.ndarray, s: int) -> np.ndarray:
    return np.repeat(np.repeat(lq, s, 0), s, 1)


@pytest.fixture
def sr_pairs(tmp_path: Path) -> tuple[Path, Path]:
    """GT = nearest-neighbour x4 of LQ, so any misaligned crop is detectable."""
    gt_dir, lq_dir = tmp_path / "HR", tmp_path / "LR"
    for i, name in enumerate(("alpha", "beta", "gamma")):
        lq = _rand(10 + i, 14, seed=i)
        write_image(lq_dir / f"{name}x4.png", lq)
        write_image(gt_dir / f"{name}.png", _nearest_up(lq, 4))
    return gt_dir, lq_dir


def test_paired_whole_images(sr_pairs: tuple[Path, Path]) -> None:
    ds = PairedImageDataset(*sr_pairs, scale=4)
    assert len(ds) == 3
    item = ds[1]
    assert item["name"] == "beta"
    assert item["lq"].shape == (3, 11, 14) and item["gt"].shape == (3, 44, 56)
    assert item["lq"].dtype == torch.float32 and float(item["gt"].max()) <= 1.0
    expected = read_image(sr_pairs[1] / "betax4.png")
    np.testing.assert_array_equal((item["lq"].numpy().transpose(1, 2, 0) * 255).round(), expected)


def test_paired_crops_stay_aligned_under_augmentation(sr_pairs: tuple[Path, Path]) -> None:
    ds = PairedImageDataset(*sr_pairs, scale=4, patch_size=32, augment=True)
    torch.manual_seed(0)
    for _ in range(20):
        item = ds[int(torch.randint(0, 3, ()).item())]
        lq, gt = item["lq"], item["gt"]
        assert lq.shape == (3, 8, 8) and gt.shape == (3, 32, 32)
        up = lq.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
        assert torch.equal(up, gt)


def test_paired_crops_are_reproducible(sr_pairs: tuple[Path, Path]) -> None:
    ds = PairedImageDataset(*sr_pairs, scale=4, patch_size=16, augment=True)
    torch.manual_seed(3)
    a = [ds[0]["gt"] for _ in range(4)]
    torch.manual_seed(3)
    b = [ds[0]["gt"] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], x) for x in a[1:])


def test_augment_reaches_all_eight_views() -> None:
    base = np.arange(12).reshape(3, 4, 1)
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        lq, gt = augment_pair(base, base, rng)
        assert np.array_equal(lq, gt)
        seen.add((lq.shape, lq.tobytes()))
    assert len(seen) == 8


def test_gt_larger_than_scale_times_lq_is_mod_cropped(tmp_path: Path) -> None:
    lq = _rand(8, 12)
    write_image(tmp_path / "LR" / "imgx4.png", lq)
    write_image(tmp_path / "HR" / "img.png", _rand(35, 50, seed=1))  # 35 // 4 = 8, 50 // 4 = 12
    item = PairedImageDataset(tmp_path / "HR", tmp_path / "LR", scale=4)[0]
    assert item["gt"].shape == (3, 32, 48)


def test_match_pairs_suffixes_and_rain_prefixes(tmp_path: Path) -> None:
    gt = [tmp_path / n for n in ("baby.png", "3096.png", "norain-001.png")]
    lq = [tmp_path / n for n in ("3096x2.png", "baby_x2.png", "rain-001.png")]
    pairs = match_pairs(gt, lq, scale=2)
    assert [(g.name, q.name) for g, q in pairs] == [
        ("baby.png", "baby_x2.png"),
        ("3096.png", "3096x2.png"),
        ("norain-001.png", "rain-001.png"),
    ]


def test_unmatched_pairs_name_the_files(sr_pairs: tuple[Path, Path]) -> None:
    gt_dir, lq_dir = sr_pairs
    write_image(gt_dir / "delta.png", _rand(40, 40))
    write_image(lq_dir / "omegax4.png", _rand(10, 10))
    with pytest.raises(ValueError, match="unmatched") as info:
        PairedImageDataset(gt_dir, lq_dir, scale=4)
    msg = str(info.value)
    assert "delta.png" in msg and "omegax4.png" in msg and str(lq_dir) in msg
    with pytest.raises(ValueError, match="unmatched"):
        PairedImageDataset(gt_dir, lq_dir, scale=2)  # x4 suffix does not match scale 2


def test_duplicate_stems_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"same name 'a'"):
        match_pairs([tmp_path / "a.png", tmp_path / "a.bmp"], [tmp_path / "a.png"])


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    write_image(tmp_path / "HR" / "x.png", _rand(40, 40))
    write_image(tmp_path / "LR" / "xx4.png", _rand(9, 10))
    with pytest.raises(ValueError, match="size mismatch") as info:
        PairedImageDataset(tmp_path / "HR", tmp_path / "LR", scale=4)
    assert "x.png" in str(info.value) and "xx4.png" in str(info.value)
    assert "40x40" in str(info.value) and "9x10" in str(info.value)


def test_empty_folder_and_small_images(sr_pairs: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images .* found in folder .*empty"):
        PairedImageDataset(tmp_path / "empty", sr_pairs[1], scale=4)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DegradedImageDataset(tmp_path / "nowhere", BicubicDownsample(2))
    with pytest.raises(ValueError, match=r"smaller than the LQ patch 16.*alphax4\.png|alphax4"):
        PairedImageDataset(*sr_pairs, scale=4, patch_size=64)
    with pytest.raises(ValueError, match="multiple of scale"):
        PairedImageDataset(*sr_pairs, scale=4, patch_size=30)
    with pytest.raises(ValueError, match=r"alpha\.png.*smaller than the patch 48"):
        DegradedImageDataset(sr_pairs[0], BicubicDownsample(4), patch_size=48)


def test_degraded_bicubic_whole_image_equals_matlab(tmp_path: Path) -> None:
    gt = _rand(30, 41)
    write_image(tmp_path / "img.png", gt)
    item = DegradedImageDataset(tmp_path, BicubicDownsample(3), seed=0)[0]
    expected = matlab_imresize(mod_crop(gt, 3), 1 / 3)
    assert item["gt"].shape == (3, 30, 39)
    np.testing.assert_array_equal(
        np.round(item["lq"].numpy().transpose(1, 2, 0) * 255).astype(np.uint8), expected
    )


def test_degraded_noise_seeding(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_image(tmp_path / f"{name}.png", _rand(24, 24, seed=ord(name)))
    seeded = DegradedImageDataset(tmp_path, GaussianNoise(25), seed=5)
    first, again = (
        seeded[0]["lq"],
        DegradedImageDataset(tmp_path, GaussianNoise(25), seed=5)[0]["lq"],
    )
    assert torch.equal(first, again)  # same seed + name -> same noise, any instance
    expected = add_gaussian_noise(_rand(24, 24, seed=ord("a")), 25, rng=derive_seed(5, "a"))
    np.testing.assert_array_equal(first.numpy().transpose(1, 2, 0), expected)
    fresh = DegradedImageDataset(tmp_path, GaussianNoise(25))
    assert not torch.equal(fresh[0]["lq"], fresh[0]["lq"])  # training: new noise each time
    jp = DegradedImageDataset(tmp_path, JpegCompression(10), patch_size=16, augment=True)[1]
    assert jp["lq"].shape == jp["gt"].shape == (3, 16, 16)


def test_degraded_training_patch_is_degraded_crop(tmp_path: Path) -> None:
    write_image(tmp_path / "img.png", _rand(40, 40))
    torch.manual_seed(1)
    item = DegradedImageDataset(tmp_path, BicubicDownsample(2), patch_size=24, augment=True)[0]
    gt = (item["gt"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    lq = (item["lq"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert gt.shape == (24, 24, 3)
    np.testing.assert_array_equal(lq, matlab_imresize(gt, 0.5))


def test_rain_pairs(tmp_path: Path) -> None:
    for i in range(1, 4):
        write_image(tmp_path / "rain" / f"rain-{i:03d}.png", _rand(20, 24, seed=i))
        write_image(tmp_path / "norain" / f"norain-{i:03d}.png", _rand(20, 24, seed=10 + i))
    ds = RainPairDataset(tmp_path, patch_size=16, augment=True)
    assert len(ds) == 3
    item = ds[0]
    assert item["lq"].shape == item["gt"].shape == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match="rain/"):
        RainPairDataset(tmp_path / "rain")


def test_rain100l_real_pairs(shared_data: Path) -> None:
    ds = RainPairDataset(shared_data / "derain" / "Rain100L")
    assert len(ds) == 50
    item = ds[0]
    assert item["name"] == "1" and item["lq"].shape == item["gt"].shape


def test_set5_pairs_real(shared_data: Path) -> None:
    sr = shared_data / "sr" / "Set5"
    ds = PairedImageDataset(sr / "HR", sr / "LR_bicubic" / "X3", scale=3, patch_size=48)
    assert [p[0].stem for p in ds.pairs] == ["baby", "bird", "butterfly", "head", "woman"]
    torch.manual_seed(0)
    assert ds[0]["lq"].shape == (3, 16, 16) and ds[0]["gt"].shape == (3, 48, 48)


# ---------------------------------------------------------------- benchmark registry


def test_registry_names_and_aliases() -> None:
    assert set(BENCHMARKS) == {
        "Set5", "Set14", "B100", "Urban100", "Manga109", "CBSD68", "Kodak24",
        "McMaster", "LIVE1", "classic5", "Rain100L", "Test100",
    }  # fmt: skip
    assert get_benchmark("bsd100").name == "B100"
    assert get_benchmark("Classic5").name == "classic5"
    with pytest.raises(KeyError, match="unknown benchmark 'Set6'"):
        get_benchmark("Set6")


def test_grouped_data_root(shared_data: Path) -> None:
    assert find_benchmark_dir("Set5", shared_data, "sr") == shared_data / "sr" / "Set5"
    assert find_benchmark_dir("cbsd68", shared_data, "dn") == shared_data / "dn" / "CBSD68"
    assert find_benchmark_dir("Rain100L", shared_data, "dr") == shared_data / "derain" / "Rain100L"
    with pytest.raises(ValueError, match="not a 'dn' test set"):
        find_benchmark_dir("Set5", shared_data, "dn")
    with pytest.raises(FileNotFoundError, match="Manga109 not found"):
        find_benchmark_dir("Manga109", shared_data, "sr")
    with pytest.raises(FileNotFoundError, match="data root not found"):
        find_benchmark_dir("Set5", shared_data / "nope", "sr")


@pytest.mark.parametrize("scale", [2, 4])
def test_sr_lr_made_on_the_fly_equals_files(shared_data: Path, tmp_path: Path, scale: int) -> None:
    # A flat root holding only Set5/HR: LR is generated and equals the MATLAB files.
    (tmp_path / "Set5").mkdir()
    (tmp_path / "Set5" / "HR").symlink_to(shared_data / "sr" / "Set5" / "HR")
    generated = load_benchmark("Set5", tmp_path, task="sr", scale=scale)
    from_files = load_benchmark("Set5", shared_data, task="sr", scale=scale)
    assert len(generated) == len(from_files) == 5
    for a, b in zip(generated, from_files):
        assert a.name == b.name
        assert a.gt.shape == b.gt.shape and a.gt.shape[0] % scale == 0
        np.testing.assert_array_equal(a.gt, b.gt)
        np.testing.assert_array_equal(a.lq, b.lq)


def test_dn_benchmark_is_deterministic(shared_data: Path) -> None:
    a = load_benchmark("McMaster", shared_data, task="dn", sigma=25)
    b = load_benchmark("McMaster", shared_data, task="dn", sigma=25)
    assert len(a) == 18
    x, y = a[3], b[3]
    np.testing.assert_array_equal(x.lq, y.lq)
    assert x.lq.dtype == np.float32 and x.gt.dtype == np.uint8
    noise = (x.lq.astype(np.float64) - x.gt / 255.0) * 255
    assert abs(noise.std() - 25) < 0.2
    other = load_benchmark("McMaster", shared_data, task="dn", sigma=25, seed=1)[3]
    assert not np.array_equal(other.lq, x.lq)
    with pytest.raises(ValueError, match="sigma"):
        load_benchmark("McMaster", shared_data, task="dn")


def test_car_benchmarks_grey_and_colour(shared_data: Path) -> None:
    c5 = load_benchmark("classic5", shared_data, task="car", quality=10)
    item = c5[0]
    assert len(c5) == 5 and item.gt.shape == (512, 512, 1)
    np.testing.assert_array_equal(
        np.round(item.lq * 255).astype(np.uint8), jpeg_compress(item.gt, 10)
    )
    live = load_benchmark("LIVE1", shared_data, task="car", quality=40)
    assert len(live) == 29 and live[0].gt.shape[2] == 3


def test_urban100_split_for_dn_car(tmp_path: Path) -> None:
    write_image(tmp_path / "Urban100" / "HR" / "img_001.png", _rand(600, 520))
    dn = load_benchmark("Urban100", tmp_path, task="dn", sigma=15)
    assert len(dn) == 4  # 2 x 2 patches of 256, remainders dropped
    assert dn.names == [f"img_001_p{k:03d}" for k in range(4)]
    assert dn[3].gt.shape == (256, 256, 3)
    full = read_image(tmp_path / "Urban100" / "HR" / "img_001.png")
    np.testing.assert_array_equal(dn[3].gt, full[256:512, 256:512])
    assert len(load_benchmark("Urban100", tmp_path, task="sr", scale=4)) == 1  # SR: whole image


def test_benchmark_dataset_and_source_paths(shared_data: Path) -> None:
    bench = load_benchmark("Rain100L", shared_data, task="dr")
    ds = BenchmarkDataset(bench)
    item = ds[0]
    assert item["lq"].shape == item["gt"].shape and item["lq"].dtype == torch.float32
    assert [p.parent.name for p in bench.source_paths(0)] == ["norain", "rain"]


def test_benchmark_size_mismatch_is_reported(tmp_path: Path) -> None:
    write_image(tmp_path / "Set5" / "HR" / "baby.png", _rand(64, 64))
    write_image(tmp_path / "Set5" / "LR_bicubic" / "X4" / "babyx4.png", _rand(15, 16))
    with pytest.raises(ValueError, match=re.escape("babyx4.png is 15x16")):
        load_benchmark("Set5", tmp_path, task="sr", scale=4)


def test_benchmark_subset_is_labelled(shared_data: Path) -> None:
    full = load_benchmark("B100", shared_data, task="sr", scale=2)
    sub = load_benchmark("B100[:3]", shared_data, task="sr", scale=2)
    assert sub.name == "B100[:3]" and len(sub) == 3
    assert sub.names == full.names[:3] and full.name == "B100"
    np.testing.assert_array_equal(sub[2].gt, full[2].gt)
    # Asking for more images than exist is the full benchmark, named as such.
    assert load_benchmark("Set5[:99]", shared_data, task="sr", scale=2).name == "Set5"
    with pytest.raises(ValueError, match="subset size"):
        full.first(0)
