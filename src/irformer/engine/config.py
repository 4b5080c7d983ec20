"""Training configuration: frozen, typed dataclasses loaded from YAML.

A config is plain values (an architecture and a norm are *names*, not classes)
so it serialises back to YAML unchanged and can be stored next to a run. Loading
is strict: an unknown or misspelled key is an error naming the key and the
closest valid one, because a silently ignored ``lerning_rate`` wastes a run.

    cfg = load_config("configs/swinir1/sr_x2_iln.yaml", ["train.lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from irformer.archs.registry import list_archs, list_presets
from irformer.errors import IrformerError
from irformer.norms import NormName
from irformer.tasks import TASKS, Task

Scheduler = Literal["steplr", "multisteplr", "none"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)

DEFAULT_TRAIN_FOLDERS: tuple[str, ...] = ("datasets/DF2K/HR",)
"""DF2K-style HR folder (DIV2K + Flickr2K HR images in one folder), relative to the
working directory; override with ``--set data.train=[...]``."""


class ConfigError(IrformerError, ValueError):
    """A config file or override names an unknown key or holds a badly typed value."""


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build: ``irformer.archs.build_model(arch, norm=..., upscale=scale)``."""

    arch: str = "swinir_light_x2"
    """A preset or architecture name of :mod:`irformer.archs` (checked at load)."""
    norm: NormName = "ln"
    scale: int = 2
    """Upscaling factor of the network (1 for DN/CAR/DR)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the preset (e.g. ``embed_dim``, ``depths``)."""


@dataclass(frozen=True)
class DataConfig:
    """Training pairs: HR folders degraded on the fly, or paired LQ/GT folders."""

    train: tuple[str, ...] = DEFAULT_TRAIN_FOLDERS
    """Ground-truth (HR / clean) image folders, or ``.irpack`` files (``irformer data
    prepare --pack``)."""
    train_lq: tuple[str, ...] = ()
    """Paired degraded folders (or packs), same file stems as ``train`` (deraining,
    prepared LR sub-images); empty = degrade ``train`` on the fly."""
    task: Task = "sr"
    sigma: float = 15.0
    """Gaussian noise std on the 0-255 scale (``dn``); with ``sigma_range`` set, the
    level used for validation only."""
    quality: int = 40
    """JPEG quality (``car``); with ``quality_range`` set, the validation quality only."""
    sigma_range: tuple[float, float] | None = None
    """Blind denoising: ``[min, max]``, each training sample draws its sigma uniformly
    from it (from the sample's seeded RNG, so resume and DDP stay exact)."""
    quality_range: tuple[int, int] | None = None
    """Blind JPEG artifact removal: ``[min, max]``, each training sample draws an
    integer quality uniformly from it (both ends included)."""
    patch_size: int = 64
    """Ground-truth patch side in pixels (BasicSR's ``gt_size``); the LQ side is
    ``patch_size // scale``."""
    batch_size: int = 16
    """Per-process micro-batch; the global batch is
    ``batch_size * world_size * train.grad_accum``."""
    workers: int = 2
    grayscale: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, as in the i-LN paper's Tables 9-14 unless overridden."""

    iters: int = 300_000
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    scheduler: Scheduler = "steplr"
    step_size: int = 250_000
    """StepLR period (the paper's "Milestones (K) 250" for StepLR)."""
    milestones: tuple[int, ...] = ()
    """MultiStepLR milestones in iterations."""
    gamma: float = 0.5
    grad_accum: int = 1
    """Micro-batches of ``data.batch_size`` whose gradients are summed before each
    optimiser step (gradient accumulation): fewer GPUs keep the paper's global
    batch. k micro-batches of B train the model one batch of k*B trains (float
    rounding aside; not with ``bn``, whose statistics are per micro-batch)."""
    grad_clip: float = 0.0
    """Max global gradient norm; 0 disables clipping (paper Table 7, "GC")."""
    kl_weight: float = 0.0
    """Weight of the auxiliary KL(N(mu, var) || N(0, 1)) feature loss (Table 7, "KLD")."""
    ema: float = 0.999
    """EMA decay of the weights; 0 disables EMA."""
    bf16: bool = False
    """Run forward/backward under bf16 autocast (weights and optimiser stay fp32)."""
    warm_start: str | None = None
    """Checkpoint or exported weights to initialise from (x4 from x2); mismatched
    tensors (the upsampler) are skipped. The file's arch and norm must be the
    config's (a file without irformer metadata counts as ``ln``)."""
    warm_start_ignore_norm: bool = False
    """Allow a warm start from weights trained with another norm (cross-norm
    initialisation); logged as a warning."""
    seed: int = 0
    time_limit_min: float = 0.0
    """Stop after this many minutes of wall time, writing a checkpoint (0 = no limit);
    ``--resume`` continues the run exactly."""


