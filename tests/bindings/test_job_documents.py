"""A job's documents as rows beside its record (store/jobdocuments.py; the last review: each
SendImage wrote the whole job record again, O(n^2) for a job of n images), on SQLite and a real
PostgreSQL: what a SendImage writes does not grow with the documents already in the job (bytes,
not time), a list that is not an extension of the stored one is written whole, another
instance's write in between is caught, and a record written before the rows still loads."""

from __future__ import annotations

import json
import sqlite3
import statistics
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from dsc_bindings.store.interface import VersionedWrite
from dsc_bindings.store.jobcodec import decode_job
from dsc_bindings.store.jobdocuments import WrittenDocuments
from dsc_bindings.store.localspool import LocalSpool
from dsc_bindings.store.postgresql import PostgresRecords
from dsc_bindings.store.split import SplitStore
from dsc_bindings.store.sqlite import DB_NAME, SCHEMA_VERSION, JobStore
from dsc_core.commands import CreateJob, JobInput, UpdateJob
from dsc_core.model import Document, Job, JobState
from engines_support import wal_position
from test_store import make_job

DOCUMENTS = 200
WINDOW = 10


def image(job: Job, number: int) -> Job:
    """The job after one more SendImage."""
    return replace(job, documents=(*job.documents, Document(number, "jfif", 100_000 + number)))


def grow(store: SplitStore, measure: Callable[[], int], begin: Callable[[], None]) -> list[int]:
    """DOCUMENTS SendImage record writes of one job as the runtime makes them (compare-and-set
    on shared records); what ``measure`` says each wrote."""
    job = make_job("grows")
    shared = store.records.shared
    store.apply(VersionedWrite(CreateJob(job), None, 0) if shared else CreateJob(job))
    written = []
    for number in range(1, DOCUMENTS + 1):
        job = image(job, number)
        update = UpdateJob(job, JobInput.IMAGE)
        begin()
        store.apply(VersionedWrite(update, number, 0) if shared else update)
        written.append(measure())
    assert store.load_jobs() == [job]
    return written


def test_a_sendimage_on_sqlite_writes_the_same_bytes_at_the_200th_document(
    tmp_path: Path,
) -> None:
    """The statements of each write with their values (SQLite's trace callback)."""
    with JobStore.open(tmp_path / "data") as store:
        statements: list[str] = []
        store.records.db().set_trace_callback(statements.append)
        written = grow(store, lambda: sum(len(s.encode()) for s in statements), statements.clear)
        # A whole record of 200 documents is some 10 kB; one document's row is tens of bytes
        # (ordinal and DocumentId grow by a digit or two between the windows).
        assert max(written[-WINDOW:]) <= max(written[WINDOW : 2 * WINDOW]) + 8, written
        assert any("INSERT OR REPLACE INTO job_documents" in s for s in statements)


def test_a_sendimage_on_postgresql_writes_the_same_wal_at_the_200th_document(
    tmp_path: Path, dsn: str
) -> None:
    """The WAL each write made (the session's PostgreSQL has full_page_writes off, so a write's
    WAL is its rows and index entries)."""
    data = tmp_path / "data"
    with (
        wal_position(dsn) as lsn,
        SplitStore.assemble(
            data, lambda: PostgresRecords.open(dsn), lambda: LocalSpool.open(data)
        ) as store,
    ):
        mark = [0]

        def begin() -> None:
            mark[0] = lsn()

        written = grow(store, lambda: lsn() - mark[0], begin)
    first = statistics.median(written[WINDOW : 2 * WINDOW])
    last = statistics.median(written[-WINDOW:])
    # Before the rows of their own: 2,008 -> 3,368 bytes (bench/job_documents.py).
    assert last <= first * 1.1, written


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[JobStore]:
    with JobStore.open(tmp_path / "data") as store:
        yield store


