"""Named test sets and where to find them under a data root.

A data root is either *task-grouped*, like the shared data
(``sr/Set5/HR/baby.png``, ``sr/Set5/LR_bicubic/X4/babyx4.png``,
``dn/CBSD68/*.png``, ``car/classic5/*.png``,
``derain/Rain100L/{rain,norain}/*.png``), or *flat*: one folder per benchmark
named as the benchmark (``Set5/HR``, ``CBSD68``, ``Rain100L/rain`` ...).
Both are searched, the task's own group first.

Inputs follow the field's conventions:

* ``sr``: GT is HR mod-cropped to a multiple of the scale; LR comes from
  ``LR_bicubic/X{s}`` when that folder exists, otherwise it is made with
  :func:`~irformer.data.degradations.matlab_imresize` (identical to the
  MATLAB files, see the tests).
* ``dn``: clean image plus Gaussian noise (sigma on 0-255), seeded per image
  from ``(seed, benchmark, name, sigma)``, unclipped float.
* ``car``: OpenCV JPEG at the given quality; greyscale sets (classic5) stay
  single-channel and are compressed as greyscale JPEG.
* ``dr``: ``rain``/``norain`` pairs.
* Urban100 for ``dn``/``car`` is split into non-overlapping 256x256 patches
  (remainders dropped), as the i-LN paper does for memory.

Your own test folders (BasicSR's ``dataroot_gt`` / ``dataroot_lq``) are named
``NAME=HR_DIR[,LR_DIR]`` wherever a benchmark name is accepted (``--bench`` of
every command, ``val.benchmarks`` of a training config): ``HR_DIR`` holds the
ground truth, ``LR_DIR`` the degraded inputs paired by file stem (an LR stem
may end in ``x4``/``_x4``). Without ``LR_DIR`` the inputs are made as for the
named sets: MATLAB bicubic for ``sr``, the seeded noise / JPEG of ``dn`` /
``car``; ``dr`` needs ``LR_DIR`` (the rainy images) unless ``HR_DIR`` holds
``rain``/``norain`` sub-folders. Every table labels the set ``NAME`` (``NAME[:N]``
takes the first N images, as for the named sets). ``NAME`` may not be a
registered benchmark's name, so a folder of yours never passes for the
published set. In a comma-separated list, the item after ``NAME=HR_DIR`` is its
``LR_DIR`` unless it is a registered benchmark or another ``NAME=...``
(write ``./DIR`` for a folder named like a benchmark).
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from irformer.data.datasets import check_pair_sizes, match_pairs, rain_pair_dirs
from irformer.data.degradations import Degradation, derive_seed, make_degradation, mod_crop
from irformer.data.io import ChannelMode, image_size, image_to_tensor, list_images, read_image

logger = logging.getLogger(__name__)

__all__ = [
    "BENCHMARKS",
    "DEFAULT_BENCHMARKS",
    "DEFAULT_DATA_ROOT",
    "TASK_GROUPS",
    "Benchmark",
    "BenchmarkDataset",
    "BenchmarkImage",
    "BenchmarkSpec",
    "PairedFolders",
    "benchmark_label",
    "benchmark_names",
    "benchmark_present",
    "default_data_root",
    "find_benchmark_dir",
    "get_benchmark",
    "load_benchmark",
    "parse_paired_folders",
    "resolve_benchmarks",
    "split_benchmark_list",
]

TASK_GROUPS: dict[str, str] = {"sr": "sr", "dn": "dn", "car": "car", "dr": "derain"}
"""Sub-folder of a task-grouped data root holding each task's benchmarks."""

CLEAN_SUBDIRS: tuple[str, ...] = ("HR", "GT", "gt", "original")
"""Sub-folders that hold the clean images of a benchmark folder, in search order."""

URBAN_PATCH = 256
_SUBSET = re.compile(r"(?P<name>.+)\[:(?P<n>\d+)\]")
_PAIRED = re.compile(r"(?P<name>[^=\[\],]+)(?:\[:(?P<n>\d+)\])?=(?P<hr>[^,]+)(?:,(?P<lr>[^,]+))?")


