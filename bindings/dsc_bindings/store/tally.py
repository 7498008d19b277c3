"""The counters the status page shows, kept across restarts (issue 14 §3).

Prometheus counters (``/metrics``) start at zero with every process, as Prometheus expects;
the page shows totals an administrator can read after a restart, so they live in a table of
the job store's SQLite file, beside the device book (.devices), through their own connection:

    counters     name -> value (jobs created, images, bytes, jobs ended per outcome, failed
                 scan deliveries, failed event deliveries)

Every :meth:`Tally.add` is one autocommit statement; ``synchronous=NORMAL`` (WAL) because a
counter that misses its last increment after a power cut is not worth a second fsync per image.
The page reads the copy in memory (:meth:`Tally.values`): no disk read on the event loop.

With ``[store] kind = "postgresql"`` the counters are the database's (.pgtally, issue 17),
shared by every instance on it; :func:`open_tally` picks.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from dsc_bindings.store.backends import StorageSettings
from dsc_bindings.store.sqlite import DB_NAME
from dsc_core.outcomes import ENDED_OUTCOMES, JobOutcome

__all__ = [
    "BYTES_RECEIVED",
    "DELIVERY_FAILURES",
    "EVENT_DELIVERY_FAILURES",
    "IMAGES_RECEIVED",
    "JOBS_CREATED",
    "NAMES",
    "Tally",
    "ended",
    "open_tally",
    "sqlite_counters",
]

log = logging.getLogger("dsc.observe")

JOBS_CREATED = "jobs_created"
IMAGES_RECEIVED = "images_received"
BYTES_RECEIVED = "bytes_received"
#: Filter runs that could not deliver a job's documents (a share, a relay, a site refused).
DELIVERY_FAILURES = "delivery_failures"
#: WS-Eventing notifications a subscriber did not accept (R7).
EVENT_DELIVERY_FAILURES = "event_delivery_failures"

_SCHEMA = """CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
)"""


def ended(outcome: JobOutcome) -> str:
    """The counter of jobs that ended with ``outcome``."""
    return f"jobs_ended_{outcome.value}"


NAMES = (
    JOBS_CREATED,
    IMAGES_RECEIVED,
    BYTES_RECEIVED,
    DELIVERY_FAILURES,
    EVENT_DELIVERY_FAILURES,
    *(ended(o) for o in ENDED_OUTCOMES),
)


def open_tally(data_dir: Path, storage: StorageSettings) -> Tally:
    """The counters where ``storage`` keeps the server's state (the composition's choice)."""
    if storage.store_kind == "postgresql":
        from dsc_bindings.store.pgtally import PostgresTally

        return PostgresTally.open(storage.dsn, password_file=storage.password_file)
    return Tally(data_dir)


def sqlite_counters(data_dir: Path) -> dict[str, int]:
    """The counters in the data folder's SQLite file, read only ({} when it has none)."""
    conn = sqlite3.connect(f"file:{Path(data_dir) / DB_NAME}?mode=ro", uri=True)
    try:
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master")}
        if "counters" not in tables:
            return {}
        return {str(n): int(v) for n, v in conn.execute("SELECT name, value FROM counters")}
    finally:
        conn.close()


class Tally:
    """Named counters, durable when given a data directory (in memory only without one)."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(NAMES, 0)
        self._conn: sqlite3.Connection | None = None
        if data_dir is None:
            return
        conn = sqlite3.connect(
            Path(data_dir) / DB_NAME, timeout=5.0, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(_SCHEMA)
        for name, value in conn.execute("SELECT name, value FROM counters"):
            if name in self._values:
                self._values[name] = int(value)
        self._conn = conn

    def add(self, name: str, amount: int = 1) -> None:
        if name not in self._values:
            raise KeyError(f"no counter {name!r}")
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute(
                        "INSERT INTO counters (name, value) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                        (name, amount),
                    )
                except sqlite3.Error as exc:  # shown, not fatal: the page's count is off by one
                    log.error("counter %s not kept: %s", name, exc)
            self._values[name] += amount

    def values(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
