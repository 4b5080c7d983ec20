"""One file per split for fast random access: the ``.irpack`` format and its datasets.

A prepared split (``HR`` or ``LR_bicubic/X4`` of :mod:`irformer.data.prepare`)
is thousands of small PNG files; a training worker opening and decoding one per
sample spends most of its time in the file system and zlib. A pack holds the
same images in one file, either as raw pixels (``codec="raw"``: no decoding at
all, and a random patch reads only its own rows through a memory map) or as the
PNG bytes themselves (``codec="png"``: the size of the folder, one open file).

File layout (little-endian), version 1::

    offset  0  8 bytes   magic b"IRPACK\\x00\\x01"
    offset  8  uint64    index offset (bytes from the start of the file)
    offset 16  uint64    index length (bytes)
    offset 24  40 bytes  zero (reserved)
    offset 64  records   one per image, each starting at a multiple of 64
    index               UTF-8 JSON:
        {"format": "irpack", "version": 1, "codec": "raw" | "png",
         "meta": {...},                         # free-form (the prepare settings)
         "records": [{"key": "0001_s001",       # file stem, the pairing key
                      "file": "HR/0001_s001.png",
                      "offset": int, "length": int,
                      "shape": [h, w, c], "dtype": "uint8" | "uint16",
                      "sha256": hex of the record's bytes}, ...]}

Raw records are the ``(h, w, c)`` array in C order. Records are in natural file
name order, the order :func:`irformer.data.io.list_images` gives the folder, so
a pack and its folder yield the same dataset items. A pack is written to a
temporary file and renamed into place, so a reader never sees half a pack.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from irformer.data.datasets import _check_patch, _item_rng, _to_item, augment_pair
from irformer.data.degradations import Degradation
from irformer.data.io import ChannelMode, _convert_channels

__all__ = [
    "PACK_SUFFIX",
    "Codec",
    "PackFormatError",
    "PackRecord",
    "PackedDegradedDataset",
    "PackedImages",
    "PackedPairDataset",
    "write_pack",
]

PACK_SUFFIX = ".irpack"
MAGIC = b"IRPACK\x00\x01"
VERSION = 1
HEADER_SIZE = 64
ALIGN = 64
Codec = Literal["raw", "png"]
CODECS: tuple[str, ...] = ("raw", "png")


class PackFormatError(ValueError):
    """A file is not a readable ``.irpack`` (bad magic, version, index or bounds)."""


@dataclass(frozen=True)
class PackRecord:
    """One image of a pack (see the module docstring for the fields)."""

    key: str
    file: str
    offset: int
    length: int
    shape: tuple[int, int, int]
    dtype: str
    sha256: str


# --------------------------------------------------------------------------- writing


def _encode_png(image: np.ndarray) -> bytes:
    bgr = image[..., ::-1] if image.shape[2] == 3 else image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a pack record as PNG")
    return buf.tobytes()


def write_pack(
    path: str | Path,
    items: Iterable[tuple[str, str, Callable[[], tuple[np.ndarray, bytes]]]],
    *,
    codec: Codec,
    meta: dict[str, Any] | None = None,
) -> list[PackRecord]:
    """Write a pack atomically; returns its records.

    ``items``: ``(key, file, load)`` in the order to store; ``load()`` returns the
    decoded ``(h, w, c)`` image and the file's bytes (stored as they are with
    ``codec="png"`` when the file is a PNG, so no pixel is re-encoded).
    """
    if codec not in CODECS:
        raise ValueError(f"unknown pack codec {codec!r}; expected one of {', '.join(CODECS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    records: list[PackRecord] = []
    keys: set[str] = set()
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\x00" * HEADER_SIZE)
            offset = HEADER_SIZE
            for key, file, load in items:
                if key in keys:
                    raise ValueError(f"pack {path}: key {key!r} appears twice ({file})")
                keys.add(key)
                image, data = load()
                if image.ndim == 2:
                    image = image[..., None]
                if codec == "raw":
                    payload = np.ascontiguousarray(image).tobytes()
                elif file.lower().endswith(".png"):
                    payload = data
                else:
                    payload = _encode_png(image)
                pad = -offset % ALIGN
                fh.write(b"\x00" * pad)
                offset += pad
                fh.write(payload)
                records.append(
                    PackRecord(
                        key=key,
                        file=file,
                        offset=offset,
                        length=len(payload),
                        shape=(int(image.shape[0]), int(image.shape[1]), int(image.shape[2])),
                        dtype=str(image.dtype),
                        sha256=hashlib.sha256(payload).hexdigest(),
                    )
                )
                offset += len(payload)
            index = json.dumps(
                {
                    "format": "irpack",
                    "version": VERSION,
                    "codec": codec,
                    "meta": meta or {},
                    "records": [r.__dict__ | {"shape": list(r.shape)} for r in records],
                }
            ).encode()
            fh.write(index)
            fh.seek(0)
            fh.write(MAGIC + struct.pack("<QQ", offset, len(index)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return records


# --------------------------------------------------------------------------- reading


class PackedImages(Sequence[np.ndarray]):
    """Read-only random access to the images of one pack.

    The index is parsed once; the pixels are read through a memory map opened
    lazily in each process (so DataLoader workers, forked or spawned, each get
    their own). ``pack[i]`` is the whole ``(h, w, c)`` image; :meth:`region`
    reads a crop, touching only its rows with the raw codec.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"pack not found: {self.path}")
        size = self.path.stat().st_size
        with self.path.open("rb") as fh:
            header = fh.read(HEADER_SIZE)
            if len(header) < HEADER_SIZE or header[:8] != MAGIC:
                raise PackFormatError(
                    f"{self.path} is not an irpack file (magic {header[:8]!r}, expected {MAGIC!r})"
                )
            index_offset, index_length = struct.unpack("<QQ", header[8:24])
            if index_offset < HEADER_SIZE or index_offset + index_length != size:
                raise PackFormatError(
                    f"{self.path}: index at {index_offset}+{index_length} does not end the "
                    f"{size}-byte file (truncated or still being written?)"
                )
            fh.seek(index_offset)
            try:
                index = json.loads(fh.read(index_length))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise PackFormatError(f"{self.path}: unreadable index: {exc}") from exc
        if index.get("format") != "irpack" or index.get("version") != VERSION:
            raise PackFormatError(
                f"{self.path}: index says format {index.get('format')!r} version "
                f"{index.get('version')!r}; this reader reads irpack version {VERSION}"
            )
        if index.get("codec") not in CODECS:
            raise PackFormatError(f"{self.path}: unknown codec {index.get('codec')!r}")
        self.codec: Codec = index["codec"]
        self.meta: dict[str, Any] = dict(index.get("meta", {}))
        self.records = [
            PackRecord(**{**r, "shape": tuple(int(v) for v in r["shape"])})
            for r in index["records"]
        ]
        for r in self.records:
            if r.offset < HEADER_SIZE or r.offset + r.length > index_offset:
                raise PackFormatError(f"{self.path}: record {r.key!r} lies outside the data")
            if (
                self.codec == "raw"
                and r.length != int(np.prod(r.shape)) * np.dtype(r.dtype).itemsize
            ):
                raise PackFormatError(f"{self.path}: raw record {r.key!r} has the wrong length")
        self._map: np.memmap | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_map"], state["_pid"] = None, -1  # each process maps the file itself
        return state

    def _data(self) -> np.memmap:
        if self._map is None or self._pid != os.getpid():
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            self._pid = os.getpid()
        return self._map

    def __len__(self) -> int:
        return len(self.records)

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.records]

    def payload(self, index: int) -> memoryview:
        """The stored bytes of record ``index`` (raw pixels or PNG)."""
        r = self.records[index]
        return memoryview(self._data()[r.offset : r.offset + r.length])

    def _raw(self, index: int) -> np.ndarray:
        r = self.records[index]
        return np.ndarray(r.shape, dtype=r.dtype, buffer=self._data(), offset=r.offset)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        if self.codec == "raw":
            return np.array(self._raw(index))  # a private, writable copy
        r = self.records[index]
        flag = cv2.IMREAD_UNCHANGED
        arr = cv2.imdecode(np.frombuffer(self.payload(index), np.uint8), flag)
        if arr is None:
            raise PackFormatError(f"{self.path}: record {r.key!r} is not a decodable PNG")
        if arr.ndim == 2:
            arr = arr[..., None]
        elif arr.shape[2] == 3:
            arr = np.ascontiguousarray(arr[..., ::-1])
        if tuple(arr.shape) != r.shape:
            raise PackFormatError(f"{self.path}: record {r.key!r} decodes to {arr.shape}")
        return arr

    def region(self, index: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """``image[top:top+height, left:left+width]`` (a copy); raw packs read only those rows."""
        h, w, _ = self.records[index].shape
        if top < 0 or left < 0 or top + height > h or left + width > w:
            raise ValueError(
                f"{self.path}: region {top},{left} {height}x{width} outside record "
                f"{self.records[index].key!r} of {h}x{w}"
            )
        if self.codec == "raw":
            return np.array(self._raw(index)[top : top + height, left : left + width])
        return self[index][top : top + height, left : left + width].copy()

    def verify(self) -> list[str]:
        """Recompute every record's sha256; returns the keys that do not match."""
        return [
            r.key
            for i, r in enumerate(self.records)
            if hashlib.sha256(self.payload(i)).hexdigest() != r.sha256
        ]


# --------------------------------------------------------------------------- datasets


class PackedPairDataset(Dataset):
    """GT/LQ packs paired by key: :class:`irformer.data.datasets.PairedImageDataset`
    with the images read from two packs.

    Items equal the folder dataset's for the same random state (the same crop
    and flips are drawn, in the same order); the raw codec reads only the patch.
    """

    def __init__(
        self,
        gt_pack: str | Path,
        lq_pack: str | Path,
        *,
        scale: int = 1,
        patch_size: int | None = None,
        augment: bool = False,
        channels: ChannelMode = "rgb",
    ) -> None:
        _check_patch(patch_size, scale)
        self.gt = PackedImages(gt_pack)
        self.lq = PackedImages(lq_pack)
        self.channels = channels
        self.scale = scale
        self.patch_size = patch_size
        self.augment = augment
        if self.gt.keys != self.lq.keys:
            missing = sorted(set(self.gt.keys) ^ set(self.lq.keys))[:5]
            raise ValueError(
                f"packs {gt_pack} and {lq_pack} do not hold the same keys in the same order "
                f"(e.g. {missing or 'same keys, other order'}); pack both from one prepared folder"
            )
        for g, q in zip(self.gt.records, self.lq.records):
            lh, lw, _ = q.shape
            if g.shape[0] // scale != lh or g.shape[1] // scale != lw:
                raise ValueError(
                    f"{g.key}: ground truth {g.shape[:2]} is not {scale}x the low-quality "
                    f"{q.shape[:2]} ({gt_pack}, {lq_pack})"
                )
            if patch_size is not None and min(lh, lw) < patch_size // scale:
                raise ValueError(
                    f"{q.key} ({lh}x{lw}) is smaller than the LQ patch {patch_size // scale}"
                )

    def __len__(self) -> int:
        return len(self.gt)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        s = self.scale
        key = self.gt.records[index].key
        lh, lw, _ = self.lq.records[index].shape
        rng = _item_rng() if (self.patch_size is not None or self.augment) else None
        if self.patch_size is not None:
            assert rng is not None
            p = self.patch_size // s
            # The draws of irformer.data.datasets.random_crop_pair, in its order.
            top = int(rng.integers(0, lh - p + 1))
            left = int(rng.integers(0, lw - p + 1))
            lq = self.lq.region(index, top, left, p, p)
            gt = self.gt.region(index, top * s, left * s, p * s, p * s)
        else:
            lq = self.lq[index]
            gt = self.gt.region(index, 0, 0, lh * s, lw * s)
        # Channel conversion is per pixel: converting the crop = cropping the converted image.
        lq = _convert_channels(lq, self.channels, self.lq.path)
        gt = _convert_channels(gt, self.channels, self.gt.path)
        if self.augment:
            assert rng is not None
            lq, gt = augment_pair(lq, gt, rng)
        return _to_item(lq, gt, key)


class PackedDegradedDataset(Dataset):
    """Clean images from one pack degraded on the fly:
    :class:`irformer.data.datasets.DegradedImageDataset` reading a pack (training only:
    ``patch_size`` is required, and the random crop reads only the patch)."""

    def __init__(
        self,
        gt_pack: str | Path,
        degradation: Degradation,
        *,
        patch_size: int,
        augment: bool = False,
        channels: ChannelMode = "rgb",
    ) -> None:
        _check_patch(patch_size, degradation.scale)
        self.gt = PackedImages(gt_pack)
        self.channels = channels
        self.degradation = degradation
        self.patch_size = patch_size
        self.augment = augment
        for r in self.gt.records:
            if min(r.shape[:2]) < patch_size:
                raise ValueError(f"{r.key} {r.shape[:2]} is smaller than the patch {patch_size}")

    def __len__(self) -> int:
        return len(self.gt)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        r = self.gt.records[index]
        s, p = self.degradation.scale, self.patch_size
        h, w = r.shape[0] - r.shape[0] % s, r.shape[1] - r.shape[1] % s  # mod crop
        rng = _item_rng()
        top = int(rng.integers(0, h - p + 1))
        left = int(rng.integers(0, w - p + 1))
        gt = _convert_channels(self.gt.region(index, top, left, p, p), self.channels, self.gt.path)
        if self.augment:
            _, gt = augment_pair(gt, gt, rng)
        gt = np.ascontiguousarray(gt)
        return _to_item(self.degradation(gt, rng), gt, r.key)