def test_a_list_that_does_not_extend_the_stored_one_is_written_whole(
    tmp_path: Path, sqlite_store: JobStore
) -> None:
    """The core's undo (R4 step 9) gives back a shorter list; a different document in a place
    already written replaces it; a store opened again knows nothing and writes all."""
    job = make_job("u")
    sqlite_store.apply(CreateJob(job))
    for number in (1, 2, 3):
        job = image(job, number)
        sqlite_store.apply(UpdateJob(job, JobInput.IMAGE))
    undone = replace(job, documents=job.documents[:2])
    sqlite_store.apply(UpdateJob(undone, JobInput.IMAGE))
    assert sqlite_store.load_jobs() == [undone]
    other = replace(undone, documents=(*undone.documents[:1], Document(9, "pdf-a", 5)))
    sqlite_store.apply(UpdateJob(other, JobInput.IMAGE))
    assert sqlite_store.load_jobs() == [other]
    sqlite_store.close()
    with JobStore.open(tmp_path / "data") as again:
        more = image(other, 10)
        again.apply(UpdateJob(more, JobInput.IMAGE))
        assert again.load_jobs() == [more]


def test_another_instances_write_in_between_is_caught(dsn: str) -> None:
    """Instance b writes the job a wrote last, with a shorter list (its undo): a's next write,
    from b's version, must not trust its own account of the rows (it would add only the
    fourth row and leave the third missing) and writes them whole; both instances read the
    whole list back, at the start and from the feed."""
    a, b = PostgresRecords.open(dsn), PostgresRecords.open(dsn)
    try:
        job = make_job("shared")
        a.write(VersionedWrite(CreateJob(job), None, 0))
        for number in (1, 2, 3):
            job = image(job, number)
            a.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), number, 0))
        undone = replace(job, documents=job.documents[:2])
        b.write(VersionedWrite(UpdateJob(undone, JobInput.IMAGE), 4, 0))
        job = image(job, 4)
        a.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), 5, 0))
        for records in (a, b):
            [(_, _, text, documents)] = records.rows()
            [(_, version, fed, fed_documents)] = records.changes(0, frozenset()).rows
            assert version == 6
            assert decode_job(text, documents) == decode_job(fed, fed_documents) == job
    finally:
        a.close()
        b.close()


def test_a_record_written_before_the_rows_loads_and_is_rewritten(tmp_path: Path) -> None:
    """A data folder of schema 1 (documents inside the record, jobcodec version 2): the schema
    step adds the table, the job loads with its documents, and its next write moves them."""
    data = tmp_path / "data"
    job = image(image(make_job("old"), 1), 2)
    with JobStore.open(data) as store:
        store.apply(CreateJob(job))
    conn = sqlite3.connect(data / DB_NAME, isolation_level=None)
    record = json.loads(conn.execute("SELECT job FROM jobs").fetchone()[0])
    record["v"] = 2
    record["documents"] = [
        {"document_id": d.document_id, "format": d.format, "size": d.size} for d in job.documents
    ]
    conn.execute("UPDATE jobs SET job = ?", (json.dumps(record),))
    conn.execute("DROP TABLE job_documents")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with JobStore.open(data) as store:
        assert store.records.db().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.load_jobs() == [job]
        more = image(job, 3)
        store.apply(UpdateJob(more, JobInput.IMAGE))
        assert store.load_jobs() == [more]
        rows = store.records.db().execute("SELECT count(*) FROM job_documents").fetchone()
        assert rows == (3,)
        assert '"documents"' not in store.records.db().execute("SELECT job FROM jobs").fetchone()[0]


def test_only_active_jobs_are_remembered() -> None:
    """What a store remembers stays bounded by the active jobs: an ended job's next write (a
    retry) is whole, and so is a job forgotten (dropped, or a write whose outcome is unknown)."""
    written = WrittenDocuments()
    job = image(image(make_job("r"), 1), 2)
    written.committed(job)
    assert written.plan(image(job, 3)).start == 2
    ended = replace(job, state=JobState.COMPLETED)
    written.committed(ended)
    assert written.plan(image(ended, 3)).start == 0
    written.committed(job, 7)
    assert written.plan(image(job, 3), 7).start == 2
    assert written.plan(image(job, 3), 8).start == 0  # another instance wrote version 8
    written.forget("r")
    assert written.plan(image(job, 3), 7).start == 0
