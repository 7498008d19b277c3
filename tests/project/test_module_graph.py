"""The dsc_core module graph is acyclic: every import counts, also one inside a function or an
``if TYPE_CHECKING`` block, because a cycle held open by a late import is still a cycle (issue
6).  Each module can then be read, and tested, on top of the ones it imports."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

CORE = Path(ROOT) / "dsc_core"


def _module_name(path: Path) -> str:
    rel = path.relative_to(CORE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute name ``from <level dots><node.module>`` refers to, inside ``module``."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def core_imports() -> dict[str, set[str]]:
    """Each dsc_core module -> the dsc_core modules it imports anywhere in its text."""
    paths = {_module_name(p): p for p in sorted(CORE.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, node, is_package)
                # `from . import faults` names modules; `from .x import y` names module x (or
                # a submodule x.y).  The package itself is not counted for `from . import`.
                targets = [f"{base}.{alias.name}" for alias in node.names]
                if node.module:
                    targets.append(base)
            for target in targets:
                if target in paths and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_dsc_core_import_graph_is_acyclic() -> None:
    graph = core_imports()
    assert "dsc_core.server" in graph and "dsc_core.registry" in graph["dsc_core.server"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_reader_sees_function_level_imports() -> None:
    """The checker itself: a cycle closed only by an import inside a function is found."""
    tree = ast.parse("def f():\n    from .b import x\n")
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [_resolve("dsc_core.a", n, False) for n in found] == ["dsc_core.b"]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_imports_nothing_of_the_bindings() -> None:
    """design.md layering: the core is pure; it never reaches into dsc_bindings."""
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("dsc_bindings") for a in node.names), path
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("dsc_bindings"), path