@dataclass(frozen=True)
class BenchmarkSpec:
    """A named test set: the tasks it is used for and how its folder may be called."""

    name: str
    tasks: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    grey: bool = False
    patch_split: int | None = None
    """Side of non-overlapping patches for ``dn``/``car`` (None: whole images)."""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        BenchmarkSpec("Set5", ("sr",)),
        BenchmarkSpec("Set14", ("sr",)),
        BenchmarkSpec("B100", ("sr",), aliases=("BSD100", "BSDS100")),
        BenchmarkSpec("Urban100", ("sr", "dn", "car"), patch_split=URBAN_PATCH),
        BenchmarkSpec("Manga109", ("sr",)),
        BenchmarkSpec("CBSD68", ("dn",)),
        BenchmarkSpec("Kodak24", ("dn",), aliases=("Kodak",)),
        BenchmarkSpec("McMaster", ("dn",), aliases=("McMaster18",)),
        BenchmarkSpec("LIVE1", ("car",), aliases=("LIVE",)),
        BenchmarkSpec("classic5", ("car",), aliases=("Classic5",), grey=True),
        BenchmarkSpec("Rain100L", ("dr",)),
        BenchmarkSpec("Test100", ("dr",)),
    )
}
"""The registry: canonical name -> spec."""

DEFAULT_BENCHMARKS: dict[str, tuple[str, ...]] = {
    "sr": ("Set5", "Set14", "B100", "Urban100", "Manga109"),
    "dn": ("Urban100", "CBSD68", "Kodak24", "McMaster"),
    "car": ("Urban100", "LIVE1", "classic5"),
    "dr": ("Rain100L", "Test100"),
}
"""Each task's test sets in the order of the i-LN paper's Table 2."""


DEFAULT_DATA_ROOT = Path("..") / "shared" / "data"
"""Where the benchmarks are looked for when no data root is given and this folder
exists (relative to the working directory: a checkout beside the shared data)."""


def default_data_root(data_root: str | Path | None) -> Path | None:
    """``data_root`` if given, else :data:`DEFAULT_DATA_ROOT` when it exists, else None
    (enough for paired folders, which need no data root)."""
    if data_root is not None:
        return Path(data_root)
    return DEFAULT_DATA_ROOT if DEFAULT_DATA_ROOT.is_dir() else None


def get_benchmark(name: str) -> BenchmarkSpec:
    """Look up a benchmark by name or alias, case-insensitively."""
    wanted = name.strip().lower()
    for spec in BENCHMARKS.values():
        if wanted in (n.lower() for n in (spec.name, *spec.aliases)):
            return spec
    raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")


def _is_registered(name: str) -> bool:
    """Whether ``name`` (or ``name[:N]``) is a registered benchmark or alias."""
    subset = _SUBSET.fullmatch(name.strip())
    try:
        get_benchmark(subset["name"] if subset else name)
    except KeyError:
        return False
    return True


@dataclass(frozen=True)
class PairedFolders:
    """A test set of your own: ``NAME=HR_DIR[,LR_DIR]`` (see the module docstring)."""

    name: str
    hr_dir: Path
    lr_dir: Path | None = None
    limit: int | None = None
    """``NAME[:N]=...``: the first N images only."""


def parse_paired_folders(text: str) -> PairedFolders | None:
    """``"mine=data/hr,data/lr"`` -> :class:`PairedFolders`; None for a benchmark name.

    A malformed ``NAME=...`` or a ``NAME`` that is a registered benchmark is an error.
    """
    text = text.strip()
    if "=" not in text:
        return None
    match = _PAIRED.fullmatch(text)
    if match is None:
        raise ValueError(
            f"benchmark {text!r}: expected NAME=HR_DIR or NAME=HR_DIR,LR_DIR "
            "(your own paired folders) or a benchmark name"
        )
    name = match["name"].strip()
    if _is_registered(name):
        raise ValueError(
            f"benchmark {text!r}: {name!r} is the name of a registered benchmark; label your "
            "folders with another name (or point --data-root / val.root at the set)"
        )
    if not name:
        raise ValueError(f"benchmark {text!r}: the NAME before '=' is empty")
    lr = match["lr"]
    return PairedFolders(
        name,
        Path(match["hr"].strip()),
        Path(lr.strip()) if lr and lr.strip() else None,
        int(match["n"]) if match["n"] else None,
    )


