"""What the PostgreSQL store's catch-up costs a read (issue 18; docs/performance.md).

    python3 bench/catchup.py [--quick] [--seconds 3] [--rounds 3] [--json results.json]

One ``dsc serve --binding async`` on the SQLite store and one on a throwaway PostgreSQL (Debian's,
in a temporary folder; local spool), both with 20 active jobs, run at once.  ``wrk`` (one
thread, 1 and 8 keep-alive connections) posts GetActiveJobs and GetRepositoryElements to each
in turn, round by round, so that a busy neighbour on the shared machine hits both alike.
Printed per setting: requests/s of each (median of the rounds) and PostgreSQL / SQLite (each
round against its own SQLite run: min/median/max).  Nothing here asserts a time.

Run it from another checkout to measure that checkout's code (the servers run the tree this
file is in), e.g. a ``git worktree`` of the commit before a change.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from asgi import checked_reply, envelope, request_body, spread  # noqa: E402
from runtime import dc, names, wrk_run  # noqa: E402
from wrk_options import missing, wrk_options  # noqa: E402

from dsc_core.model import FileShareInstructions  # noqa: E402
from e2e_support import ServerProcess, Soap  # noqa: E402
from engines_support import PgCluster, pg_cluster, store_section  # noqa: E402

OPS = ("GetActiveJobs", "GetRepositoryElements")
STORES = ("sqlite", "postgresql")
ACTIVE_JOBS = 20
SHARE = [FileShareInstructions((r"\\localhost\scans",))]


def body_of(op: str) -> bytes:
    if op == "GetActiveJobs":
        return envelope(names.Action.DSC_GET_ACTIVE_JOBS, dc.empty_request("GetActiveJobsRequest"))
    return request_body(op, "")


@contextmanager
def store_server(folder: Path, store: str, dsn: str) -> Iterator[ServerProcess]:
    folder.mkdir()
    config = folder / "dsc.toml"
    # The jobs stay Creating for the whole run (no R6 timeout).
    stored = store_section(dsn) if store != "sqlite" else ""
    config.write_text(f"[jobs]\ntimeout_seconds = 3600\n\n{stored}")
    (folder / "data").mkdir()
    server = ServerProcess(folder / "data", config=config, binding="async")
    server.start(timeout=60)
    try:
        client = Soap(server.url)
        for n in range(ACTIVE_JOBS):
            client.create(SHARE, root_name=f"bench{n}", user=f"S-1-5-21-1-2-3-{1000 + n}")
        yield server
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()


def measure(args: argparse.Namespace, tmp: Path, pg: PgCluster) -> dict[str, Any]:
    """results[f"{op} c{conns}"][store] = [requests/s, ...]"""
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        servers = {
            store: stack.enter_context(store_server(tmp / store, store, pg.new_database()))
            for store in STORES
        }
        for op in OPS:
            body = tmp / f"{op}.xml"
            body.write_bytes(body_of(op))
            for server in servers.values():
                checked_reply(server.port, body.read_bytes(), op)
            for conns in args.connections:
                runs: dict[str, list[float]] = {store: [] for store in STORES}
                for _ in range(args.rounds):
                    for store, server in servers.items():
                        done = wrk_run(server.port, body, conns, args.seconds)
                        if done.non_2xx:
                            raise RuntimeError(f"{store}: {done.non_2xx} answers were not 2xx")
                        runs[store].append(done.rps)
                results[f"{op} c{conns}"] = runs
                ratios = [p / s for p, s in zip(runs["postgresql"], runs["sqlite"], strict=True)]
                print(
                    f"{op}, wrk -t1 -c{conns}: SQLite {statistics.median(runs['sqlite']):,.0f} "
                    f"req/s, PostgreSQL {statistics.median(runs['postgresql']):,.0f} req/s, "
                    f"PostgreSQL / SQLite {spread(ratios)}x",
                    flush=True,
                )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = wrk_options(__doc__.split("\n\n")[0], argv, connections=[1, 8])
    if skipped := missing(postgresql=True):
        print(skipped)
        return 0
    with pg_cluster() as pg, tempfile.TemporaryDirectory(prefix="dsc-bench-catchup-") as name:
        results = measure(args, Path(name), pg)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
