"""Shared test fixtures: the reference data folder and the independent spandrel implementation."""

from __future__ import annotations

import enum
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# Under pytest-xdist each worker gets one thread: two workers with two threads
# each on a 2-core machine oversubscribe it badly (tiny forwards 10x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models, many tiny ops: OpenMP hand-offs cost more than they save on a busy
    2-core CPU (20x measured on the DRCT tests). Use as
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real benchmark images); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent (CI has it beside the repo)")
    return SHARED_DATA


def _install_torchvision_stub() -> None:
    """spandrel imports torchvision only for unrelated models (LaMa, RestoreFormer).

    torchvision has no CPU build beside torch 2.13 here, so register a minimal
    stand-in before importing spandrel (see shared/design/NOTES.md).
    """
    if "torchvision" in sys.modules:
        return
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    def _unavailable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torchvision stub: not available in irformer tests")

    functional.InterpolationMode = InterpolationMode
    functional.rotate = _unavailable
    functional.normalize = _unavailable
    transforms.functional = functional
    tv.transforms = transforms
    sys.modules.update(
        {
            "torchvision": tv,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
        }
    )


@pytest.fixture(scope="session")
def spandrel_archs() -> types.ModuleType:
    """The ``spandrel.architectures`` package (independent reference implementations)."""
    _install_torchvision_stub()
    try:
        import spandrel.architectures as archs
    except ImportError as exc:
        pytest.skip(f"spandrel is not installed ({exc}); run `make setup`")
    return archs
