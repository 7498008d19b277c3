"""The devices that created jobs: client address, certificate identity, first and last contact,
job counts.  Durable, kept across restarts: :class:`DeviceBook` is what the server asks of it,
:class:`SqliteDeviceBook` keeps it in the job store's SQLite file (here), and
``.pgdevices.PostgresDeviceBook`` in the PostgreSQL database when ``[store] kind =
"postgresql"`` (issue 17), shared by every instance on it.  :func:`open_device_book` picks.

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
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from dsc_bindings.settings import DeviceLimits
from dsc_bindings.store.backends import StorageSettings
from dsc_bindings.store.sqlite import DB_NAME

__all__ = [
    "COLUMNS",
    "OUTCOME_COLUMNS",
    "Device",
    "DeviceBook",
    "DeviceCopy",
    "DeviceLimits",
    "DeviceRows",
    "SqliteDeviceBook",
    "device",
    "log_removed",
    "open_device_book",
    "sqlite_rows",
]

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

#: A device's columns in :class:`Device`'s order (both engines).
COLUMNS = "address, identity, first_contact, last_contact, jobs, completed, failed, canceled"

#: The end of a job, counted once (outcome -> its column): the names are ours, never input.
OUTCOME_COLUMNS = {"completed": "completed", "failed": "failed", "canceled": "canceled"}


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


class DeviceBook(Protocol):
    """What the server asks of the device book, whichever engine keeps it.  Writes come from
    the command writer's record lane (never the event loop) and may raise; the caller logs
    the failure and the request goes on (a device record is never worth failing a scan for).
    Reads (:meth:`all`, :meth:`recent`) never wait for a disk or a database: the status page
    calls them on the event loop."""

    limits: DeviceLimits

    def job_created(self, token: str, address: str, identity: str, when: datetime) -> None: ...

    def job_ended(self, token: str, outcome: str) -> None:
        """Count the end of a job (``outcome``: completed, failed or canceled) for its device."""

    def contact(self, address: str, identity: str, when: datetime) -> None:
        """A later request from a known device (an image, the end of a job)."""

    def device_of(self, token: str) -> tuple[str, str] | None:
        """The device that created a job not yet ended."""

    def all(self) -> list[Device]:
        """Every device, most recent contact first."""

    def recent(self, limit: int) -> tuple[list[Device], int]:
        """The ``limit`` devices of most recent contact, most recent first, and how many the
        book holds."""

    def apply_limits(self, now: datetime) -> None:
        """The retention and the cap, now."""

    def close(self) -> None: ...


def open_device_book(data_dir: Path, storage: StorageSettings, limits: DeviceLimits) -> DeviceBook:
    """The device book where ``storage`` keeps the server's state (the composition's choice)."""
    if storage.store_kind == "postgresql":
        from dsc_bindings.observe.pgdevices import PostgresDeviceBook

        return PostgresDeviceBook.open(storage.dsn, limits, password_file=storage.password_file)
    return SqliteDeviceBook(data_dir, limits)


class DeviceCopy:
    """The book in memory, least recent contact first: a contact moves its device to the end,
    so the status page reads the most recent N without sorting the whole book (see
    :meth:`recent`).  Thread-safe."""

    def __init__(self, devices: Iterable[Device] = ()) -> None:
        self._lock = threading.Lock()
        self._devices = {(d.address, d.identity): d for d in devices}

    def replace_all(self, devices: Iterable[Device]) -> None:
        """``devices``: least recent contact first."""
        fresh = {(d.address, d.identity): d for d in devices}
        with self._lock:
            self._devices = fresh

    def contacted(self, device: Device) -> None:
        """``device`` as it now is, with the most recent contact: it goes to the end."""
        key = (device.address, device.identity)
        with self._lock:
            self._devices.pop(key, None)
            self._devices[key] = device

    def counted(self, device: Device) -> None:
        """``device`` with a new count, its place unchanged (an end is no contact)."""
        key = (device.address, device.identity)
        with self._lock:
            if key in self._devices:
                self._devices[key] = device

    def forget(self, keys: Iterable[tuple[str, str]]) -> None:
        with self._lock:
            for key in keys:
                self._devices.pop(key, None)

    def get(self, key: tuple[str, str]) -> Device | None:
        with self._lock:
            return self._devices.get(key)

    def keys(self) -> set[tuple[str, str]]:
        with self._lock:
            return set(self._devices)

    def all(self) -> list[Device]:
        with self._lock:
            return list(reversed(self._devices.values()))

    def recent(self, limit: int) -> tuple[list[Device], int]:
        """Issue 14: a book at the cap of 10,000 cost 15 ms listed whole; this does not grow
        with the book."""
        with self._lock:
            return list(itertools.islice(reversed(self._devices.values()), limit)), len(
                self._devices
            )


def device(row: tuple[Any, ...] | sqlite3.Row) -> Device:
    """A row of :data:`COLUMNS` as a :class:`Device`."""
    a, i, first, last, jobs, completed, failed, canceled = row
    return Device(
        str(a), str(i), str(first), str(last), int(jobs), int(completed), int(failed), int(canceled)
    )


def log_removed(
    limits: DeviceLimits, expired: list[tuple[str, str]], evicted: list[tuple[str, str]]
) -> None:
    if expired:
        log.info(
            "device book: %d device(s) removed, last contact more than %d days ago "
            "([devices] retention_days)",
            len(expired),
            limits.retention_days,
        )
    if evicted:
        log.info(
            "device book: %d device(s) evicted, the oldest last contact first: more than "
            "%d devices ([devices] max_devices)",
            len(evicted),
            limits.max_devices,
        )


@dataclass(frozen=True, slots=True)
class DeviceRows:
    """A whole book as rows (``dsc db migrate``): devices with their ``last_contact_at``, least
    recent contact first, and the device of each job not yet counted as ended."""

    devices: list[tuple[Device, float]]
    jobs: list[tuple[str, str, str]]


def sqlite_rows(data_dir: Path) -> DeviceRows:
    """The book in the data folder's SQLite file, read only (empty when it has none)."""
    path = Path(data_dir) / DB_NAME
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master")}
        if "devices" not in tables:
            return DeviceRows([], [])
        columns = {row[1] for row in conn.execute("PRAGMA table_info(devices)")}
        at = "last_contact_at" if "last_contact_at" in columns else "0"
        found = conn.execute(f"SELECT {COLUMNS}, {at} FROM devices ORDER BY {at}, rowid").fetchall()
        rows = [(device(r[:8]), float(r[8])) for r in found]
        if at == "0":  # a book from before the bounds: its times from the text (module doc)
            rows = sorted(((d, _unix_time(d.last_contact)) for d, _ in rows), key=lambda r: r[1])
        jobs = (
            [
                (str(t), str(a), str(i))
                for t, a, i in conn.execute(
                    "SELECT token, address, identity FROM device_jobs ORDER BY token"
                )
            ]
            if "device_jobs" in tables
            else []
        )
        return DeviceRows(rows, jobs)
    finally:
        conn.close()


