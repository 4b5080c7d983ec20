"""Memory planning of restore: estimates, the path chosen within a budget, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from irformer.archs import build_model, save_model_weights
from irformer.cli import main as cli_main
from irformer.data.io import write_image
from irformer.engine.infer import RestoreOptions, restore_files
from irformer.engine.memory import (
    CONSTANT_BYTES,
    MemoryBudgetError,
    estimate_peak_bytes,
    parse_memory_size,
    plan_restore,
)

TINY = {
    "img_size": 16,
    "embed_dim": 12,
    "depths": (2,),
    "num_heads": (2,),
    "window_size": 4,
    "mlp_ratio": 2.0,
    "upsampler": "pixelshuffledirect",
    "drop_path_rate": 0.0,
}


def tiny(norm: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("swinir", norm=norm, upscale=2, **TINY).eval()


def test_estimates_scale_with_pixels_and_paths_order() -> None:
    model = tiny("ln")
    plain = estimate_peak_bytes(model, (1000, 1000))
    plain4 = estimate_peak_bytes(model, (2000, 2000))
    exact = estimate_peak_bytes(model, (1000, 1000), RestoreOptions(chunk_windows=64))
    tiled = estimate_peak_bytes(model, (4000, 4000), RestoreOptions(tile=128, tile_overlap=16))
    weights = sum(p.numel() * 4 for p in model.parameters()) + CONSTANT_BYTES
    assert plain.path == "plain" and exact.path == "exact" and tiled.path == "tiled"
    assert (plain4.total - weights) == pytest.approx(4 * (plain.total - weights), rel=1e-6)
    assert exact.total < plain.total
    # A tile's working memory does not grow with the image; the output accumulators do.
    assert tiled.total < estimate_peak_bytes(model, (4000, 4000)).total / 5
    half = estimate_peak_bytes(model, (1000, 1000), RestoreOptions(precision="bf16"))
    assert half.total < plain.total


def test_plan_picks_the_path_that_fits() -> None:
    ln, iln = tiny("ln"), tiny("iln")
    size = (3000, 3000)
    options = RestoreOptions()
    plain = estimate_peak_bytes(ln, size).total
    exact = estimate_peak_bytes(ln, size, RestoreOptions(chunk_windows=256)).total
    assert plan_restore(ln, size, options, max_memory=plain + 1) == options
    chosen = plan_restore(ln, size, options, max_memory=exact + 1)
    assert chosen.chunk_windows == 256 and chosen.tile is None
    tiled = plan_restore(ln, size, options, max_memory=exact // 3)
    assert tiled.tile is not None and tiled.chunk_windows is None
    assert estimate_peak_bytes(ln, size, tiled).total <= exact // 3
    # i-LN (whole-image statistics) is never tiled unasked: refused, with the options.
    with pytest.raises(MemoryBudgetError, match=r"plain: ~.*exact: ~.*--max-memory.*--tile"):
        plan_restore(iln, size, options, max_memory=exact // 3)
    # A path the user chose is kept, and refused when it does not fit.
    mine = RestoreOptions(chunk_windows=64)
    assert plan_restore(ln, size, mine, max_memory=exact + 1, explicit=True) == mine
    with pytest.raises(MemoryBudgetError, match="exact"):
        plan_restore(ln, size, mine, max_memory=exact // 2, explicit=True)


def test_parse_memory_size() -> None:
    assert parse_memory_size("8G") == 8 * 2**30
    assert parse_memory_size("500m") == 500 * 2**20
    assert parse_memory_size("1.5G") == int(1.5 * 2**30)
    assert parse_memory_size("1024") == 1024
    assert parse_memory_size("none") is None
    with pytest.raises(ValueError, match="expected a number"):
        parse_memory_size("lots")
    with pytest.raises(ValueError, match="positive"):
        parse_memory_size("-1G")


def test_restore_refuses_an_image_no_path_fits(tmp_path: Path, capsys) -> None:
    """Was: a 4000x4000 restore grew to 6.5 GB in 5 s (default settings)."""
    model = tiny("iln")
    ckpt = save_model_weights(tmp_path / "iln.safetensors", model)
    rng = np.random.default_rng(0)
    write_image(tmp_path / "in" / "small.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    write_image(tmp_path / "in" / "big.png", rng.integers(0, 256, (200, 200, 3), dtype=np.uint8))
    small = estimate_peak_bytes(model, (24, 24)).total
    big_exact = estimate_peak_bytes(model, (200, 200), RestoreOptions(chunk_windows=256)).total
    budget = (small + big_exact) // 2  # the small image fits plain, the big one nothing
    assert small < budget < big_exact
    result = restore_files(model, [tmp_path / "in"], tmp_path / "out", max_memory=budget)
    assert [f.source.name for f in result.restored] == ["small.png"]
    assert [f.source.name for f in result.failed] == ["big.png"]
    assert "memory budget" in result.failed[0].error
    args = ["restore", str(tmp_path / "in"), "-o", str(tmp_path / "o2"), "--model", str(ckpt)]
    assert cli_main([*args, "--max-memory", str(budget)]) == 1
    assert "memory budget" in capsys.readouterr().err


def _measured_extra_mb(size: int) -> float:
    code = f"""
import json, resource, torch
from irformer.archs import build_model
from irformer.engine.infer import restore_tensor
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model("swinir", norm="ln", upscale=2, **{TINY!r}).eval()
x = torch.rand(1, 3, {size}, {size})
restore_tensor(model, x[..., :8, :8])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
restore_tensor(model, x)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow  # two fresh processes; the planner's tests above run by default
def test_estimate_tracks_a_measured_peak() -> None:
    """The estimate's growth with the image matches the measured peak's (within 40%):
    the coefficients are fitted on large models in BENCHMARKS.md; this checks the
    shape of the formula on a tiny one in a fresh process."""
    small, large = 256, 512
    measured = _measured_extra_mb(large) - _measured_extra_mb(small)
    model = tiny("ln")
    estimated = (
        estimate_peak_bytes(model, (large, large)).total
        - estimate_peak_bytes(model, (small, small)).total
    ) / 2**20
    assert measured > 0
    assert 0.6 < measured / estimated < 1.4, (measured, estimated)
