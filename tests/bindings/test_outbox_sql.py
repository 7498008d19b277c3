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

from dsc_bindings.store.errors import JobChanged
from dsc_bindings.store.interface import VersionedWrite
from dsc_bindings.store.postgresql import PostgresRecords
from dsc_bindings.store.subcodec import decode_subscription, encode_subscription
from dsc_core.commands import CreateJob, Deliver, JobInput, UpdateJob
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
