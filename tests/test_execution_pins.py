"""Outputs on every execution path equal those recorded before the models/execution
redesign (tests/fixtures/execution_pins.json, see make_execution_pins.py).

Samples must agree within 1e-6 everywhere; the whole output must be bit-identical
where the CPU-kernel build tag (CPU flags, torch, Python) is the one recorded,
since GEMM and the -march=native kernel may round differently elsewhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from execution_pin_cases import (
    PATHS,
    SHIPPED,
    SMALL,
    build_tag,
    run_path,
    shipped_input,
    shipped_model,
    small_input,
    small_model,
    summarise,
)

PINS_FILE = Path(__file__).resolve().parent / "fixtures" / "execution_pins.json"
PINS = json.loads(PINS_FILE.read_text())


def _check(case: str, model, x) -> None:
    same_machine = PINS["build_tag"] == build_tag()
    for path in PATHS:
        want = PINS["pins"][f"{case}/{path}"]
        got = summarise(run_path(model, x, path))
        assert got["shape"] == want["shape"], (case, path)
        assert got["sample"] == pytest.approx(want["sample"], abs=1e-6), (case, path)
        if same_machine:
            assert got["sha256"] == want["sha256"], f"{case}/{path}: output bytes changed"


@pytest.mark.parametrize("stem", SHIPPED)
def test_shipped_checkpoints_pinned(stem: str, shared_data: Path) -> None:
    _check(stem, shipped_model(stem), shipped_input(stem, shared_data))


@pytest.mark.parametrize("norm", ["ln", "iln"])
@pytest.mark.parametrize("name", list(SMALL))
def test_small_models_pinned(name: str, norm: str) -> None:
    _check(f"{name}_{norm}", small_model(name, norm), small_input())
