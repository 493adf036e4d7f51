"""The package's import graph: no cycle, and every import points down the layers.

    core (_args, _bins) <- backends <- API (anypool, _dispatch, _harness) <- layers <- export and tools

Imports inside functions count as much as those at the top of a module: a cycle held
together by a function-level import is still a cycle.  ``python tests/test_import_graph.py``
prints the graph.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"

# Lowest first; a module belongs to the first level with one of its prefixes.
LEVELS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("anypool._args", "anypool._bins")),
    ("backends", ("anypool.backends",)),
    ("API", ("anypool", "anypool._dispatch", "anypool._harness")),
    ("layers", ("anypool.layers",)),
    ("export and tools", ("anypool.onnx", "anypool.cli", "anypool.bench")),
]


def modules(root: Path, package: str = "anypool") -> dict[str, Path]:
    """Every module of ``package`` under ``root``: dotted name -> file."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph(root: Path, package: str = "anypool") -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` for imports of ``package``'s own modules, wherever they stand."""
    known = modules(root, package)
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})

        def add(target: str, line: int, name=name, edges=edges) -> None:
            while target and target not in known:  # `import a.b.c` binds a, loads a.b.c: use the deepest module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.setdefault(target, line)

        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                if not target.startswith(package):
                    continue
                for alias in node.names:  # `from a import b`: the module a.b if there is one, else a
                    add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target, node.lineno)
    return graph


def level(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LEVELS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    if best is None:
        raise LookupError(f"{module} is in no level of tests/test_import_graph.py: LEVELS; place it there")
    return best[0]


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, dict[str, int]]) -> list[str]:
    """Imports from a lower level to a higher one, worded ``a (level) -> b (level), line n``."""
    bad = []
    for a, edges in sorted(graph.items()):
        for b, line in sorted(edges.items()):
            if level(b) > level(a):
                bad.append(f"{a} ({LEVELS[level(a)][0]}) imports {b} ({LEVELS[level(b)][0]}), line {line}")
    return bad


def test_every_module_has_a_level():
    for module in modules(SRC):
        level(module)


def test_no_import_cycle():
    assert cycles(import_graph(SRC)) == []


def test_imports_point_down_the_layers():
    assert upward(import_graph(SRC)) == []


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "anypool"
    (pkg / "backends" / "torch").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import _args\n")
    (pkg / "_args.py").write_text("")
    (pkg / "onnx.py").write_text("from .backends.torch import ops\n")
    (pkg / "backends" / "__init__.py").write_text("")
    (pkg / "backends" / "torch" / "__init__.py").write_text("from . import ops\n")
    # a function-level import back up to the export module closes a cycle
    (pkg / "backends" / "torch" / "ops.py").write_text("def f():\n    from ... import onnx\n")
    graph = import_graph(tmp_path)
    assert graph["anypool.onnx"] == {"anypool.backends.torch.ops": 1}
    assert cycles(graph) == [["anypool.backends.torch.ops", "anypool.onnx"]]
    assert upward(graph) == ["anypool.backends.torch.ops (backends) imports anypool.onnx (export and tools), line 2"]


def test_the_torch_backend_costs_nothing_for_export_until_an_export_runs():
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    code = ("import sys, torch, anypool\n"
            "x = anypool.adaptive_avg_pool2d(torch.randn(1, 2, 7, 9), (3, 4))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('onnx', 'anypool.onnx', 'anypool.backends.onnx',"
            " 'anypool.backends.torch.export', 'anypool.layers'))))\n")
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


if __name__ == "__main__":
    graph = import_graph(SRC)
    for a, edges in sorted(graph.items()):
        print(f"{a} [{LEVELS[level(a)][0]}]")
        for b, line in sorted(edges.items()):
            print(f"    -> {b}  (line {line})")
    print("cycles:", cycles(graph) or "none")
    print("upward imports:", upward(graph) or "none")