@dataclass(frozen=True)
class ValConfig:
    """Validation on benchmark sets during training."""

    every: int = 5000
    """Validate every N iterations; 0 disables validation."""
    benchmarks: tuple[str, ...] = ("Set5",)
    """Test sets: names (``Set5``, ``B100[:20]``) found under ``root``, or your own
    paired folders ``NAME=HR_DIR[,LR_DIR]`` (BasicSR's ``dataroot_gt`` / ``dataroot_lq``;
    LR made with MATLAB bicubic, or the task's noise / JPEG, when absent)."""
    root: str = "../shared/data"
    """Folder holding the benchmark sets (``sr/Set5/HR`` etc.)."""


@dataclass(frozen=True)
class LogConfig:
    """Where a run writes and how often."""

    out_dir: str = "runs/default"
    every: int = 100
    """Write a metrics record every N iterations."""
    jsonl: bool = True
    tensorboard: bool = False
    checkpoint_every: int = 5000
    keep_last: int = 3
    probe_interval: int = 1000
    """Call the trainer's hooks (the analysis probes) every N iterations; 0 = never."""


@dataclass(frozen=True)
class Config:
    """One training run."""

    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _validate(self)


def _validate(cfg: Config) -> None:
    names = [*list_archs(), *list_presets()]
    if cfg.model.arch not in names:
        match = difflib.get_close_matches(cfg.model.arch, names, n=1, cutoff=0.6)
        hint = f"did you mean {match[0]!r}?" if match else "`irformer models list` shows them"
        raise ConfigError(f"model.arch: {cfg.model.arch!r} is no preset or architecture; {hint}")
    if cfg.data.task not in TASKS:
        raise ConfigError(f"data.task: {cfg.data.task!r} is not one of {', '.join(TASKS)}")
    if cfg.train.scheduler not in SCHEDULERS:
        raise ConfigError(
            f"train.scheduler: {cfg.train.scheduler!r} is not one of {', '.join(SCHEDULERS)}"
        )
    if cfg.data.task == "sr" and cfg.model.scale < 2:
        raise ConfigError(f"model.scale: task 'sr' needs a scale >= 2, got {cfg.model.scale}")
    if cfg.data.task != "sr" and cfg.model.scale != 1:
        raise ConfigError(
            f"model.scale: task {cfg.data.task!r} restores at scale 1, got {cfg.model.scale}"
        )
    if cfg.data.patch_size % cfg.model.scale:
        raise ConfigError(
            f"data.patch_size: {cfg.data.patch_size} is not divisible by "
            f"model.scale {cfg.model.scale}"
        )
    if cfg.data.train_lq and len(cfg.data.train_lq) != len(cfg.data.train):
        raise ConfigError(
            f"data.train_lq: {len(cfg.data.train_lq)} folders but data.train has "
            f"{len(cfg.data.train)}; paired folders go one to one"
        )
    for key, value in (
        ("train.iters", cfg.train.iters),
        ("data.batch_size", cfg.data.batch_size),
        ("train.grad_accum", cfg.train.grad_accum),
        ("data.patch_size", cfg.data.patch_size),
        ("log.every", cfg.log.every),
        ("log.keep_last", cfg.log.keep_last),
    ):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    _validate_levels(cfg.data)
    if not 0.0 <= cfg.train.ema < 1.0:
        raise ConfigError(f"train.ema: decay must be in [0, 1), got {cfg.train.ema}")
    _validate_numbers(cfg)
    if cfg.train.scheduler == "multisteplr" and list(cfg.train.milestones) != sorted(
        cfg.train.milestones
    ):
        raise ConfigError(f"train.milestones: must be increasing, got {cfg.train.milestones}")


