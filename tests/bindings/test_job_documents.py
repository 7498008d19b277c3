"""A job's documents as rows beside its record (store/jobdocuments.py; the last review: each
SendImage wrote the whole job record again, O(n^2) for a job of n images), on SQLite and a real
PostgreSQL: what a SendImage writes does not grow with the documents already in the job (bytes,
not time), a list that is not an extension of the stored one is written whole, another
instance's write in between is caught, and a record written before the rows still loads.  On
PostgreSQL another instance's catch-up reads only the rows written since the version it knows
(an append: one row), a rewrite whole, and what it read spares its next write the rest."""

from __future__ import annotations

import json
import logging
import sqlite3
import statistics
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.interface import VersionedWrite
from dsc_bindings.store.jobcodec import decode_job, document_row
from dsc_bindings.store.jobdocuments import KnownDocuments
from dsc_bindings.store.localspool import LocalSpool
from dsc_bindings.store.postgresql import (
    _CHANGES,
    _JOB_DOCUMENTS_SCHEMA,
    _MIGRATIONS,
    INCREMENTAL_DOCUMENTS,
    UPLOAD_ROW_SECONDS,
    PgDatabase,
    PostgresRecords,
    connection_kwargs,
    upgrade,
)
from dsc_bindings.store.postgresql import SCHEMA_VERSION as PG_SCHEMA_VERSION
from dsc_bindings.store.split import SplitStore
from dsc_bindings.store.sqlite import DB_NAME, SCHEMA_VERSION, JobStore, record_columns
from dsc_core.commands import CreateJob, DropJob, JobInput, Removal, UpdateJob
from dsc_core.model import Document, Job, JobState
from engines_support import PgCluster, database_of_schema, wal_position
from test_store import make_job
from waiting import wait_for

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

        written = grow(store, lambda: lsn.since(mark[0]), begin)
    first = statistics.median(written[WINDOW : 2 * WINDOW])
    last = statistics.median(written[-WINDOW:])
    # Before the rows of their own: 2,008 -> 3,368 bytes (bench/job_documents.py).
    assert last <= first * 1.1, written


def test_the_wal_measured_is_the_databases_own(pg: PgCluster, dsn: str) -> None:
    """What the tests above measure is the WAL of their database's relations: another
    database's writes in between (a CI run: 816 bytes measured as 22,664) count for nothing."""
    other = pg.new_database()
    with (
        wal_position(dsn) as wal,
        psycopg.connect(dsn, autocommit=True) as own,
        psycopg.connect(other, autocommit=True) as elsewhere,
    ):
        own.execute("CREATE TABLE mine (n integer)")
        elsewhere.execute("CREATE TABLE theirs (n integer)")
        start = wal()
        elsewhere.execute("INSERT INTO theirs SELECT generate_series(1, 1000)")
        assert wal() - start > 10_000  # the cluster's WAL took it
        assert wal.since(start) == 0
        start = wal()
        own.execute("INSERT INTO mine VALUES (1)")
        elsewhere.execute("INSERT INTO theirs SELECT generate_series(1, 1000)")
        assert 0 < wal.since(start) < 200  # one row's record


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
    written = KnownDocuments()
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


#: Above postgresql.INCREMENTAL_DOCUMENTS: the catch-up reads such a job's new rows only.
MANY = INCREMENTAL_DOCUMENTS + 24


def grown(records: PostgresRecords, count: int) -> Job:
    """A job of ``count`` documents, written by ``records`` as SendImage writes it (its row
    version ends at ``count + 1``)."""
    job = make_job("shared")
    records.write(VersionedWrite(CreateJob(job), None, 0))
    for number in range(1, count + 1):
        job = image(job, number)
        records.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), number, 0))
    return job


def caught_up(records: PostgresRecords) -> tuple[Job, int, int]:
    """The one job as ``records``' change feed gives it, its row version, and how many
    document rows that read."""
    before = records.documents_fed
    [(_, version, text, documents)] = records.changes(0, frozenset()).rows
    return decode_job(text, documents), version, records.documents_fed - before


