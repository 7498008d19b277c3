"""The static checks CI relies on: mypy strict on both packages, ruff lint and format.

They run here, inside the README's test command, so that a clean clone fails the same way CI does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_mypy_strict_on_core_and_bindings() -> None:
    # pyproject.toml [tool.mypy]: strict, files = dsc_core and bindings/dsc_bindings.
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_alone_is_mypy_strict_clean() -> None:
    # design.md: the core is typed on its own, with only lxml installed.
    result = run("mypy", "--strict", "dsc_core")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("check", [("check", "."), ("format", "--check", ".")])
def test_ruff(check: tuple[str, ...]) -> None:
    if shutil.which("ruff") is None and run("ruff", "--version").returncode != 0:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    result = run("ruff", *check)
    assert result.returncode == 0, result.stdout + result.stderr
