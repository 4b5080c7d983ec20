"""The training loop: one function, readable top to bottom.

:func:`train` builds the model, optimiser, scheduler, EMA and the sample stream
from a :class:`~irformer.engine.config.Config`, optionally resumes from the
newest checkpoint of the run folder, and runs the L1 loop. Side concerns are
small functions it calls: checkpoint I/O (:mod:`.checkpoint`), DDP
(:mod:`.distributed`), the deterministic sample stream (:mod:`.data`), metric
logging (:class:`MetricsLog`).

Guarantees:

* **Exact resume.** The k-th sample depends only on (seed, k); every RNG
  state, the optimiser, scheduler and EMA are checkpointed; validation and
  hooks run with the RNGs saved and restored. A killed run resumed from its
  last checkpoint reproduces the uninterrupted run's losses bit for bit (CPU).
* **DDP = big batch = accumulation.** N ranks with batch B see the samples of
  one process with batch N*B and average gradients, so they train the same
  model; ``train.grad_accum = k`` sums the gradients of k micro-batches per
  step, so N ranks x k micro-batches of B train the model one process with
  batch N*k*B trains (float rounding aside).
* **Non-finite loss stops the run** before the optimiser step, naming the
  iteration and the last good checkpoint (never overwritten afterwards).
  Weights (and EMA) are checked for NaN/inf before every checkpoint and every
  validation: a checkpoint is only written, and only called good, when finite.
* **No run is overwritten.** A folder holding an earlier run is refused unless
  ``resume`` (continue it) or ``overwrite`` (delete its artefacts first) is
  given; the folder must be writable before any data is read. A resume falls
  back past unusable (truncated, non-finite) newest checkpoints, setting them
  aside as ``*.skipped``, and removes temporary files of interrupted writes.

Hooks (``hooks=[fn]``, called as ``fn(state)`` every ``log.probe_interval``
iterations on rank 0) are where :mod:`irformer.analysis` probes attach.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import irformer
from irformer.archs import transformer_blocks
from irformer.engine.checkpoint import (
    checkpoint_name,
    newest_usable_checkpoint,
    nonfinite_tensors,
    preserve_rng,
    prune_checkpoints,
    remove_orphaned_temp_files,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
)
from irformer.engine.config import (
    RUN_CONFIG_FILE,
    Config,
    config_differences,
    config_to_dict,
    dump_config,
)
from irformer.engine.data import ItemDataset, build_train_dataset, make_loader
from irformer.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_flag,
    init_distributed,
    unwrap,
    wrap_ddp,
)
from irformer.errors import CheckpointReadError, IrformerError, RunExistsError
from irformer.files import atomic_write

logger = logging.getLogger(__name__)

Validator = Callable[[nn.Module], dict[str, float]]
"""Model -> metrics such as ``{"Set5/psnr": 37.2, "Set5/ssim": 0.95}``; the first
``*/psnr`` key decides the best checkpoint."""


class NonFiniteLossError(IrformerError, RuntimeError):
    """The loss became NaN/inf; training stopped without taking the step."""


class NonFiniteWeightsError(NonFiniteLossError):
    """The weights (or their EMA) became NaN/inf; training stopped without writing them."""


RUN_ARTEFACTS: tuple[str, ...] = ("config.yaml", "metrics.jsonl", "checkpoints", "tb")
"""What marks a folder as holding a run (``--overwrite`` deletes these and ``*.jsonl``)."""


@dataclass
class TrainState:
    """What the loop exposes to hooks and the progress callback (read-only by convention)."""

    config: Config
    model: nn.Module
    """The bare network being trained (never the DDP wrapper)."""
    ema_model: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    run_dir: Path
    dist: DistInfo
    iteration: int = 0
    """Iterations completed."""
    start_iteration: int = 0
    loss: float = math.nan
    lr: float = math.nan
    best: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    metrics_log: MetricsLog | None = None

    def log(self, record: Mapping[str, Any]) -> None:
        """Append a record (e.g. probe results) to the run's metrics, tagged with the iteration."""
        if self.metrics_log is not None:
            self.metrics_log.write({"iter": self.iteration, **record})

    @property
    def eval_model(self) -> nn.Module:
        """The model to evaluate/probe: EMA weights when EMA is on."""
        return self.ema_model if self.ema_model is not None else self.model


