"""Blind DN/CAR training: the per-sample noise level / JPEG quality, its config keys, and
that each level is a function of (seed, position) only, so resume and DDP stay exact."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from irformer.data.degradations import (
    BlindGaussianNoise,
    BlindJpegCompression,
    GaussianNoise,
    JpegCompression,
    make_degradation,
)
from irformer.engine.config import ConfigError, load_config
from irformer.engine.data import PositionedDataset, build_train_dataset, make_loader


def test_blind_degradations_draw_within_their_range() -> None:
    rng = np.random.default_rng(0)
    noise = BlindGaussianNoise(0.0, 50.0)
    sigmas = [noise.draw(rng) for _ in range(200)]
    assert min(sigmas) >= 0.0 and max(sigmas) <= 50.0
    assert min(sigmas) < 5 and max(sigmas) > 45  # spread over the range, not one value
    jpeg = BlindJpegCompression(10, 40)
    qualities = [jpeg.draw(rng) for _ in range(300)]
    assert set(qualities) == set(range(10, 41))  # both ends included, integers only
    gt = np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    assert noise(gt, rng).shape == gt.shape and noise(gt, rng).dtype == np.float32
    assert jpeg(gt, rng).max() <= 1.0
    assert make_degradation("dn", sigma=25, sigma_range=(0, 50)) == BlindGaussianNoise(0.0, 50.0)
    assert make_degradation("car", quality_range=(10, 40)) == BlindJpegCompression(10, 40)
    assert make_degradation("dn", sigma=25) == GaussianNoise(25.0)  # fixed levels still work
    assert make_degradation("car", quality=30) == JpegCompression(30)
    with pytest.raises(ValueError, match="0 <= min <= max"):
        BlindGaussianNoise(10.0, 5.0)
    with pytest.raises(ValueError, match="1 <= min <= max <= 100"):
        BlindJpegCompression(0, 40)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.sigma_range=[50, 0]"], "data.sigma_range: expected [min, max] with 0 <= min"),
        (["data.sigma_range=[-1, 10]"], "data.sigma_range"),
        (["data.sigma_range=[10]"], "data.sigma_range: expected 2 values"),
        (["data.sigma_range=[a, b]"], "data.sigma_range[0]: expected a number"),
        (["data.task=car", "data.sigma_range=[0, 50]"], "data.sigma_range: only task 'dn'"),
        (["data.task=car", "data.quality_range=[10, 101]"], "data.quality_range: expected"),
        (["data.quality_range=[10, 40]"], "data.quality_range: only task 'car'"),
        (["data.quality_range=[10.5, 40]"], "data.quality_range[0]: expected an integer"),
        (["data.sigma=-5"], "data.sigma: must be a finite number >= 0"),
        (["data.task=car", "data.quality=0"], "data.quality: must be a JPEG quality in 1..100"),
    ],
)
def test_bad_ranges_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.task=dn", "model.scale=1", *overrides])
    assert message in str(err.value)


def test_ranges_load_typed_and_default_to_fixed_levels() -> None:
    cfg = load_config(None, ["data.task=dn", "model.scale=1", "data.sigma_range=[0, 50]"])
    assert cfg.data.sigma_range == (0.0, 50.0) and cfg.data.quality_range is None
    cfg = load_config(None, ["data.task=car", "model.scale=1", "data.quality_range=[10, 40]"])
    assert cfg.data.quality_range == (10, 40) and isinstance(cfg.data.quality_range[0], int)
    assert load_config(None).data.sigma_range is None  # fixed sigma unless a range is given


@pytest.fixture
def train_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "train"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        image = rng.integers(40, 216, (40 + 4 * i, 44, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{i}.png"), image)
    return folder


_UNPATCHED_DRAW = {cls: cls.draw for cls in (BlindGaussianNoise, BlindJpegCompression)}


def _recorded_levels(
    monkeypatch: pytest.MonkeyPatch, cls: type, task: str, folder: Path, seed: int
) -> tuple[PositionedDataset, list[float]]:
    """A positioned training stream of a blind config and the list its draws land in."""
    drawn: list[float] = []
    original = _UNPATCHED_DRAW[cls]

    def recording(self, rng):  # type: ignore[no-untyped-def]
        value = original(self, rng)
        drawn.append(value)
        return value

    monkeypatch.setattr(cls, "draw", recording)
    key = "data.sigma_range=[0, 50]" if task == "dn" else "data.quality_range=[10, 40]"
    cfg = load_config(
        None,
        [f"data.task={task}", "model.scale=1", key, f"data.train=[{folder}]", "data.patch_size=32"],
    )
    return PositionedDataset(build_train_dataset(cfg), seed), drawn


@pytest.mark.parametrize(
    ("task", "cls"), [("dn", BlindGaussianNoise), ("car", BlindJpegCompression)]
)
def test_each_samples_level_is_a_function_of_seed_and_position(
    monkeypatch: pytest.MonkeyPatch, train_folder: Path, task: str, cls: type
) -> None:
    stream, drawn = _recorded_levels(monkeypatch, cls, task, train_folder, seed=7)
    forward = {}
    for k in range(8):
        item = stream[k]
        forward[k] = drawn[-1]
        if task == "dn":  # the noise really has the drawn level (unclipped, 3 * 32 * 32 values)
            noise_std = float((item["lq"] - item["gt"]).std()) * 255
            assert noise_std == pytest.approx(forward[k], abs=1.5)
    assert len(set(forward.values())) >= 5  # different positions draw different levels
    # A fresh stream (a resumed run), read backwards with the global RNGs disturbed: same levels.
    fresh, drawn_again = _recorded_levels(monkeypatch, cls, task, train_folder, seed=7)
    torch.manual_seed(123)
    np.random.seed(123)
    for k in reversed(range(8)):
        fresh[k]
        assert drawn_again[-1] == forward[k]
    # The loader of a run resumed at position 4, and rank 1 of 2 (batch 2): the same draws.
    drawn_again.clear()
    next(iter(make_loader(fresh.base, seed=7, start=4, batch_size=4)))
    assert drawn_again == [forward[k] for k in (4, 5, 6, 7)]
    drawn_again.clear()
    next(iter(make_loader(fresh.base, seed=7, start=0, batch_size=2, rank=1, world_size=2)))
    assert drawn_again == [forward[2], forward[3]]
    # Another seed, another stream.
    other, drawn_other = _recorded_levels(monkeypatch, cls, task, train_folder, seed=8)
    for k in range(8):
        other[k]
    assert drawn_other != [forward[k] for k in range(8)]
