"""The benchmark runs (smoke test): ``python bench/run.py --quick`` exits 0 and prints every
section.  No timing is asserted, ever: these machines are noisy (design.md, "Measuring")."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

SECTIONS = ("== core vs floor", "== image upload", "== memory vs image size", "== HTTP")


def test_bench_quick_runs_every_section() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for section in SECTIONS:
        assert section in result.stdout, f"missing section {section!r}:\n{result.stdout}"
    http = result.stdout.split("== HTTP", 1)[1]
    # Either measured or explicitly skipped, never silently empty.
    assert (
        "throughput ratio binding/floor" in http or "skipped: HTTP bindings not available" in http
    ), http