def test_a_catch_up_reads_only_the_documents_another_instance_appended(
    two: tuple[PostgresRecords, PostgresRecords],
) -> None:
    """Instance a appends documents to a job instance b has read: b's next catch-up reads the
    new document rows only, and has the whole list (store/jobdocuments.py)."""
    a, b = two
    job = grown(a, MANY)
    assert caught_up(b) == (job, MANY + 1, MANY)  # known to b from now on
    job = image(job, MANY + 1)
    a.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), MANY + 1, 0))
    assert caught_up(b) == (job, MANY + 2, 1)
    for number in (MANY + 2, MANY + 3):
        job = image(job, number)
        a.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), number, 0))
    assert caught_up(b) == (job, MANY + 4, 2)
    assert caught_up(b) == (job, MANY + 4, 0)  # nothing new
    # A job with few documents is read whole (asking for less would cost about as much).
    few = replace(job, token="few", documents=job.documents[:3])
    a.write(VersionedWrite(CreateJob(few), None, 0))
    fed = b.changes(0, frozenset()).rows
    assert {token: len(documents) for token, _, _, documents in fed} == {
        "shared": MANY + 3,
        "few": 3,
    }


def test_a_rewrite_by_another_instance_is_read_whole(
    two: tuple[PostgresRecords, PostgresRecords],
) -> None:
    """A list another instance replaced (a document in a place b holds) or shortened (the
    core's undo) is written whole, and b's catch-up reads it whole, not as b knew it."""
    a, b = two
    job = grown(a, MANY)
    assert caught_up(b) == (job, MANY + 1, MANY)
    documents = list(job.documents)
    documents[5] = Document(99, "pdf-a", 7)
    replaced = replace(job, documents=tuple(documents))
    a.write(VersionedWrite(UpdateJob(replaced, JobInput.IMAGE), MANY + 1, 0))
    assert caught_up(b) == (replaced, MANY + 2, MANY)
    undone = replace(replaced, documents=replaced.documents[: MANY - 4])
    a.write(VersionedWrite(UpdateJob(undone, JobInput.IMAGE), MANY + 2, 0))
    assert caught_up(b) == (undone, MANY + 3, MANY - 4)


def test_a_document_row_written_without_its_version_is_read(
    dsn: str, two: tuple[PostgresRecords, PostgresRecords]
) -> None:
    """A server of an earlier version writes the rows without their version (schema 14): a
    row it adds has none, and the trigger forgets the version of a row it updates, so b reads
    both (here a row in the middle, which no server writes alone, to show that any row is)."""
    a, b = two
    job = grown(a, MANY)
    assert caught_up(b) == (job, MANY + 1, MANY)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE job_documents SET size = 1 WHERE token = 'shared' AND ordinal = 2; "
            "INSERT INTO job_documents (token, ordinal, document_id, format, size) "
            f"VALUES ('shared', {MANY}, 77, 'pdf-a', 5); "
            "UPDATE jobs SET version = version + 1, xid = pg_current_xact_id()"
        )
    documents = list(job.documents)
    documents[2] = replace(documents[2], size=1)
    documents.append(Document(77, "pdf-a", 5))
    assert caught_up(b) == (replace(job, documents=tuple(documents)), MANY + 2, 2)


def test_a_write_after_reading_another_instances_version_carries_only_its_new_row(
    dsn: str, two: tuple[PostgresRecords, PostgresRecords]
) -> None:
    """What b read of a's write is what the table holds at that version: b's next write of
    the job adds its one row, as after its own write, where an instance that never read the
    job rewrites them all (the WAL each write made)."""
    a, b = two
    job = grown(a, MANY)
    caught_up(b)
    c = PostgresRecords.open(dsn)
    try:
        with wal_position(dsn) as lsn:
            walled = []
            for number, records in ((MANY + 1, b), (MANY + 2, c)):
                job = image(job, number)
                before = lsn()
                records.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), number, 0))
                walled.append(lsn.since(before))
                assert stored(dsn) == job.documents  # the one row b added, in its place
    finally:
        c.close()
    after_read, whole = walled
    assert after_read * 3 < whole, walled
    assert caught_up(a)[0] == job