Hook = Callable[[TrainState], None]


# --------------------------------------------------------------------------- the loop


def train(
    cfg: Config,
    *,
    resume: bool = False,
    model: nn.Module | None = None,
    train_set: ItemDataset | None = None,
    validator: Validator | None = None,
    hooks: Sequence[Hook] = (),
    progress: Callable[[TrainState], None] | None = None,
    dist_info: DistInfo | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> TrainState:
    """Train ``cfg`` to ``cfg.train.iters`` iterations; returns the final state.

    ``model``/``train_set``/``validator`` default to what the config describes
    (``irformer.archs.build_model``, ``irformer.data.datasets``,
    ``irformer.engine.evaluate``); pass them to train something else with the
    same loop. ``progress(state)`` is called after every iteration on rank 0
    (the CLI draws its progress bar there). ``log.out_dir`` holding an earlier
    run is an error (:class:`~irformer.errors.RunExistsError`) unless
    ``resume`` or ``overwrite`` (see :func:`prepare_run_dir`). Resuming a run whose
    newest checkpoint has reached ``train.iters`` logs that it is finished and returns
    its state without training (``state.iteration == state.start_iteration``).
    """
    info = dist_info or init_distributed(device)
    run_dir = Path(cfg.log.out_dir)
    tc = cfg.train
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, info=info)

    # Where to start: a checkpoint of this run (found first: a finished run needs no data).
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path: Path | None = None
    ckpt: dict[str, Any] | None = None
    if resume:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
        ckpt_path, ckpt = find_resume_checkpoint(ckpt_dir, info)
        if ckpt_path is None:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
    finished = ckpt is not None and int(ckpt["iteration"]) >= tc.iters

    # Data first: a wrong folder should fail before a large model is built.
    if train_set is None and not finished:
        train_set = build_train_dataset(cfg)

    # Model: seeded so that every fresh run with this seed starts identically.
    seed_everything(tc.seed)
    if model is None:
        model = build_network(cfg)
    model.to(info.device)
    ema_model = make_ema(model) if tc.ema > 0 else None
    optimizer = torch.optim.Adam(
        model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
    )
    scheduler = build_scheduler(optimizer, cfg)
    state = TrainState(cfg, model, ema_model, optimizer, scheduler, run_dir, info)

    resumed_rng: Any = None
    if ckpt_path is not None and ckpt is not None:
        resumed_rng = restore_checkpoint(state, ckpt, source=ckpt_path)
        if finished:
            logger.info(
                "%s is finished (iteration %d of %d, %s); nothing to do. To train longer, "
                "resume with --set train.iters=N (N > %d)",
                run_dir,
                state.iteration,
                tc.iters,
                ckpt_path.name,
                state.iteration,
            )
            state.start_iteration = state.iteration
            return state
        logger.info("resumed from %s at iteration %d", ckpt_path, state.iteration)
    if ckpt_path is None and tc.warm_start:
        warm_start(
            model,
            tc.warm_start,
            norm=cfg.model.norm,
            ignore_norm=tc.warm_start_ignore_norm,
        )
        if ema_model is not None:
            ema_model.load_state_dict(model.state_dict())
    state.start_iteration = state.iteration

    # Data: an endless stream positioned after the samples already consumed.
    assert train_set is not None
    loader = make_loader(
        train_set,
        seed=tc.seed,
        start=state.iteration * samples_per_iteration(cfg, info),
        batch_size=cfg.data.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        workers=cfg.data.workers,
        pin_memory=info.device.type == "cuda",
    )
    batches = iter(loader)
    if validator is None and cfg.val.every > 0:
        validator = default_validator(cfg, info.device)

    if info.is_main:
        write_run_config(cfg, run_dir, differences_logged=ckpt is not None and "config" in ckpt)
        state.metrics_log = MetricsLog(run_dir, cfg, truncate_after=state.iteration)
    net = wrap_ddp(model, info)
    feature_taps = FeatureTaps(model) if tc.kl_weight > 0 else None

    # Per-rank stream for anything stochastic in the model itself; a resumed run
    # continues the saved states instead.
    seed_everything(tc.seed + 1_000_003 * (info.rank + 1))
    if resumed_rng is not None:
        set_rng_state(resumed_rng)

    last_good = ckpt_path
    t_start = t_last = time.perf_counter()
    it_last = state.iteration
    try:
        for it in range(state.iteration + 1, tc.iters + 1):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss_total: Tensor | None = None
            for micro in range(tc.grad_accum):
                batch = next(batches)
                lq = batch["lq"].to(info.device, non_blocking=True)
                gt = batch["gt"].to(info.device, non_blocking=True)
                # DDP all-reduces the gradients once, after the last micro-batch.
                last_micro = micro == tc.grad_accum - 1
                no_sync = getattr(net, "no_sync", None)
                sync = contextlib.nullcontext() if last_micro or no_sync is None else no_sync()
                with sync:
                    with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=tc.bf16):
                        out = net(lq)
                        loss = F.l1_loss(out.float(), gt)
                        if feature_taps is not None:
                            loss = loss + tc.kl_weight * feature_taps.kl_to_standard_normal()
                    # Mean over micro-batches of per-batch means = the mean over one
                    # batch of their union (equal micro-batch sizes).
                    (loss / tc.grad_accum if tc.grad_accum > 1 else loss).backward()
                detached = loss.detach()
                loss_total = detached if loss_total is None else loss_total + detached
            assert loss_total is not None
            loss_value = all_reduce_mean(loss_total / tc.grad_accum, info).item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss_value}) at iteration {it} of {cfg.name}; stopped "
                    f"before the optimiser step. Last good checkpoint: "
                    f"{last_good if last_good else 'none written yet'}"
                )
            if tc.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if ema_model is not None:
                update_ema(ema_model, model, tc.ema)

            state.iteration = it
            state.loss = loss_value
            state.lr = optimizer.param_groups[0]["lr"]

            if info.is_main and (it % cfg.log.every == 0 or it == tc.iters):
                now = time.perf_counter()
                rate = (it - it_last) / max(now - t_last, 1e-9)
                t_last, it_last = now, it
                state.log({"loss": loss_value, "lr": state.lr, "it_per_s": rate})
            if progress is not None and info.is_main:
                progress(state)
            if hooks and cfg.log.probe_interval and it % cfg.log.probe_interval == 0:
                run_hooks(hooks, state)
            if (
                cfg.val.every
                and validator is not None
                and (it % cfg.val.every == 0 or it == tc.iters)
            ):
                require_finite_weights(state, last_good, "validating")
                validate(state, validator)
            out_of_time = tc.time_limit_min > 0 and broadcast_flag(
                time.perf_counter() - t_start >= 60.0 * tc.time_limit_min, info
            )
            if it % cfg.log.checkpoint_every == 0 or it == tc.iters or out_of_time:
                require_finite_weights(state, last_good, "writing its checkpoint")
                last_good = write_checkpoint(state) or last_good
            if out_of_time:
                logger.info(
                    "time limit of %g min reached at iteration %d; resume with --resume",
                    tc.time_limit_min,
                    it,
                )
                break
    finally:
        if state.metrics_log is not None:
            state.metrics_log.close()
        if feature_taps is not None:
            feature_taps.remove()
    return state