def split_benchmark_list(text: str | Sequence[str]) -> list[str]:
    """A comma-separated list (or a sequence of such lists) -> one item per test set.

    ``"Set5,mine=hr,lr,B100[:20]"`` -> ``["Set5", "mine=hr,lr", "B100[:20]"]``: the
    item after ``NAME=HR_DIR`` is its LR folder unless it is a registered benchmark
    or another ``NAME=...``. A sequence (``val.benchmarks``) is joined first, so a
    YAML flow list ``[Set5, mine=hr, lr]`` reads the same.
    """
    joined = text if isinstance(text, str) else ",".join(text)
    items: list[str] = []
    for raw in joined.split(","):
        item = raw.strip()
        if not item:
            continue
        last = items[-1] if items else ""
        awaits_lr = "=" in last and "," not in last.partition("=")[2]
        if awaits_lr and "=" not in item and not _is_registered(item):
            items[-1] = f"{last},{item}"
        else:
            items.append(item)
    return items


def benchmark_label(name: str) -> str:
    """The label results of ``name`` carry: a paired folder's ``NAME`` (``NAME[:N]``),
    a registered set's canonical name (with its ``[:N]``)."""
    paired = parse_paired_folders(name)
    if paired is not None:
        return paired.name if paired.limit is None else f"{paired.name}[:{paired.limit}]"
    base, bracket, rest = name.strip().partition("[")
    return get_benchmark(base).name + bracket + rest


def benchmark_names(
    text: str | Sequence[str] | None, task: str, data_root: str | Path | None
) -> list[str]:
    """What ``--bench`` names, canonical (``b100[:20]`` -> ``B100[:20]``; paired folders
    as given); ``None``: the task's paper sets (:data:`DEFAULT_BENCHMARKS`) present
    under ``data_root``, each missing one logged. An unknown name is an error."""
    if text is not None:
        names = split_benchmark_list(text)
        if not names:
            raise ValueError(f"--bench {text!r} names no benchmark")
        return [name if "=" in name else benchmark_label(name) for name in names]
    if data_root is None:
        raise ValueError(
            f"--data-root is required to find the {task} benchmarks ({DEFAULT_DATA_ROOT} does "
            "not exist); or name your own folders with --bench NAME=HR_DIR[,LR_DIR]"
        )
    found = []
    for name in DEFAULT_BENCHMARKS[task]:
        try:
            find_benchmark_dir(name, data_root, task)
        except FileNotFoundError:
            logger.warning("skipping %s: not found under %s", name, data_root)
            continue
        found.append(name)
    if not found:
        raise FileNotFoundError(
            f"none of the {task} benchmarks {', '.join(DEFAULT_BENCHMARKS[task])} is under "
            f"{data_root}"
        )
    return found


def benchmark_present(name: str, data_root: str | Path | None, task: str) -> bool:
    """Whether registered benchmark ``name`` (``[:N]`` allowed) has a folder under
    ``data_root`` for ``task``: for test sets that are scored only where the user has
    them (``--bench NAME?``); an unknown name or a wrong task is still an error."""
    base = _SUBSET.fullmatch(name.strip())
    spec = get_benchmark(base.group("name") if base else name.strip())
    if task not in spec.tasks:
        raise ValueError(
            f"benchmark {spec.name} is not a {task!r} test set; it is used for {spec.tasks}"
        )
    if data_root is None:
        return False
    try:
        find_benchmark_dir(spec.name, data_root, task)
    except FileNotFoundError:
        return False
    return True


