"""``irformer data prepare``: geometry, LR, manifest, resume, atomicity, packs, training."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irformer.cli import main as cli_main
from irformer.data import matlab_imresize, read_image
from irformer.data.datasets import DegradedImageDataset, PairedImageDataset
from irformer.data.degradations import make_degradation
from irformer.data.packed import (
    PackedDegradedDataset,
    PackedImages,
    PackedPairDataset,
    PackFormatError,
)
from irformer.data.prepare import (
    MANIFEST,
    PrepareError,
    PrepareSettings,
    extract_boxes,
    pack_path,
    prepare_dataset,
    read_manifest,
    verify_prepared,
)
from irformer.engine.config import load_config
from irformer.engine.data import PositionedDataset, build_train_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = PrepareSettings(crop=48, step=24, scales=(2, 4))
SIZES = {"0001": (100, 136), "0002": (72, 96), "0803": (41, 57)}  # (h, w); 0803 < crop


def make_sources(folder: Path) -> Path:
    """Smooth colour images (textured enough that crops differ)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        small = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        img.save(folder / f"{name}.png")
    return folder


def basicsr_starts(length: int, crop: int, step: int, thresh: int) -> list[int]:
    """BasicSR's scripts/data_preparation/extract_subimages.py, per axis."""
    space = np.arange(0, length - crop + 1, step)
    if length - (space[-1] + crop) > thresh:
        space = np.append(space, length - crop)
    return space.tolist()


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("thresh", [0, 150, 160])
def test_boxes_follow_basicsr_border_rule(thresh: int) -> None:
    s = PrepareSettings(thresh=thresh)
    h, w = 1356, 2040  # a DIV2K size (a multiple of 12)
    boxes = extract_boxes(h, w, s)
    tops = basicsr_starts(h, 480, 240, thresh)
    lefts = basicsr_starts(w, 480, 240, thresh)
    assert boxes == [(t, left, 480, 480) for t in tops for left in lefts]
    # Windows at 0..720 leave 156 rows: a thresh below that adds the window at 876.
    assert (876 in tops) == (thresh < 156)


def test_short_axis_gets_one_full_length_window() -> None:
    assert extract_boxes(300, 1000, PrepareSettings()) == [
        (0, 0, 300, 480),
        (0, 240, 300, 480),
        (0, 480, 300, 480),
        (0, 520, 300, 480),
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop": 100}, "multiple of 12"),
        ({"step": 0}, "must be >= 1"),
        ({"scales": (2, 2)}, "distinct"),
        ({"scales": (1,)}, ">= 2"),
        ({"compression": 10}, "0-9"),
        ({"thresh": -1}, "thresh"),
    ],
)
def test_bad_settings_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(PrepareError, match=match):
        PrepareSettings(**kwargs)


# --------------------------------------------------------------------------- outputs


