"""Data throughput per CPU core on 2K-class images: preparing them, and feeding training.

No DIV2K/Flickr2K here, so 2040x1356 images (DIV2K's most common size) are made
by tiling the shared training photos (``../shared/data/train``) into a temporary
folder (never committed). Measured in this process with one thread (one
worker = one core), in CPU seconds (``time.process_time``), which a shared,
busy machine disturbs far less than wall time:

1. ``irformer data prepare`` per source image: decode, 480/240 sub-images,
   MATLAB-bicubic LR at x2/x3/x4, PNG encode + sha256 + atomic write (and the
   share of each step, on one image).
2. What one DataLoader worker delivers to training, in samples/s (one sample =
   one GT/LQ patch pair, cropped and flipped as the trainer does): from the 2K
   folder degraded on the fly (what ``data.train`` alone does), from the
   prepared sub-image folders, and from raw and PNG packs.

    .venv/bin/python benchmarks/bench_data.py --images 4 --samples 150
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_TRAIN = REPO.parent / "shared" / "data" / "train"
SIZE_2K = (1356, 2040)
CASES = (("x4", 4, 128), ("x2", 2, 64))
"""(name, scale, GT patch): the paper's SR x4 (patch 128) and x2 (patch 64) settings."""


def make_2k_images(folder: Path, count: int) -> list[Path]:
    """``count`` 2040x1356 PNGs, each a mosaic of shared training photos (a different
    selection per image, so every image compresses like a photo)."""
    import numpy as np

    from irformer.data.io import list_images, read_image, write_image

    photos = [p for sub in ("General100", "BSD200") for p in list_images(SHARED_TRAIN / sub)]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        canvas = np.zeros((*SIZE_2K, 3), np.uint8)
        y = 0
        while y < SIZE_2K[0]:
            x, row_h = 0, 0
            while x < SIZE_2K[1]:
                tile = read_image(photos[int(rng.integers(len(photos)))])
                h = min(tile.shape[0], SIZE_2K[0] - y)
                w = min(tile.shape[1], SIZE_2K[1] - x)
                canvas[y : y + h, x : x + w] = tile[:h, :w]
                x += w
                row_h = max(row_h, h)
            y += row_h
        paths.append(write_image(folder / f"{i + 1:04d}.png", canvas, overwrite=True))
    return paths


