"""The devices that created jobs: client address, certificate identity, first and last contact,
job counts.  Durable: a table in the job store's SQLite file, kept across restarts.

A device is one (address, identity) pair: the client's IP address (without the port, which
changes with every connection) and the R10 identity of its TLS client certificate ("" without
one).  The book is written from the command writer's record lane, right after the job record it
belongs to (so it never blocks a request), through its own connection to the same database
file (WAL lets two connections share it; the job store keeps its own schema untouched).

Tables (created if missing)::

    devices      one row per device: first/last contact (ISO 8601 with offset), counters
    device_jobs  token -> device of every job not yet counted as ended, so that a job that
                 ends after a restart still counts for the device that created it

Bounded (issue 14 section 4): every client address that creates a job is a device, so without a
bound the book grows with every address a network ever used.  :class:`DeviceLimits` caps it
(``[devices] max_devices``: over the cap, the devices with the oldest last contact go) and keeps
a device only ``retention_days`` after its last contact.  Both are one indexed DELETE on
``last_contact_at`` (Unix seconds: the ISO text's offset changes with daylight saving time, so
the text does not sort by time), run where the book is written (the command writer's record
lane, on each job it records), when the book is opened at start, and hourly from the service's
ticker thread (so a device also goes while no job is created); never on the event loop.  A device removed while a
job of it is still active keeps that job's ``device_jobs`` row, and its end then counts for
nobody: the device had the oldest contact of all, so this needs a cap smaller than the jobs
in progress.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from dsc_bindings.settings import DeviceLimits
from dsc_bindings.store.sqlite import DB_NAME

__all__ = ["Device", "DeviceBook", "DeviceLimits"]

log = logging.getLogger("dsc.devices")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS devices (
        address       TEXT NOT NULL,
        identity      TEXT NOT NULL,            -- '' without a client certificate
        first_contact TEXT NOT NULL,
        last_contact  TEXT NOT NULL,
        jobs          INTEGER NOT NULL DEFAULT 0,
        completed     INTEGER NOT NULL DEFAULT 0,  -- ended Completed without errors
        failed        INTEGER NOT NULL DEFAULT 0,  -- Aborted, or Completed with errors
        canceled      INTEGER NOT NULL DEFAULT 0,
        last_contact_at REAL NOT NULL DEFAULT 0,  -- last_contact in Unix seconds (module doc)
        PRIMARY KEY (address, identity)
    )""",
    """CREATE TABLE IF NOT EXISTS device_jobs (
        token    TEXT PRIMARY KEY NOT NULL,
        address  TEXT NOT NULL,
        identity TEXT NOT NULL
    )""",
)


#: The index the cap and the retention delete by (module doc).
_INDEX = "CREATE INDEX IF NOT EXISTS devices_by_last_contact ON devices (last_contact_at)"

#: Over the cap: the ``?`` devices with the oldest last contact, in one statement.
_EVICT_OLDEST = """DELETE FROM devices WHERE rowid IN (
    SELECT rowid FROM devices ORDER BY last_contact_at LIMIT ?
) RETURNING address, identity"""

#: Past the retention: every device whose last contact is before ``?``.
_EXPIRE = "DELETE FROM devices WHERE last_contact_at < ? RETURNING address, identity"


@dataclass(frozen=True, slots=True)
class Device:
    address: str
    identity: str
    first_contact: str
    last_contact: str
    jobs: int
    completed: int
    failed: int
    canceled: int

    def as_dict(self) -> dict[str, object]:
        # Not dataclasses.asdict, which deep-copies every field: for a book at the default
        # cap (10,000 devices) that was 59 ms of /status.json on the event loop; this is 3.5.
        return {
            "address": self.address,
            "identity": self.identity,
            "first_contact": self.first_contact,
            "last_contact": self.last_contact,
            "jobs": self.jobs,
            "completed": self.completed,
            "failed": self.failed,
            "canceled": self.canceled,
        }