def test_prepare_writes_crops_lr_and_manifest(tmp_path: Path) -> None:
    src = make_sources(tmp_path / "src")
    out = tmp_path / "out"
    result = prepare_dataset([src], out, SETTINGS)
    records = read_manifest(out)
    assert result.prepared == 3 and result.skipped == 0 and result.files == len(records)
    hr = {name: read_image(src / f"{name}.png") for name in SIZES}
    for name, image in hr.items():
        image = image[: image.shape[0] // 4 * 4, : image.shape[1] // 4 * 4]  # lcm(2, 4)
        boxes = extract_boxes(image.shape[0], image.shape[1], SETTINGS)
        mine = [r for r in records if Path(r["source"]).stem == name]
        assert len(mine) == mine[0]["source_files"] == 3 * len(boxes)
        lrs = {s: matlab_imresize(image, 1 / s) for s in (2, 4)}
        for number, (t, left, h, w) in enumerate(boxes, start=1):
            crop = read_image(out / "HR" / f"{name}_s{number:03d}.png")
            np.testing.assert_array_equal(crop, image[t : t + h, left : left + w])
            for s in (2, 4):
                lr = read_image(out / f"LR_bicubic/X{s}" / f"{name}_s{number:03d}.png")
                whole = lrs[s][t // s : (t + h) // s, left // s : (left + w) // s]
                np.testing.assert_array_equal(lr, whole)  # cropped from the whole-image LR
    for r in records:
        data = (out / r["file"]).read_bytes()
        assert r["size"] == len(data) and r["sha256"] == hashlib.sha256(data).hexdigest()
        source = Path(r["source"]).read_bytes()
        assert r["source_sha256"] == hashlib.sha256(source).hexdigest()
    files = [r["file"] for r in records]
    assert files == sorted(files) and files[0] == "HR/0001_s001.png"  # file order
    assert not list(out.rglob(".*.tmp"))
    assert verify_prepared(out) == []
    # 0803 is 40x56 after the mod crop: one 40-row window, 2 columns (0 and 56-48=8).
    assert [r["box"] for r in records if r["file"].startswith("HR/0803")] == [
        [0, 0, 40, 48],
        [0, 8, 40, 48],
    ]


def test_rerun_skips_finished_images_and_repairs_the_rest(tmp_path: Path) -> None:
    src = make_sources(tmp_path / "src")
    out = tmp_path / "out"
    prepare_dataset([src], out, SETTINGS)
    reference = (out / MANIFEST).read_text()
    # Damage: one LR file lost, the manifest cut mid-line, a temp file left by a kill.
    (out / "LR_bicubic/X4/0002_s001.png").unlink()
    text = (out / MANIFEST).read_text()
    (out / MANIFEST).write_text(text + text.splitlines()[0][:40])
    (out / "HR" / ".0001_s001.png.abc.tmp").write_bytes(b"partial")
    calls: list[tuple[int, int]] = []
    again = prepare_dataset([src], out, SETTINGS, progress=lambda d, t: calls.append((d, t)))
    assert (again.prepared, again.skipped) == (1, 2)
    assert calls[0] == (2, 3) and calls[-1] == (3, 3)
    assert (out / MANIFEST).read_text() == reference
    assert not list(out.rglob(".*.tmp"))
    assert verify_prepared(out) == []


def test_an_interrupted_run_leaves_only_whole_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_sources(tmp_path / "src")
    clean = tmp_path / "clean"
    prepare_dataset([src], clean, SETTINGS)
    out = tmp_path / "out"
    import irformer.data.prepare as prepare_module

    real_replace = prepare_module.os.replace
    count = {"n": 0}
    # prepare.json, the manifest, then the first image's files; die 5 files into the second.
    first_image = sum(Path(r["source"]).stem == "0001" for r in read_manifest(clean))
    kill_at = 2 + first_image + 5

    def replace_then_die(a: str, b: str) -> None:
        count["n"] += 1
        if count["n"] == kill_at:
            raise KeyboardInterrupt("killed")
        real_replace(a, b)

    monkeypatch.setattr(prepare_module.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([src], out, SETTINGS)
    monkeypatch.setattr(prepare_module.os, "replace", real_replace)
    assert not list(out.rglob(".*.tmp"))
    for png in out.rglob("*.png"):  # every file there is whole
        assert png.read_bytes() == (clean / png.relative_to(out)).read_bytes(), png
    listed = {Path(r["source"]).stem for r in read_manifest(out)}
    assert len(listed) == 1  # only the finished image is listed
    result = prepare_dataset([src], out, SETTINGS)
    assert (result.prepared, result.skipped) == (2, 1)
    assert (out / MANIFEST).read_text().replace(str(out), "") == (
        (clean / MANIFEST).read_text().replace(str(clean), "")
    )


def test_workers_give_the_same_files(tmp_path: Path) -> None:
    src = make_sources(tmp_path / "src")
    prepare_dataset([src], tmp_path / "one", SETTINGS)
    prepare_dataset([src], tmp_path / "two", SETTINGS, workers=2)
    assert (tmp_path / "one" / MANIFEST).read_text() == (tmp_path / "two" / MANIFEST).read_text()


def test_other_settings_or_clashing_names_are_refused(tmp_path: Path) -> None:
    src = make_sources(tmp_path / "src")
    prepare_dataset([src / "0803.png"], tmp_path / "out", SETTINGS)
    with pytest.raises(PrepareError, match="crop: 48 there, 96 now"):
        prepare_dataset([src], tmp_path / "out", PrepareSettings(crop=96, step=24, scales=(2, 4)))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(src / "0001.png", other / "0001.png")
    with pytest.raises(PrepareError, match="share the name '0001'"):
        prepare_dataset([src, other], tmp_path / "out2", SETTINGS)


# --------------------------------------------------------------------------- packs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("prepared")
    src = make_sources(tmp / "src")
    prepare_dataset([src], tmp / "out", SETTINGS, pack="raw")
    return tmp / "out"


@pytest.mark.parametrize("codec", ["raw", "png"])
def test_pack_random_access_equals_the_files(prepared: Path, tmp_path: Path, codec: str) -> None:
    out = prepared
    if codec == "png":
        out = tmp_path / "png"
        shutil.copytree(prepared, out)
        shutil.rmtree(out / "packs")
        prepare_dataset([Path(r["source"]) for r in read_manifest(out)][:1], out, SETTINGS)
        prepare_dataset(
            sorted({Path(r["source"]) for r in read_manifest(prepared)}),
            out,
            SETTINGS,
            pack="png",
        )
    for split, folder in (("HR", "HR"), ("LR_bicubic_X4", "LR_bicubic/X4")):
        pack = PackedImages(pack_path(out, split))
        assert pack.codec == codec
        files = sorted((out / folder).glob("*.png"))
        assert sorted(pack.keys) == sorted(f.stem for f in files)
        rng = np.random.default_rng(1)
        for i in rng.permutation(len(pack))[:8]:  # random order, not the file order
            expected = read_image(out / folder / f"{pack.keys[i]}.png")
            np.testing.assert_array_equal(pack[i], expected)
            h, w, _ = pack.records[i].shape
            t, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            np.testing.assert_array_equal(
                pack.region(i, t, left, h // 2, w // 2),
                expected[t : t + h // 2, left : left + w // 2],
            )
        assert pack.verify() == []


def test_packs_are_rebuilt_only_when_stale_and_damage_is_found(
    prepared: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    sources = sorted({Path(r["source"]) for r in read_manifest(out)})
    before = pack_path(out, "HR").stat().st_mtime_ns
    prepare_dataset(sources, out, SETTINGS, pack="raw")
    assert pack_path(out, "HR").stat().st_mtime_ns == before  # up to date: untouched
    data = bytearray(pack_path(out, "LR_bicubic_X2").read_bytes())
    first = PackedImages(pack_path(out, "LR_bicubic_X2")).records[0]
    data[first.offset] ^= 0xFF
    pack_path(out, "LR_bicubic_X2").write_bytes(bytes(data))
    problems = verify_prepared(out)
    assert problems == [f"LR_bicubic_X2.irpack: record {first.key}: sha256 differs"]


def test_bad_pack_files_are_named(tmp_path: Path, prepared: Path) -> None:
    bad = tmp_path / "bad.irpack"
    bad.write_bytes(b"not a pack" + b"\0" * 100)
    with pytest.raises(PackFormatError, match="not an irpack file"):
        PackedImages(bad)
    cut = tmp_path / "cut.irpack"
    cut.write_bytes(pack_path(prepared, "HR").read_bytes()[:-10])
    with pytest.raises(PackFormatError, match="truncated"):
        PackedImages(cut)


def _items(dataset, n: int) -> list[dict]:
    stream = PositionedDataset(dataset, seed=3)
    return [stream[k] for k in range(n)]


def test_pack_datasets_yield_the_folder_datasets_items(prepared: Path) -> None:
    folder = PairedImageDataset(
        prepared / "HR", prepared / "LR_bicubic/X4", scale=4, patch_size=16, augment=True
    )
    packed = PackedPairDataset(
        pack_path(prepared, "HR"),
        pack_path(prepared, "LR_bicubic_X4"),
        scale=4,
        patch_size=16,
        augment=True,
    )
    assert len(folder) == len(packed)
    for a, b in zip(_items(folder, 12), _items(packed, 12)):
        assert a["name"] == b["name"]
        assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
    degradation = make_degradation("dn", scale=1, sigma=25)
    folder = DegradedImageDataset(prepared / "HR", degradation, patch_size=16, augment=True)
    packed = PackedDegradedDataset(
        pack_path(prepared, "HR"), degradation, patch_size=16, augment=True
    )
    for a, b in zip(_items(folder, 6), _items(packed, 6)):
        assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
    grey = PackedPairDataset(
        pack_path(prepared, "HR"), pack_path(prepared, "LR_bicubic_X2"), scale=2, channels="grey"
    )[0]
    assert grey["lq"].shape[0] == grey["gt"].shape[0] == 1


def test_mismatched_packs_are_refused(prepared: Path) -> None:
    with pytest.raises(ValueError, match="is not 2x"):
        PackedPairDataset(pack_path(prepared, "HR"), pack_path(prepared, "LR_bicubic_X4"), scale=2)


def test_training_reads_prepared_folders_and_packs_alike(prepared: Path, tmp_path: Path) -> None:
    from irformer.engine.train import read_metrics, train

    def run(name: str, gt: Path, lq: Path) -> list[float]:
        cfg = load_config(
            None,
            [
                f"name={name}",
                "model.arch=swinir_light_x4",
                "model.scale=4",
                "model.overrides={embed_dim: 6, depths: [1], num_heads: [1], window_size: 4}",
                f"data.train=[{gt}]",
                f"data.train_lq=[{lq}]",
                "data.patch_size=16",
                "data.batch_size=2",
                "data.workers=0",
                "train.iters=3",
                "val.every=0",
                "log.every=1",
                f"log.out_dir={tmp_path / name}",
            ],
        )
        dataset = build_train_dataset(cfg)
        assert isinstance(dataset, PackedPairDataset if gt.suffix else PairedImageDataset)
        train(cfg, device="cpu")
        return [r["loss"] for r in read_metrics(tmp_path / name)]

    folders = run("folders", prepared / "HR", prepared / "LR_bicubic/X4")
    packs = run("packs", pack_path(prepared, "HR"), pack_path(prepared, "LR_bicubic_X4"))
    assert len(folders) == 3 and folders == packs  # the same samples, bit for bit


def test_a_pack_paired_with_a_folder_is_refused(prepared: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "model.scale=4",
            "model.arch=swinir_light_x4",
            f"data.train=[{pack_path(prepared, 'HR')}]",
            f"data.train_lq=[{prepared / 'LR_bicubic/X4'}]",
        ],
    )
    with pytest.raises(ValueError, match="pair a pack with a pack"):
        build_train_dataset(cfg)


# --------------------------------------------------------------------------- CLI


def test_cli_prepare_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_sources(tmp_path / "src")
    out = tmp_path / "out"
    args = ["data", "prepare", str(src), "--out", str(out), "--crop", "48", "--step", "24"]
    assert cli_main([*args, "--scales", "2,4", "--workers", "0", "--no-progress"]) == 0
    assert "3 source image(s), 3 prepared now" in capsys.readouterr().out
    assert cli_main(["data", "verify", str(out)]) == 0
    record = json.loads((out / MANIFEST).read_text().splitlines()[0])
    (out / record["file"]).write_bytes(b"damaged")
    assert cli_main(["data", "verify", str(out)]) == 1
    assert f"{record['file']}: sha256 differs" in capsys.readouterr().err
    assert cli_main([*args, "--scales", "2,3"]) == 2  # other settings: one clear error
    assert "prepared with other settings" in capsys.readouterr().err