def find_benchmark_dir(name: str, data_root: str | Path, task: str) -> Path:
    """The folder of benchmark ``name`` under ``data_root`` for ``task``.

    Searches ``root/<task group>/<name>``, then ``root/<name>``, then the
    other task groups (Urban100's HR images serve DN and CAR too), trying
    every alias of the name.
    """
    spec = get_benchmark(name)
    if task not in spec.tasks:
        raise ValueError(
            f"benchmark {spec.name} is not a {task!r} test set; it is used for {spec.tasks}"
        )
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    own = TASK_GROUPS[task]
    groups = [own, "", *(g for g in TASK_GROUPS.values() if g != own)]
    tried = []
    for group in groups:
        for folder_name in (spec.name, *spec.aliases):
            cand = root / group / folder_name if group else root / folder_name
            tried.append(cand)
            if cand.is_dir():
                return cand
    raise FileNotFoundError(
        f"benchmark {spec.name} not found under {root}; looked in "
        + ", ".join(str(t) for t in tried[:4])
        + ", ..."
    )


def _clean_dir(bench_dir: Path) -> Path:
    for sub in CLEAN_SUBDIRS:
        if (bench_dir / sub).is_dir():
            return bench_dir / sub
    return bench_dir


@dataclass(frozen=True)
class BenchmarkImage:
    """One test input and its ground truth.

    ``lq``: float32 ``(h, w, C)`` in [0, 1] (noisy DN inputs are unclipped).
    ``gt``: uint8 ``(H, W, C)``, the exact values metrics compare against.
    """

    name: str
    lq: np.ndarray
    gt: np.ndarray


@dataclass(frozen=True)
class _Recipe:
    name: str
    gt_path: Path
    lq_path: Path | None = None
    box: tuple[int, int, int] | None = None  # (top, left, side) of a patch


class Benchmark(Sequence[BenchmarkImage]):
    """A benchmark resolved to files; images are read and degraded on access."""

    def __init__(
        self,
        spec: BenchmarkSpec,
        task: str,
        recipes: list[_Recipe],
        *,
        scale: int,
        degradation: Degradation | None,
        channels: ChannelMode,
        seed: int,
        settings: str,
        sigma: float | None = None,
        quality: int | None = None,
    ) -> None:
        self.spec = spec
        self.task = task
        self.scale = scale
        self.sigma = sigma
        self.quality = quality
        self.channels = channels
        self._recipes = recipes
        self._degradation = degradation
        self._seed = seed
        self._settings = settings
        self._limit: int | None = None

    @property
    def name(self) -> str:
        """The spec's name; ``NAME[:N]`` when only the first N images are used."""
        return self.spec.name if self._limit is None else f"{self.spec.name}[:{self._limit}]"

    def first(self, n: int) -> Benchmark:
        """The first ``n`` images (in file-name order), named ``NAME[:n]`` everywhere
        results are reported, so a subset can never pass for the full benchmark."""
        if n < 1:
            raise ValueError(f"benchmark {self.spec.name}: subset size must be >= 1, got {n}")
        sub = copy.copy(self)
        sub._recipes = self._recipes[:n]
        sub._limit = n if n < len(self._recipes) else self._limit
        return sub

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._recipes]

    def __len__(self) -> int:
        return len(self._recipes)

    def source_paths(self, index: int) -> tuple[Path, ...]:
        """The files image ``index`` is read from (outputs must never replace them)."""
        r = self._recipes[index]
        return (r.gt_path,) if r.lq_path is None else (r.gt_path, r.lq_path)

    def __iter__(self) -> Iterator[BenchmarkImage]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> BenchmarkImage:  # type: ignore[override]
        r = self._recipes[index]
        gt = read_image(r.gt_path, channels=self.channels)
        if r.box is not None:
            top, left, side = r.box
            gt = gt[top : top + side, left : left + side]
        if r.lq_path is not None:
            lq = read_image(r.lq_path, channels=self.channels)
            h, w = lq.shape[:2]
            gt = gt[: h * self.scale, : w * self.scale]
            if gt.shape[:2] != (h * self.scale, w * self.scale):
                raise ValueError(
                    f"size mismatch: {r.gt_path} is {gt.shape[0]}x{gt.shape[1]}, "
                    f"{r.lq_path} is {h}x{w} at scale {self.scale}"
                )
            return BenchmarkImage(r.name, lq.astype(np.float32) / np.float32(255.0), gt)
        gt = np.ascontiguousarray(mod_crop(gt, self.scale))
        assert self._degradation is not None
        key = f"{self.spec.name}/{r.name}/{self._settings}"
        rng = np.random.default_rng(derive_seed(self._seed, key))
        return BenchmarkImage(r.name, self._degradation(gt, rng), gt)