class DeviceBook:
    """The devices table, with a copy in memory (read by the status page on the event loop,
    which must not wait for the disk).  Thread-safe; every write is one committed
    transaction, and the copy changes only after it committed."""

    def __init__(self, data_dir: Path, limits: DeviceLimits | None = None) -> None:
        self.limits = limits or DeviceLimits()
        self._conn = sqlite3.connect(
            Path(data_dir) / DB_NAME, timeout=5.0, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            self._conn.execute(statement)
        self._add_last_contact_at()
        self._conn.execute(_INDEX)
        rows = self._conn.execute(
            "SELECT address, identity, first_contact, last_contact, jobs, completed, failed, "
            "canceled FROM devices ORDER BY last_contact_at"
        ).fetchall()
        #: Least recent contact first: a contact moves its device to the end, so the status
        #: page reads the most recent N without sorting the whole book (see :meth:`recent`).
        self._devices = {(r[0], r[1]): Device(*r) for r in rows}
        self._jobs = {
            str(r[0]): (str(r[1]), str(r[2]))
            for r in self._conn.execute("SELECT token, address, identity FROM device_jobs")
        }

    def _add_last_contact_at(self) -> None:
        """A book written before the cap and retention existed has no ``last_contact_at``:
        add it, computed from each row's ``last_contact`` (once)."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(devices)")}
        if "last_contact_at" in columns:
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(
                "ALTER TABLE devices ADD COLUMN last_contact_at REAL NOT NULL DEFAULT 0"
            )
            rows = self._conn.execute("SELECT rowid, last_contact FROM devices").fetchall()
            self._conn.executemany(
                "UPDATE devices SET last_contact_at = ? WHERE rowid = ?",
                [(_unix_time(stamp), rowid) for rowid, stamp in rows],
            )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def apply_limits(self, now: datetime) -> None:
        """The retention and the cap, now (at start: a book kept while the server was down,
        or under a larger cap, shrinks before anything shows it)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                expired, evicted = self._bound(now, None)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._forget(expired + evicted)
        self._log_removed(expired, evicted)

    def job_created(self, token: str, address: str, identity: str, when: datetime) -> None:
        stamp = when.isoformat()
        key = (address, identity)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    """INSERT INTO devices
                           (address, identity, first_contact, last_contact, last_contact_at, jobs)
                       VALUES (?, ?, ?, ?, ?, 1)
                       ON CONFLICT (address, identity) DO UPDATE SET
                           last_contact = excluded.last_contact,
                           last_contact_at = excluded.last_contact_at,
                           jobs = jobs + 1""",
                    (address, identity, stamp, stamp, when.timestamp()),
                )
                self._conn.execute(
                    "INSERT OR REPLACE INTO device_jobs (token, address, identity) VALUES (?, ?, ?)",
                    (token, address, identity),
                )
                expired, evicted = self._bound(when, key)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            old = self._devices.pop(key, None)  # re-inserted last: the most recent contact
            self._devices[key] = (
                Device(address, identity, stamp, stamp, 1, 0, 0, 0)
                if old is None
                else replace(old, last_contact=stamp, jobs=old.jobs + 1)
            )
            self._jobs[token] = key
            self._forget(expired + evicted)
        self._log_removed(expired, evicted)

    def _bound(
        self, now: datetime, added: tuple[str, str] | None
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Within the caller's transaction (and lock): delete the devices past the retention,
        then the oldest over the cap.  ``added``: a device the transaction just inserted or
        updated, not yet in the copy in memory.  Returns (expired, evicted)."""
        expired = [
            (str(a), str(i)) for a, i in self._conn.execute(_EXPIRE, (self.limits.cutoff(now),))
        ]
        kept = set(self._devices).difference(expired)
        if added is not None:
            kept.add(added)
        excess = len(kept) - self.limits.max_devices
        evicted = (
            [(str(a), str(i)) for a, i in self._conn.execute(_EVICT_OLDEST, (excess,))]
            if excess > 0
            else []
        )
        return expired, evicted

    def _forget(self, keys: list[tuple[str, str]]) -> None:
        """Drop deleted devices from the copy in memory (under the lock, after the commit)."""
        for key in keys:
            self._devices.pop(key, None)

    def _log_removed(self, expired: list[tuple[str, str]], evicted: list[tuple[str, str]]) -> None:
        if expired:
            log.info(
                "device book: %d device(s) removed, last contact more than %d days ago "
                "([devices] retention_days)",
                len(expired),
                self.limits.retention_days,
            )
        if evicted:
            log.info(
                "device book: %d device(s) evicted, the oldest last contact first: more than "
                "%d devices ([devices] max_devices)",
                len(evicted),
                self.limits.max_devices,
            )

    def job_ended(self, token: str, outcome: str) -> None:
        """Count the end of a job (``outcome``: completed, failed or canceled) for its device."""
        column = {"completed": "completed", "failed": "failed", "canceled": "canceled"}[outcome]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._jobs.get(token)
                if row is not None:
                    self._conn.execute(
                        f"UPDATE devices SET {column} = {column} + 1 "
                        "WHERE address = ? AND identity = ?",
                        row,
                    )
                    self._conn.execute("DELETE FROM device_jobs WHERE token = ?", (token,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            if row is not None:
                del self._jobs[token]
                old = self._devices.get(row)
                if old is not None:
                    self._devices[row] = replace(old, **{column: getattr(old, column) + 1})

    def contact(self, address: str, identity: str, when: datetime) -> None:
        """A later request from a known device (an image, the end of a job)."""
        stamp = when.isoformat()
        with self._lock:
            old = self._devices.get((address, identity))
            if old is None or _unix_time(old.last_contact) >= when.timestamp():
                return
            self._conn.execute(
                "UPDATE devices SET last_contact = ?, last_contact_at = ? "
                "WHERE address = ? AND identity = ?",
                (stamp, when.timestamp(), address, identity),
            )
            del self._devices[(address, identity)]  # re-inserted last: the most recent contact
            self._devices[(address, identity)] = replace(old, last_contact=stamp)

    def device_of(self, token: str) -> tuple[str, str] | None:
        """The device that created a job not yet ended."""
        with self._lock:
            return self._jobs.get(token)

    def all(self) -> list[Device]:
        """Every device, most recent contact first (from memory: no disk read)."""
        with self._lock:
            return list(reversed(self._devices.values()))

    def recent(self, limit: int) -> tuple[list[Device], int]:
        """The ``limit`` devices of most recent contact, most recent first, and how many the
        book holds: what /status.json lists on the event loop, at a cost that does not grow
        with the book (issue 14: a book at the cap of 10,000 cost 15 ms listed whole)."""
        with self._lock:
            return list(itertools.islice(reversed(self._devices.values()), limit)), len(
                self._devices
            )


def _unix_time(stamp: str) -> float:
    """An ISO 8601 time the book wrote (with its offset) as Unix seconds."""
    return datetime.fromisoformat(stamp).timestamp()
