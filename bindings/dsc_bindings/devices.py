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
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

from .store import DB_NAME

__all__ = ["Device", "DeviceBook"]

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
        PRIMARY KEY (address, identity)
    )""",
    """CREATE TABLE IF NOT EXISTS device_jobs (
        token    TEXT PRIMARY KEY NOT NULL,
        address  TEXT NOT NULL,
        identity TEXT NOT NULL
    )""",
)


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
        return asdict(self)


class DeviceBook:
    """The devices table, with a copy in memory (read by the status page on the event loop,
    which must not wait for the disk).  Thread-safe; every write is one committed
    transaction, and the copy changes only after it committed."""

    def __init__(self, data_dir: Path) -> None:
        self._conn = sqlite3.connect(
            Path(data_dir) / DB_NAME, timeout=5.0, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            self._conn.execute(statement)
        rows = self._conn.execute(
            "SELECT address, identity, first_contact, last_contact, jobs, completed, failed, "
            "canceled FROM devices"
        ).fetchall()
        self._devices = {(r[0], r[1]): Device(*r) for r in rows}
        self._jobs = {
            str(r[0]): (str(r[1]), str(r[2]))
            for r in self._conn.execute("SELECT token, address, identity FROM device_jobs")
        }

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def job_created(self, token: str, address: str, identity: str, when: datetime) -> None:
        stamp = when.isoformat()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    """INSERT INTO devices (address, identity, first_contact, last_contact, jobs)
                       VALUES (?, ?, ?, ?, 1)
                       ON CONFLICT (address, identity) DO UPDATE SET
                           last_contact = excluded.last_contact, jobs = jobs + 1""",
                    (address, identity, stamp, stamp),
                )
                self._conn.execute(
                    "INSERT OR REPLACE INTO device_jobs (token, address, identity) VALUES (?, ?, ?)",
                    (token, address, identity),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            key = (address, identity)
            old = self._devices.get(key)
            self._devices[key] = (
                Device(address, identity, stamp, stamp, 1, 0, 0, 0)
                if old is None
                else replace(old, last_contact=stamp, jobs=old.jobs + 1)
            )
            self._jobs[token] = key

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
            if old is None or old.last_contact >= stamp:
                return
            self._conn.execute(
                "UPDATE devices SET last_contact = ? WHERE address = ? AND identity = ?",
                (stamp, address, identity),
            )
            self._devices[(address, identity)] = replace(old, last_contact=stamp)

    def device_of(self, token: str) -> tuple[str, str] | None:
        """The device that created a job not yet ended."""
        with self._lock:
            return self._jobs.get(token)

    def all(self) -> list[Device]:
        """Every device, most recent contact first (from memory: no disk read)."""
        with self._lock:
            devices = list(self._devices.values())
        return sorted(devices, key=lambda d: d.last_contact, reverse=True)
