"""The record write of each SendImage as a job grows (the last review: each SendImage wrote the
whole job record again, so a job of n documents paid O(n^2)), and another instance's catch-up
read of it (the next review: the catch-up read the job's whole document list).

    python3 bench/job_documents.py [--documents 200] [--runs 3]

One job gets ``--documents`` images' record writes (``UpdateJob``, cause SendImage, carried out
by the store as the runtime does: a compare-and-set ``VersionedWrite`` on PostgreSQL), on SQLite
and on a throwaway PostgreSQL (tests/engines_support.py).  Per write it takes the time and the
bytes written: on SQLite the statements with their values (the trace callback), on PostgreSQL
the WAL the write made (``pg_current_wal_insert_lsn`` before and after).  Printed: the median of
the last ten writes against writes 11-20 of the same run, as ratios (min / median / max over
``--runs``): a write proportional to its document stays near 1.

The catch-up (PostgreSQL only: SQLite has one server per data folder, and no change feed): a
second instance reads the change feed after each write, as the runtime does
(``PostgresRecords.changes`` from its last cursor), once reading each changed job's document
list whole (as before: ``INCREMENTAL_DOCUMENTS`` out of reach) and once only the rows written
since the version it knows (store/jobdocuments.py).  Printed: the document rows and the bytes
of the documents column (as compact JSON) that read at the 20th document and at the last.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [
    str(ROOT),
    str(ROOT / "bindings"),
    str(ROOT / "tests"),
    str(ROOT / "tests/bindings"),
]

import psycopg  # noqa: E402

from dsc_bindings.store import postgresql  # noqa: E402
from dsc_bindings.store.interface import VersionedWrite  # noqa: E402
from dsc_bindings.store.localspool import LocalSpool  # noqa: E402
from dsc_bindings.store.postgresql import PostgresRecords  # noqa: E402
from dsc_bindings.store.split import SplitStore  # noqa: E402
from dsc_bindings.store.sqlite import JobStore  # noqa: E402
from dsc_core.commands import CreateJob, JobInput, UpdateJob  # noqa: E402
from dsc_core.model import Document, FileShareInstructions, JobState  # noqa: E402
from engines_support import PgCluster, pg_cluster, postgres_bin, wal_position  # noqa: E402
from test_filters_support import make_job  # noqa: E402

WINDOW = 10


def grow(
    store: SplitStore, documents: int, wal: Callable[[], int] | None
) -> list[tuple[float, int]]:
    """(seconds, bytes) of each of ``documents`` SendImage record writes of one job; bytes are
    the WAL's (``wal``) or, without it, SQLite's statements."""
    job = make_job(FileShareInstructions((r"\\localhost\scans",)), state=JobState.CREATING)
    shared = store.records.shared
    written: list[int] = []
    if wal is None:
        assert isinstance(store, JobStore)
        store.records.db().set_trace_callback(lambda sql: written.append(len(sql.encode())))
    store.apply(VersionedWrite(CreateJob(job), None, 0) if shared else CreateJob(job))
    found: list[tuple[float, int]] = []
    for number in range(1, documents + 1):
        job = replace(job, documents=(*job.documents, Document(number, "jfif", 100_000 + number)))
        update = UpdateJob(job, JobInput.IMAGE)
        command = VersionedWrite(update, number, 0) if shared else update
        written.clear()
        before = wal() if wal is not None else 0
        start = time.perf_counter()
        store.apply(command)
        seconds = time.perf_counter() - start
        size = wal() - before if wal is not None else sum(written)
        found.append((seconds, size))
    return found


def on_postgresql(pg: PgCluster, data: Path, args: argparse.Namespace) -> list[tuple[float, int]]:
    dsn = pg.new_database()
    with (
        wal_position(dsn) as wal,
        SplitStore.assemble(
            data, lambda: PostgresRecords.open(dsn), lambda: LocalSpool.open(data)
        ) as store,
    ):
        return grow(store, args.documents, wal)


def fetched(dsn: str, sql: str, params: dict[str, object]) -> tuple[int, int]:
    """(rows of ``job_documents`` the database fetched, those of them it filtered out) for
    ``sql``: EXPLAIN ANALYZE, every scan of the table, times its loops."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params).fetchone()  # type: ignore[arg-type]
    assert row is not None
    rows = removed = 0
    nodes = [row[0][0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", ()))
        if node.get("Relation Name") == "job_documents":
            loops = int(node["Actual Loops"])
            kept, dropped = int(node["Actual Rows"]), int(node.get("Rows Removed by Filter", 0))
            rows += (kept + dropped) * loops
            removed += dropped * loops
    return rows, removed


def catch_up(
    pg: PgCluster, documents: int, whole: bool
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(document rows, bytes) each catch-up of a second instance read after each of
    ``documents`` SendImage writes of one job by the first; ``whole``: as before, every
    document of a changed job.  And what the database fetched for the last one (:func:`fetched`,
    the read made again under EXPLAIN ANALYZE)."""
    dsn = pg.new_database()
    writer, reader = PostgresRecords.open(dsn), PostgresRecords.open(dsn)
    sizes: list[int] = []
    read = reader._read
    last: list[tuple[str, dict[str, object]]] = []

    def measured(what: str, sql: str, params: dict[str, object]) -> list[tuple[object, ...]]:
        last[:] = [(sql, params)]
        found = read(what, sql, params)
        sizes.append(
            sum(len(json.dumps(row[4], separators=(",", ":"))) for row in found if row[0] == 1)
        )
        return found

    reader._read = measured  # type: ignore[method-assign]
    incremental = postgresql.INCREMENTAL_DOCUMENTS
    if whole:
        postgresql.INCREMENTAL_DOCUMENTS = sys.maxsize
    try:
        job = make_job(FileShareInstructions((r"\\localhost\scans",)), state=JobState.CREATING)
        writer.write(VersionedWrite(CreateJob(job), None, 0))
        cursor = reader.changes(0, frozenset()).cursor
        found: list[tuple[int, int]] = []
        for number in range(1, documents + 1):
            job = replace(
                job, documents=(*job.documents, Document(number, "jfif", 100_000 + number))
            )
            writer.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), number, 0))
            fed, sizes[:] = reader.documents_fed, []
            cursor = reader.changes(cursor, frozenset()).cursor
            found.append((reader.documents_fed - fed, sum(sizes)))
        return found, fetched(dsn, *last[0])
    finally:
        postgresql.INCREMENTAL_DOCUMENTS = incremental
        writer.close()
        reader.close()


def ratios(found: list[tuple[float, int]]) -> tuple[float, float, float, float]:
    """(time ratio, bytes ratio, first bytes, last bytes): the medians of the last WINDOW writes
    over those of the WINDOW after the first WINDOW (the first writes of a fresh file or
    connection warm up)."""
    first, last = found[WINDOW : 2 * WINDOW], found[-WINDOW:]
    t0, t1 = (statistics.median(s for s, _ in part) for part in (first, last))
    b0, b1 = (statistics.median(b for _, b in part) for part in (first, last))
    return t1 / t0, b1 / b0, b0, b1


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if postgres_bin() is None:
        print("skipped: no PostgreSQL server here (.ci/run installs Debian's postgresql)")
        return 0
    results: dict[str, list[tuple[float, float, float, float]]] = {"sqlite": [], "postgresql": []}
    caught: dict[bool, tuple[list[tuple[int, int]], tuple[int, int]]] = {}
    with pg_cluster() as pg, tempfile.TemporaryDirectory(prefix="dsc-bench-docs-") as name:
        folder = Path(name)
        for run in range(args.runs):
            with JobStore.open(folder / f"sqlite-{run}") as store:
                results["sqlite"].append(ratios(grow(store, args.documents, None)))
            results["postgresql"].append(ratios(on_postgresql(pg, folder / f"pg-{run}", args)))
        for whole in (True, False):
            caught[whole] = catch_up(pg, args.documents, whole)
    print(
        f"SendImage record write: writes {args.documents - WINDOW + 1}-{args.documents} against "
        f"{WINDOW + 1}-{2 * WINDOW} of one job, {args.runs} run(s), min / median / max"
    )
    print("| engine | time ratio | bytes ratio | bytes per write (first -> last) |")
    print("|---|---|---|---|")
    for engine, rows in results.items():
        first = statistics.median(r[2] for r in rows)
        last = statistics.median(r[3] for r in rows)
        what = "statement bytes" if engine == "sqlite" else "WAL bytes"
        print(
            f"| {engine} | {spread([r[0] for r in rows])} | {spread([r[1] for r in rows])} | "
            f"{first:.0f} -> {last:.0f} {what} |"
        )
    early = 2 * WINDOW
    print(
        f"\nAnother instance's catch-up after each SendImage (PostgreSQL; SQLite has no change "
        f"feed): what it read at document {early} -> document {args.documents}"
    )
    print(
        "| catch-up | document rows | bytes of the documents column | rows the database "
        f"fetched at document {args.documents} (filtered out) |"
    )
    print("|---|---|---|---|")
    for whole, (found, (rows, removed)) in caught.items():
        (rows0, bytes0), (rows1, bytes1) = found[early - 1], found[-1]
        what = "whole list (before)" if whole else "rows since the version known"
        print(f"| {what} | {rows0} -> {rows1} | {bytes0} -> {bytes1} | {rows} ({removed}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
