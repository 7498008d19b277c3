"""What the wrk benches (bench/asgi.py, workers.py, catchup.py, fairness.py) share before they measure: their
options, what ``--quick`` makes of them, and why one cannot run here.

A bench that cannot run prints ``skipped: WHY`` and exits 0; the smoke tests
(tests/project/test_bench.py) turn that line into a skip saying why.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["missing", "wrk_options"]


def wrk_options(
    description: str,
    argv: Sequence[str] | None,
    *,
    connections: list[int],
    threads: list[int] | None = None,
    quick_connections: int | None = None,
    more: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """``--quick --seconds --rounds --connections [--threads] --json`` parsed, with the
    bench's own options (``more`` adds them); ``threads`` None: the bench runs wrk with one
    thread and has no ``--threads``.  ``--quick`` is one round of 1 s with the first of each
    list (or ``quick_connections``): a smoke run, not a measurement."""
    quick_c = connections[0] if quick_connections is None else quick_connections
    quick = f"-t{threads[0]} " if threads else ""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 1 round of 1 s, {quick}-c{quick_c} (no measurement)",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting")
    if threads is not None:
        parser.add_argument("--threads", type=int, nargs="+", default=threads, help="wrk -t values")
    parser.add_argument(
        "--connections", type=int, nargs="+", default=connections, help="wrk -c values"
    )
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    if more is not None:
        more(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds, args.connections = 1.0, 1, [quick_c]
        if threads is not None:
            args.threads = threads[:1]
    return args


def missing(*, postgresql: bool = False) -> str | None:
    """The ``skipped: ...`` line for a tool this machine lacks (wrk, and Debian's PostgreSQL
    when ``postgresql``), or None when the bench can run."""
    if shutil.which("wrk") is None:
        return "skipped: wrk is not installed (apt-get install -y wrk)"
    if postgresql:
        from engines_support import postgres_bin  # tests/ is on the bench's path

        if postgres_bin() is None:
            return "skipped: needs Debian's postgresql (/usr/lib/postgresql/*/bin/initdb)"
    return None
