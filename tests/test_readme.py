"""The README's example of embedding the core runs as written (design.md: no drifting README)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT


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
