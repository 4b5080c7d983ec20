"""``torch.compile(model, dynamic=True)`` of every architecture x ln/iln: one graph, as eager.

``fullgraph=True`` turns any graph break into an error, so every passing case
has a graph-break count of 0 (inference and a training step; the per-preset
counts are in BENCHMARKS.md, ``benchmarks/bench_export.py compile``). A
counting backend records the graphs dynamo compiled: with ``dynamic=True`` a
second input size -- another batch, sides that are not window multiples --
reuses the first call's graphs (no recompilation). ``aot_eager`` traces through
AOTAutograd as inductor does but needs no C++ compiler; the inductor test
compiles for real and skips without one.
"""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from export_cases import CASES, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
SLOW = pytest.mark.slow


def _sizes(model: torch.nn.Module) -> list[tuple[int, int, int, int]]:
    """Two inputs that differ in batch, height and width, neither a window multiple,
    each at least two windows per side: dynamo specialises sizes of 0 and 1 by design
    (a batch of one, or one row of windows, is a new graph; ``torch.export`` avoids
    that with size-oblivious reasoning, :mod:`irformer.export.graph`)."""
    ws, chans = int(model.window_size), int(model.in_chans)
    return [(2, chans, ws + 3, ws + 5), (3, chans, 2 * ws + 1, 3 * ws - 1)]


COMPILE_CASES = [
    pytest.param(name, norm, marks=[] if (name, norm) == ("swinir_light", "iln") else [SLOW])
    for name, norm in CASES
]
"""Each compilation takes 1-3 minutes on this shared 2-core CPU, so the default run
compiles one model for inference (SwinIR-light-style, i-LN); ``-m slow`` runs every
architecture x norm, and the training steps."""


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize(("name", "norm"), COMPILE_CASES)
def test_compiled_inference_is_one_graph_equal_to_eager(name: str, norm: str) -> None:
    model = tiny_model(name, norm)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(5)
    frames = []
    for shape in _sizes(model):
        x = torch.rand(shape, generator=gen)
        with torch.no_grad():
            got, want = compiled(x), model(x)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-5, shape
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], "the second input size recompiled"


@SLOW
@pytest.mark.parametrize(("name", "norm"), CASES)
def test_compiled_training_step_equals_eager(name: str, norm: str) -> None:
    model = tiny_model(name, norm).train()
    twin = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(twin, backend=counter, dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(6)
    frames = []
    for shape in _sizes(model):
        x = torch.rand(shape, generator=gen)
        model.zero_grad()
        twin.zero_grad()
        model(x).square().mean().backward()
        compiled(x).square().mean().backward()
        for (key, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert q.grad is not None, key
            scale = p.grad.abs().max().item() + 1e-12
            assert (p.grad - q.grad).abs().max().item() <= 1e-4 * scale + 1e-7, (shape, key)
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[0], "the second input size recompiled"


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="no C++ compiler on PATH: inductor cannot generate CPU code here",
)
@pytest.mark.parametrize("norm", ["ln", "iln"])
def test_inductor_dynamic_matches_eager(norm: str) -> None:
    """The real compiler (inductor, C++ codegen): inference at two sizes and one
    training step's gradients equal eager within float rounding."""
    model = tiny_model("swinir_light", norm)
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(7)
    for shape in _sizes(model):
        x = torch.rand(shape, generator=gen)
        with torch.no_grad():
            assert (compiled(x) - model(x)).abs().max().item() < 1e-4, shape
    model.train()
    twin = copy.deepcopy(model)
    compiled_train = torch.compile(twin, dynamic=True, fullgraph=True)
    x = torch.rand(_sizes(model)[0], generator=gen)
    model(x).square().mean().backward()
    if norm == "iln":
        # Known limit of torch 2.13's inductor (not a graph break: dynamo captures the
        # whole graph and aot_eager trains it, test_compiled_training_step_equals_eager):
        # codegen of i-LN's training graph with dynamic sizes fails comparing symbolic
        # strides. Asserted, so a torch that fixes it makes this test say so.
        from torch._inductor.exc import InductorError

        with pytest.raises(InductorError, match="cannot determine truth value of Relational"):
            compiled_train(x).square().mean().backward()
        return
    compiled_train(x).square().mean().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max().item() <= 1e-3 * (p.grad.abs().max().item() + 1e-9)