def load_benchmark(
    name: str,
    data_root: str | Path | None,
    *,
    task: str,
    scale: int = 1,
    sigma: float | None = None,
    quality: int | None = None,
    seed: int = 0,
) -> Benchmark:
    """Resolve benchmark ``name`` for ``task`` under ``data_root`` (see the module docstring).

    Validates the folder (missing/empty folders, unmatched pairs, GT/LQ size
    mismatches) eagerly, reading only image headers. ``NAME[:N]`` selects the
    first N images (a quick, clearly labelled subset for slow models);
    ``NAME=HR_DIR[,LR_DIR]`` is a paired folder of your own (``data_root`` unused,
    may be None).
    """
    paired = parse_paired_folders(name)
    if paired is not None:
        bench = _load_paired_folders(
            paired, task=task, scale=scale, sigma=sigma, quality=quality, seed=seed
        )
        return bench if paired.limit is None else bench.first(paired.limit)
    if data_root is None:
        raise ValueError(
            f"benchmark {name!r} needs a data root (--data-root / val.root; {DEFAULT_DATA_ROOT} "
            "does not exist)"
        )
    subset = _SUBSET.fullmatch(name.strip())
    if subset is not None:
        full = load_benchmark(
            subset["name"],
            data_root,
            task=task,
            scale=scale,
            sigma=sigma,
            quality=quality,
            seed=seed,
        )
        return full.first(int(subset["n"]))
    spec = get_benchmark(name)
    bench_dir = find_benchmark_dir(spec.name, data_root, task)
    channels: ChannelMode = "grey" if spec.grey and task == "car" else "rgb"
    if task == "sr":
        if scale < 2:
            raise ValueError(f"task 'sr' needs scale >= 2, got {scale}")
        hr = list_images(_clean_dir(bench_dir))
        lr_dir = bench_dir / "LR_bicubic" / f"X{scale}"
        if lr_dir.is_dir():
            pairs = match_pairs(hr, list_images(lr_dir), scale=scale)
            for gt, lq in pairs:
                check_pair_sizes(gt, lq, scale)
            recipes = [_Recipe(gt.stem, gt, lq) for gt, lq in pairs]
            degradation = None
        else:
            recipes = [_Recipe(p.stem, p) for p in hr]
            degradation = make_degradation("sr", scale=scale)
        settings = f"x{scale}"
    elif task == "dr":
        lq_dir, gt_dir = rain_pair_dirs(bench_dir)
        pairs = match_pairs(list_images(gt_dir), list_images(lq_dir))
        for gt, lq in pairs:
            check_pair_sizes(gt, lq, 1)
        recipes = [_Recipe(gt.stem, gt, lq) for gt, lq in pairs]
        degradation, settings, scale = None, "rain", 1
    elif task in ("dn", "car"):
        degradation = make_degradation(task, sigma=sigma, quality=quality)
        settings = _level_settings(task, sigma, quality)
        scale = 1
        recipes = []
        for p in list_images(_clean_dir(bench_dir)):
            if spec.patch_split is None:
                recipes.append(_Recipe(p.stem, p))
                continue
            side = spec.patch_split
            h, w = image_size(p)
            k = 0
            for top in range(0, h - side + 1, side):
                for left in range(0, w - side + 1, side):
                    recipes.append(_Recipe(f"{p.stem}_p{k:03d}", p, box=(top, left, side)))
                    k += 1
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASK_GROUPS)}")
    return _benchmark(
        spec, task, recipes, scale, degradation, channels, seed, settings, sigma, quality
    )


def _level_settings(task: str, sigma: float | None, quality: int | None) -> str:
    return f"sigma{sigma:g}" if task == "dn" else f"q{quality}"


def _benchmark(
    spec: BenchmarkSpec,
    task: str,
    recipes: list[_Recipe],
    scale: int,
    degradation: Degradation | None,
    channels: ChannelMode,
    seed: int,
    settings: str,
    sigma: float | None,
    quality: int | None,
) -> Benchmark:
    return Benchmark(
        spec,
        task,
        recipes,
        scale=scale,
        degradation=degradation,
        channels=channels,
        seed=seed,
        settings=settings,
        sigma=sigma if task == "dn" else None,
        quality=quality if task == "car" else None,
    )


