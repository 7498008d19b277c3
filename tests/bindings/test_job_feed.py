"""The PostgreSQL job feed and compare-and-set writes (issue 18 point 1, store/postgresql.py) on a
real PostgreSQL: a writer that commits late is still read, deleted rows leave tombstones, a
write from an outdated version is refused, uploads in flight are seen by the other instances;
and the runtime's catch-up (runtime/catchup.py) over it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest

from dsc_bindings.runtime.catchup import JobCatchUp
from dsc_bindings.store.errors import JobChanged, StoreError
from dsc_bindings.store.interface import VersionedWrite
from dsc_bindings.store.jobcodec import encode_job
from dsc_bindings.store.postgresql import PostgresRecords
from dsc_bindings.store.sqlite import record_columns
from dsc_core import ScanServer, ServerConfig
from dsc_core.commands import CreateJob, DropJob, JobInput, Removal, UpdateJob
from dsc_core.model import Document, JobState
from test_store import make_job

if TYPE_CHECKING:
    from engines_support import PgCluster


@pytest.fixture
def dsn(pg: PgCluster) -> str:
    return pg.new_database()


@pytest.fixture
def two(dsn: str) -> Iterator[tuple[PostgresRecords, PostgresRecords]]:
    """Two instances' records on one database."""
    a, b = PostgresRecords.open(dsn), PostgresRecords.open(dsn)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def create(records: PostgresRecords, token: str) -> None:
    records.write(VersionedWrite(CreateJob(make_job(token)), None, 0))


def test_a_writer_that_commits_late_is_still_read(
    dsn: str, two: tuple[PostgresRecords, ...]
) -> None:
    """The late writer takes its transaction id first and commits last: a cursor over
    increasing numbers would have read past it."""
    a, b = two
    first = a.changes(0, frozenset())
    assert first.rows == ()
    late = psycopg.connect(dsn)
    try:
        with late.transaction():
            token, state, active, created, completed, text = record_columns(make_job("late"))
            late.execute(
                "INSERT INTO jobs (token, state, active, created, completed, job) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (token, state, active, created, completed, text),
            )  # its xid is taken now, below every xid of what follows
            create(b, "early")  # committed at once
            seen = a.changes(first.cursor, frozenset())
            assert [row[0] for row in seen.rows] == ["early"]
        # The late transaction commits now, after the reader passed "early".
        after = a.changes(seen.cursor, frozenset())
        assert "late" in [row[0] for row in after.rows]
    finally:
        late.close()


def test_versions_are_compare_and_set(two: tuple[PostgresRecords, ...]) -> None:
    a, b = two
    create(a, "j")
    with pytest.raises(JobChanged):
        create(b, "j")  # the token is taken: a new job is an INSERT
    updated = make_job("j", 1, state=JobState.PENDING)
    a.write(VersionedWrite(UpdateJob(updated, JobInput.END, ()), 1, 0))
    with pytest.raises(JobChanged) as lost:  # b decided from version 1 too
        b.write(VersionedWrite(UpdateJob(make_job("j", 2), JobInput.IMAGE, ()), 1, 0))
    assert lost.value.temporary
    [(token, version, text)] = b.changes(0, frozenset()).rows
    assert (token, version, text) == ("j", 2, encode_job(updated))  # the winner's record


def test_deleted_rows_leave_tombstones(two: tuple[PostgresRecords, ...]) -> None:
    a, b = two
    create(a, "gone")
    cursor = b.changes(0, frozenset()).cursor
    a.write(VersionedWrite(DropJob("gone", Removal.PURGED), None, 0))
    changed = b.changes(cursor, frozenset())
    assert changed.rows == () and changed.dropped == ("gone",)


def test_asked_rows_come_whatever_the_cursor(two: tuple[PostgresRecords, ...]) -> None:
    a, b = two
    create(a, "old")
    cursor = b.changes(0, frozenset()).cursor
    assert b.changes(cursor, frozenset()).rows == ()
    assert [r[0] for r in b.changes(cursor, frozenset({"old"})).rows] == ["old"]


def test_uploads_in_flight_are_seen_by_the_others_only(two: tuple[PostgresRecords, ...]) -> None:
    a, b = two
    create(a, "j")
    a.upload_began("j", 1, "host-a:/data")
    assert b.changes(0, frozenset()).uploads_elsewhere == (("j", 1),)
    assert a.changes(0, frozenset()).uploads_elsewhere == ()
    with pytest.raises(StoreError) as taken:
        b.upload_began("j", 1, "host-b:/data")
    assert taken.value.temporary
    # Recording the image in the job ends its upload, in the same statement.
    received = make_job("j", 1).evolve(documents=(Document(1, "png", 3),))
    a.write(VersionedWrite(UpdateJob(received, JobInput.IMAGE, ()), 1, 0))
    assert b.changes(0, frozenset()).uploads_elsewhere == ()
    # A run that died mid-upload: the next run from its home releases the row at start.
    a.upload_began("j", 2, "host-a:/data")
    assert b.release_uploads("host-a:/data") == [("j", 2)]
    b.upload_began("j", 2, "host-b:/data")


def test_catch_up_absorbs_what_others_wrote_and_refuses_writes_from_a_lost_race(
    two: tuple[PostgresRecords, ...],
) -> None:
    a, b = two
    core = ScanServer(ServerConfig(), new_id=lambda: "unused")
    catch_up = JobCatchUp(b.changes)
    catch_up.seed(catch_up.read())
    create(a, "j")
    catch_up.absorb(core, catch_up.read())
    assert core.jobs.get("j") == make_job("j")
    # This instance decides from version 1 while the other one writes version 2.
    [stamped] = catch_up.stamp([UpdateJob(make_job("j", 5), JobInput.IMAGE, ())])
    assert isinstance(stamped, VersionedWrite) and stamped.expected == 1
    winner = make_job("j", 9, state=JobState.PENDING)
    a.write(VersionedWrite(UpdateJob(winner, JobInput.END, ()), 1, 0))
    later = catch_up.stamp([UpdateJob(make_job("j", 6), JobInput.IMAGE, ())])[0]
    with pytest.raises(JobChanged) as lost:
        catch_up.check(stamped)
        b.write(stamped)
    catch_up.settled(stamped, lost.value)
    with pytest.raises(JobChanged):  # decided before the failure: refused without asking
        assert isinstance(later, VersionedWrite)
        catch_up.check(later)
    catch_up.settled(later, JobChanged("j"))
    # The next catch-up reads the job again and the core gets the winner's record.
    catch_up.absorb(core, catch_up.read())
    assert core.jobs.get("j") == winner
    [again] = catch_up.stamp([UpdateJob(make_job("j", 10), JobInput.IMAGE, ())])
    assert isinstance(again, VersionedWrite) and again.expected == 2
    catch_up.check(again)
    b.write(again)
