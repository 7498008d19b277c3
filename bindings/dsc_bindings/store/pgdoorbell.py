"""The job feed's doorbell (issue 18, cluster-design lesson 3): ``LISTEN dsc_jobs`` on a
connection of its own, in a thread of its own.

Every change of a job row, a tombstone or an ``uploads`` row sends ``NOTIFY dsc_jobs`` from
the transaction that made it (a trigger, postgresql.py schema 8), so a notification arrives
only after its change committed, and never for a change rolled back.  The doorbell is only a
hint that the feed (``PostgresRecords.changes``) has something: the payload names the job,
never its record (NOTIFY refuses payloads of 8,000 bytes).  ``<token>:claimable`` (schema 12)
is no change of the record: a job waiting for an engine that nobody holds, which an instance
with a free engine place claims (runtime/leasing.py).

A notification is lost while nobody listens (the connection dropped, PostgreSQL restarting),
so the listener reports its state: ``heard(False)`` when the connection is lost (the runtime
then reads the feed before every request, as without a doorbell), ``heard(True)`` once
``LISTEN`` is in place again (the runtime's next read is a full catch-up: everything committed
before that moment is in the feed, everything after rings).  It reconnects by itself, backing
off up to :data:`RECONNECT_MAX_SECONDS`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.interface import Rang

__all__ = ["CHANNEL", "RECONNECT_MAX_SECONDS", "PgDoorbell", "parse_ring"]

log = logging.getLogger("dsc.store")

#: The channel every job change is announced on (postgresql.py, schema 8).
CHANNEL = "dsc_jobs"
#: The listener waits at most this long between reconnection attempts.
RECONNECT_MAX_SECONDS = 2.0
#: How often the listening thread looks up from the socket (to stop when asked).
_POLL_SECONDS = 0.5


def parse_ring(payload: str) -> Rang | None:
    """A notification's payload (postgresql.py's trigger), None for one this server does not
    know (a newer server's: the runtime reads the feed, the safe side)."""
    token, sep, what = payload.rpartition(":")
    if not sep or not token:
        return None
    if what.isdigit():
        return Rang(token, version=int(what))
    if what == "dropped":
        return Rang(token, dropped=True)
    if what.startswith("upload."):
        return Rang(token, upload_instance=what.removeprefix("upload."))
    if what == "claimable":
        return Rang(token, claimable=True)
    return None


class PgDoorbell:
    """Listens on :data:`CHANNEL` (module doc): ``ring`` gets each notification (None: one
    it does not understand), ``heard`` the listening state; both are called in this
    listener's thread."""

    def __init__(
        self,
        dsn: str,
        connect_kwargs: Callable[[], dict[str, Any]],
        ring: Callable[[Rang | None], None],
        heard: Callable[[bool], None],
    ) -> None:
        self._dsn = dsn
        self._connect_kwargs = connect_kwargs
        self._ring = ring
        self._heard = heard
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsc-doorbell", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(_POLL_SECONDS * 4)

    def _run(self) -> None:
        backoff = 0.1
        failed_before = False
        while not self._stop.is_set():
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = psycopg.connect(self._dsn, **self._connect_kwargs())
                conn.execute(f"LISTEN {CHANNEL}")  # our own constant name
                if failed_before:
                    log.info("listening to the job doorbell again: catching up in full")
                failed_before = False
                backoff = 0.1
                self._heard(True)
                while not self._stop.is_set():
                    for notification in conn.notifies(timeout=_POLL_SECONDS):
                        self._ring(parse_ring(notification.payload))
            except (psycopg.Error, OSError, StoreError) as exc:
                self._heard(False)
                if not failed_before:
                    log.warning(
                        "the job doorbell is not heard (%s): every request reads what other "
                        "instances changed until it is back",
                        str(exc).strip() or type(exc).__name__,
                    )
                failed_before = True
            except Exception:  # a bug must not silence the doorbell for the rest of the run
                self._heard(False)
                log.exception("the job doorbell failed")
                failed_before = True
            finally:
                if conn is not None:
                    conn.close()
            self._stop.wait(backoff)
            backoff = min(RECONNECT_MAX_SECONDS, backoff * 2)
        self._heard(False)
