"""``irformer train (--config FILE | --resume RUN_DIR) [--set KEY=VALUE ...] [--overwrite]``.

Works alone (one CPU or GPU) and under ``torchrun --nproc_per_node N``
(DDP: NCCL on GPUs, gloo on CPU). Rank 0 draws the progress bar, writes the
logs and checkpoints into ``log.out_dir``, and, every ``log.probe_interval``
iterations, the feature probes of :mod:`irformer.analysis.probes`. A
``log.out_dir`` holding an earlier run is refused unless ``--resume`` continues
it or ``--overwrite`` deletes it (its checkpoints, logs and config) first.

``--resume RUN_DIR`` continues the run in RUN_DIR with the ``config.yaml`` it
saved (``--set`` still applies; every difference from the config the checkpoint
was trained with is logged); ``--config FILE --resume`` continues
``log.out_dir`` of FILE, as before. A finished run is reported as such (exit 0).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from tqdm import tqdm

from irformer.cli.options import add_set_argument
from irformer.engine.config import load_config, load_run_config

RESUME_FROM_CONFIG = "<log.out_dir>"
"""``--resume`` without a folder: the ``log.out_dir`` of ``--config``."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config (also under torchrun)",
        description=__doc__,
    )
    p.add_argument("--config", help="YAML config (see configs/); optional with --resume RUN_DIR")
    add_set_argument(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        nargs="?",
        const=RESUME_FROM_CONFIG,
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its newest usable checkpoint (exactly, on CPU): RUN_DIR "
        "with its saved config.yaml, or without RUN_DIR the log.out_dir of --config",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the earlier run in log.out_dir (checkpoints, logs, config) and start again",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to train (auto: CUDA when available)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic CUDA kernels (exact resume on a GPU; slower; HAT's channel "
        "attention has none and raises)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):  # -> Config
    if args.resume in (None, RESUME_FROM_CONFIG):
        if args.config is None:
            raise ValueError("train needs --config FILE (or --resume RUN_DIR)")
        return load_config(args.config, args.overrides)
    if args.config is None:
        return load_run_config(args.resume, args.overrides)
    cfg = load_config(args.config, [*args.overrides, f"log.out_dir={Path(args.resume)}"])
    return cfg


def run(args: argparse.Namespace) -> int:
    from irformer.engine.distributed import cleanup_distributed, init_distributed
    from irformer.engine.train import TrainState, train

    cfg = _config(args)
    if args.deterministic:
        from irformer.engine.runtime import enable_determinism

        enable_determinism()  # before the first CUDA call
    info = init_distributed(None if args.device == "auto" else args.device)
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    bar: tqdm | None = None

    def progress(state: TrainState) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            bar = tqdm(
                total=cfg.train.iters,
                initial=state.iteration - 1,
                unit="it",
                dynamic_ncols=True,
                desc=cfg.name,
            )
        bar.update(1)
        bar.set_postfix(loss=f"{state.loss:.4f}", lr=f"{state.lr:.2e}", refresh=False)

    hooks = []
    if cfg.log.probe_interval > 0 and info.is_main:
        # The analysis probes (issue 5): per-layer magnitude and channel entropy
        # on a fixed batch of training-like patches, into <out_dir>/features.jsonl.
        from irformer.analysis.probes import FEATURES_FILE, FeatureProbe
        from irformer.engine.data import probe_batch_for

        out_path = Path(cfg.log.out_dir) / FEATURES_FILE
        hooks.append(FeatureProbe(probe_batch_for(cfg), out_path=out_path))
    try:
        state = train(
            cfg,
            resume=args.resume is not None,
            overwrite=args.overwrite,
            progress=progress,
            dist_info=info,
            hooks=hooks,
        )
    finally:
        if bar is not None:
            bar.close()
        cleanup_distributed()
    if info.is_main and state.iteration == state.start_iteration and args.resume is not None:
        return 0  # a finished run: the library said so
    if info.is_main:
        best = f", best PSNR {state.best['psnr']:.3f} dB" if state.best else ""
        logging.getLogger("irformer.train").info(
            "%s: %d iterations done, last loss %.5f%s; outputs in %s",
            cfg.name,
            state.iteration,
            state.loss,
            best,
            os.fspath(state.run_dir),
        )
    return 0