def _validate_numbers(cfg: Config) -> None:
    """Range checks of the numeric fields, each naming its key (run at load time:
    ``log.checkpoint_every: 0`` used to surface as a ZeroDivisionError mid-run,
    ``train.gamma: -1`` as a negative learning rate)."""
    tc, dc = cfg.train, cfg.data
    at_least_one = [
        ("log.checkpoint_every", cfg.log.checkpoint_every),
        ("train.step_size", tc.step_size),
    ]
    at_least_zero = [
        ("data.workers", dc.workers),
        ("val.every", cfg.val.every),
        ("log.probe_interval", cfg.log.probe_interval),
        ("train.seed", tc.seed),
    ]
    for key, value in at_least_one:
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    for key, value in at_least_zero:
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    for key, value, positive in (
        ("train.lr", tc.lr, True),
        ("train.gamma", tc.gamma, True),
        ("train.weight_decay", tc.weight_decay, False),
        ("train.grad_clip", tc.grad_clip, False),
        ("train.kl_weight", tc.kl_weight, False),
        ("train.time_limit_min", tc.time_limit_min, False),
        ("data.sigma", dc.sigma, False),
    ):
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise ConfigError(f"{key}: must be a finite number {bound}, got {value}")
    for i, beta in enumerate(tc.betas):
        if not 0.0 <= beta < 1.0:  # also false for NaN
            raise ConfigError(f"train.betas[{i}]: must be in [0, 1), got {beta}")
    if not 1 <= dc.quality <= 100:
        raise ConfigError(f"data.quality: must be a JPEG quality in 1..100, got {dc.quality}")
    for i, milestone in enumerate(tc.milestones):
        if milestone < 1:
            raise ConfigError(f"train.milestones[{i}]: must be >= 1, got {milestone}")


def _validate_levels(d: DataConfig) -> None:
    """Blind noise levels and JPEG qualities (ranges), each error naming its key (the
    fixed ``sigma``/``quality`` are checked with the other numbers)."""
    if d.sigma_range is not None:
        if d.task != "dn":
            raise ConfigError(f"data.sigma_range: only task 'dn' adds noise, task is {d.task!r}")
        lo, hi = d.sigma_range
        if not 0 <= lo <= hi:
            raise ConfigError(
                f"data.sigma_range: expected [min, max] with 0 <= min <= max, got [{lo}, {hi}]"
            )
    if d.quality_range is not None:
        if d.task != "car":
            raise ConfigError(f"data.quality_range: only task 'car' compresses, task is {d.task!r}")
        lo, hi = d.quality_range
        if not 1 <= lo <= hi <= 100:
            raise ConfigError(
                f"data.quality_range: expected [min, max] with 1 <= min <= max <= 100, "
                f"got [{lo}, {hi}]"
            )


# --------------------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _closest(key: str, valid: Sequence[str], prefix: str) -> str:
    """The error suffix: the closest valid key (by difflib), else the whole list."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if match:
        return f"; did you mean {prefix + match[0]!r}?"
    return f"; valid keys: {', '.join(prefix + v for v in valid)}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated field type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        match = difflib.get_close_matches(
            str(value).lower(), [str(a) for a in args], n=1, cutoff=0.5
        )
        hint = f"; did you mean {match[0]!r}?" if match else ""
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}{hint}")
    if origin in (types.UnionType, typing.Union):
        is_null = value is None or (
            isinstance(value, str) and value.lower() in ("none", "null", "~", "")
        )
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot convert {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = _yaml_value(value, where)
        if not isinstance(value, list | tuple):
            value = [value]  # a single folder or milestone given without brackets
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(value, where)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _plain(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _yaml_value(text: str, where: str) -> Any:
    """A YAML value given as text (``--set``); unreadable YAML is one line with the fix:
    the usual cause is a shell splitting ``[a, b]`` at the space or expanding it."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0].strip() if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{where}: cannot read {text!r} as YAML ({problem}); quote the whole override so "
            f"the shell passes it as one argument: --set '{where}=[a, b]'"
        ) from None