def _paired_recipes(gt_dir: Path, lq_dir: Path, scale: int) -> list[_Recipe]:
    pairs = match_pairs(list_images(gt_dir), list_images(lq_dir), scale=scale)
    for gt, lq in pairs:
        check_pair_sizes(gt, lq, scale)
    return [_Recipe(gt.stem, gt, lq) for gt, lq in pairs]


def _load_paired_folders(
    folders: PairedFolders,
    *,
    task: str,
    scale: int,
    sigma: float | None,
    quality: int | None,
    seed: int,
) -> Benchmark:
    """Your own ground-truth folder, with its degraded inputs or with inputs made as
    for the named sets (MATLAB bicubic, seeded noise, JPEG)."""
    spec = BenchmarkSpec(folders.name, (task,))
    hr_dir, lr_dir = folders.hr_dir, folders.lr_dir
    what = f"benchmark {folders.name}"
    if not hr_dir.is_dir():
        raise FileNotFoundError(f"{what}: ground-truth folder not found: {hr_dir}")
    if lr_dir is not None and not lr_dir.is_dir():
        raise FileNotFoundError(f"{what}: low-quality folder not found: {lr_dir}")
    degradation: Degradation | None = None
    if task == "sr":
        if scale < 2:
            raise ValueError(f"task 'sr' needs scale >= 2, got {scale}")
        settings = f"x{scale}"
    elif task in ("dn", "car"):
        scale, settings = 1, _level_settings(task, sigma, quality)
    elif task == "dr":
        scale, settings = 1, "rain"
        if lr_dir is None:
            try:
                lr_dir, hr_dir = rain_pair_dirs(hr_dir)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{what}: deraining needs the rainy inputs: NAME=CLEAN_DIR,RAINY_DIR "
                    f"(no rain/norain sub-folders in {hr_dir})"
                ) from None
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASK_GROUPS)}")
    if lr_dir is not None:
        recipes = _paired_recipes(_clean_dir(hr_dir), lr_dir, scale)
    else:
        recipes = [_Recipe(p.stem, p) for p in list_images(_clean_dir(hr_dir))]
        degradation = make_degradation(task, scale=scale, sigma=sigma, quality=quality)
    return _benchmark(
        spec, task, recipes, scale, degradation, "rgb", seed, settings, sigma, quality
    )


def resolve_benchmarks(
    names: str | Sequence[str],
    data_root: str | Path | None,
    *,
    task: str,
    scale: int = 1,
    sigma: float | None = None,
    quality: int | None = None,
    seed: int = 0,
) -> list[Benchmark]:
    """Every test set of a ``--bench`` list or ``val.benchmarks`` (names, ``NAME[:N]``,
    ``NAME=HR_DIR[,LR_DIR]``), resolved and validated before any image runs: the one
    resolver behind eval, lowprec, compress, the norm study and training validation."""
    items = split_benchmark_list(names)
    if not items:
        raise ValueError("no benchmarks given")
    resolved = [
        load_benchmark(
            n, data_root, task=task, scale=scale, sigma=sigma, quality=quality, seed=seed
        )
        for n in items
    ]
    seen: set[str] = set()
    for bench in resolved:
        if bench.name in seen:
            raise ValueError(f"benchmark {bench.name} is named twice; give each set its own name")
        seen.add(bench.name)
    return resolved


class BenchmarkDataset(Dataset):
    """A :class:`Benchmark` as a torch dataset of ``{"lq", "gt", "name"}`` float32 tensors.

    For validation inside training; full evaluation uses the uint8 GT of
    :class:`BenchmarkImage` directly.
    """

    def __init__(self, benchmark: Benchmark) -> None:
        self.benchmark = benchmark

    def __len__(self) -> int:
        return len(self.benchmark)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        item = self.benchmark[index]
        return {"lq": image_to_tensor(item.lq), "gt": image_to_tensor(item.gt), "name": item.name}
