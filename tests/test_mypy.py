"""mypy --strict passes on dsc_core (design.md: the core is typed)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_core_is_mypy_strict_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "dsc_core"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
