"""The README's example of embedding the core runs as written (design.md: no drifting README)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT
from test_module_graph import core_imports


def test_readme_embedding_example_runs(spec: Path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Embedding the core", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the README lost its embedding example"
    exec(compile(code.group(1), "README.md", "exec"), {"SPEC": spec})


def test_readme_names_the_ci_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    last = [line for line in ci if line.strip() and not line.startswith(("#", "set ", "cd "))][-1]
    assert last.strip() in readme


def test_readme_layout_lists_every_core_module_once() -> None:
    """The README's dsc_core table names each module of the tree, one line each, no more."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    section = section.split("`bindings/dsc_bindings/` (import name", 1)[0]
    listed = re.findall(r"^\| `([a-z_]+\.py)` \|", section, re.M)
    on_disk = sorted(p.name for p in (ROOT / "dsc_core").glob("*.py"))
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))
    # "bottom layer first": each module imports only modules listed before it.
    position = {
        ("dsc_core." + name.removesuffix(".py")).removesuffix(".__init__"): i
        for i, name in enumerate(listed)
    }
    for module, imported in core_imports().items():
        for other in imported:
            assert position[other] < position[module], f"{module} imports {other}, listed later"


def test_readme_adding_an_operation_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worked example, as written: its operation, registered the way step 3 does (in a
    registry for this test only), answers through the in-process transport, and its test
    passes."""
    import dsc_core.server
    from dsc_core.registry import OPERATIONS, Registry

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Adding an operation", 1)[1].split("\n## ", 1)[0]
    declaration, test = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict[str, object] = {}
    exec(compile(declaration, "README.md", "exec"), namespace)
    monkeypatch.setattr(
        dsc_core.server, "OPERATIONS", Registry([*OPERATIONS, namespace["OPERATION"]])
    )
    exec(compile(test, "README.md", "exec"), namespace)
    run = namespace["test_get_active_job_count"]
    assert callable(run)
    run()


def test_readme_layout_lists_every_bindings_module_once() -> None:
    """The README's dsc_bindings table names each module of bindings/dsc_bindings, no more."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `dsc_bindings/([a-z_/]+\.py)` \|", section, re.M)
    package = ROOT / "bindings" / "dsc_bindings"
    on_disk = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py"))
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))
