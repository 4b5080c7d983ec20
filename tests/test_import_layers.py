"""The package's layers: nothing imports a layer above it, and no import cycle exists.

Layers, bottom to top (README "Layout"): the foundations (files, errors, safe
loading, tasks, the execution context, the C++ kernel loader) -> ``norms`` and
``data`` -> ``archs`` -> ``metrics``, ``analysis``, ``compress`` -> ``engine`` ->
``experiments``, ``export`` -> ``cli``. Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "irformer"

LAYERS: dict[str, int] = {
    "irformer": 0,
    "irformer.files": 0,
    "irformer.errors": 0,
    "irformer.safe_load": 0,
    "irformer.tasks": 0,
    "irformer.progress": 0,
    "irformer.execution": 0,
    "irformer.cpu_kernels": 0,
    "irformer.norms": 1,
    "irformer.data": 1,
    "irformer.archs": 2,
    "irformer.metrics": 3,
    "irformer.analysis": 3,
    "irformer.compress": 3,
    "irformer.engine": 4,
    "irformer.experiments": 5,
    "irformer.export": 5,
    "irformer.cli": 6,
    "irformer.__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The layer of the longest prefix of ``module`` in :data:`LAYERS`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and the README layout)")


def _imports(path: Path, module: str) -> set[str]:
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "irformer"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "irformer":
                continue
            found.add(target)
            # ``from irformer.archs import drct`` imports the submodule irformer.archs.drct
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file():
                    found.add(candidate)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name) & set(modules) for name, path in modules.items()}


def test_no_module_imports_a_layer_above_it() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = _graph()
    # A package imports its submodules through its __init__; the edge from a
    # submodule to its own package's __init__ is part of Python's import of
    # that submodule, not a dependency of it.
    for module, targets in graph.items():
        targets -= {t for t in targets if t == module or module.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_violations(tmp_path: Path) -> None:
    """The rules catch an upward import (the test could not fail otherwise)."""
    assert _layer("irformer.archs.swinir") < _layer("irformer.engine.infer")
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from irformer.engine.infer import forward_plain\n")
    assert "irformer.engine.infer" in _imports(source, "irformer.archs.probe")
