"""CPU allocator tuning (irformer.engine.runtime), in fresh processes: it runs once each."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "from irformer.engine.runtime import tune_cpu_allocator as t; print(t(), t())"


def _run(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "IRFORMER_MALLOC_TUNE"}
    if env_value is not None:
        env["IRFORMER_MALLOC_TUNE"] = env_value
    out = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_applied_once_on_glibc_and_can_be_turned_off() -> None:
    assert _run(None) == "True True"
    assert _run("0") == "False False"


def test_cli_entry_point_applies_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import irformer.engine.runtime as runtime
    from irformer.cli import main

    calls = []
    monkeypatch.setattr(runtime, "tune_cpu_allocator", lambda: calls.append(1) or True)
    assert main(["models", "list"]) == 0
    assert calls == [1]