def test_a_row_neither_read_nor_known_has_its_job_read_whole_and_the_others_caught_up(
    dsn: str, two: tuple[PostgresRecords, PostgresRecords], caplog: pytest.LogCaptureFixture
) -> None:
    """A row b did not know and the feed does not read (its version says b knew it: no server
    writes that) no longer fails b's whole read: the job another instance changed in the same
    round is caught up, the one job is read whole at once, a WARNING names it and why, and
    its next read is by its new rows again."""
    a, b = two
    job = grown(a, MANY)
    caught_up(b)
    other = make_job("other")
    a.write(VersionedWrite(CreateJob(other), None, 0))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO job_documents (token, ordinal, document_id, format, size, version) "
            f"VALUES ('shared', {MANY}, 77, 'pdf-a', 5, 1); "
            "UPDATE jobs SET version = version + 1, xid = pg_current_xact_id() "
            "WHERE token = 'shared'"
        )
    before = b.documents_fed
    with caplog.at_level(logging.WARNING, logger="dsc.store"):
        fed = b.changes(0, frozenset()).rows
    whole = replace(job, documents=(*job.documents, Document(77, "pdf-a", 5)))
    assert {token: (version, decode_job(text, rows)) for token, version, text, rows in fed} == {
        "other": (1, other),
        "shared": (MANY + 2, whole),
    }
    assert b.documents_fed - before == MANY + 1  # the one job whole
    [warned] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned.startswith("job shared: the document rows at version 42 are not what this ")
    assert f"row {MANY} neither read nor known" in warned and "read again whole" in warned
    a.write(VersionedWrite(DropJob("other", Removal.PURGED), None, 0))
    assert caught_up(b) == (whole, MANY + 2, 0)  # known again: not whole for ever


def test_a_job_whose_rows_are_not_a_whole_list_is_left_out_and_the_others_caught_up(
    dsn: str, two: tuple[PostgresRecords, PostgresRecords], caplog: pytest.LogCaptureFixture
) -> None:
    """A document row missing in the middle (by hand: no server writes that) of a job b
    reads whole (it never read it): b leaves that job out of its read, with a WARNING saying
    so and why, and catches up the other jobs (the whole read failed, every round); the job
    comes back whole once a write makes it whole."""
    a, b = two
    job = grown(a, MANY)
    other = make_job("other")
    a.write(VersionedWrite(CreateJob(other), None, 0))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DELETE FROM job_documents WHERE token = 'shared' AND ordinal = 3; "
            "UPDATE jobs SET version = version + 1, xid = pg_current_xact_id() "
            "WHERE token = 'shared'"
        )
    with caplog.at_level(logging.WARNING, logger="dsc.store"):
        changed = b.changes(0, frozenset())
    assert [(token, version) for token, version, _, _ in changed.rows] == [("other", 1)]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned[-1].startswith(
        f"job shared: the stored document rows at version {MANY + 2} are not a whole list"
    )
    assert "the other jobs are caught up" in warned[-1]
    job = image(job, MANY + 1)
    a.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), MANY + 2, 0))  # a whole write
    a.write(VersionedWrite(DropJob("other", Removal.PURGED), None, 0))
    assert caught_up(b) == (job, MANY + 3, MANY + 1)


