"""The staged compression drivers (benchmarks/compress_stages.sh and its scripts): each stage
passes the arguments it documents to `irformer compress`, finished stages are skipped on a
rerun, and the report/significance steps see the right folders. `irformer` itself is replaced
by a recorder (PY), so nothing is quantised here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RECORDER = """#!{python}
import json, os, sys
args = sys.argv[3:]  # after "-m irformer"
if "--out" in args:
    os.makedirs(args[args.index("--out") + 1], exist_ok=True)
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps(args) + "\\n")
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(script: str, tmp_path: Path, stages: str) -> list[list[str]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recorder = tmp_path / "py"
    recorder.write_text(RECORDER.format(python=sys.executable))
    recorder.chmod(0o755)
    record = tmp_path / "calls.jsonl"
    env = {**os.environ, "PY": str(recorder), "RECORD": str(record)}
    env |= {"OUT": str(tmp_path / "out"), "STAGES": stages, "DATA": str(tmp_path / "data")}
    subprocess.run(
        ["bash", str(REPO / "benchmarks" / script)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    record.unlink()
    return calls


def option(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def test_variants_stages(tmp_path: Path) -> None:
    stages = "base split_qkv prune_official channel_w3 sweep_w4_p6"
    calls = run_script("compress_variants.sh", tmp_path, stages)
    runs, report = calls[:-1], calls[-1]
    assert [c[:2] for c in runs] == [["compress", "run"]] * 5
    assert [option(c, "--wbits") for c in runs] == ["2", "2", "2", "3", "4"]
    assert "--qkv-inputs" in runs[1] and option(runs[1], "--qkv-inputs") == "split"
    assert option(runs[2], "--prune-mode") == "official" and option(runs[2], "--prune") == "0.4"
    assert option(runs[3], "--prune-mode") == "channel" and "--save-packed" in runs[3]
    assert option(runs[4], "--prune") == "0.6" and "--prune-mode" not in runs[4]
    assert [option(c, "--latency-repeats") for c in runs] == ["0", "0", "0", "3", "3"]
    for c in runs:
        assert option(c, "--method") == "compsrt" and "--resume" in c
        assert option(c, "--bench") == "Set5,Set14"
    assert report[:2] == ["compress", "report"] and len(report) == 2 + 5 + 4
    # A rerun skips every finished stage and only reports again.
    again = run_script("compress_variants.sh", tmp_path, stages)
    assert [c[:2] for c in again] == [["compress", "report"]]


def test_x4_tables_and_budget_curve_stages(tmp_path: Path) -> None:
    calls = run_script("compress_x4_tables.sh", tmp_path, "ablation_iln table_ln")
    ablation, table, _report, significance = calls
    assert "compsrt_scalars_only" in option(ablation, "--method")
    assert option(ablation, "--bench") == "Set5,Set14" and option(ablation, "--wbits") == "2"
    assert option(ablation, "--model").endswith("swinir_light_x4_iln.safetensors")
    assert option(table, "--bench") == "paper" and option(table, "--wbits") == "4,3,2"
    assert option(table, "--method") == "minmax,2dquant,compsrt,ptq4vit,noisyquant"
    assert significance[:2] == ["compress", "significance"]
    assert [Path(p).name for p in significance[2:-2]] == ["table_ln"]  # tables only
    curve = run_script("dqc_budget_curve.sh", tmp_path / "curve", "iln:4")
    assert option(curve[0], "--dqc-iters") == "0,50,200,1000"
    assert option(curve[0], "--out").endswith("iln_w4")
