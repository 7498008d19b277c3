"""The outbox's delivery side in PostgreSQL (issue 18 point 3, docs/architecture.md "Several
instances"): which instance sends a subscription's notifications, and the doorbell.

Each subscription has one delivery owner at a time: a lease on its row (``delivery_owner``,
``delivery_until`` in database time), claimed with ``FOR UPDATE SKIP LOCKED`` by any instance
(:meth:`OutboxRows.claim`; an owner renews its leases with the same statement, every poll).  A
subscription without an owner, or whose owner's lease ran out, is claimed once it has rows to
send.  The owner sends the rows in id order and deletes each once answered
(:meth:`OutboxRows.answered`); there is no cursor, so a row whose transaction committed late
with a lower id is sent when it appears.  A new owner starts from the rows left: only the one
in flight when the owner died (sent, answer not yet recorded) is sent twice, with the same
MessageID (the message is stored whole).

The doorbell is ``NOTIFY dsc_outbox`` with an empty payload, from the transaction that wrote the
rows (postgresql.py); it is only a hint (lost while nobody listens, cluster-design lesson 3), so
:meth:`OutboxRows.wait` also returns after its timeout, and at once after a (re)connect.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from dsc_bindings.store.errors import as_store_error

if TYPE_CHECKING:
    from dsc_bindings.store.postgresql import PgDatabase

__all__ = ["OutboxRow", "OutboxRows"]

log = logging.getLogger("dsc.delivery")

#: Renew the leases this instance holds and take the free or lapsed ones that have rows; then
#: the rows of every subscription it holds, oldest first.  One statement: one snapshot.
_CLAIM = """
    WITH mine AS (
        UPDATE subscriptions s SET delivery_owner = %(me)s,
            delivery_until = now() + make_interval(secs => %(lease)s)
        WHERE s.id IN (
            SELECT c.id FROM subscriptions c
            WHERE NOT c.ended AND c.expires > now()
              AND (c.delivery_owner = %(me)s
                   OR ((c.delivery_owner IS NULL OR c.delivery_until < now())
                       AND EXISTS (SELECT 1 FROM outbox o WHERE o.subscription_id = c.id)))
            FOR UPDATE SKIP LOCKED)
        RETURNING s.id)
    SELECT o.id, o.subscription_id, o.address, o.content_type, o.message
    FROM outbox o JOIN mine ON mine.id = o.subscription_id
    ORDER BY o.id
"""
#: Let the others take over at once (a clean stop), instead of after the lease.
_RELEASE = """
    UPDATE subscriptions SET delivery_owner = NULL, delivery_until = NULL
    WHERE delivery_owner = %s
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    subscription_id: str
    address: str
    content_type: str
    message: bytes


class OutboxRows:
    """The delivery owner's statements (on the store's pool) and the doorbell (a listening
    connection of its own, used by one thread).  Raises only StoreError."""

    def __init__(self, db: PgDatabase, dsn: str, password_file: Path | None) -> None:
        self._db = db
        self._dsn = dsn
        self._password_file = password_file
        self._listener: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def claim(self, me: str, lease_seconds: float) -> list[OutboxRow]:
        """Take or renew the leases (module doc); the rows to send of the subscriptions held."""
        found = self._db.run(
            "claiming subscriptions to deliver to", _CLAIM, {"me": me, "lease": lease_seconds}
        )
        return [OutboxRow(int(i), str(s), str(a), str(c), bytes(m)) for i, s, a, c, m in found]

    def answered(self, row_id: int) -> None:
        """The subscriber answered this row's message (or failed to, which the core counted)."""
        self._db.run("deleting a sent notification", "DELETE FROM outbox WHERE id = %s", (row_id,))

    def release(self, me: str) -> None:
        self._db.run("releasing delivery leases", _RELEASE, (me,))

    def wait(self, timeout: float) -> bool:
        """Until the doorbell rings or ``timeout`` passes; at once after (re)connecting (what
        rang meanwhile was lost: the caller reads the table again).  True when it rang or
        reconnected, False when the time passed."""
        from dsc_bindings.store.postgresql import connection_kwargs, is_temporary_pg

        with self._lock:
            try:
                if self._listener is None or self._listener.closed:
                    self._listener = psycopg.connect(
                        self._dsn, **connection_kwargs(self._password_file)
                    )
                    self._listener.execute("LISTEN dsc_outbox")
                    return True
                for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                    return True
                return False
            except psycopg.Error as exc:
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                raise as_store_error(
                    "listening for notifications", exc, is_temporary_pg(exc)
                ) from exc

    def close(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
