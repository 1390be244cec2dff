"""The dependency rule of src/ (README "Architecture"), read from the code with ``ast``.

run -> pipeline -> stages -> {models, ops, data, metrics, callbacks} -> utils; models -> ops; no cycles
between packages or between the modules of one package. Every import counts, also one inside a
function (such imports used to hide cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# package -> the packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "ops": {"utils"},
    "models": {"ops", "utils"},
    "data": {"utils"},
    "metrics": {"utils"},
    "callbacks": {"metrics", "utils"},
    "stages": {"models", "ops", "data", "metrics", "callbacks", "utils"},
    "pipeline": {"stages", "models", "ops", "data", "metrics", "callbacks", "utils"},
    "run": {"pipeline", "utils"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str | None:
    """'src.stages.seeds' -> 'stages'; 'src.run' -> 'run'; 'src' -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "src" else None


def imports_of(path: Path) -> set[str]:
    """Every project module ``path`` imports (``from src.x import y`` counts as src.x and src.x.y)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "src"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "src" \
                and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def module_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    return {m: {i for i in imports_of(p) if i in files and i != m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_package_has_a_rule():
    packages = {package_of(m) for m in module_graph()} - {None}
    assert packages <= set(ALLOWED), f"packages without a dependency rule: {packages - set(ALLOWED)}"


def test_no_import_breaks_the_dependency_rule():
    bad = []
    for module, targets in module_graph().items():
        source = package_of(module)
        for target in targets:
            dest = package_of(target)
            if source and dest and dest != source and dest not in ALLOWED[source]:
                bad.append(f"{module} imports {target} ({source} -> {dest})")
    assert not bad, "imports the rule forbids:\n" + "\n".join(sorted(bad))


def test_no_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for module, targets in module_graph().items():
        source = package_of(module)
        if source:
            graph.setdefault(source, set()).update(
                d for t in targets if (d := package_of(t)) and d != source)
    assert find_cycle(graph) is None, f"package cycle: {' -> '.join(find_cycle(graph))}"


def test_no_cycle_between_modules():
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in module_graph().items()}
    graph = {m: {t for t in ts if t in graph} for m, ts in graph.items()}
    assert find_cycle(graph) is None, f"module cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize(("graph", "cycle"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle


def test_a_function_local_import_counts(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from src.pipeline.plan import plan\n    return plan\n")
    assert "src.pipeline.plan" in imports_of(source)