def test_the_catch_up_finds_a_jobs_new_document_rows_by_their_index(dsn: str) -> None:
    """The change feed's read of a job known at a version asks the database for the rows
    written after it and those without one: EXPLAIN (on 300 jobs of 200 documents each, as
    written since schema 14, analyzed) shows both found through ``job_documents_by_version``
    (schema 16), not every row of the job fetched through the primary key and filtered."""
    records = PostgresRecords.open(dsn)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO jobs (token, state, active, created, job, version) "
                "SELECT 'j' || i, 'Processing', true, now(), '{}', 200 "
                "FROM generate_series(1, 300) i"
            )
            conn.execute(
                "INSERT INTO job_documents (token, ordinal, document_id, format, size, version) "
                "SELECT 'j' || i, o, o + 1, 'jfif', 5, o + 1 "
                "FROM generate_series(1, 300) i, generate_series(0, 199) o"
            )
            conn.execute("ANALYZE")
            params = {
                "since": 0,
                "tokens": [],
                "me": records.instance,
                "age": UPLOAD_ROW_SECONDS,
                "known_tokens": [f"j{i}" for i in range(1, 301)],
                "known_versions": [199] * 300,
            }
            with conn.cursor() as cur:
                cur.execute(f"EXPLAIN {_CHANGES}", params)  # type: ignore[arg-type]
                plan = "\n".join(str(row[0]) for row in cur.fetchall())
    finally:
        records.close()
    since = (
        "Index Cond: ((token = jobs.token) AND (version > COALESCE(known.version, '0'::bigint)))"
    )
    unversioned = "Index Cond: ((token = jobs.token) AND (version IS NULL))"
    assert since in plan and unversioned in plan, plan
    assert plan.count("job_documents_by_version") == 2, plan
    assert "(version > known.version)" not in plan, plan  # no longer a filter over every row


def stored(dsn: str, token: str = "shared") -> tuple[Document, ...]:
    """The job's documents as the table holds them, read by hand (no store's memory)."""
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT document_id, format, size FROM job_documents WHERE token = %s ORDER BY ordinal",
            (token,),
        ).fetchall()
    return tuple(Document(int(i), str(f), int(s)) for i, f, s in found)


def test_two_instances_writing_in_turn_each_read_only_the_others_row(
    dsn: str, two: tuple[PostgresRecords, PostgresRecords]
) -> None:
    """Instances a and b take turns adding a document, each from the version its catch-up
    read of the other's write (as the runtime stamps it): each write adds one row, each read
    one row, and the table, and each instance's read, hold the whole list every time."""
    a, b = two
    job = grown(a, MANY)
    version = MANY + 1
    assert caught_up(b) == (job, version, MANY)
    assert caught_up(a) == (job, version, 0)  # its own write: known
    writer, reader = b, a
    for number in range(MANY + 1, MANY + 7):
        job = image(job, number)
        writer.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), version, 0))
        version += 1
        assert stored(dsn) == job.documents
        assert caught_up(reader) == (job, version, 1)
        assert caught_up(writer) == (job, version, 0)
        writer, reader = reader, writer
    with psycopg.connect(dsn) as conn:
        # Each row carries the version of the write that added it: no write rewrote them.
        versions = conn.execute(
            "SELECT version FROM job_documents WHERE token = 'shared' AND ordinal >= %s "
            "ORDER BY ordinal",
            (MANY,),
        ).fetchall()
    assert [v for (v,) in versions] == list(range(MANY + 2, version + 1))


@pytest.mark.parametrize("count", [INCREMENTAL_DOCUMENTS - 1, INCREMENTAL_DOCUMENTS])
def test_a_job_is_read_by_its_new_rows_from_incremental_documents_on(
    count: int, two: tuple[PostgresRecords, PostgresRecords]
) -> None:
    """The threshold (postgresql.INCREMENTAL_DOCUMENTS): a job b knows with one document
    fewer is read whole, with as many its new row only, and the list is whole either way."""
    a, b = two
    job = grown(a, count)
    assert caught_up(b) == (job, count + 1, count)
    job = image(job, count + 1)
    a.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), count + 1, 0))
    fed = count + 1 if count < INCREMENTAL_DOCUMENTS else 1
    assert caught_up(b) == (job, count + 2, fed)
    job = image(job, count + 2)
    a.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), count + 2, 0))
    assert caught_up(b) == (job, count + 3, 1)  # known with at least as many now


