"""The outbox and the delivery leases in PostgreSQL (issue 18 point 3; store/postgresql.py,
store/pgoutbox.py) on a real PostgreSQL: subscriptions travel through the job feed, a job's
notifications commit with its row (or not at all), one instance at a time holds a
subscription's lease, the rows come in id order and leave once answered, a lapsed or released
lease is taken over from the rows left, and the doorbell rings."""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from cluster_support import lone_instance
from dsc_bindings.console.main import main
from dsc_bindings.observe.metrics import ClusterGauges
from dsc_bindings.runtime.announcing import FOLLOW, TERM_ROW_BUSY_SECONDS, LeaderTerm, NewTerm
from dsc_bindings.runtime.catchup import JobCatchUp
from dsc_bindings.runtime.cluster import ClusterMember
from dsc_bindings.store.errors import JobChanged
from dsc_bindings.store.instances import (
    INSERT,
    LEADER,
    LEADER_LOCK,
    LOCK_WITHOUT_TERM,
    NO_TERM,
    TAKING_THE_LEAD,
    ClusterSettings,
    Leadership,
    list_instances,
)
from dsc_bindings.store.interface import Announcement, EventsWrite, VersionedWrite
from dsc_bindings.store.postgresql import SCHEMA_VERSION, PostgresRecords, upgrade
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
from engines_support import database_of_schema, store_section
from test_store import make_job
from waiting import wait_for

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
    assert outbox.wait(30)  # the first call connects and listens: it returns at once
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


Members = Callable[[], ClusterMember]


@pytest.fixture
def members(two: tuple[PostgresRecords, ...], dsn: str) -> Iterator[Members]:
    """Instances of a cluster on ``two``'s database (runtime/cluster.py: a row and a lock
    connection each), started when called: one started while nobody holds the leader's lock
    takes it.  Their heartbeat waits an hour, so what they hold changes only as the test
    does it."""
    started: list[ClusterMember] = []

    def member() -> ClusterMember:
        joined = ClusterMember(
            dsn,
            ClusterSettings(
                instance_name=f"dsc-{len(started)}", heartbeat_seconds=3600, lease_seconds=7200
            ),
            address=lambda: "http://127.0.0.1:1/ScanServer",
        )
        joined.start()
        started.append(joined)
        return joined

    yield member
    for joined in started:
        joined.stop()


