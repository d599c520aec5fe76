"""The package's import graph: no circles, and lower layers never import higher ones.

Every import counts, wherever it stands: at the top, inside a function (a lazy import is still a
dependency), or under ``TYPE_CHECKING`` (a type from a higher module couples the lower one to it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cnl"


def _module_name(path: Path) -> tuple[str, list[str]]:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def import_graph() -> dict[str, set[str]]:
    """``{module: the cnl modules it imports}`` for every module of the package."""
    modules = {_module_name(p)[0]: p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        _, package = _module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package[: len(package) - (node.level - 1)])
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                submodules = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
                # ``from . import kernels`` imports the submodule; its parent package is loaded anyway
                targets = submodules if len(submodules) == len(node.names) else [mod, *submodules]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "cnl.train" in graph and "cnl.methods.base" in graph
    assert "cnl.optimizer" in graph["cnl.train"]  # a real edge is seen
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds


def test_no_circle_in_the_import_graph() -> None:
    assert cycles(import_graph()) == []


#: (lower module, modules it must not reach through any chain of imports).
LAYERS = [
    ("cnl.config", {"cnl.methods", "cnl.resolve", "cnl.train", "cnl.cli", "cnl.optim", "cnl.models"}),
    ("cnl.mask", {"cnl.optimizer", "cnl.optim", "cnl.train", "cnl.methods", "cnl.cli"}),
    ("cnl.optim", {"cnl.optimizer", "cnl.train", "cnl.methods", "cnl.cli", "cnl.config"}),
    ("cnl.optimizer", {"cnl.train", "cnl.methods", "cnl.cli", "cnl.config", "cnl.scoring"}),
    ("cnl.reference", {"cnl.train", "cnl.methods", "cnl.cli", "cnl.scoring"}),
    ("cnl.methods", {"cnl.train", "cnl.cli", "cnl.compare", "cnl.resolve", "cnl.analyze", "cnl.report"}),
    ("cnl.train", {"cnl.cli", "cnl.compare", "cnl.report"}),
    ("cnl.rundir", {"cnl.train", "cnl.methods", "cnl.cli"}),
]


@pytest.mark.parametrize(("lower", "higher"), LAYERS, ids=[low for low, _ in LAYERS])
def test_lower_layers_never_import_higher_ones(lower: str, higher: set[str]) -> None:
    graph = import_graph()
    reached = reachable(graph, lower) | {lower}
    for module in [m for m in graph if m == lower or m.startswith(lower + ".")]:
        reached |= reachable(graph, module)
    bad = sorted(m for m in reached for h in higher if m == h or m.startswith(h + "."))
    assert not bad, f"{lower} reaches {bad}"


def test_parameter_names_are_known_in_one_module() -> None:
    """Which parameter is an attention projection, an embedding or a decoder block is params.py's business."""
    for path in SRC.rglob("*.py"):
        if path.name == "params.py":
            continue
        code = ast.parse(path.read_text(encoding="utf-8"))
        literals = {n.value for n in ast.walk(code) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        names = {"q_proj", "gate_proj", "embed_tokens", "lm_head", "model.layers"}
        assert not literals & names, f"{path.relative_to(SRC)} spells parameter names: {sorted(literals & names)}"
