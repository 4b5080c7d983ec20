"""Paper-scale training data: sub-images, MATLAB-bicubic LR once per scale, a manifest, packs.

DIV2K/Flickr2K images are ~2040x1400 PNGs: decoding one (and bicubic-resizing
it) per training sample starves a GPU. The field's toolkits (BasicSR's
``extract_subimages.py``) therefore cut every HR image once into overlapping
480x480 sub-images and cut its published LR images the same way. This module
does that for any HR folder(s), and makes the LR itself with
:func:`irformer.data.degradations.matlab_imresize`, the exact resize the
evaluation uses:

``OUT/HR/{stem}_s{NNN}.png``
    Sub-image NNN (from 001, row-major) of source ``{stem}``.
``OUT/LR_bicubic/X{s}/{stem}_s{NNN}.png``
    The same region of the whole-image LR (one ``matlab_imresize(hr, 1/s)`` per
    image and scale, then cropped: the LR border pixels are those of the whole
    image, as in DIV2K's published LR, not of a resized crop). Same file name as
    the HR sub-image, so ``data.train=[OUT/HR] data.train_lq=[OUT/LR_bicubic/X4]``
    pairs them.
``OUT/manifest.jsonl``
    One JSON record per output file: ``file`` (relative to OUT), ``size``
    (bytes), ``sha256``, ``kind`` (``hr``/``lr``), ``scale`` (1 for HR), ``shape``
    ``[h, w, c]``, ``box`` ``[top, left, height, width]`` of the region in the
    source's pixels (HR and its LR partners share it; the LR crop is
    ``box / scale``), ``source`` (path), ``source_size`` and ``source_sha256``, and
    ``source_files`` (how many files that source produced). Sorted by file name
    once the run completes.
``OUT/prepare.json``
    The settings; a rerun with other settings is refused.
``OUT/packs/{HR,LR_bicubic_X{s}}.irpack``
    Optional, one per split (:mod:`irformer.data.packed`).

Geometry. Each HR image is first cropped at the bottom/right to a multiple of
``lcm(scales)`` (12 for x2/x3/x4: at most 11 pixels) so that one set of HR
sub-images pairs with every scale's LR; crop and step must be multiples of it.
Along each axis the windows start at ``0, step, 2*step, ...`` while they fit;
when more than ``thresh`` pixels would remain uncovered at the far border, one
more window is placed flush with it (BasicSR's rule; ``thresh = 0``, the
default, covers every pixel). An axis shorter than the crop gets one window of
its full length, so such sub-images are smaller than ``crop``.

Resume and atomicity. Every file is written to a temporary name and renamed,
so a killed run never leaves half a file. A source image is finished when the
manifest holds all of its ``source_files`` records and those files exist with
the recorded sizes; a rerun skips finished images and redoes the rest (their
partial outputs are overwritten). ``verify_prepared`` recomputes every checksum.
Work is spread over worker processes (one source image per task).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from irformer.data.degradations import matlab_imresize
from irformer.data.io import list_images, read_image
from irformer.data.packed import PACK_SUFFIX, Codec, PackedImages, write_pack

__all__ = [
    "MANIFEST",
    "SETTINGS_FILE",
    "PrepareError",
    "PrepareResult",
    "PrepareSettings",
    "extract_boxes",
    "pack_path",
    "prepare_dataset",
    "prepare_image",
    "read_manifest",
    "split_dirs",
    "verify_prepared",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
SETTINGS_FILE = "prepare.json"
FORMAT_VERSION = 1


class PrepareError(ValueError):
    """Bad settings or sources, or an output folder prepared with other settings."""


@dataclass(frozen=True)
class PrepareSettings:
    """How sub-images are cut (BasicSR's DF2K defaults) and which LR scales are made."""

    crop: int = 480
    """Sub-image side in HR pixels."""
    step: int = 240
    """Distance between window origins (crop - step = the overlap)."""
    thresh: int = 0
    """Uncovered border pixels tolerated before one more window is placed flush with it."""
    scales: tuple[int, ...] = (2, 3, 4)
    """LR scales made (MATLAB bicubic); empty for HR only (denoising, JPEG)."""
    compression: int = 3
    """PNG compression level 0-9 (3, as BasicSR's script: near-smallest files, fast)."""

    def __post_init__(self) -> None:
        if self.crop < 1 or self.step < 1:
            raise PrepareError(f"crop ({self.crop}) and step ({self.step}) must be >= 1")
        if self.thresh < 0:
            raise PrepareError(f"thresh must be >= 0, got {self.thresh}")
        if len(set(self.scales)) != len(self.scales) or any(s < 2 for s in self.scales):
            raise PrepareError(f"scales must be distinct integers >= 2, got {list(self.scales)}")
        if not 0 <= self.compression <= 9:
            raise PrepareError(f"PNG compression must be 0-9, got {self.compression}")
        for name, value in (("crop", self.crop), ("step", self.step)):
            if value % self.mod:
                raise PrepareError(
                    f"{name} {value} is not a multiple of {self.mod} (the least common multiple "
                    f"of the scales {list(self.scales)}): its LR windows would not align"
                )

    @property
    def mod(self) -> int:
        """HR sizes and window origins are multiples of this: ``lcm(scales)``."""
        return math.lcm(*self.scales) if self.scales else 1


@dataclass(frozen=True)
class PrepareResult:
    """What :func:`prepare_dataset` did."""

    out: Path
    sources: int
    prepared: int
    """Source images processed in this run."""
    skipped: int
    """Source images already finished by an earlier run."""
    files: int
    """Files listed in the manifest."""
    packs: dict[str, Path] = field(default_factory=dict)
    """Split name -> pack written or found up to date."""


# --------------------------------------------------------------------------- geometry


def _starts(length: int, crop: int, step: int, thresh: int) -> tuple[list[int], int]:
    if length <= crop:
        return [0], length
    starts = list(range(0, length - crop + 1, step))
    if length - (starts[-1] + crop) > thresh:
        starts.append(length - crop)
    return starts, crop


def extract_boxes(height: int, width: int, settings: PrepareSettings) -> list[tuple[int, ...]]:
    """``(top, left, h, w)`` of every sub-image of a (mod-cropped) ``height x width`` image,
    row-major (BasicSR's order and border rule; see the module docstring)."""
    tops, h = _starts(height, settings.crop, settings.step, settings.thresh)
    lefts, w = _starts(width, settings.crop, settings.step, settings.thresh)
    return [(t, left, h, w) for t in tops for left in lefts]


def split_dirs(settings: PrepareSettings) -> dict[str, str]:
    """Split name -> folder relative to the output: ``HR`` and ``LR_bicubic_X{s}``."""
    dirs = {"HR": "HR"}
    dirs.update({f"LR_bicubic_X{s}": f"LR_bicubic/X{s}" for s in settings.scales})
    return dirs


def pack_path(out: str | Path, split: str) -> Path:
    """Where the pack of ``split`` (``HR``, ``LR_bicubic_X4``) lives."""
    return Path(out) / "packs" / f"{split}{PACK_SUFFIX}"


# --------------------------------------------------------------------------- one image


def _atomic_write(path: Path, data: bytes) -> None:
    # No fsync per file: a killed process never leaves half a file (rename is
    # atomic); after a power cut, ``verify_prepared`` finds a damaged file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _encode_png(image: np.ndarray, compression: int) -> bytes:
    bgr = image[..., ::-1] if image.shape[2] == 3 else image
    ok, buf = cv2.imencode(
        ".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, compression]
    )
    if not ok:
        raise RuntimeError("OpenCV failed to encode a sub-image as PNG")
    return buf.tobytes()


def prepare_image(source: Path, out: Path, settings: PrepareSettings) -> list[dict[str, Any]]:
    """Cut one source image into sub-images (+ LR per scale); returns its manifest records.

    Every output file is written atomically; the records are what the manifest
    lists for them.
    """
    raw = source.read_bytes()
    hr = read_image(source, channels="rgb")
    mod = settings.mod
    hr = hr[: hr.shape[0] - hr.shape[0] % mod, : hr.shape[1] - hr.shape[1] % mod]
    if hr.shape[0] == 0 or hr.shape[1] == 0:
        raise PrepareError(f"{source} ({hr.shape[:2]}) is smaller than lcm(scales) = {mod}")
    lrs = {s: matlab_imresize(hr, 1.0 / s) for s in settings.scales}
    boxes = extract_boxes(hr.shape[0], hr.shape[1], settings)
    common = {
        "source": str(source),
        "source_size": len(raw),
        "source_sha256": hashlib.sha256(raw).hexdigest(),
        "source_files": len(boxes) * (1 + len(settings.scales)),
    }
    dirs = [("HR", 1, hr)] + [(f"LR_bicubic/X{s}", s, lrs[s]) for s in settings.scales]
    records = []
    for number, (top, left, h, w) in enumerate(boxes, start=1):
        name = f"{source.stem}_s{number:03d}.png"
        for folder, s, image in dirs:
            crop = image[top // s : (top + h) // s, left // s : (left + w) // s]
            data = _encode_png(crop, settings.compression)
            path = out / folder / name
            _atomic_write(path, data)
            records.append(
                {
                    "file": f"{folder}/{name}",
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "kind": "hr" if s == 1 else "lr",
                    "scale": s,
                    "shape": list(crop.shape),
                    "box": [top, left, h, w],
                    **common,
                }
            )
    return records


def _work(args: tuple[Path, Path, PrepareSettings]) -> tuple[str, list[dict[str, Any]]]:
    source, out, settings = args
    return str(source), prepare_image(source, out, settings)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core: no nested thread pools


# --------------------------------------------------------------------------- manifest


def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def read_manifest(out: str | Path) -> list[dict[str, Any]]:
    """The manifest's records; a last line cut short by a kill is ignored."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: ignoring a cut-off last line", path)
                continue
            raise PrepareError(f"{path}, line {number}: not JSON") from None
    return records


def _write_manifest(out: Path, records: Iterable[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    _atomic_write(out / MANIFEST, text.encode())


def _finished_sources(
    out: Path, records: Sequence[dict[str, Any]], sources: Sequence[Path]
) -> dict[str, list[dict[str, Any]]]:
    """Records of the sources whose every output is listed and present with its size,
    keyed by file stem (unique among the sources; output names derive from it, so a
    moved source folder still counts as done)."""
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_source.setdefault(Path(r["source"]).stem, []).append(r)
    current = {s.stem: s for s in sources}
    finished = {}
    for source, group in by_source.items():
        path = current.get(source)
        if path is None:
            continue
        complete = len({r["file"] for r in group}) == group[0]["source_files"] == len(group)
        same_source = path.stat().st_size == group[0]["source_size"]
        present = all(
            (out / r["file"]).is_file() and (out / r["file"]).stat().st_size == r["size"]
            for r in group
        )
        if complete and same_source and present:
            finished[source] = group
    dropped = sorted(set(by_source) - set(current))
    if dropped:
        logger.warning(
            "%d image(s) in %s are not among the sources (e.g. %s): dropped from the manifest, "
            "their files left in place",
            len(dropped),
            out / MANIFEST,
            dropped[0],
        )
    return finished


def _check_settings(out: Path, settings: PrepareSettings) -> None:
    path = out / SETTINGS_FILE
    wanted = {"version": FORMAT_VERSION, **asdict(settings), "scales": list(settings.scales)}
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted:
            diff = ", ".join(
                f"{k}: {found.get(k)} there, {v} now"
                for k, v in wanted.items()
                if found.get(k) != v
            )
            raise PrepareError(
                f"{out} was prepared with other settings ({diff}); use another output folder "
                "or the settings in its prepare.json"
            )
        return
    _atomic_write(path, (json.dumps(wanted, indent=2) + "\n").encode())


def _gather_sources(sources: Sequence[str | Path]) -> list[Path]:
    paths: list[Path] = []
    for src in sources:
        src = Path(src)
        paths.extend(list_images(src) if src.is_dir() else [src])
    seen: dict[str, Path] = {}
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"source image not found: {p}")
        if p.stem in seen:
            raise PrepareError(
                f"two sources share the name {p.stem!r}: {seen[p.stem]} and {p}; "
                "sub-image names would collide"
            )
        seen[p.stem] = p
    if not paths:
        raise PrepareError("no source images given")
    return [p.resolve() for p in paths]


# --------------------------------------------------------------------------- the dataset


def prepare_dataset(
    sources: Sequence[str | Path],
    out: str | Path,
    settings: PrepareSettings | None = None,
    *,
    workers: int = 0,
    pack: Codec | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """Prepare HR folders/files ``sources`` into ``out`` (layout: module docstring).

    Resumable: images finished by an earlier run are skipped. ``workers`` > 0
    processes images in that many processes (0: in this process). ``pack``:
    also write one pack per split with that codec (``raw`` or ``png``), or keep
    an up-to-date one. ``progress(done, total)`` is called after each image.
    """
    settings = settings or PrepareSettings()
    out = Path(out)
    paths = _gather_sources(sources)
    for rel in split_dirs(settings).values():
        (out / rel).mkdir(parents=True, exist_ok=True)
        for stale in (out / rel).glob(".*.tmp"):  # a write cut short by a kill
            stale.unlink()
    _check_settings(out, settings)

    finished = _finished_sources(out, read_manifest(out), paths)
    _write_manifest(out, (r for group in finished.values() for r in group))
    todo = [p for p in paths if p.stem not in finished]
    logger.info(
        "%d source image(s): %d finished earlier, %d to prepare",
        len(paths),
        len(finished),
        len(todo),
    )
    done = len(finished)
    if progress is not None:
        progress(done, len(paths))
    with (out / MANIFEST).open("a") as manifest:

        def record(group: list[dict[str, Any]]) -> None:
            nonlocal done
            # One write per image: a cut-off group is incomplete and redone next time.
            manifest.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in group))
            manifest.flush()
            done += 1
            if progress is not None:
                progress(done, len(paths))

        tasks = [(p, out, settings) for p in todo]
        if workers > 0 and len(todo) > 1:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, len(todo)), initializer=_init_worker) as pool:
                for _source, group in pool.imap_unordered(_work, tasks):
                    record(group)
        else:
            for task in tasks:
                record(_work(task)[1])

    records = read_manifest(out)
    records.sort(key=lambda r: _natural_key(r["file"]))
    _write_manifest(out, records)
    packs = {}
    if pack is not None:
        for split, rel in split_dirs(settings).items():
            packs[split] = _ensure_pack(out, split, rel, records, pack, settings)
    return PrepareResult(
        out=out,
        sources=len(paths),
        prepared=len(todo),
        skipped=len(finished),
        files=len(records),
        packs=packs,
    )


# --------------------------------------------------------------------------- packs


def _ensure_pack(
    out: Path,
    split: str,
    rel: str,
    records: Sequence[dict[str, Any]],
    codec: Codec,
    settings: PrepareSettings,
) -> Path:
    """Write the pack of one split unless an identical one (same files, same checksums) exists."""
    mine = [r for r in records if r["file"].startswith(rel + "/")]
    mine.sort(key=lambda r: _natural_key(Path(r["file"]).name))  # list_images' order
    path = pack_path(out, split)
    if path.is_file():
        try:
            existing = PackedImages(path)
            same = existing.codec == codec and existing.meta.get("files") == {
                r["file"]: r["sha256"] for r in mine
            }
        except ValueError:
            same = False
        if same:
            logger.info("%s is up to date", path)
            return path

    def loader(record: dict[str, Any]) -> Callable[[], tuple[np.ndarray, bytes]]:
        def load() -> tuple[np.ndarray, bytes]:
            file = out / record["file"]
            data = file.read_bytes()
            if hashlib.sha256(data).hexdigest() != record["sha256"]:
                raise PrepareError(f"{file}: checksum differs from the manifest; rerun prepare")
            return read_image(file, channels="keep"), data

        return load

    meta = {
        "split": split,
        "settings": {**asdict(settings), "scales": list(settings.scales)},
        "files": {r["file"]: r["sha256"] for r in mine},
    }
    items = ((Path(r["file"]).stem, r["file"], loader(r)) for r in mine)
    write_pack(path, items, codec=codec, meta=meta)
    logger.info("wrote %s (%d images, codec %s)", path, len(mine), codec)
    return path


# --------------------------------------------------------------------------- verify


def verify_prepared(out: str | Path) -> list[str]:
    """Recompute the sha256 of every manifest file and pack record; returns the problems."""
    out = Path(out)
    records = read_manifest(out)
    if not records:
        return [f"{out / MANIFEST}: missing or empty"]
    problems = []
    for r in records:
        path = out / r["file"]
        if not path.is_file():
            problems.append(f"{r['file']}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != r["sha256"]:
            problems.append(f"{r['file']}: sha256 differs from the manifest")
    for pack in sorted((out / "packs").glob(f"*{PACK_SUFFIX}")):
        try:
            bad = PackedImages(pack).verify()
        except ValueError as exc:
            problems.append(f"{pack.name}: {exc}")
            continue
        problems.extend(f"{pack.name}: record {key}: sha256 differs" for key in bad)
    return problems