def lose_the_lock(dsn: str, member: ClusterMember) -> None:
    """The member's lock connection dies (its backend terminated, as by a network cut or a
    PostgreSQL restart): PostgreSQL releases its lock.  The member does not notice until its
    next heartbeat."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(lock_backend, 10000) FROM instances WHERE id = %s",
            (member.id,),
        )


def announcement(a: str, term: int, previous: str, state: str, n: int) -> Announcement:
    return Announcement(state, previous, a, term, (event(n),))


def test_an_announcement_is_written_once_per_change_under_the_current_term_only(
    two: tuple[PostgresRecords, ...], members: Members, dsn: str
) -> None:
    a, b = two
    store(a, subscription())
    refused: list[str] = []
    a.announcement_refused = lambda: refused.append("a")
    b.announcement_refused = lambda: refused.append("b")
    first = members()
    A = first.id
    assert a.take_lead(A) == ("Idle", 1)  # nothing announced yet: subscribers heard Idle
    job = make_job("t1")
    a.write(
        VersionedWrite(
            CreateJob(job), None, 0, announcement=announcement(A, 1, "Idle", "Processing", 1)
        )
    )
    # B takes the lead (A lost its lock): A's queued announcement of its old term is refused,
    # its job write stands; B starts from what was heard last.
    lose_the_lock(dsn, first)
    B = members().id
    assert b.take_lead(B) == ("Processing", 2)
    a.write(
        VersionedWrite(
            UpdateJob(job, JobInput.END),
            1,
            0,
            announcement=announcement(A, 1, "Processing", "Idle", 2),
        )
    )
    assert refused == ["a"]
    assert b.changes(0, frozenset()).rows[0][1] == 2  # the job row was written
    # B's own, with no job write: one transaction of its own; one that says another state than
    # the row is refused (nothing heard twice), and B is told.
    b.write_events(EventsWrite(announcement=announcement(B, 2, "Idle", "Processing", 3)))
    assert refused == ["a", "b"]
    b.write_events(EventsWrite(announcement=announcement(B, 2, "Processing", "Idle", 4)))
    assert [r.message for r in a.outbox().claim("A", 30)] == [b"<m>1</m>", b"<m>4</m>"]
    assert b.take_lead(B) == ("Idle", 3)


def test_events_after_an_announcement_in_one_write_are_stored_after_its_events(
    two: tuple[PostgresRecords, ...], members: Members
) -> None:
    """The core emits a job's event, the repository state's announcement with its event, then
    another job event, in one batch: the stamped writes carry them to the outbox in that order
    (subscribers hear them so), on a job's write and on a write of notifications alone; an
    announcement refused leaves the events around it, still in order."""
    a, _ = two
    store(a, subscription())
    leader = members().id
    taken = a.take_lead(leader)
    assert taken is not None
    term = taken[1]
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
        for write in catch_up.stamp(batch, (leader, term)):
            if isinstance(write, VersionedWrite):
                a.write(write)
            else:
                assert isinstance(write, EventsWrite)
                a.write_events(write)
    heard = [r.message for r in a.outbox().claim("A", 30)]
    assert heard == [f"<m>{n}</m>".encode() for n in (1, 2, 3, 4, 5, 6, 8)]


def test_an_announcement_whose_job_write_loses_is_not_written_and_says_so(
    two: tuple[PostgresRecords, ...], members: Members
) -> None:
    a, _ = two
    store(a, subscription())
    refused: list[bool] = []
    a.announcement_refused = lambda: refused.append(True)
    A = members().id
    assert a.take_lead(A) == ("Idle", 1)
    job = make_job("t1")
    a.write(VersionedWrite(CreateJob(job), None, 0))
    with pytest.raises(JobChanged):  # an outdated version: no row, no event, no announcement
        a.write(
            VersionedWrite(
                UpdateJob(job, JobInput.END),
                7,
                0,
                announcement=announcement(A, 1, "Idle", "Processing", 1),
            )
        )
    assert refused == [True]
    assert a.outbox().claim("A", 30) == []
    assert a.take_lead(A) == ("Idle", 2)


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
    two: tuple[PostgresRecords, ...], dsn: str, members: Members
) -> None:
    """runtime/announcing.py: the database fails the statement that takes a term (its table
    is renamed away here).  A leader whose announcement was refused then follows (FOLLOW: its
    core neither sweeps nor announces) instead of going on under the refused term; while it
    follows and still cannot take one, nothing changes; once the statement works again the
    next tick takes a new term, from the state the row says."""
    a, _ = two
    term = LeaderTerm(members().id, a.take_lead)
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


def test_a_deposed_leader_that_has_not_noticed_takes_no_term_and_follows(
    two: tuple[PostgresRecords, ...],
    dsn: str,
    members: Members,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A term is taken only while the instance holds the leader's lock, asked in the statement
    that takes it (store/postgresql.py ``_TAKE_LEAD``).  The leader's lock connection dies and
    another instance takes the lock and a term; the old leader's heartbeat has not run since,
    so it still believes it holds the lock, and one of its announcements is refused (the new
    term): it does not take a newer term over the new leader's (which would refuse the new
    leader's announcements in turn) but follows, and no longer shows itself holding the lock;
    the row still names the new leader's term."""
    a, b = two
    old = members()
    term = LeaderTerm(old.id, a.take_lead, name=lambda: old.name, lock_lost=old.lock_lost)
    change = term.change(old.holds_lock)
    assert change == NewTerm(RepositoryState.IDLE, 1)
    term.apply(change)
    lose_the_lock(dsn, old)
    new = members()
    assert new.holds_lock and old.holds_lock  # the old one has not noticed
    assert b.take_lead(new.id) == ("Idle", 2)
    term.refused()  # its next announcement, under term 1
    assert term.change(old.holds_lock) == FOLLOW
    term.apply(FOLLOW)
    assert term.current is None and not old.holds_lock and not old.leads
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT leader, term FROM repository_announced").fetchone()
    assert row == (new.id, 2)
    [said] = [r for r in caplog.records if "no longer holds the leader's lock" in r.getMessage()]
    assert said.levelno == logging.WARNING and old.id in said.getMessage()
    # Nor may an instance that never held it take one, unless it is the last one stopping
    # (R7: it announces Stopped whoever led, nobody else is up), and only once the instance
    # that holds the lock is gone (test_the_last_instance_stopping_takes_no_term_over_...).
    assert a.take_lead(old.id) is None
    assert a.take_lead(old.id, True) is None
    new.stop()
    assert a.take_lead(old.id, True) == ("Idle", 3)


