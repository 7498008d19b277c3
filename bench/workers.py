"""``dsc serve --workers 1`` against ``--workers 2`` on the PostgreSQL store (issue 18 point 5).

    python3 bench/workers.py [--quick] [--seconds 3] [--rounds 3] [--json results.json]

Both servers run at once on one throwaway PostgreSQL (Debian's, in a temporary folder; local
spool), each ``dsc serve --binding async`` with its default settings.  ``wrk`` (``-t1`` and
``-t2``, 8 and 64 connections, keep-alive) posts GetRepositoryElements to each in turn, round
by round, so that a busy neighbour on the shared machine hits both alike.  Printed per
setting: requests/s and p99 of each (median of the rounds) and the ratio of 2 workers to 1,
each round against its own 1-worker run (min/median/max).  Nothing here asserts a time.

GetRepositoryElements is answered from the core's memory (no database round trip), so this
measures the per-request cost that more processes spread over more cores; wrk itself takes
CPU from the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from asgi import checked_reply, request_body, spread, wrk_round  # noqa: E402
from wrk_options import missing, wrk_options  # noqa: E402

from e2e_support import LISTENING, ServerProcess  # noqa: E402
from engines_support import PgCluster, pg_cluster, store_section  # noqa: E402
from waiting import wait_for  # noqa: E402

OP = "GetRepositoryElements"
WORKERS = (1, 2)


@dataclass(frozen=True)
class Run:
    rps: float
    p99_ms: float
    non_2xx: int


@contextmanager
def workers_server(folder: Path, dsn: str, count: int) -> Iterator[ServerProcess]:
    """``dsc serve --workers count`` on the PostgreSQL store, every worker listening."""
    folder.mkdir()
    config = folder / "dsc.toml"
    config.write_text(store_section(dsn))
    server = ServerProcess(folder / "data", config=config, extra=["--workers", str(count)])
    (folder / "data").mkdir()
    server.start(timeout=60)
    try:
        wait_for(
            lambda: server.log.count(LISTENING) >= count,
            timeout=60,
            what=f"{count} worker(s) listening",
        )
        yield server
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()


def measure(args: argparse.Namespace, tmp: Path, pg: PgCluster) -> dict[str, Any]:
    """results[f"t{threads}c{conns}"][workers] = [Run, ...]"""
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        servers = {
            n: stack.enter_context(workers_server(tmp / f"w{n}", pg.new_database(), n))
            for n in WORKERS
        }
        bodies = {}
        for n, server in servers.items():
            body = request_body(OP, "")
            for _ in range(4 * n):  # every worker answers (new connections: the kernel spreads)
                checked_reply(server.port, body, OP)
            bodies[n] = tmp / f"body-{n}.xml"
            bodies[n].write_bytes(body)
        for threads in args.threads:
            for conns in args.connections:
                runs: dict[int, list[Run]] = {n: [] for n in WORKERS}
                for _ in range(args.rounds):
                    targets = {n: (server.port, bodies[n]) for n, server in servers.items()}
                    for n, done in wrk_round(args, targets, conns, threads).items():
                        runs[n].append(Run(done.rps, done.p99 * 1000, done.non_2xx))
                results[f"t{threads}c{conns}"] = runs
                print_table(threads, conns, runs)
    return results


def print_table(threads: int, conns: int, runs: dict[int, list[Run]]) -> None:
    one = runs[1]
    print(f"\n{OP}, wrk -t{threads} -c{conns} (per round; min/median/max)", flush=True)
    print("| dsc serve | req/s (median) | vs --workers 1 | p99 ms (median) | p99 vs --workers 1 |")
    print("| --- | --- | --- | --- | --- |")
    for n, mine in runs.items():
        rps = statistics.median(r.rps for r in mine)
        p99 = statistics.median(r.p99_ms for r in mine)
        ratio = spread([r.rps / o.rps for r, o in zip(mine, one, strict=True)])
        p99_ratio = spread([r.p99_ms / o.p99_ms for r, o in zip(mine, one, strict=True)])
        bad = sum(r.non_2xx for r in mine)
        flag = f" ({bad} non-2xx answers!)" if bad else ""
        print(f"| --workers {n}{flag} | {rps:,.0f} | {ratio}x | {p99:.2f} | {p99_ratio}x |")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = wrk_options(
        "wrk against dsc serve --workers 1 and --workers 2 on PostgreSQL",
        argv,
        threads=[1, 2],
        connections=[8, 64],
    )
    if skipped := missing(postgresql=True):
        print(skipped)
        return 0
    with pg_cluster() as pg, tempfile.TemporaryDirectory(prefix="dsc-workers-bench-") as tmp:
        results = measure(args, Path(tmp), pg)
    if args.json:
        raw = {
            c: {n: [asdict(r) for r in runs] for n, runs in d.items()} for c, d in results.items()
        }
        args.json.write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