def test_a_refused_write_after_a_read_leaves_the_rows_and_the_next_write_right(
    dsn: str, two: tuple[PostgresRecords, PostgresRecords]
) -> None:
    """b read a's version and would append to it, but a wrote first: b's write is refused
    and writes no row, so what b knew of the version it read still holds: its next read
    reads a's one row, its write from a's version adds its own one row, and a reads that."""
    a, b = two
    job = grown(a, MANY)
    caught_up(b)
    won = image(job, MANY + 1)
    a.write(VersionedWrite(UpdateJob(won, JobInput.IMAGE), MANY + 1, 0))
    lost = replace(job, documents=(*job.documents, Document(500, "pdf-a", 9)))
    with pytest.raises(StoreError):
        b.write(VersionedWrite(UpdateJob(lost, JobInput.IMAGE), MANY + 1, 0))
    assert stored(dsn) == won.documents
    assert caught_up(b) == (won, MANY + 2, 1)
    job = image(won, MANY + 2)
    b.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), MANY + 2, 0))
    assert stored(dsn) == job.documents
    with psycopg.connect(dsn) as conn:
        written = conn.execute(
            "SELECT ordinal FROM job_documents WHERE token = 'shared' AND version = %s",
            (MANY + 3,),
        ).fetchall()
    assert written == [(MANY + 1,)]
    assert caught_up(a) == (job, MANY + 3, 1)


def test_a_restarted_instance_reads_whole_then_only_new_rows(
    dsn: str, two: tuple[PostgresRecords, PostgresRecords]
) -> None:
    """An instance started again knows no rows: its first read is whole, the next ones read
    what was written since."""
    a, b = two
    job = grown(a, MANY)
    caught_up(b)
    b.close()
    again = PostgresRecords.open(dsn)
    try:
        assert caught_up(again) == (job, MANY + 1, MANY)
        job = image(job, MANY + 1)
        a.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), MANY + 1, 0))
        assert caught_up(again) == (job, MANY + 2, 1)
    finally:
        again.close()


def database_with_a_job_in_flight(dsn: str, schema: int = 13) -> Job:
    """An empty database brought to ``schema``, holding one active job of MANY documents whose
    rows have no version (as a server of schema 13 writes them): the job."""
    job = make_job("shared")
    for number in range(1, MANY + 1):
        job = image(job, number)
    database_of_schema(dsn, schema)
    with psycopg.connect(dsn) as conn:
        token, state, active, created, completed, text = record_columns(job)
        conn.execute(
            "INSERT INTO jobs (token, state, active, created, completed, job, origin) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (token, state, active, created, completed, text, job.origin),
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO job_documents (token, ordinal, document_id, format, size) "
                "VALUES (%s, %s, %s, %s, %s)",
                [(token, n, *document_row(d)) for n, d in enumerate(job.documents)],
            )
    return job


def wait_for_the_upgrade_to_wait(dsn: str) -> None:
    """Until a session of the test's database waits for a lock: the upgrade, behind the write
    the test holds open."""
    with psycopg.connect(dsn, autocommit=True) as watch:
        wait_for(
            lambda: watch.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            ).fetchone(),
            what="the upgrade waiting for the write in flight",
        )