def test_the_last_instance_stopping_takes_no_term_over_an_instance_up_that_holds_the_lock(
    two: tuple[PostgresRecords, ...],
    dsn: str,
    members: Members,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The last instance stopping takes a term whether it holds the lock or not (R7: it
    announces Stopped, nobody else is up to lead), but not over an instance that is up and
    holds it: one that started while the stopping one counted the others (none then) took the
    lock and a term, and leads.  A term taken over it made both lead at once: the stopping one
    announced Stopped for a repository that another instance serves, and the new leader's
    announcements were refused until it took yet another term.  Once that instance is gone
    too, the stopping one takes its last term, lock or not."""
    caplog.set_level(logging.INFO, logger="dsc.cluster")
    a, b = two
    refused: list[str] = []
    b.announcement_refused = lambda: refused.append("b")
    store(a, subscription())
    stopping = members()
    lose_the_lock(dsn, stopping)  # the lock is free: the next instance takes it
    started = members()
    assert started.holds_lock
    assert b.take_lead(started.id) == ("Idle", 1)
    term = LeaderTerm(
        stopping.id, a.take_lead, name=lambda: stopping.name, lock_lost=stopping.lock_lost
    )
    term.retake()  # as runtime/service.py's shutdown does for the last instance
    assert term.change(True) is None  # no term: its core goes on following, no Stopped
    assert term.current is None
    b.write_events(EventsWrite(announcement=announcement(started.id, 1, "Idle", "Processing", 1)))
    assert refused == []  # the leader's term stands
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT leader, term, state FROM repository_announced").fetchone()
    assert row == (started.id, 1, "Processing")
    [said] = [r for r in caplog.records if "the last instance" in r.getMessage()]
    assert said.levelno == logging.INFO and stopping.id in said.getMessage()
    assert f"{started.name} ({started.id})" not in said.getMessage()  # it cannot know which
    assert "announces no Stopped" in said.getMessage(), said.getMessage()
    started.stop()
    term.retake()
    assert term.change(True) == NewTerm(RepositoryState.PROCESSING, 2)


def test_a_member_that_dropped_the_lock_takes_it_and_a_term_again_at_its_next_heartbeat(
    two: tuple[PostgresRecords, ...], dsn: str
) -> None:
    """After ``ClusterMember.lock_lost`` nobody may sit as a follower while the lock is free:
    the next heartbeat tries it again.  Dropped while its connection still held the lock (the
    take-term statement raced a heartbeat that had just taken it back), the lock is taken
    again on the same connection (nobody else could take it meanwhile); lost with its
    connection, the heartbeat fails, reconnects and takes it on the new one.  Each time a term
    follows at the next tick."""
    a, _ = two
    member = ClusterMember(
        dsn,
        ClusterSettings(instance_name="dsc-beating", heartbeat_seconds=0.2, lease_seconds=60),
        address=lambda: "http://127.0.0.1:1/ScanServer",
    )
    member.start()
    try:
        term = LeaderTerm(member.id, a.take_lead, lock_lost=member.lock_lost)

        def next_term() -> NewTerm | str | None:
            term.refused()  # as an announcement refused makes it ask again
            change = term.change(member.holds_lock)
            if change is not None:
                term.apply(change)
            return change

        def holders() -> list[int]:
            """The backends that hold the leader's lock (pg_locks)."""
            with psycopg.connect(dsn) as conn:
                found = conn.execute(
                    "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.objid = %s",
                    (LEADER_LOCK,),
                ).fetchall()
            return [int(pid) for (pid,) in found]

        assert next_term() == NewTerm(RepositoryState.IDLE, 1)
        [holder] = holders()
        member.lock_lost()
        wait_for(lambda: member.holds_lock, what="the lock taken again at the next heartbeat")
        assert holders() == [holder]
        assert next_term() == NewTerm(RepositoryState.IDLE, 2)
        lose_the_lock(dsn, member)
        wait_for(
            lambda: member.holds_lock and holders() not in ([], [holder]),
            what="the lock taken on a new connection",
        )
        assert next_term() == NewTerm(RepositoryState.IDLE, 3)
    finally:
        member.stop()


def test_is_now_the_leader_is_logged_once_a_term_is_taken_not_with_the_lock(
    two: tuple[PostgresRecords, ...],
    dsn: str,
    members: Members,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Holding the lock is not leading (runtime/announcing.py): "is now the leader" is logged
    when the term is taken.  While the database refuses the statement that takes one (its
    table renamed away), each attempt is one WARNING line saying what it means and what to do,
    nothing says the instance leads, and its row says it fails (not that it is taking the
    lead, as one that has not tried yet: test_an_instance_is_shown_as_the_leader_only_...)."""
    caplog.set_level(logging.DEBUG, logger="dsc.cluster")
    a, _ = two
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("ALTER TABLE repository_announced RENAME TO repository_announced_away")
    holder = members()
    assert holder.holds_lock
    term = LeaderTerm(holder.id, a.take_lead, name=lambda: holder.name)
    holder.core_leads = lambda: term.current is not None
    holder.term_failing = lambda: term.failing

    def shown() -> tuple[str, object]:
        """What ``dsc cluster status`` and /api/cluster show of the holder."""
        holder.publish_leading()  # as the ticker does after each attempt
        with psycopg.connect(dsn) as conn:
            [row] = [r for r in list_instances(conn) if r.id == holder.id]
        return row.leadership, holder.as_json()["leadership"]

    assert not term.failing
    assert shown() == (TAKING_THE_LEAD, TAKING_THE_LEAD)  # nothing tried yet
    assert term.change(True) is None
    assert term.change(True) is None
    assert term.failing
    stuck = f"{LOCK_WITHOUT_TERM}: {NO_TERM}"
    assert shown() == (stuck, stuck)

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "dsc.cluster" and r.levelno >= logging.INFO]

    assert not [r for r in said() if "is now the leader" in r.getMessage()], said()
    warnings = [r for r in said() if r.levelno == logging.WARNING]
    assert len(warnings) == 2, said()
    line = warnings[0].getMessage()
    assert "\n" not in line
    assert line.startswith(
        f"cluster: {holder.name} ({holder.id}) holds the leader's lock but cannot take the "
        "lead for announcements: "
    ), line
    assert "repository_announced" in line  # the database's own words: what failed
    assert "it does not lead meanwhile (no repository state announcements" in line, line
    assert line.endswith("make the database answer this statement"), line

    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("ALTER TABLE repository_announced_away RENAME TO repository_announced")
    caplog.clear()
    change = term.change(True)
    assert change == NewTerm(RepositoryState.IDLE, 1)
    assert [r.getMessage() for r in said()] == [
        f"cluster: {holder.name} ({holder.id}) is now the leader, announcing the repository "
        "state (term 1)"
    ]
    term.apply(change)
    assert not term.failing
    assert shown() == (LEADER, LEADER)


def test_an_instance_is_shown_as_the_leader_only_once_it_took_a_term(
    tmp_path: Path,
    two: tuple[PostgresRecords, ...],
    dsn: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between taking the leader's lock and taking a term an instance does not lead
    (runtime/announcing.py), and nothing may show it as the leader: its row (``dsc cluster
    status``), its own view (/api/cluster, /status.json, /metrics: ``ClusterMember.leads``).
    A real ScanService starts here while another transaction holds the row its term is taken
    in (as a term another instance takes at the same moment would), so it holds the lock and
    waits for its term; its heartbeat is an hour apart, so the row says what its first beat
    wrote.  Its core led by default until told to follow, and that beat wrote ``leads`` true
    before the start told it.  Nothing failed meanwhile: it is shown taking the lead, not as
    a holder that cannot take a term, and logs nothing of the kind (the failure's wording:
    test_is_now_the_leader_is_logged_once_a_term_is_taken_not_with_the_lock).  Once the term
    is taken, every view shows the leader."""
    caplog.set_level(logging.DEBUG, logger="dsc")
    # Its take waits for the row for as long as the test holds it (not failing after a few
    # seconds: test_a_take_of_a_term_held_up_by_another_transaction_fails_...).
    monkeypatch.setattr("dsc_bindings.store.postgresql.TAKE_LEAD_LOCK_WAIT_SECONDS", 600.0)
    service = lone_instance(tmp_path, dsn)
    taking = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO repository_announced%'"
    )
    with psycopg.connect(dsn) as holder:
        holder.execute(
            "INSERT INTO repository_announced (id, state, leader, term) "
            "VALUES (1, 'Idle', 'another', 1)"
        )
        starting = threading.Thread(target=service.start)
        starting.start()
        with psycopg.connect(dsn, autocommit=True) as watcher:

            def waits_for_its_term() -> bool:
                row = watcher.execute(taking).fetchone()
                return row is not None and row[0] == 1

            wait_for(waits_for_its_term, what="the service's take of a term to wait")
            [row] = list_instances(watcher)
            config = tmp_path / "dsc.toml"
            config.write_text(store_section(dsn))
            assert main(["cluster", "status", "--config", str(config)]) == 0
            table = capsys.readouterr().out
        cluster = service.cluster
        assert cluster is not None
        shown = cluster.as_json()
        holder.commit()
    starting.join(30)
    try:
        assert (row.leader_lock, row.leader, row.leadership, row.leadership_label) == (
            True,
            False,
            TAKING_THE_LEAD,
            TAKING_THE_LEAD,
        ), row
        assert (
            shown["leader_lock"],
            shown["leader"],
            shown["leadership"],
            shown["term_failing"],
        ) == (True, False, TAKING_THE_LEAD, False), shown
        assert f" up {TAKING_THE_LEAD} 0 " in " ".join(table.split()), table
        assert "leader: none" in table and "does not lead" not in table, table
        said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "dsc.cluster"]
        assert not [m for level, m in said if level >= logging.WARNING or "cannot" in m], said
        with psycopg.connect(dsn) as conn:
            [row] = list_instances(conn)
        assert (row.leader, row.leadership) == (True, LEADER), row
        assert cluster.as_json()["leadership"] == LEADER and service.leads
    finally:
        service.shutdown(5.0)


