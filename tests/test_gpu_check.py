"""benchmarks/gpu_check.py: its CPU smoke mode runs every section; without CUDA it refuses.

The smoke run is the default-run guard that the one-command GPU check still
works before a GPU is ever available; the CUDA tests' own CPU self-check is slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_smoke_mode_runs_every_section_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out-dir", str(tmp_path)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_cpu-smoke.json").read_text())
    sections = report["sections"]
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(
        gpu_check.SECTIONS, "ok"
    )
    tests = sections["tests"]
    assert tests["passed"] == 2 and tests["failed"] == 0  # the CUDA tests ran, on the CPU
    rows = sections["forward"]["rows"]
    assert not [r for r in rows if "error" in r]
    assert {(r["model"], r["precision"], r["mode"]) for r in rows} == {
        ("swinir_light_x4", "bf16", "eager"),
        ("hat_s_x4", "fp32", "eager"),
        ("swinir_light_x4", "fp16", "eager"),
        ("swinir_light_x4", "bf16", "compile"),
    }
    for r in rows:
        assert all(v > 0 for v in r["ms"].values()) and all(r["finite"].values())
    fp32 = next(r for r in rows if r["precision"] == "fp32")
    assert fp32["ln_vs_ref_max_abs_diff"] < 1e-4  # same weights, same function
    assert [r["model"] for r in sections["train"]["rows"]] == list(gpu_check.TRAIN_CONFIGS)
    assert all(r["ours_it_s"] > 0 and r["ref_it_s"] > 0 for r in sections["train"]["rows"])
    smoke = sections["smoke"]
    assert smoke["loss_falls"] and smoke["probe_calls"] >= 1 and smoke["probe_values_finite"]
    assert {t["what"].split(" ")[0] for t in report["targets"]} == {"forward", "training"}
    md = (tmp_path / "gpu_check_cpu-smoke.md").read_text()
    assert "smoke mode: tiny models, not measurements" in md
    assert "## 3. Training throughput" in md and "## 4. Training smoke run" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_refuses_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu --smoke" in err
    assert gpu_check.main(["--device", "cpu", "--out-dir", str(tmp_path)]) == 2
    assert "only with --smoke" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no report pretends a run happened


def test_tests_cut_at_their_time_box_are_reported_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])
    clock = gpu_check.Clock(1000.0, dict(gpu_check.SMOKE_PLANNED_S))
    monkeypatch.setattr(clock, "left", lambda name: 0.0)
    # Shorter than pytest's own start-up (importing torch), so the cut happens on any machine.
    monkeypatch.setattr(gpu_check, "MIN_TESTS_BOX_S", 0.5)
    t0 = time.monotonic()
    result = gpu_check.run_tests(torch.device("cpu"), clock, True, tmp_path)
    assert time.monotonic() - t0 < 60
    assert result["status"] == "failed" and "interrupted at its 0.5 s time box" in result["note"]
    assert result["output_tail"]  # pytest's own account of where it stopped


def test_time_boxes_roll_over_and_never_pass_the_budget() -> None:
    clock = gpu_check.Clock(100.0, {"tests": 10.0, "forward": 20.0, "train": 30.0, "smoke": 40.0})
    assert clock.section_deadline("forward") - clock.start == pytest.approx(30.0)
    assert clock.section_deadline("smoke") - clock.start == pytest.approx(100.0)
    tight = gpu_check.Clock(50.0, dict(clock.planned), start=time.monotonic())
    assert tight.section_deadline("smoke") - tight.start == pytest.approx(50.0)
    assert tight.section_deadline("tests") - tight.start == pytest.approx(5.0)


def test_junit_results_and_device_names_are_read(tmp_path: Path) -> None:
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_cuda" name="a" time="1.5"/>'
        '<testcase classname="tests.test_cuda" name="b"><failure message="boom"/></testcase>'
        '<testcase classname="t" name="c"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    cases = gpu_check.parse_junit(xml)["cases"]
    assert [(c["name"], c["outcome"]) for c in cases] == [
        ("tests.test_cuda::a", "passed"),
        ("tests.test_cuda::b", "failed"),
        ("t::c", "skipped"),
    ]
    assert cases[1]["message"] == "boom"
    assert (
        gpu_check.device_slug({"name": "NVIDIA H100 80GB HBM3"}, False) == "nvidia-h100-80gb-hbm3"
    )


@pytest.mark.slow
def test_the_cuda_tests_pass_when_run_on_the_cpu() -> None:
    """IRFORMER_TEST_DEVICE=cpu: every CUDA test's own logic, CPU against CPU (minutes)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "cuda",
            "-p",
            "no:cacheprovider",
            "tests/test_cuda.py",
        ],
        cwd=REPO,
        env={**env(), "IRFORMER_TEST_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
