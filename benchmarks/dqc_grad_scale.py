"""How far below Adam's eps the reference code's DQC loss puts the bound gradients.

The 2DQuant/CompSRT code divides its mean L1 by one sample's output element
count (and its mean feature MSE by the feature element count). Adam is
invariant to the loss scale except through ``eps`` (1e-8): a step is
``lr * m / (sqrt(v) + eps)``, so a parameter whose gradient is far below eps
moves ``|g| / eps`` times the lr. This script calibrates one SwinIR-light
model (the DOBI start DQC begins from), runs the first DQC step on one batch
of the DQC stream with ``--dqc-loss mean`` and ``official`` (lr 0: only the
gradient is wanted) and prints, per parameter kind (weight/activation bounds,
CompSRT's alpha/beta), the median |g| and the median of ``|g| / (|g| + eps)``:
the fraction of a full lr step the first Adam step takes (Adam's first step is
``lr * g / (|g| + eps)``; later steps replace |g| by a running RMS).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dqc_grad_scale.py --method compsrt --wbits 4
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EPS = 1e-8  # torch.optim.Adam's default, as in the reference configs


def gradients(model: torch.nn.Module) -> dict[str, list[float]]:
    from irformer.compress.quantizers import ActQuantizer, WeightQuantizer

    out: dict[str, list[float]] = {}
    for module in model.modules():
        if not isinstance(module, WeightQuantizer | ActQuantizer):
            continue
        kind = "w" if isinstance(module, WeightQuantizer) else "a"
        for name in ("lower", "upper", "alpha", "beta"):
            p = getattr(module.quantizer, name, None)
            if isinstance(p, torch.Tensor) and p.grad is not None:
                key = f"{kind}_{'bounds' if name in ('lower', 'upper') else name}"
                out.setdefault(key, []).extend(p.grad.abs().reshape(-1).tolist())
    return out


def main() -> None:
    from irformer.archs.zoo import load_model
    from irformer.experiments.compression import (
        CompressionSettings,
        calibration_batches,
        quantize_with_settings,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default=str(REPO / "src/irformer/weights/swinir_light_x4_ln.safetensors")
    )
    ap.add_argument("--method", default="compsrt")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--calib", default=str(REPO.parent / "shared/data/train/BSD200"))
    ap.add_argument("--dqc-batch", type=int, default=2)
    ap.add_argument("--dqc-patch", type=int, default=32)
    args = ap.parse_args()

    loaded = load_model(args.model)
    model = loaded.model
    scale = int(getattr(model, "upscale", 1))
    print(
        f"{Path(args.model).name} {args.method} W{args.wbits}A{args.wbits}, first DQC step, "
        f"batch {args.dqc_batch} x {args.dqc_patch} px; Adam eps {EPS:g}"
    )
    print(
        f"{'loss':9} {'params':10} {'n':>6} {'median |g|':>11} {'p90 |g|':>10} "
        f"{'median step fraction':>21}"
    )
    for loss in ("mean", "official"):
        settings = CompressionSettings(
            methods=(args.method,),
            bits=((args.wbits, args.wbits),),
            calib_dir=args.calib,
            scale=scale,
            dqc_iters=1,
            dqc_batch=args.dqc_batch,
            dqc_patch=args.dqc_patch,
            dqc_lr=0.0,
            dqc_loss=loss,
            dqc_fused=False,
        )
        calib, held_out = calibration_batches(settings)
        result = quantize_with_settings(
            model,
            settings,
            args.method,
            args.wbits,
            args.wbits,
            calib,
            held_out,
            device=torch.device("cpu"),
        )
        for key, g in sorted(gradients(result.model).items()):
            ordered = sorted(g)
            frac = statistics.median(x / (x + EPS) for x in g)
            print(
                f"{loss:9} {key:10} {len(g):6d} {statistics.median(g):11.3e} "
                f"{ordered[int(0.9 * (len(g) - 1))]:10.3e} {frac:21.3f}"
            )


if __name__ == "__main__":
    main()