def test_jobs_in_flight_at_an_upgrade_from_schema_13_are_read_by_their_new_rows_after_it(
    dsn: str,
) -> None:
    """A database of schema 13 with a job in flight (its rows without a version): the upgrade
    gives them the job's row version (schema 17), so after each instance's first read, whole,
    a write from what one read is read by its one row; a row a server of schema 13 still
    running adds or replaces has no version and is read every time (only those)."""
    job = database_with_a_job_in_flight(dsn)
    a, b = PostgresRecords.open(dsn), PostgresRecords.open(dsn)
    try:
        assert caught_up(a) == (job, 1, MANY)
        assert caught_up(b) == (job, 1, MANY)
        job = image(job, MANY + 1)
        a.write(VersionedWrite(UpdateJob(job, JobInput.IMAGE), 1, 0))
        assert stored(dsn) == job.documents
        assert caught_up(b) == (job, 2, 1)  # the rows from before have version 1 now
        with psycopg.connect(dsn) as conn:
            versions = conn.execute(
                "SELECT count(*) FILTER (WHERE version IS NULL), min(version), max(version) "
                "FROM job_documents WHERE token = 'shared'"
            ).fetchone()
            assert versions == (0, 1, 2)  # a's write added its one row only
            # A server of schema 13, still running, appends as it did: no version.
            conn.execute(
                "INSERT INTO job_documents (token, ordinal, document_id, format, size) "
                f"VALUES ('shared', {MANY + 1}, 77, 'pdf-a', 5)"
            )
            conn.execute("UPDATE jobs SET version = version + 1, xid = pg_current_xact_id()")
        job = replace(job, documents=(*job.documents, Document(77, "pdf-a", 5)))
        # The row without a version, and none of those known at version 2.
        assert caught_up(b) == (job, 3, 1)
        assert caught_up(a) == (job, 3, 1)
        # It replaces the row a wrote (version 2) with its upsert, which sets no version: the
        # trigger forgets it, or the instances knowing version 2 would keep the old document.
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "INSERT INTO job_documents (token, ordinal, document_id, format, size) "
                f"VALUES ('shared', {MANY}, 88, 'pdf-a', 6) "
                "ON CONFLICT (token, ordinal) DO UPDATE SET document_id = excluded.document_id, "
                "format = excluded.format, size = excluded.size"
            )
            conn.execute("UPDATE jobs SET version = version + 1, xid = pg_current_xact_id()")
        documents = list(job.documents)
        documents[MANY] = Document(88, "pdf-a", 6)
        job = replace(job, documents=tuple(documents))
        assert caught_up(b) == (job, 4, 2)
        assert caught_up(a) == (job, 4, 2)
    finally:
        a.close()
        b.close()


def test_the_upgrade_that_stamps_the_rows_waits_for_a_write_in_flight_of_an_earlier_server(
    dsn: str,
) -> None:
    """Schema 16 -> 17 while a server of schema 13 still runs: its write of the job (a
    document replaced, no version; the job's row version bumped) is in flight when the upgrade
    stamps the rows.  The upgrade waits for it, so the rows get the version that write made,
    and instance b, which knew the job at the version before, reads the new document; stamped
    with the version b knew (the upgrade's snapshot from before the write), b would keep the
    old one for ever."""
    job = database_with_a_job_in_flight(dsn, schema=16)
    # Instance b runs this server's code on the database of schema 16 (not upgraded by it).
    pool: ConnectionPool[Any] = ConnectionPool(dsn, kwargs=connection_kwargs(None))
    b = PostgresRecords(PgDatabase(dsn, pool), dsn)
    upgrading = psycopg.connect(dsn)
    try:
        assert caught_up(b) == (job, 1, MANY)  # knows the job at version 1 from now on
        with psycopg.connect(dsn) as writer:
            # The schema-13 server's write, in flight: the job's row first, as it writes.
            writer.execute(
                "UPDATE jobs SET version = version + 1, xid = pg_current_xact_id() "
                "WHERE token = 'shared'"
            )
            writer.execute(
                "UPDATE job_documents SET size = 1 WHERE token = 'shared' AND ordinal = 2"
            )
            upgraded: list[tuple[int, int]] = []
            upgrade_thread = threading.Thread(target=lambda: upgraded.append(upgrade(upgrading)))
            upgrade_thread.start()
            wait_for_the_upgrade_to_wait(dsn)
            writer.commit()
        upgrade_thread.join()
        assert upgraded == [(16, PG_SCHEMA_VERSION)]  # this server's schema, whatever came after 17
        documents = list(job.documents)
        documents[2] = replace(documents[2], size=1)
        assert caught_up(b) == (replace(job, documents=tuple(documents)), 2, MANY)
        with psycopg.connect(dsn) as conn:
            versions = conn.execute(
                "SELECT DISTINCT version FROM job_documents WHERE token = 'shared'"
            ).fetchall()
        assert versions == [(2,)]
    finally:
        upgrading.close()
        b.close()


