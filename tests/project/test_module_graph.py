"""The module graphs: dsc_core's is acyclic, and dsc_bindings' follows its layers (issue 15).

Every import counts, also one inside a function or an ``if TYPE_CHECKING`` block, because a
cycle held open by a late import is still a cycle (issue 6).  Each module can then be read, and
tested, on top of the ones it imports."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

CORE = Path(ROOT) / "dsc_core"
BINDINGS = Path(ROOT) / "bindings" / "dsc_bindings"

#: The bindings' layers, top first (issue 15): a module imports only from its own part (its
#: subpackage, or itself) and from parts in lower layers, never from one beside it or above.
#: ``inprocess`` is apart: it imports only dsc_core (the in-process transport of the tests and
#: of embedders).
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(layer)
    for layer in (
        {"console", "asgi"},
        {"serve"},
        {"webconsole"},
        {"exposure"},
        {"observe"},
        {"settings", "http", "discovery"},
        {"runtime"},
        {"store"},
        {"filters"},
        {"directory", "durable", "urls"},
    )
)


def _module_name(path: Path, root: Path = CORE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
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


def core_imports(root: Path = CORE) -> dict[str, set[str]]:
    """Each module of the package at ``root`` (dsc_core unless told) -> the modules of that
    package it imports anywhere in its text."""
    paths = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
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


def _part(module: str) -> str:
    """``dsc_bindings.http.driver`` -> ``http``; ``dsc_bindings.serve`` -> ``serve``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(part: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if part in layer), None)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import that goes up a layer or across to a part beside it, as text."""
    problems = []
    for module, targets in sorted(graph.items()):
        part = _part(module)
        if part in ("", "inprocess"):
            continue
        mine = _layer(part)
        for target in sorted(targets):
            theirs = _part(target)
            if theirs == part or theirs == "":
                continue
            other = _layer(theirs)
            if mine is None or other is None or other <= mine:
                problems.append(f"{module} imports {target}")
    return problems


def test_dsc_bindings_follow_their_layers() -> None:
    graph = core_imports(BINDINGS)
    assert "dsc_bindings.runtime.service" in graph
    unplaced = sorted({_part(m) for m in graph} - {"", "inprocess"} - set().union(*LAYERS))
    assert not unplaced, f"parts of dsc_bindings in no layer (add them to LAYERS): {unplaced}"
    problems = layer_violations(graph)
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_the_layer_check_sees_an_import_upwards() -> None:
    """The checker itself: the runtime reaching up into observe, or http across to settings."""
    graph = {
        "dsc_bindings.runtime.service": {"dsc_bindings.observe.observer"},
        "dsc_bindings.http.driver": {"dsc_bindings.settings", "dsc_bindings.runtime.ticket"},
        "dsc_bindings.observe.web": {"dsc_bindings.runtime.service"},
    }
    assert layer_violations(graph) == [
        "dsc_bindings.http.driver imports dsc_bindings.settings",
        "dsc_bindings.runtime.service imports dsc_bindings.observe.observer",
    ]


def test_inprocess_imports_only_the_core() -> None:
    """``dsc_bindings.inprocess`` stays usable on its own: it imports dsc_core, nothing else of
    the bindings."""
    assert core_imports(BINDINGS)["dsc_bindings.inprocess"] == set()