#: The heartbeat of a server of schema 15 to 17 (runtime/cluster.py then): it says whether it
#: leads, and nothing of a failure to take a term.
HEARTBEAT_OF_SCHEMA_17 = (
    "UPDATE instances SET heartbeat = now(), name = %s, address = %s, leads = %s WHERE id = %s"
)


def test_cluster_status_on_a_schema_older_than_it_says_what_to_do(
    dsn: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A rolling upgrade begins with the new ``dsc`` installed while the servers of the
    earlier version still run on their schema: ``dsc cluster status`` reads columns that
    schema lacks.  It answered the database's words (``column i.term_failing does not
    exist``); it says which schema the database has, which it needs, and what to do."""
    database_of_schema(dsn, 17)
    with psycopg.connect(dsn, autocommit=True) as earlier:
        earlier.execute(
            INSERT,
            (str(uuid.uuid4()), "dsc-17", "http://127.0.0.1:1/ScanServer", "host", 17, 60, "h"),
        )
    config = tmp_path / "dsc.toml"
    config.write_text(store_section(dsn))
    assert main(["cluster", "status", "--config", str(config)]) != 0
    said = capsys.readouterr()
    assert said.out == "", said.out
    assert f"schema 17, older than this dsc ({SCHEMA_VERSION})" in said.err, said.err
    assert f"dsc db upgrade --config {config}" in said.err, said.err
    assert "does not exist" not in said.err, said.err


@pytest.mark.parametrize("schema", [17, 18])
def test_a_holder_of_an_earlier_version_without_a_term_is_shown_as_it_showed_itself(
    dsn: str, schema: int, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A rolling upgrade: a server of schema 17 still runs, holds the leader's lock and writes
    ``leads`` false (it cannot take a term, or is about to: it does not say which), while a
    server of this version upgrades the database and reads the rows.  The earlier server's row
    says nothing of ``term_failing`` (store/instances.py): it must not be read as "nothing
    failed", which would show a holder stuck for good as ``taking the lead``, with no line
    under ``dsc cluster status``'s table, where that server's own views show the failure; it
    is shown as they show it.  From schema 18 too (its column said false for such a row)."""
    database_of_schema(dsn, schema)
    with psycopg.connect(dsn, autocommit=True) as earlier:
        ident = "00000000-0000-0000-0000-000000000017"
        earlier.execute(
            INSERT,
            (ident, "dsc-17", "http://127.0.0.1:1/ScanServer", "host", 17, 60, "host:/data"),
        )
        assert earlier.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
        earlier.execute(
            HEARTBEAT_OF_SCHEMA_17, ("dsc-17", "http://127.0.0.1:1/ScanServer", False, ident)
        )
        with psycopg.connect(dsn) as upgrading:
            assert upgrade(upgrading) == (schema, SCHEMA_VERSION)
        # It goes on beating as it did, on the upgraded schema.
        earlier.execute(
            HEARTBEAT_OF_SCHEMA_17, ("dsc-17", "http://127.0.0.1:1/ScanServer", False, ident)
        )
        with psycopg.connect(dsn) as conn:
            [row] = list_instances(conn)
        stuck = f"{LOCK_WITHOUT_TERM}: {NO_TERM}"
        assert (row.leader_lock, row.leader, row.leadership, row.leadership_label) == (
            True,
            False,
            stuck,
            LOCK_WITHOUT_TERM,
        ), row
        config = tmp_path / "dsc.toml"
        config.write_text(store_section(dsn))
        assert main(["cluster", "status", "--config", str(config)]) == 0
        table = capsys.readouterr().out
        assert f" up {LOCK_WITHOUT_TERM} 0 " in " ".join(table.split()), table
        assert "dsc-17 holds the leader's lock but does not lead: " in table, table