def _plain(value: Any) -> Any:
    """YAML values inside ``overrides`` dicts: lists become lists, nothing else changes."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, recursing into nested sections."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_closest(str(key), names, prefix)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{path}.")
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from nested plain values (strict)."""
    return _build(Config, raw, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], "1e-4"); the value is typed later."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        if text.rstrip().endswith(("]", "}")):
            raise ConfigError(
                f"override {text!r}: expected KEY=VALUE; this looks like the end of a list "
                "the shell split at a space: quote the whole override, "
                "e.g. --set 'data.train=[a, b]'"
            )
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    value = value.strip()
    if value.count("[") != value.count("]") or value.count("{") != value.count("}"):
        raise ConfigError(
            f"override {text!r}: unbalanced brackets (the shell split the value at a space?); "
            f"quote the whole override: --set '{key.strip()}=[a, b]'"
        )
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a raw config dict; keys are checked against the dataclasses.

    Values are parsed as YAML (so ``[1, 2]`` is a list) and then coerced to the
    field's type by :func:`config_from_dict`. ``model.overrides.KEY=V`` sets one
    architecture keyword.
    """
    for text in overrides:
        keys, value_text = parse_override(text)
        cls: Any = Config
        node = raw
        for depth, key in enumerate(keys):
            path = ".".join(keys[: depth + 1])
            last = depth == len(keys) - 1
            if cls is dict:  # inside model.overrides: free-form keys
                if last:
                    node[key] = _yaml_value(value_text, path) if value_text else None
                else:
                    node = node.setdefault(key, {})
                continue
            names = [f.name for f in dataclasses.fields(cls)]
            if key not in names:
                parent = ".".join(keys[:depth]) + "." if depth else ""
                raise ConfigError(f"unknown config key {path!r}{_closest(key, names, parent)}")
            tp = _field_types(cls)[key]
            if last:
                node[key] = value_text  # typed by _coerce against the field's annotation
            elif dataclasses.is_dataclass(tp):
                child = node.get(key)
                node[key] = child = dict(child) if isinstance(child, Mapping) else {}
                node, cls = child, tp
            elif typing.get_origin(tp) is dict:
                child = node.get(key)
                node[key] = child = dict(child) if isinstance(child, Mapping) else {}
                node, cls = child, dict
            else:
                raise ConfigError(f"override {text!r}: {path!r} is a value, not a section")
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at top level, got {type(loaded)}")
        raw = loaded
    raw = apply_overrides(raw, overrides)
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{path}: {exc}") from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that :func:`config_from_dict` reads back."""
    return _plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    """YAML text of a config, sections in declaration order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and (prefix == "" or value):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def config_differences(
    before: Config | Mapping[str, Any], after: Config | Mapping[str, Any]
) -> list[str]:
    """``["model.overrides.embed_dim: 60 -> 48", ...]``: every dotted key whose value
    differs between two configs (or their :func:`config_to_dict` forms, e.g. the one a
    checkpoint stores), in key order. A key one side lacks reads ``(unset)``."""
    flat = [
        _flatten(config_to_dict(c) if isinstance(c, Config) else _plain(c)) for c in (before, after)
    ]
    missing = "(unset)"
    lines = []
    for key in sorted(set(flat[0]) | set(flat[1])):
        a, b = flat[0].get(key, missing), flat[1].get(key, missing)
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


RUN_CONFIG_FILE = "config.yaml"
"""The config a training run writes into its folder (what ``--resume RUN_DIR`` reads)."""


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config of the run in ``run_dir`` (its ``config.yaml``), with ``overrides``
    applied and ``log.out_dir`` set to ``run_dir`` (so a moved folder resumes in place)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume {run_dir}: no such run folder")
    if not path.is_file():
        raise ConfigError(
            f"--resume {run_dir}: no {RUN_CONFIG_FILE} in it (not a training run folder); "
            "pass --config FILE with --resume to continue it with that config"
        )
    cfg = load_config(path, overrides)
    return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, out_dir=str(run_dir)))
