"""A start that waits for ANOTHER server's schema upgrade (store/postgresql.py ``upgrade``,
the advisory upgrade lock) on a real PostgreSQL: a long, legitimate migration does not make it
give up early, but while it waits it says who holds the lock and for how long, and after a
generous bound it gives up saying what to do.  Without it the wait was silent and endless."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import psycopg
import pytest

from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.postgresql import SCHEMA_VERSION, upgrade
from waiting import wait_for

#: The name the other server's session shows in pg_stat_activity while it upgrades.
OTHER = "dsc schema upgrade of another server"


@pytest.fixture
def other_upgrading(dsn: str) -> Iterator[tuple[psycopg.Connection[object], int]]:
    """Another server's upgrade under way: its session holds the upgrade lock in an open
    transaction (as upgrade() does while its migrations run); its connection and pid."""
    from dsc_bindings.store.postgresql import _UPGRADE_LOCK

    with psycopg.connect(dsn, application_name=OTHER) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
        [(pid,)] = other.execute("SELECT pg_backend_pid()").fetchall()
        yield other, pid
        other.rollback()


def test_a_start_waits_for_another_servers_upgrade_saying_who_holds_it(
    dsn: str,
    other_upgrading: tuple[psycopg.Connection[object], int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    other, pid = other_upgrading
    outcome: list[tuple[int, int] | BaseException] = []

    def start() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                outcome.append(upgrade(conn, report_every=0.2))
            except BaseException as exc:  # the thread's outcome is the test's: kept
                outcome.append(exc)

    with caplog.at_level("WARNING", logger="dsc.store"):
        starting = threading.Thread(target=start)
        starting.start()
        try:
            said = wait_for(
                lambda: [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()][1:],
                what="two WARNINGs of the wait",
            )
        finally:
            assert outcome == [], outcome  # still waiting: it did not give up
            other.rollback()  # the other server's upgrade ends
            starting.join()
    assert outcome == [(0, SCHEMA_VERSION)]
    first = said[0]
    assert first.startswith("waiting "), first
    assert "s so far for another server's schema upgrade of the job store (held by pid " in first
    assert f"pid {pid} ({OTHER}, from " in first, first
    assert ", idle in transaction, its transaction open for " in first, first
    assert first.endswith("this server starts once it is done (it gives up after 1800 s)"), first


def test_a_start_gives_up_after_its_bound_naming_the_upgrade_it_waited_for(
    dsn: str, other_upgrading: tuple[psycopg.Connection[object], int]
) -> None:
    _, pid = other_upgrading
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(StoreError) as gave_up:
            upgrade(conn, upgrade_wait=0.5, report_every=0.2)
        assert conn.execute("SELECT to_regclass('dsc_schema')").fetchone() == (None,)
    message = gave_up.value.message
    assert not gave_up.value.temporary
    assert "\n" not in message
    assert message.startswith("upgrading the job store schema: waited "), message
    assert f"for another server's schema upgrade to end (held by pid {pid} ({OTHER}, " in message
    assert message.endswith(
        "if that upgrade still runs, start this server once it is done; if it is stuck, end "
        f"that session (SELECT pg_terminate_backend({pid})) and start this server again"
    ), message


def test_an_upgrading_session_names_itself_to_those_waiting_for_it(dsn: str) -> None:
    """The name the wait's WARNING shows is the upgrading server's own (``application_name``,
    set in its transaction): a real upgrade() from the schema before, held up by a lock on
    ``jobs`` so that it can be seen mid-upgrade.  The other tests name the holder themselves,
    so they passed without it."""
    from engines_support import database_of_schema

    database_of_schema(dsn, SCHEMA_VERSION - 1)
    outcome: list[tuple[int, int] | BaseException] = []

    def start() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                outcome.append(upgrade(conn, lock_wait=60.0))
            except BaseException as exc:  # the thread's outcome is the test's: kept
                outcome.append(exc)

    with psycopg.connect(dsn) as blocker, psycopg.connect(dsn, autocommit=True) as watcher:
        blocker.execute("LOCK TABLE jobs IN ROW SHARE MODE")  # the upgrade's lock waits
        upgrading = threading.Thread(target=start)
        upgrading.start()
        try:
            names = wait_for(
                lambda: [
                    name
                    for (name,) in watcher.execute(
                        "SELECT application_name FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    ).fetchall()
                ],
                what="the upgrade waiting for the lock on jobs",
            )
        finally:
            blocker.rollback()
            upgrading.join()
    assert outcome == [(SCHEMA_VERSION - 1, SCHEMA_VERSION)]
    [name] = names
    said = f"dsc schema upgrade {SCHEMA_VERSION - 1} -> {SCHEMA_VERSION} "
    assert name == f"{said}(host {socket.gethostname()}, pid {os.getpid()})"[:63], name