def test_an_upgrade_from_schema_13_waits_for_a_write_in_flight_of_a_server_of_schema_13(
    dsn: str,
) -> None:
    """Schema 13 -> 17 while a server of schema 13 still runs: its write holds the job's row
    (jobs first, as it writes) when the upgrade starts.  The upgrade waits for it before
    taking anything, so the write goes on to its document row and both commit; had the upgrade
    altered job_documents (schema 14) before waiting for jobs (schema 16), each waited for the
    other and PostgreSQL ended one of them (a deadlock: the upgrade, so the server did not
    start, or the running server's write)."""
    assert "CREATE TABLE job_documents" in _MIGRATIONS[_JOB_DOCUMENTS_SCHEMA - 1][0]
    job = database_with_a_job_in_flight(dsn)
    upgrading = psycopg.connect(dsn)
    upgraded: list[tuple[int, int]] = []
    failed: list[BaseException] = []

    def upgrade_now() -> None:
        try:
            upgraded.append(upgrade(upgrading))
        except BaseException as exc:  # the thread's failure is the test's: kept
            failed.append(exc)

    try:
        with psycopg.connect(dsn) as writer:
            writer.execute(
                "UPDATE jobs SET version = version + 1, xid = pg_current_xact_id() "
                "WHERE token = 'shared'"
            )
            upgrade_thread = threading.Thread(target=upgrade_now)
            upgrade_thread.start()
            wait_for_the_upgrade_to_wait(dsn)
            writer.execute(
                "UPDATE job_documents SET size = 1 WHERE token = 'shared' AND ordinal = 2"
            )
            writer.commit()
        upgrade_thread.join()
        assert failed == []
        assert upgraded == [(13, PG_SCHEMA_VERSION)]
        documents = list(job.documents)
        documents[2] = replace(documents[2], size=1)
        assert stored(dsn) == tuple(documents)
        with psycopg.connect(dsn) as conn:
            versions = conn.execute(
                "SELECT DISTINCT version FROM job_documents WHERE token = 'shared'"
            ).fetchall()
        assert versions == [(2,)]  # stamped after the write, with the version it made
    finally:
        upgrading.close()


def test_an_upgrade_held_up_by_a_transaction_left_open_gives_up_and_names_it(dsn: str) -> None:
    """Schema 16 -> 17 while a session (an operator's psql here) holds a write on jobs in a
    transaction it left open: the upgrade's lock waits for it, and every write of the
    instances still running waits behind the upgrade.  It waits a bounded time, then gives up
    with an error naming that session and saying what to do, so that neither the new server's
    start nor the running instances hang for as long as the session stays open; without it,
    both waited for ever.  Once the session is gone the upgrade runs."""
    database_of_schema(dsn, 16)
    failed: list[BaseException] = []
    upgraded: list[tuple[int, int]] = []
    with psycopg.connect(dsn, application_name="psql of an operator") as session:
        session.execute("UPDATE jobs SET version = version + 1")  # no commit: left open
        [(pid,)] = session.execute("SELECT pg_backend_pid()").fetchall()
        upgrading = psycopg.connect(dsn)

        def upgrade_now() -> None:
            try:
                upgraded.append(upgrade(upgrading, lock_wait=0.5))
            except BaseException as exc:  # the thread's outcome is the test's: kept
                failed.append(exc)

        upgrade_thread = threading.Thread(target=upgrade_now)
        upgrade_thread.start()
        upgrade_thread.join(60.0)
        waited_for_ever = upgrade_thread.is_alive()
        session.rollback()  # lets a waiting upgrade go, so that the test ends either way
        upgrade_thread.join()
        upgrading.close()
    assert not waited_for_ever, upgraded
    [error] = failed
    assert isinstance(error, StoreError)
    message = error.message
    assert "\n" not in message
    assert message.startswith(f"upgrading the job store schema 16 -> {PG_SCHEMA_VERSION}: "), (
        message
    )
    assert f"pid {pid} (psql of an operator, idle in transaction" in message, message
    assert "end that transaction (SELECT pg_terminate_backend(" in message, message
    assert message.endswith("then try again"), message
    with psycopg.connect(dsn) as conn:
        assert upgrade(conn) == (16, PG_SCHEMA_VERSION)