def test_a_take_of_a_term_held_up_by_another_transaction_fails_and_is_shown_failing(
    two: tuple[PostgresRecords, ...],
    dsn: str,
    members: Members,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Taking a term writes the row of the term (store/postgresql.py ``_TAKE_LEAD``); another
    transaction holding that row (one left open, or a leader's stuck in flight) made the take
    wait for as long as it stayed open: the ticker hung in it, and the holder, whose last
    attempt never ended, was shown ``taking the lead`` for good, no WARNING, no
    ``dsc_cluster_term_failing``, while nobody led.  The take gives up after
    ``take_lead_lock_wait`` seconds: a failure like any other (runtime/announcing.py), logged
    and shown, and the next tick tries again."""
    caplog.set_level(logging.DEBUG, logger="dsc.cluster")
    a, _ = two
    a.take_lead_lock_wait = 0.2
    holder = members()
    assert holder.holds_lock
    term = LeaderTerm(holder.id, a.take_lead, name=lambda: holder.name)
    holder.core_leads = lambda: term.current is not None
    holder.term_failing = lambda: term.failing
    answered: list[NewTerm | str | None] = []
    with psycopg.connect(dsn) as blocking:
        blocking.execute(
            "INSERT INTO repository_announced (id, state, leader, term) "
            "VALUES (1, 'Idle', 'another', 1)"
        )
        taking = threading.Thread(target=lambda: answered.append(term.change(True)), daemon=True)
        taking.start()
        taking.join(60)  # a bound on a hang, not a time asserted: it answers at once
        assert answered == [None], "the take of a term waits for the transaction for good"
        assert term.failing
        holder.publish_leading()
        with psycopg.connect(dsn) as conn:
            [row] = [r for r in list_instances(conn) if r.id == holder.id]
        stuck = f"{LOCK_WITHOUT_TERM}: {NO_TERM}"
        assert (row.leadership, holder.as_json()["leadership"]) == (stuck, stuck), row
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "cannot take the lead for announcements" in warning.getMessage(), warning
        assert "lock timeout" in warning.getMessage(), warning.getMessage()
    assert term.change(True) == NewTerm(RepositoryState.IDLE, 2)
    assert not term.failing


def test_the_view_of_this_instance_is_of_one_moment(members: Members) -> None:
    """``ClusterMember.as_json`` (/api/cluster, /status.json) read whether the core leads and
    whether the last try for a term failed once per field, while the ticker changes them: one
    answer could mix two moments ("lock held, not leading: cannot take a term" beside
    ``term_failing`` false).  Here each read answers the other way, as a ticker between two
    reads would: every field of one answer is of one reading."""
    holder = members()
    assert holder.holds_lock
    reads = itertools.count()
    holder.core_leads = lambda: False
    holder.term_failing = lambda: next(reads) % 2 == 0
    for _ in range(4):
        shown = holder.as_json()
        standing = Leadership(
            leads=bool(shown["leader"]),
            holds_lock=bool(shown["leader_lock"]),
            term_failing=bool(shown["term_failing"]),
        )
        assert (shown["leadership"], shown["fails_to_lead"]) == (
            standing.shown,
            standing.fails_to_lead,
        ), shown


def cluster_gauges(member: ClusterMember) -> dict[str, float]:
    """The leadership gauges of /metrics for ``member``."""
    gauges = ClusterGauges()
    gauges.update(member)
    names = ("dsc_cluster_leader", "dsc_cluster_leader_lock", "dsc_cluster_term_failing")
    return {m.name: m.samples[0].value for m in gauges.collect() if m.name in names}


def test_the_term_failing_gauge_follows_the_rule_not_the_flag(members: Members) -> None:
    """``dsc_cluster_term_failing`` read the term's flag (``LeaderTerm.failing``), which stays
    set until the ticker's next attempt: a holder whose attempt failed, then whose heartbeat
    failed (the lock is lost: it does not hold it from then on), stayed 1 there for a tick
    while ``dsc cluster status``, /api/cluster and the console showed it holding nothing.  The
    gauge, the label and the JSON follow one rule (store/instances.py ``Leadership``)."""
    holder = members()
    assert holder.holds_lock
    holder.core_leads = lambda: False
    holder.term_failing = lambda: True  # its last attempt failed; the ticker has not run since
    stuck = f"{LOCK_WITHOUT_TERM}: {NO_TERM}"
    assert cluster_gauges(holder) == {
        "dsc_cluster_leader": 0,
        "dsc_cluster_leader_lock": 1,
        "dsc_cluster_term_failing": 1,
    }
    assert (holder.as_json()["leadership"], holder.as_json()["fails_to_lead"]) == (stuck, True)
    holder.lock_lost()  # as a failed heartbeat drops it: the flag stays until the next tick
    assert cluster_gauges(holder) == {
        "dsc_cluster_leader": 0,
        "dsc_cluster_leader_lock": 0,
        "dsc_cluster_term_failing": 0,
    }
    assert (holder.as_json()["leadership"], holder.as_json()["fails_to_lead"]) == ("", False)


def test_an_instance_that_takes_the_lock_from_a_stopped_leader_is_shown_taking_the_lead(
    two: tuple[PostgresRecords, ...],
    dsn: str,
    members: Members,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The takeover, not the start: an instance up as a follower takes the leader's lock at a
    heartbeat after the leader stopped; its term comes at its next tick.  Until then nothing
    failed: every view shows it ``taking the lead`` (its row in ``dsc cluster status``, with no
    "does not lead" line, /api/cluster, /metrics: dsc_cluster_term_failing 0), and once its
    term is taken, the leader."""
    a, b = two
    leader = members()
    assert leader.holds_lock
    first = LeaderTerm(leader.id, a.take_lead)
    taken = first.change(True)
    assert taken == NewTerm(RepositoryState.IDLE, 1)
    first.apply(taken)
    follower = ClusterMember(
        dsn,
        ClusterSettings(instance_name="dsc-b", heartbeat_seconds=0.1, lease_seconds=7200),
        address=lambda: "http://127.0.0.1:2/ScanServer",
    )
    follower.start()
    try:
        term = LeaderTerm(follower.id, b.take_lead, name=lambda: follower.name)
        follower.core_leads = lambda: term.current is not None
        follower.term_failing = lambda: term.failing
        assert not follower.holds_lock
        leader.stop()
        wait_for(lambda: follower.holds_lock, what="the follower to take the lock at a beat")
        follower.publish_leading()  # as the ticker does
        shown = follower.as_json()
        assert (shown["leader"], shown["leader_lock"], shown["leadership"]) == (
            False,
            True,
            TAKING_THE_LEAD,
        ), shown
        assert shown["fails_to_lead"] is False, shown
        assert cluster_gauges(follower)["dsc_cluster_term_failing"] == 0
        with psycopg.connect(dsn) as conn:
            [row] = [r for r in list_instances(conn) if r.id == follower.id]
        assert (row.leader_lock, row.leader, row.leadership) == (True, False, TAKING_THE_LEAD)
        config = tmp_path / "dsc.toml"
        config.write_text(store_section(dsn))
        assert main(["cluster", "status", "--config", str(config)]) == 0
        table = capsys.readouterr().out
        assert f" up {TAKING_THE_LEAD} 0 " in " ".join(table.split()), table
        assert "does not lead" not in table, table

        change = term.change(True)  # its next tick
        assert change == NewTerm(RepositoryState.IDLE, 2)
        term.apply(change)
        follower.publish_leading()
        assert follower.as_json()["leadership"] == LEADER
        with psycopg.connect(dsn) as conn:
            [row] = [r for r in list_instances(conn) if r.id == follower.id]
        assert (row.leader, row.leadership) == (True, LEADER), row
    finally:
        follower.stop()


def test_a_row_of_the_term_held_by_another_transaction_does_not_hold_the_ticker(
    tmp_path: Path, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another transaction holds the row of the term (one left open, another instance's take
    in flight) while a real ScanService holds the leader's lock and has no term.  Its take
    waited for the row up to TAKE_LEAD_LOCK_WAIT_SECONDS (5 s), in the ticker: measured, a
    refused leader then ticked once in 6 s where it ticks each second, shown leading the
    while, its row and views not written.  Now the take locks the row without waiting
    (store/postgresql.py ``_TERM_ROW_NOWAIT``): each tick's attempt ends at once, a failure
    to take a term (the WARNING, shown failing) once the row stayed held past
    runtime/announcing.py ``TERM_ROW_BUSY_SECONDS`` (before, contention: a DEBUG line), and the
    tick after the row is free takes the term.  The test counts the ticker's attempts while a
    watcher looks for a take of this database waiting on a lock: before, the first attempt
    waited (seen)."""
    caplog.set_level(logging.DEBUG, logger="dsc.cluster")
    with psycopg.connect(dsn, autocommit=True) as admin:
        upgrade(admin)
        admin.execute(
            "INSERT INTO repository_announced (id, state, leader, term) "
            "VALUES (1, 'Idle', 'another', 1)"
        )
    service = lone_instance(tmp_path, dsn)
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE '%repository_announced%'"
    )
    seen_waiting: list[int] = []
    held = threading.Event()

    def watch() -> None:
        with psycopg.connect(dsn, autocommit=True) as watcher:
            while not held.wait(0.01):
                row = watcher.execute(waiting).fetchone()
                if row is not None and row[0]:
                    seen_waiting.append(int(row[0]))

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if "cannot take the lead" in r.getMessage()]

    def attempts() -> int:
        busy = sum("waits for the row of the term" in r.getMessage() for r in caplog.records)
        return busy + len(failures())

    watching = threading.Thread(target=watch, daemon=True)
    with psycopg.connect(dsn) as holder:
        holder.execute("UPDATE repository_announced SET changed = now() WHERE id = 1")
        watching.start()
        try:
            service.start()  # takes the lock; its first attempt fails, the ticker tries again
            cluster = service.cluster
            assert cluster is not None and cluster.holds_lock
            wait_for(
                lambda: attempts() >= 3 and failures() != [],
                timeout=60,
                what="three attempts of the ticker, the row held past the grace",
            )
            assert not service.leads
            assert cluster.as_json()["fails_to_lead"] is True
            [first, *_] = failures()
            assert "could not obtain lock on row" in first, first
        finally:
            held.set()
            watching.join(30)
        assert seen_waiting == [], "a take of a term waited for the row in the ticker"
        holder.rollback()
    try:
        wait_for(lambda: service.leads, what="the term, at the tick after the row is free")
        cluster.publish_leading()
        assert cluster.as_json()["leadership"] == LEADER
    finally:
        service.shutdown(5.0)


def test_a_row_of_the_term_busy_for_a_moment_is_no_failure_until_it_stays_busy(
    two: tuple[PostgresRecords, ...],
    dsn: str,
    members: Members,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ordinary contention: the row of the term is held a moment by another transaction (a
    leader's announcement in flight as its successor takes a term, this leader's own writer
    as its ticker takes a new term after a refusal, the last instance's Stopped as another
    starts).  The take locks the row NOWAIT (store/postgresql.py ``_TERM_ROW_NOWAIT``) and
    counted that as a failure to take a term: a WARNING and the failure colour,
    ``dsc_cluster_term_failing`` 1, for a moment nothing failed in, an operator paged for
    it.  A busy row is no failure until it stays busy past
    ``TERM_ROW_BUSY_SECONDS`` (runtime/announcing.py: a transaction left open): meanwhile
    the holder follows, shown taking the lead, and tries again at each tick.  The clock is
    the test's: no time is waited nor asserted."""
    caplog.set_level(logging.DEBUG, logger="dsc.cluster")
    a, _ = two
    holder = members()
    assert holder.holds_lock
    now = [0.0]
    term = LeaderTerm(holder.id, a.take_lead, name=lambda: holder.name, clock=lambda: now[0])
    holder.core_leads = lambda: term.current is not None
    holder.term_failing = lambda: term.failing
    taken = term.change(True)
    assert taken == NewTerm(RepositoryState.IDLE, 1)
    term.apply(taken)
    term.refused()  # an announcement of term 1 was not written: a new term at the next tick

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    with psycopg.connect(dsn) as busy:
        busy.execute("UPDATE repository_announced SET changed = now() WHERE id = 1")
        assert term.change(True) == FOLLOW  # no term meanwhile: its core follows
        term.apply(FOLLOW)
        now[0] += TERM_ROW_BUSY_SECONDS / 2
        assert term.change(True) is None  # still busy, still following
        assert not term.failing
        assert warnings() == []
        holder.publish_leading()
        assert (holder.as_json()["leadership"], holder.as_json()["fails_to_lead"]) == (
            TAKING_THE_LEAD,
            False,
        )
        assert cluster_gauges(holder)["dsc_cluster_term_failing"] == 0
        busy.rollback()
    taken = term.change(True)  # the row is free: the next tick takes the term
    assert taken == NewTerm(RepositoryState.IDLE, 2)
    term.apply(taken)
    assert warnings() == []

    # Busy for good (a psql session left open): a failure once it stayed busy past the grace,
    # counted from the first busy attempt of the run, not from a moment of an earlier one.
    term.refused()
    with psycopg.connect(dsn) as left_open:
        left_open.execute("UPDATE repository_announced SET changed = now() WHERE id = 1")
        assert term.change(True) == FOLLOW
        term.apply(FOLLOW)
        assert not term.failing and warnings() == []
        now[0] += TERM_ROW_BUSY_SECONDS
        assert term.change(True) is None
        assert term.failing
        [warning] = warnings()
        assert "cannot take the lead for announcements" in warning, warning
        assert "could not obtain lock on row" in warning, warning
        # What to do about a row held for good: end the transaction that holds it (not "make
        # the database answer this statement", which it does).
        assert "end the transaction that holds it" in warning, warning
        assert "pg_stat_activity" in warning, warning
        assert cluster_gauges(holder)["dsc_cluster_term_failing"] == 1
        left_open.rollback()
    assert term.change(True) == NewTerm(RepositoryState.IDLE, 3)
    assert not term.failing
