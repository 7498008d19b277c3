"""The outbox and the delivery leases in PostgreSQL (issue 18 point 3; store/postgresql.py,
store/pgoutbox.py) on a real PostgreSQL: subscriptions travel through the job feed, a job's
notifications commit with its row (or not at all), one instance at a time holds a
subscription's lease, the rows come in id order and leave once answered, a lapsed or released
lease is taken over from the rows left, and the doorbell rings."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import psycopg
import pytest

from dsc_bindings.runtime.announcing import FOLLOW, LeaderTerm, NewTerm
from dsc_bindings.runtime.catchup import JobCatchUp
from dsc_bindings.store.errors import JobChanged
from dsc_bindings.store.interface import Announcement, EventsWrite, VersionedWrite
from dsc_bindings.store.postgresql import PostgresRecords
from dsc_bindings.store.subcodec import decode_subscription, encode_subscription
from dsc_core import RepositoryState, ScanServer, ServerConfig
from dsc_core.commands import (
    AnnounceRepositoryState,
    Command,
    CreateJob,
    Deliver,
    EndSubscription,
    JobInput,
    RecordDeliveryFailures,
    UpdateJob,
)
from dsc_core.subscription import EndpointReference, Subscription
from test_store import make_job

if TYPE_CHECKING:
    pass

SUB = "urn:uuid:5b0d3f6e-0000-4000-8000-000000000001"


def subscription(expires: datetime | None = None) -> Subscription:
    return Subscription(
        SUB,
        EndpointReference("http://sink.example/n", (b'<x:R xmlns:x="urn:x">1</x:R>',)),
        None,
        frozenset({"urn:a"}),
        expires or datetime.now(UTC) + timedelta(hours=1),
        owner="alice",
    )


def store(records: PostgresRecords, sub: Subscription) -> None:
    records.store_subscription(sub.identifier, sub.expires, encode_subscription(sub))


def event(n: int) -> Deliver:
    return Deliver(SUB, "http://sink.example/n", (b"<m>", str(n).encode(), b"</m>"))


def test_subscriptions_travel_through_the_job_feed(two: tuple[PostgresRecords, ...]) -> None:
    a, b = two
    cursor = b.changes(0, frozenset()).cursor
    sub = subscription()
    store(a, sub)
    seen = b.changes(cursor, frozenset())
    ((identifier, _version, text),) = seen.subscriptions
    assert identifier == SUB and decode_subscription(text) == sub
    a.end_subscription(SUB)
    ended = b.changes(seen.cursor, frozenset())
    assert ended.subscriptions == () and ended.subscriptions_ended == (SUB,)
    store(a, sub)  # a late Renew does not bring an ended subscription back
    assert b.changes(ended.cursor, frozenset()).subscriptions == ()


def test_events_commit_with_their_job_row_or_not_at_all(
    two: tuple[PostgresRecords, ...],
) -> None:
    a, b = two
    store(a, subscription())
    job = make_job("t1")
    a.write(VersionedWrite(CreateJob(job), None, 0, (event(1),)))
    b.write(VersionedWrite(UpdateJob(job, JobInput.END), 1, 0, (event(2),)))
    with pytest.raises(JobChanged):  # from an outdated version: neither row nor event
        a.write(VersionedWrite(UpdateJob(job, JobInput.END), 1, 0, (event(3),)))
    rows = a.outbox().claim("A", 30)
    assert [r.message for r in rows] == [b"<m>1</m>", b"<m>2</m>"]


def test_one_owner_at_a_time_rows_in_order_deleted_once_answered(
    two: tuple[PostgresRecords, ...], dsn: str
) -> None:
    a, b = two
    store(a, subscription())
    a.enqueue(tuple(event(n) for n in range(3)))
    first, second = a.outbox(), b.outbox()
    rows = first.claim("A", 30)
    assert [r.message for r in rows] == [b"<m>0</m>", b"<m>1</m>", b"<m>2</m>"]
    assert second.claim("B", 30) == []  # A holds the lease
    first.answered(rows[0].id)
    assert [r.id for r in first.claim("A", 30)] == [r.id for r in rows[1:]]  # renewed
    # A's lease lapses (as when its instance dies): B takes over from the rows left.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE subscriptions SET delivery_until = now() - interval '1 s'")
    assert [r.id for r in second.claim("B", 30)] == [r.id for r in rows[1:]]
    assert first.claim("A", 30) == []
    second.release("B")
    assert [r.id for r in first.claim("A", 30)] == [r.id for r in rows[1:]]
    a.end_subscription(SUB)  # its rows go with it
    assert first.claim("A", 30) == []
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)


def test_the_doorbell_rings_when_rows_are_written(two: tuple[PostgresRecords, ...]) -> None:
    a, b = two
    store(a, subscription())
    outbox = b.outbox()
    assert outbox.wait(5)  # the first call connects and listens: it returns at once
    assert not outbox.wait(0.05)  # nothing rang: the time passed
    rang = threading.Event()

    def listen() -> None:
        if outbox.wait(30):
            rang.set()

    listener = threading.Thread(target=listen)
    listener.start()
    while not rang.is_set():  # rows written until it rings (LISTEN may not be waiting yet)
        a.enqueue((event(0),))
        rang.wait(0.2)
    listener.join()
    outbox.close()


# --- the leader's announcements and the failure count (issue 18 point 4) -------------------


def announcement(a: str, term: int, previous: str, state: str, n: int) -> Announcement:
    return Announcement(state, previous, a, term, (event(n),))


def test_an_announcement_is_written_once_per_change_under_the_current_term_only(
    two: tuple[PostgresRecords, ...],
) -> None:
    a, b = two
    store(a, subscription())
    refused: list[str] = []
    a.announcement_refused = lambda: refused.append("a")
    b.announcement_refused = lambda: refused.append("b")
    assert a.take_lead("A") == ("Idle", 1)  # nothing announced yet: subscribers heard Idle
    job = make_job("t1")
    a.write(
        VersionedWrite(
            CreateJob(job), None, 0, announcement=announcement("A", 1, "Idle", "Processing", 1)
        )
    )
    # B takes the lead (A lost its lock): A's queued announcement of its old term is refused,
    # its job write stands; B starts from what was heard last.
    assert b.take_lead("B") == ("Processing", 2)
    a.write(
        VersionedWrite(
            UpdateJob(job, JobInput.END),
            1,
            0,
            announcement=announcement("A", 1, "Processing", "Idle", 2),
        )
    )
    assert refused == ["a"]
    assert b.changes(0, frozenset()).rows[0][1] == 2  # the job row was written
    # B's own, with no job write: one transaction of its own; one that says another state than
    # the row is refused (nothing heard twice), and B is told.
    b.write_events(EventsWrite(announcement=announcement("B", 2, "Idle", "Processing", 3)))
    assert refused == ["a", "b"]
    b.write_events(EventsWrite(announcement=announcement("B", 2, "Processing", "Idle", 4)))
    assert [r.message for r in a.outbox().claim("A", 30)] == [b"<m>1</m>", b"<m>4</m>"]
    assert b.take_lead("B") == ("Idle", 3)


def test_events_after_an_announcement_in_one_write_are_stored_after_its_events(
    two: tuple[PostgresRecords, ...],
) -> None:
    """The core emits a job's event, the repository state's announcement with its event, then
    another job event, in one batch: the stamped writes carry them to the outbox in that order
    (subscribers hear them so), on a job's write and on a write of notifications alone; an
    announcement refused leaves the events around it, still in order."""
    a, _ = two
    store(a, subscription())
    term = a.take_lead("A")[1]
    catch_up = JobCatchUp(a.changes)

    def announce(previous: RepositoryState, state: RepositoryState, n: int) -> Command:
        return AnnounceRepositoryState(state, previous, (event(n),))

    idle, processing = RepositoryState.IDLE, RepositoryState.PROCESSING
    batches: list[list[Command]] = [
        [CreateJob(make_job("t1")), event(1), announce(idle, processing, 2), event(3)],
        [announce(processing, idle, 4), event(5)],
        [event(6), announce(processing, idle, 7), event(8)],  # refused: Idle already
    ]
    for batch in batches:
        for write in catch_up.stamp(batch, ("A", term)):
            if isinstance(write, VersionedWrite):
                a.write(write)
            else:
                assert isinstance(write, EventsWrite)
                a.write_events(write)
    heard = [r.message for r in a.outbox().claim("A", 30)]
    assert heard == [f"<m>{n}</m>".encode() for n in (1, 2, 3, 4, 5, 6, 8)]


def test_an_announcement_whose_job_write_loses_is_not_written_and_says_so(
    two: tuple[PostgresRecords, ...],
) -> None:
    a, _ = two
    store(a, subscription())
    refused: list[bool] = []
    a.announcement_refused = lambda: refused.append(True)
    a.take_lead("A")
    job = make_job("t1")
    a.write(VersionedWrite(CreateJob(job), None, 0))
    with pytest.raises(JobChanged):  # an outdated version: no row, no event, no announcement
        a.write(
            VersionedWrite(
                UpdateJob(job, JobInput.END),
                7,
                0,
                announcement=announcement("A", 1, "Idle", "Processing", 1),
            )
        )
    assert refused == [True]
    assert a.outbox().claim("A", 30) == []
    assert a.take_lead("A") == ("Idle", 2)


def test_the_failure_count_travels_with_the_subscription(
    two: tuple[PostgresRecords, ...],
) -> None:
    a, b = two
    cursor = b.changes(0, frozenset()).cursor
    store(a, subscription())
    cursor = b.changes(cursor, frozenset()).cursor
    a.record_failures(SUB, 2)
    seen = b.changes(cursor, frozenset())
    ((_, _, text),) = seen.subscriptions
    assert decode_subscription(text).failures == 2
    # A Renew elsewhere keeps the count (its record has none); the same count again is no news.
    store(b, subscription(datetime.now(UTC) + timedelta(hours=2)))
    a.record_failures(SUB, 2)
    ((_, _, text),) = a.changes(seen.cursor, frozenset()).subscriptions
    assert decode_subscription(text).failures == 2


def test_a_failure_counted_while_a_renew_is_read_is_not_lost(
    two: tuple[PostgresRecords, ...],
) -> None:
    """The delivery owner (A) counts a failure in its core and writes it after; a Renew written
    on B meanwhile is read by A's catch-up with the count from before.  Taken, it lost the
    failure (the next one was counted from the older number, and R7's end came late).  Each
    interleaving forced in turn: the Renew read while the write waits in A's queue; a read
    begun before the write and absorbed after it; a write committed before a read began but
    done (``counted``) after, whose row the next read brings again whatever the cursor.  Then
    three failures in a row end the subscription, as on one server."""
    a, b = two
    core = ScanServer(ServerConfig(), new_id=lambda: "unused")
    catch_up = JobCatchUp(a.changes)
    catch_up.seed(catch_up.read())
    store(b, subscription())
    catch_up.absorb(core, catch_up.read())

    def delivered(ok: bool) -> RecordDeliveryFailures:
        [command] = catch_up.stamp(core.delivery_result(SUB, ok))
        assert isinstance(command, RecordDeliveryFailures)
        return command

    def write(command: RecordDeliveryFailures) -> None:
        a.record_failures(command.identifier, command.failures)

    def renewed(hours: int) -> None:
        store(b, subscription(datetime.now(UTC) + timedelta(hours=hours)))

    def count() -> int:
        return core.subscriptions.by_id[SUB].failures

    # 1. The first failure waits in A's writer queue while B's Renew is read and absorbed.
    first = delivered(False)
    renewed(2)
    catch_up.absorb(core, catch_up.read())
    write(first)
    catch_up.counted(first)
    assert count() == 1
    # 2. The second is written after a read of B's next Renew began, before it is absorbed.
    second = delivered(False)
    assert second == RecordDeliveryFailures(SUB, 2)
    renewed(3)
    caught = catch_up.read()
    write(second)
    catch_up.counted(second)
    catch_up.absorb(core, caught)
    assert count() == 2
    # 3. A delivery succeeds: its 0 is committed, a read begins (it may or may not see it:
    # here it does), then the write is done.  The row is read again by the next read, with
    # no change since (only the recount brings it), and then no more.
    reset = delivered(True)
    write(reset)
    caught = catch_up.read()
    catch_up.counted(reset)
    catch_up.absorb(core, caught)
    again = catch_up.read()
    assert [sub.failures for sub in again.subscriptions] == [0]
    catch_up.absorb(core, again)
    assert count() == 0 and catch_up.read().subscriptions == ()
    # Three failures in a row end the subscription (R7).
    for n in (1, 2):
        failure = delivered(False)
        write(failure)
        catch_up.counted(failure)
        assert count() == n
    assert EndSubscription(SUB) in catch_up.stamp(core.delivery_result(SUB, False))


def test_a_leader_that_cannot_take_a_term_follows_until_it_takes_one(
    two: tuple[PostgresRecords, ...], dsn: str
) -> None:
    """runtime/announcing.py: the database fails the statement that takes a term (its table
    is renamed away here).  A leader whose announcement was refused then follows (FOLLOW: its
    core neither sweeps nor announces) instead of going on under the refused term; while it
    follows and still cannot take one, nothing changes; once the statement works again the
    next tick takes a new term, from the state the row says."""
    a, _ = two
    term = LeaderTerm("A", a.take_lead)
    change = term.change(True)
    assert change == NewTerm(RepositoryState.IDLE, 1)
    term.apply(change)
    assert term.change(True) is None  # leading: nothing to take
    term.refused()  # an announcement of term 1 was not written
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("ALTER TABLE repository_announced RENAME TO repository_announced_away")
    assert term.change(True) == FOLLOW
    term.apply(FOLLOW)
    assert term.current is None
    assert term.change(True) is None  # still failing: it goes on following
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("ALTER TABLE repository_announced_away RENAME TO repository_announced")
    assert term.change(True) == NewTerm(RepositoryState.IDLE, 2)