def cpu_seconds(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(CPU seconds, wall seconds, result) of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def prepare_breakdown(source: Path) -> dict[str, float]:
    """CPU seconds of each step of preparing one image (as prepare_image does them)."""
    import hashlib

    from irformer.data.degradations import matlab_imresize
    from irformer.data.io import read_image
    from irformer.data.prepare import PrepareSettings, _encode_png, extract_boxes

    s = PrepareSettings()
    decode, _, hr = cpu_seconds(lambda: read_image(source))
    hr = hr[: hr.shape[0] // s.mod * s.mod, : hr.shape[1] // s.mod * s.mod]
    steps = {"decode": decode}
    lrs = {}
    for scale in s.scales:
        steps[f"lr_x{scale}"], _, lrs[scale] = cpu_seconds(
            lambda scale=scale: matlab_imresize(hr, 1 / scale)
        )
    boxes = extract_boxes(hr.shape[0], hr.shape[1], s)

    def encode_all() -> int:
        total = 0
        for t, left, h, w in boxes:
            for scale, image in [(1, hr), *lrs.items()]:
                crop = image[t // scale : (t + h) // scale, left // scale : (left + w) // scale]
                data = _encode_png(crop, s.compression)
                hashlib.sha256(data).hexdigest()
                total += len(data)
        return total

    steps["encode_png_sha256"], _, total = cpu_seconds(encode_all)
    steps["sub_images"] = len(boxes)
    steps["output_mb"] = total / 1e6
    return steps


def loader_rate(dataset: Any, samples: int) -> dict[str, float]:
    """Samples/s of one worker: positions of the trainer's sample stream, one at a time."""
    from irformer.engine.data import PositionedDataset

    stream = PositionedDataset(dataset, seed=0)
    stream[0]  # first touch (page cache, lazy maps)
    cpu, wall, _ = cpu_seconds(lambda: [stream[k] for k in range(1, samples + 1)])
    return {"samples": samples, "cpu_s": cpu, "wall_s": wall, "per_core_per_s": samples / cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="2K images to make and prepare")
    parser.add_argument("--samples", type=int, default=150, help="samples per loader case")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if not SHARED_TRAIN.is_dir():
        print(f"bench_data: {SHARED_TRAIN} is absent; it tiles those photos", file=sys.stderr)
        return 2
    from irformer.data.datasets import DegradedImageDataset, PairedImageDataset
    from irformer.data.degradations import make_degradation
    from irformer.data.packed import PackedPairDataset
    from irformer.data.prepare import PrepareSettings, pack_path, prepare_dataset

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = args.keep or Path(tmp)
        src, out = work / "src", work / "prepared"
        sources = make_2k_images(src, args.images)
        source_mb = sum(p.stat().st_size for p in sources) / 1e6
        breakdown = prepare_breakdown(sources[0])
        cpu, wall, result = cpu_seconds(lambda: prepare_dataset([src], out, PrepareSettings()))
        prepared_mb = sum(p.stat().st_size for p in out.rglob("*.png")) / 1e6
        pack = {}
        for codec in ("raw", "png"):
            packed = work / f"packed_{codec}"
            packed.mkdir(exist_ok=True)
            for sub in ("HR", "LR_bicubic", "manifest.jsonl", "prepare.json"):
                link = packed / sub
                if not link.exists():
                    link.symlink_to(out / sub)
            c, w, _ = cpu_seconds(lambda p=packed, c=codec: prepare_dataset([src], p, pack=c))
            size = sum(f.stat().st_size for f in (packed / "packs").glob("*.irpack")) / 1e6
            pack[codec] = {"cpu_s": c, "wall_s": w, "mb": size, "dir": packed}
        rows: dict[str, Any] = {}
        for name, scale, patch in CASES:
            deg = make_degradation("sr", scale=scale)
            lr_dir = f"LR_bicubic/X{scale}"
            split = f"LR_bicubic_X{scale}"
            datasets = {
                "2K folder, LR on the fly": DegradedImageDataset(
                    src, deg, patch_size=patch, augment=True
                ),
                "prepared sub-image folders": PairedImageDataset(
                    out / "HR", out / lr_dir, scale=scale, patch_size=patch, augment=True
                ),
                "raw pack": PackedPairDataset(
                    pack_path(pack["raw"]["dir"], "HR"),
                    pack_path(pack["raw"]["dir"], split),
                    scale=scale,
                    patch_size=patch,
                    augment=True,
                ),
                "png pack": PackedPairDataset(
                    pack_path(pack["png"]["dir"], "HR"),
                    pack_path(pack["png"]["dir"], split),
                    scale=scale,
                    patch_size=patch,
                    augment=True,
                ),
            }
            rows[name] = {
                k: loader_rate(d, args.samples if "2K" not in k else max(20, args.samples // 5))
                for k, d in datasets.items()
            }
    per_image = cpu / result.sources
    report = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "load_avg": os.getloadavg()},
        "images": args.images,
        "image_size": SIZE_2K,
        "source_mb": source_mb,
        "prepare": {
            "cpu_s_per_image": per_image,
            "images_per_core_s": 1 / per_image,
            "wall_s": wall,
            "files": result.files,
            "prepared_mb": prepared_mb,
            "breakdown_one_image": breakdown,
        },
        "packs": {k: {kk: vv for kk, vv in v.items() if kk != "dir"} for k, v in pack.items()},
        "loaders": rows,
    }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def print_report(r: dict[str, Any]) -> None:
    p = r["prepare"]
    b = p["breakdown_one_image"]
    print(f"machine: {r['machine']}")
    print(
        f"prepare: {r['images']} images {r['image_size'][1]}x{r['image_size'][0]} "
        f"({r['source_mb']:.1f} MB PNG) -> {p['files']} files ({p['prepared_mb']:.1f} MB); "
        f"{p['cpu_s_per_image']:.2f} CPU s per image = {p['images_per_core_s']:.2f} images/s "
        f"per core (wall {p['wall_s']:.1f} s)"
    )
    steps = ", ".join(
        f"{k} {v:.2f} s" for k, v in b.items() if k not in ("sub_images", "output_mb")
    )
    print(f"  one image ({b['sub_images']} sub-images, {b['output_mb']:.1f} MB out): {steps}")
    for codec, v in r["packs"].items():
        print(f"pack {codec}: {v['mb']:.1f} MB, {v['cpu_s']:.2f} CPU s")
    for case, loaders in r["loaders"].items():
        print(f"loader samples/s per core, SR {case}:")
        for name, v in loaders.items():
            print(
                f"  {name:28s} {v['per_core_per_s']:8.1f}  "
                f"({v['samples']} in {v['cpu_s']:.2f} CPU s)"
            )


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