# --------------------------------------------------------------------------- building


def samples_per_iteration(cfg: Config, info: DistInfo) -> int:
    """Training samples one optimiser step consumes over all ranks (the global batch):
    ``data.batch_size * world_size * train.grad_accum``."""
    return cfg.data.batch_size * info.world_size * cfg.train.grad_accum


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's ``random``."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def build_network(cfg: Config) -> nn.Module:
    """``irformer.archs.build_model`` for the config's preset (or arch), norm and scale."""
    from irformer.archs import build_model, preset_kwargs

    try:
        preset_scale = preset_kwargs(cfg.model.arch).get("upscale")
    except ValueError:
        preset_scale = None  # an architecture name, not a preset
    if preset_scale is not None and int(preset_scale) != cfg.model.scale:
        raise ValueError(
            f"model.scale {cfg.model.scale} contradicts preset {cfg.model.arch!r} "
            f"(upscale {preset_scale}); pick the preset of that scale"
        )
    kwargs = dict(cfg.model.overrides)
    kwargs["norm"] = cfg.model.norm
    kwargs["upscale"] = cfg.model.scale
    if cfg.data.grayscale:
        kwargs.setdefault("in_chans", 1)
    return build_model(cfg.model.arch, **kwargs)


def default_validator(cfg: Config, device: torch.device) -> Validator:
    """PSNR/SSIM on ``cfg.val.benchmarks`` via :func:`irformer.engine.evaluate.evaluate_benchmark`.

    Benchmarks are resolved (folders checked) once, before training starts.
    """
    from irformer.data.benchmarks import resolve_benchmarks
    from irformer.engine.evaluate import evaluate_benchmark

    sets = resolve_benchmarks(
        cfg.val.benchmarks,
        cfg.val.root,
        task=cfg.data.task,
        scale=cfg.model.scale,
        sigma=cfg.data.sigma,
        quality=cfg.data.quality,
    )

    def run(model: nn.Module) -> dict[str, float]:
        results: dict[str, float] = {}
        for bench in sets:
            res = evaluate_benchmark(model, bench, device=device)
            results[f"{bench.name}/psnr"] = res.psnr
            results[f"{bench.name}/ssim"] = res.ssim
        return results

    return run


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """StepLR / MultiStepLR stepped once per iteration (the paper's tables)."""
    tc = cfg.train
    if tc.scheduler == "steplr":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=tc.step_size, gamma=tc.gamma)
    if tc.scheduler == "multisteplr":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(tc.milestones), gamma=tc.gamma
        )
    return None


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` whose weights track an exponential moving average."""
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers copied (BasicSR).

    Written as a lerp so that equal weights stay bit-identical (a frozen model's
    EMA is the model).
    """
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def warm_start(
    model: nn.Module,
    path: str | Path,
    *,
    norm: str | None = None,
    ignore_norm: bool = False,
) -> None:
    """Initialise from another run's weights (x4 from x2): tensors whose name and
    shape match are loaded, the rest (the upsampler) keep their initialisation.

    The file's metadata must agree with the model on arch and norm (``norm``:
    the config's, when the model carries no irformer metadata): i-LN keeps
    LayerNorm's key names, so a cross-norm file would load without a single
    mismatch. ``ignore_norm`` allows it on purpose, with a warning.
    """
    from irformer.archs import read_state_dict

    state, meta = read_state_dict(path)
    check_warm_start_meta(model, meta, path, norm=norm, ignore_norm=ignore_norm)
    own = model.state_dict()
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not loadable:
        raise ValueError(f"warm start {path}: no tensor matches the model by name and shape")
    skipped = sorted(set(own) - set(loadable))
    model.load_state_dict(loadable, strict=False)
    logger.info("warm start from %s: %d tensors loaded, %d kept", path, len(loadable), len(skipped))
    if skipped:
        logger.info("warm start kept initialisation for: %s", ", ".join(skipped))


def check_warm_start_meta(
    model: nn.Module,
    file_meta: Mapping[str, Any],
    path: str | Path,
    *,
    norm: str | None = None,
    ignore_norm: bool = False,
) -> None:
    """Refuse a warm-start file of another arch or norm (see :func:`warm_start`).

    Scale and other hyper-parameters may differ (that is what a warm start is
    for; shapes decide which tensors load). A file without irformer metadata
    (an official release) counts as ``ln``, as everywhere else.
    """
    from irformer.archs import CheckpointMismatchError

    own = getattr(model, "irformer_meta", None)
    own = own if isinstance(own, Mapping) else {}
    if "arch" in own and "arch" in file_meta and own["arch"] != file_meta["arch"]:
        raise CheckpointMismatchError(
            f"train.warm_start {path} holds a {file_meta['arch']!r} model but the config "
            f"builds {own['arch']!r}"
        )
    want = str(own.get("norm", norm)) if own.get("norm", norm) is not None else None
    have = str(file_meta.get("norm", "ln"))
    if want is None or want == have:
        return
    origin = "" if "norm" in file_meta else " (no irformer metadata: taken as ln)"
    message = (
        f"train.warm_start {path} was trained with norm {have!r}{origin} but model.norm is "
        f"{want!r}; i-LN keeps LayerNorm's key names, so the tensors would load silently "
        "into the other norm"
    )
    if not ignore_norm:
        raise CheckpointMismatchError(
            message + ". Set train.warm_start_ignore_norm=true to initialise across norms on "
            "purpose"
        )
    logger.warning("CROSS-NORM WARM START (train.warm_start_ignore_norm=true): %s", message)


# --------------------------------------------------------------------------- run folder


def is_run_dir(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a run's artefacts (:data:`RUN_ARTEFACTS`)."""
    run_dir = Path(run_dir)
    for name in RUN_ARTEFACTS:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return True
    return False


def clear_run_dir(run_dir: str | Path) -> list[Path]:
    """Delete a run's artefacts (:data:`RUN_ARTEFACTS` and ``*.jsonl``); other files
    stay (a mistyped ``log.out_dir`` must not wipe a folder). Returns the deleted."""
    import shutil

    run_dir = Path(run_dir)
    doomed = [run_dir / n for n in RUN_ARTEFACTS if (run_dir / n).exists()]
    doomed += [p for p in sorted(run_dir.glob("*.jsonl")) if p not in doomed]
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return doomed


def _claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    from irformer.data.io import check_folder_writable

    if not resume and is_run_dir(run_dir):
        if not overwrite:
            raise RunExistsError(
                f"{run_dir} holds an earlier run (config.yaml, metrics or checkpoints); "
                "pass --resume to continue it, --overwrite to delete it and start again, "
                "or choose another folder with --set log.out_dir=NEW_DIR"
            )
        deleted = clear_run_dir(run_dir)
        logger.warning(
            "--overwrite: deleted the earlier run in %s (%s)",
            run_dir,
            ", ".join(p.name for p in deleted),
        )
    check_folder_writable(run_dir)
    if resume:
        for folder in (run_dir, run_dir / "checkpoints"):
            for path in remove_orphaned_temp_files(folder):
                logger.warning("--resume: removed %s, left by an interrupted write", path)


def prepare_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, info: DistInfo) -> None:
    """Make ``run_dir`` ready before any data is read or model built.

    Rank 0 refuses a folder holding an earlier run unless ``resume`` or
    ``overwrite`` (which deletes that run's artefacts, see :func:`clear_run_dir`),
    creates the folder and proves it writable, and, when resuming, removes
    temporary files of interrupted writes. Every rank raises if rank 0 did.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other: pick one")
    problem: IrformerError | None = None
    if info.is_main:
        try:
            _claim_run_dir(Path(run_dir), resume=resume, overwrite=overwrite)
        except IrformerError as exc:
            problem = exc
    if broadcast_flag(problem is not None, info):
        raise problem or IrformerError(f"rank 0 could not use the run folder {run_dir}")


# --------------------------------------------------------------------------- checkpoints


def require_finite_weights(state: TrainState, last_good: Path | None, doing: str) -> None:
    """Stop (:class:`NonFiniteWeightsError`) before ``doing`` something with NaN/inf
    weights: a checkpoint is never written with them, nor validated as best.

    The loss check catches most divergences one iteration later; this catches
    the step that produced the NaN itself (its loss was still finite).
    """
    bad = nonfinite_tensors(unwrap(state.model).state_dict())
    bad_ema = nonfinite_tensors(state.ema_model.state_dict()) if state.ema_model is not None else []
    if not bad and not bad_ema:
        return
    parts = [f"{len(bad)} model tensors ({', '.join(bad[:3])})"] if bad else []
    if bad_ema:
        parts.append(f"{len(bad_ema)} EMA tensors ({', '.join(bad_ema[:3])})")
    raise NonFiniteWeightsError(
        f"non-finite weights after iteration {state.iteration} of {state.config.name}: "
        f"{' and '.join(parts)}; stopped before {doing}. Last good checkpoint: "
        f"{last_good if last_good else 'none written yet'}"
    )


def find_resume_checkpoint(
    ckpt_dir: Path, info: DistInfo
) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest usable checkpoint of ``ckpt_dir`` (on the CPU) for ``--resume``.

    Newer ones that do not load or hold non-finite weights are named in a
    warning and, once every rank has chosen, set aside by rank 0 (renamed
    ``*.skipped``) so that pruning never keeps them in place of good ones.
    All present but none usable is an error.
    """
    path, ckpt, skipped = newest_usable_checkpoint(ckpt_dir, "cpu")
    for bad, reason in skipped:
        if info.is_main:
            logger.warning("--resume: skipping %s: %s", bad.name, reason)
    if path is None and skipped:
        raise CheckpointReadError(
            f"--resume: none of the {len(skipped)} checkpoints in {ckpt_dir} is usable "
            f"(newest: {skipped[0][1]}); --overwrite starts the run again"
        )
    barrier(info)
    if info.is_main:
        for bad, _ in skipped:
            logger.warning("--resume: %s set aside as %s", bad.name, set_aside(bad).name)
    if path is not None and info.is_main and skipped:
        logger.warning("--resume: continuing from %s instead", path.name)
    return path, ckpt


def model_meta(cfg: Config, model: nn.Module) -> dict[str, Any]:
    """The ``irformer`` metadata stored with every checkpoint and export.

    What ``build_model`` recorded on the model (arch, preset, norm, scale, task,
    full constructor kwargs), so :func:`irformer.archs.load_checkpoint_model`
    rebuilds the network from a checkpoint alone; models built elsewhere get
    the config's names. ``task`` is always the config's ``data.task``.
    """
    meta = getattr(model, "irformer_meta", None)
    if isinstance(meta, Mapping):
        # The task trained on (a preset built for another task, or an architecture
        # name without a preset, takes the config's).
        return {**meta, "task": cfg.data.task}
    return {
        "arch": type(model).__name__.lower(),
        "preset": cfg.model.arch,
        "norm": cfg.model.norm,
        "scale": cfg.model.scale,
        "task": cfg.data.task,
        "version": irformer.__version__,
        "model_kwargs": dict(cfg.model.overrides),
    }


def gather_rng_states(info: DistInfo) -> list[Any]:
    """Every rank's RNG states, indexed by rank (so each rank resumes its own stream)."""
    mine = rng_state()
    if not info.distributed:
        return [mine]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, mine)
    return states


def write_checkpoint(state: TrainState) -> Path | None:
    """Rank 0 writes ``checkpoints/iter_*.pth`` atomically and prunes old ones."""
    cfg, info = state.config, state.dist
    rngs = gather_rng_states(info)  # collective: every rank takes part
    path = None
    if info.is_main:
        ckpt = {
            "params": unwrap(state.model).state_dict(),
            "params_ema": state.ema_model.state_dict() if state.ema_model is not None else {},
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict() if state.scheduler is not None else {},
            "rng": rngs,
            "data": {
                "position": state.iteration * samples_per_iteration(cfg, info),
                "seed": cfg.train.seed,
            },
            "iteration": state.iteration,
            "best": dict(state.best),
            "irformer": model_meta(cfg, state.model),
            "config": config_to_dict(cfg),
        }
        ckpt_dir = state.run_dir / "checkpoints"
        path = save_checkpoint(ckpt_dir / checkpoint_name(state.iteration), ckpt)
        prune_checkpoints(ckpt_dir, cfg.log.keep_last)
    barrier(info)
    return path


def restore_checkpoint(
    state: TrainState, ckpt: Mapping[str, Any], *, source: str | Path = "checkpoint"
) -> Any:
    """Load weights/optimiser/scheduler into ``state``; returns this rank's RNG states.

    The RNG states are returned, not applied, so the caller can restore them
    after everything that still draws random numbers during setup. Where the
    config differs from the one the checkpoint was written with, the differences
    are logged; weights that do not fit the model are one error naming them
    (:class:`~irformer.archs.CheckpointMismatchError`), not PyTorch's key listing.
    """
    meta = ckpt.get("irformer", {})
    cfg = state.config
    saved = ckpt.get("config")
    differences = config_differences(saved, cfg) if isinstance(saved, Mapping) else []
    if differences and state.dist.is_main:
        logger.warning(
            "resume: the config differs from the one %s was trained with: %s",
            Path(source).name,
            "; ".join(differences),
        )
    for key, expected in (("preset", cfg.model.arch), ("norm", cfg.model.norm)):
        if meta.get(key) not in (None, expected):
            raise ValueError(
                f"resume: checkpoint was trained with {key}={meta.get(key)!r} "
                f"but the config says {expected!r}"
            )
    try:
        state.model.load_state_dict(ckpt["params"])
    except RuntimeError as exc:
        from irformer.archs import CheckpointMismatchError

        model_keys = [d for d in differences if d.startswith(("model.", "data.grayscale"))]
        cause = (
            "the config differs from the run's: " + "; ".join(model_keys or differences)
            if differences
            else f"no config difference recorded ({str(exc).splitlines()[0]})"
        )
        raise CheckpointMismatchError(
            f"resume: the weights in {source} do not fit the model this config builds; "
            f"{cause}. Resume with the run's own config (irformer train --resume RUN_DIR) "
            "or start a new run"
        ) from None
    if state.ema_model is not None:
        state.ema_model.load_state_dict(ckpt["params_ema"] or ckpt["params"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scheduler is not None and ckpt.get("scheduler"):
        state.scheduler.load_state_dict(ckpt["scheduler"])
    state.iteration = int(ckpt["iteration"])
    state.best = dict(ckpt.get("best", {}))
    expected_position = state.iteration * samples_per_iteration(cfg, state.dist)
    if ckpt["data"]["position"] != expected_position:
        logger.warning(
            "resume: batch size, world size or grad_accum changed (position %d, now %d); "
            "the sample stream continues from iteration %d",
            ckpt["data"]["position"],
            expected_position,
            state.iteration,
        )
    rngs = ckpt["rng"]
    if len(rngs) != state.dist.world_size:
        logger.warning(
            "resume: %d ranks saved RNG states, running %d", len(rngs), state.dist.world_size
        )
    return rngs[min(state.dist.rank, len(rngs) - 1)]


# --------------------------------------------------------------------------- validation, hooks


def validate(state: TrainState, validator: Validator) -> dict[str, float]:
    """Rank 0 evaluates the EMA model; the best ``*/psnr`` is tracked and saved."""
    info = state.dist
    results: dict[str, float] = {}
    if info.is_main:
        model = state.eval_model
        was_training = model.training
        model.eval()
        with preserve_rng(), torch.no_grad():
            results = {k: float(v) for k, v in validator(model).items()}
        model.train(was_training)
        state.last_val = results
        state.log({f"val/{k}": v for k, v in results.items()})
        key = next((k for k in results if k.endswith("psnr")), None)
        if key is not None and results[key] > state.best.get("psnr", -math.inf):
            state.best = {"psnr": results[key], "iter": float(state.iteration)}
            save_best(state)
            logger.info("new best %s = %.4f at iteration %d", key, results[key], state.iteration)
    barrier(info)
    return results


def save_best(state: TrainState) -> Path:
    """``best.pth``: weights of the best validation so far (not resumable state)."""
    from irformer.engine.checkpoint import atomic_torch_save

    path = state.run_dir / "checkpoints" / "best.pth"
    atomic_torch_save(
        {
            "params": unwrap(state.model).state_dict(),
            "params_ema": state.ema_model.state_dict() if state.ema_model is not None else {},
            "iteration": state.iteration,
            "val": dict(state.last_val),
            "irformer": model_meta(state.config, state.model),
        },
        path,
    )
    return path


def run_hooks(hooks: Sequence[Hook], state: TrainState) -> None:
    """Call the hooks on rank 0 without letting them touch the RNGs or the train mode."""
    if not state.dist.is_main:
        return
    modes = (state.model.training, state.eval_model.training)
    with preserve_rng():
        for hook in hooks:
            hook(state)
    state.model.train(modes[0])
    state.eval_model.train(modes[1])


# --------------------------------------------------------------------------- features


class FeatureTaps:
    """Forward hooks keeping each Transformer layer's output for an auxiliary loss."""

    def __init__(self, model: nn.Module) -> None:
        self.blocks = [block for _, block in transformer_blocks(model)]
        if not self.blocks:
            raise ValueError(
                f"{type(model).__name__}: no Transformer blocks (modules with norm1/norm2) "
                "to regularise; train.kl_weight needs them"
            )
        self.features: list[Tensor] = []
        self.handles = [b.register_forward_hook(self._keep) for b in self.blocks]

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training:
            self.features.append(output[0] if isinstance(output, tuple) else output)

    def kl_to_standard_normal(self) -> Tensor:
        """Mean over layers of KL(N(mu_c, var_c) || N(0, 1)), per sample and channel.

        mu_c/var_c are each channel's mean/variance over the tokens of one image;
        this is the paper's Table 7 "KLD" regulariser pulling features towards
        unit Gaussian statistics. Features are consumed (cleared) by the call.
        """
        if not self.features:
            raise RuntimeError("FeatureTaps: no features captured in this forward")
        terms = []
        for feat in self.features:
            f = feat.float().reshape(feat.shape[0], -1, feat.shape[-1])  # (B, L, C)
            var, mean = torch.var_mean(f, dim=1, unbiased=False)
            var = var.clamp_min(1e-8)
            terms.append(0.5 * (mean.square() + var - var.log() - 1.0).mean())
        self.features.clear()
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# --------------------------------------------------------------------------- logging


def write_run_config(cfg: Config, run_dir: Path, *, differences_logged: bool = False) -> None:
    """``config.yaml`` in the run folder; warn when a resumed run's config differs
    (unless ``differences_logged``: the resume already named them)."""
    path = run_dir / RUN_CONFIG_FILE
    text = dump_config(cfg)
    if path.is_file() and path.read_text() != text and not differences_logged:
        try:
            differences = config_differences(yaml.safe_load(path.read_text()) or {}, cfg)
        except yaml.YAMLError:
            differences = ["(the old file is not valid YAML)"]
        logger.warning(
            "%s differs from the current config (%s); keeping the new one",
            path,
            "; ".join(differences) or "formatting only",
        )
    atomic_write(path, text)


class MetricsLog:
    """JSONL (``metrics.jsonl``) and optional TensorBoard (``tb/``) writer.

    At start every ``*.jsonl`` of the run folder (these metrics, the probes'
    ``features.jsonl``) is cut back to the starting iteration: a resumed run
    re-runs the iterations after its checkpoint and must log them once, and a
    fresh run in an old folder starts clean.
    """

    def __init__(self, run_dir: Path, cfg: Config, *, truncate_after: int) -> None:
        for old in run_dir.glob("*.jsonl"):
            _truncate_jsonl(old, truncate_after)
        self.path = run_dir / "metrics.jsonl" if cfg.log.jsonl else None
        if self.path is not None:
            self.handle = self.path.open("a")
        self.tb = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError(
                    "log.tensorboard is on but tensorboard is not installed "
                    "(pip install tensorboard)"
                ) from exc
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=truncate_after + 1)

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is not None:
            self.handle.write(json.dumps(record, default=float) + "\n")
            self.handle.flush()
        if self.tb is not None:
            step = int(record["iter"])
            for key, value in record.items():
                if key != "iter" and isinstance(value, int | float) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.path is not None:
            self.handle.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_jsonl(path: Path, last_iteration: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if int(record.get("iter", record.get("iteration", 0))) <= last_iteration:
            kept.append(line)
    atomic_write(path, "".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
