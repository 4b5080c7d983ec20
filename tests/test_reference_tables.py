"""``docs/reference/blind_tables.py``: the MODEL_CARD tables come from the committed eval
records, and a record still being written (a set not scored yet at one level) shows "-"
instead of failing."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"


def _load_script():
    spec = importlib.util.spec_from_file_location("blind_tables", REFERENCE / "blind_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_records_give_the_model_card_rows() -> None:
    tables = _load_script()
    card = (REFERENCE / "MODEL_CARD.md").read_text()
    for task in ("dn", "car"):
        text = tables.table(task, REFERENCE)
        rows = [line for line in text.splitlines() if "(ours)" in line]
        assert rows, task
        for line in rows:
            assert line in card, f"{task}: {line!r} not in MODEL_CARD.md"


def test_a_partly_written_record_shows_dashes(tmp_path: Path) -> None:
    tables = _load_script()
    for name in ("eval_swinir_1_dn_ln.json", "eval_swinir_1_dn_iln.json"):
        shutil.copy(REFERENCE / name, tmp_path / name)
    path = tmp_path / "eval_swinir_1_dn_iln.json"
    records = json.loads(path.read_text())
    records = records if isinstance(records, list) else [records]
    own = [r for r in records if r["model"] == "swinir_1_dn_iln"]
    dropped = own[-1]["benchmarks"].pop()["benchmark"]
    path.write_text(json.dumps(records))
    text = tables.table("dn", tmp_path)
    level = f"{own[-1]['sigma']:g}"
    gap = next(line for line in text.splitlines() if line.startswith(f"| {level} | `iln` - `ln`"))
    sets = [b["benchmark"] for b in own[0]["benchmarks"]]
    assert gap.split(" | ")[2 + sets.index(dropped)].strip(" |") == "-"
    with pytest.raises(FileNotFoundError, match=r"eval_swinir_1_car_ln\.json"):  # no records
        tables.table("car", tmp_path)