class SqliteDeviceBook:
    """The devices table in the data folder's SQLite file, with a copy in memory (read by the
    status page on the event loop, which must not wait for the disk): one server per data
    folder (the job store's lock), so the copy is the book.  Thread-safe; every write is one
    committed transaction, and the copy changes only after it committed."""

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
            f"SELECT {COLUMNS} FROM devices ORDER BY last_contact_at"
        ).fetchall()
        self._copy = DeviceCopy(device(r) for r in rows)
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
            self._copy.forget(expired + evicted)
        log_removed(self.limits, expired, evicted)

    def job_created(self, token: str, address: str, identity: str, when: datetime) -> None:
        stamp = when.isoformat()
        key = (address, identity)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    f"""INSERT INTO devices
                           (address, identity, first_contact, last_contact, last_contact_at, jobs)
                       VALUES (?, ?, ?, ?, ?, 1)
                       ON CONFLICT (address, identity) DO UPDATE SET
                           last_contact = excluded.last_contact,
                           last_contact_at = excluded.last_contact_at,
                           jobs = jobs + 1
                       RETURNING {COLUMNS}""",
                    (address, identity, stamp, stamp, when.timestamp()),
                ).fetchone()
                self._conn.execute(
                    "INSERT OR REPLACE INTO device_jobs (token, address, identity) VALUES (?, ?, ?)",
                    (token, address, identity),
                )
                expired, evicted = self._bound(when, key)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._copy.contacted(device(row))
            self._jobs[token] = key
            self._copy.forget(expired + evicted)
        log_removed(self.limits, expired, evicted)

    def _bound(
        self, now: datetime, added: tuple[str, str] | None
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Within the caller's transaction (and lock): delete the devices past the retention,
        then the oldest over the cap.  ``added``: a device the transaction just inserted or
        updated, not yet in the copy in memory.  Returns (expired, evicted)."""
        expired = [
            (str(a), str(i)) for a, i in self._conn.execute(_EXPIRE, (self.limits.cutoff(now),))
        ]
        kept = self._copy.keys().difference(expired)
        if added is not None:
            kept.add(added)
        excess = len(kept) - self.limits.max_devices
        evicted = (
            [(str(a), str(i)) for a, i in self._conn.execute(_EVICT_OLDEST, (excess,))]
            if excess > 0
            else []
        )
        return expired, evicted

    def job_ended(self, token: str, outcome: str) -> None:
        """Count the end of a job (``outcome``: completed, failed or canceled) for its device."""
        column = OUTCOME_COLUMNS[outcome]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                key = self._jobs.get(token)
                row = None
                if key is not None:
                    row = self._conn.execute(
                        f"UPDATE devices SET {column} = {column} + 1 "
                        f"WHERE address = ? AND identity = ? RETURNING {COLUMNS}",
                        key,
                    ).fetchone()
                    self._conn.execute("DELETE FROM device_jobs WHERE token = ?", (token,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            if key is not None:
                del self._jobs[token]
            if row is not None:
                self._copy.counted(device(row))

    def contact(self, address: str, identity: str, when: datetime) -> None:
        """A later request from a known device (an image, the end of a job)."""
        stamp = when.isoformat()
        with self._lock:
            old = self._copy.get((address, identity))
            if old is None or _unix_time(old.last_contact) >= when.timestamp():
                return
            row = self._conn.execute(
                "UPDATE devices SET last_contact = ?, last_contact_at = ? "
                f"WHERE address = ? AND identity = ? RETURNING {COLUMNS}",
                (stamp, when.timestamp(), address, identity),
            ).fetchone()
            if row is not None:
                self._copy.contacted(device(row))

    def device_of(self, token: str) -> tuple[str, str] | None:
        """The device that created a job not yet ended."""
        with self._lock:
            return self._jobs.get(token)

    def all(self) -> list[Device]:
        """Every device, most recent contact first (from memory: no disk read)."""
        return self._copy.all()

    def recent(self, limit: int) -> tuple[list[Device], int]:
        """The ``limit`` devices of most recent contact, most recent first, and how many the
        book holds: what /status.json lists on the event loop."""
        return self._copy.recent(limit)


def _unix_time(stamp: str) -> float:
    """An ISO 8601 time the book wrote (with its offset) as Unix seconds."""
    return datetime.fromisoformat(stamp).timestamp()
