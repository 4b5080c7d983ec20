"""The README's Python inference example runs as written (issue 16, item 10)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-test:"


def readme_blocks() -> list[str]:
    """The ```python blocks right after a ``<!-- readme-test: ... -->`` line."""
    pattern = re.compile(re.escape(MARKER) + r"[^\n]*-->\n```python\n(.*?)```", re.S)
    return pattern.findall(README.read_text())


def test_readme_keeps_its_first_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert lines[3].startswith("make demo   # creates .venv")
    assert lines[4].startswith("make test   # creates .venv the same way")


@pytest.mark.usefixtures("one_thread")
def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = readme_blocks()
    assert len(blocks) == 1 and "restore_tensor" in blocks[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "out" / "photo.png").is_file()
