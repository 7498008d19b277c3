"""The device book in PostgreSQL (``[store] kind = "postgresql"``, issue 17): the tables
``devices`` and ``device_jobs`` of the job store's schema (store/postgresql.py, schema 4), shared
by every instance serving from the database (issue 18).

Several instances write the same rows, so nothing is read, changed in memory and written back:
a new job is one upsert (``jobs = jobs + 1``), an end one statement that deletes the job's
``device_jobs`` row and counts it for the device that row names (whichever instance created the
job), a contact one UPDATE that only moves the last contact forward.  The cap and the retention
are the same two deletes as on SQLite (.devices), by the index on ``last_contact_at``, with the
count taken in SQL.  Two instances evicting at once may each remove the oldest device: the book
then holds one less than the cap until the next job.

Reads (:meth:`all`, :meth:`recent`) come from a copy in memory, as the status page asks them on
the event loop: this instance's writes update it from the rows the statements return, and a
read that finds it older than ``store.refresh.MAX_AGE`` (2 s) reloads it in the background, so
what other instances wrote shows within about 2 s.

The pool is this book's own (at most two connections): device records never take a connection
a job record waits for.  Its faults are the job store's (``PgDatabase``: ONE mapping).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from dsc_bindings.observe.devices import (
    COLUMNS,
    OUTCOME_COLUMNS,
    Device,
    DeviceCopy,
    DeviceLimits,
    DeviceRows,
    device,
    log_removed,
)
from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.postgresql import PgDatabase
from dsc_bindings.store.refresh import MAX_AGE, BackgroundReload

__all__ = ["PostgresDeviceBook"]

_CREATED = f"""
    INSERT INTO devices (address, identity, first_contact, last_contact, last_contact_at, jobs)
    VALUES (%s, %s, %s, %s, %s, 1)
    ON CONFLICT (address, identity) DO UPDATE SET
        last_contact = excluded.last_contact,
        last_contact_at = excluded.last_contact_at,
        jobs = devices.jobs + 1
    RETURNING {COLUMNS}
"""

_JOB = """
    INSERT INTO device_jobs (token, address, identity) VALUES (%s, %s, %s)
    ON CONFLICT (token) DO UPDATE SET address = excluded.address, identity = excluded.identity
"""

#: The end of a job, for the device whose ``device_jobs`` row names it ({column}: ours).
_ENDED = """
    WITH ended AS (DELETE FROM device_jobs WHERE token = %s RETURNING address, identity)
    UPDATE devices SET {column} = devices.{column} + 1
    FROM ended WHERE devices.address = ended.address AND devices.identity = ended.identity
    RETURNING {columns}
"""

#: Only forward: two instances may report contacts of one device out of order.
_CONTACT = f"""
    UPDATE devices SET last_contact = %s, last_contact_at = %s
    WHERE address = %s AND identity = %s AND last_contact_at < %s
    RETURNING {COLUMNS}
"""

_EXPIRE = "DELETE FROM devices WHERE last_contact_at < %s RETURNING address, identity"

#: Over the cap (%s): the devices with the oldest last contact, counted and deleted in SQL.
_EVICT_OLDEST = """
    DELETE FROM devices WHERE (address, identity) IN (
        SELECT address, identity FROM devices ORDER BY last_contact_at
        LIMIT GREATEST((SELECT count(*) FROM devices) - %s, 0)
    ) RETURNING address, identity
"""

_ALL = f"SELECT {COLUMNS} FROM devices ORDER BY last_contact_at"

Keys = list[tuple[str, str]]


class PostgresDeviceBook:
    """The device book of every instance on one PostgreSQL database (module doc)."""

    def __init__(self, db: PgDatabase, limits: DeviceLimits, max_age: float = MAX_AGE) -> None:
        self.limits = limits
        self._db = db
        self._copy = DeviceCopy()
        self._reload = BackgroundReload("the device book", self._load, max_age)
        self._load()

    @classmethod
    def open(
        cls, dsn: str, limits: DeviceLimits, *, password_file: Path | None = None
    ) -> PostgresDeviceBook:
        return cls(
            PgDatabase.open(dsn, password_file=password_file, max_size=2, name="dsc-devices"),
            limits,
        )

    def _load(self) -> None:
        rows = self._db.run("reading the device book", _ALL)
        self._copy.replace_all(device(r) for r in rows)

    def close(self) -> None:
        self._db.close()

    def _bound(self, cur: psycopg.Cursor[Any], now: datetime) -> tuple[Keys, Keys]:
        cur.execute(_EXPIRE, (self.limits.cutoff(now),))
        expired = [(str(a), str(i)) for a, i in cur.fetchall()]
        cur.execute(_EVICT_OLDEST, (self.limits.max_devices,))
        evicted = [(str(a), str(i)) for a, i in cur.fetchall()]
        return expired, evicted

    def apply_limits(self, now: datetime) -> None:
        expired, evicted = self._db.transaction(
            "bounding the device book", lambda cur: self._bound(cur, now)
        )
        self._copy.forget(expired + evicted)
        log_removed(self.limits, expired, evicted)

    def job_created(self, token: str, address: str, identity: str, when: datetime) -> None:
        stamp = when.isoformat()

        def work(cur: psycopg.Cursor[Any]) -> tuple[Device, Keys, Keys]:
            cur.execute(_CREATED, (address, identity, stamp, stamp, when.timestamp()))
            row = cur.fetchone()
            assert row is not None  # an upsert returns its row
            cur.execute(_JOB, (token, address, identity))
            return (device(row), *self._bound(cur, when))

        recorded, expired, evicted = self._db.transaction(f"recording the device of {token}", work)
        self._copy.contacted(recorded)
        self._copy.forget(expired + evicted)
        log_removed(self.limits, expired, evicted)

    def job_ended(self, token: str, outcome: str) -> None:
        column = OUTCOME_COLUMNS[outcome]
        qualified = ", ".join(f"devices.{c.strip()}" for c in COLUMNS.split(","))
        sql = _ENDED.format(column=column, columns=qualified)
        for row in self._db.run(f"counting the end of {token} for its device", sql, (token,)):
            self._copy.counted(device(row))

    def contact(self, address: str, identity: str, when: datetime) -> None:
        at = when.timestamp()
        for row in self._db.run(
            f"recording a contact of {address}",
            _CONTACT,
            (when.isoformat(), at, address, identity, at),
        ):
            self._copy.contacted(device(row))

    def device_of(self, token: str) -> tuple[str, str] | None:
        rows = self._db.run(
            f"reading the device of {token}",
            "SELECT address, identity FROM device_jobs WHERE token = %s",
            (token,),
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def all(self) -> list[Device]:
        """Every device, most recent contact first (the copy: at most ~2 s old, module doc)."""
        self._reload.due()
        return self._copy.all()

    def recent(self, limit: int) -> tuple[list[Device], int]:
        self._reload.due()
        return self._copy.recent(limit)

    # --- dsc db migrate ------------------------------------------------------------------------

    def copy_in(self, book: DeviceRows) -> DeviceRows:
        """Write a whole book into this (empty) one, in one transaction; the book as read back.
        StoreError when this one already holds devices."""

        def work(cur: psycopg.Cursor[Any]) -> None:
            cur.execute("SELECT count(*) FROM devices")
            present = cur.fetchone()
            if present is not None and int(present[0]):
                raise _NotEmpty(int(present[0]))
            cur.executemany(
                f"INSERT INTO devices ({COLUMNS}, last_contact_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (d.address, d.identity, d.first_contact, d.last_contact)
                    + (d.jobs, d.completed, d.failed, d.canceled, at)
                    for d, at in book.devices
                ],
            )
            cur.executemany(
                "INSERT INTO device_jobs (token, address, identity) VALUES (%s, %s, %s)", book.jobs
            )

        try:
            self._db.transaction("copying the device book", work)
        except _NotEmpty as exc:
            raise StoreError(
                f"the destination {self._db.location} already holds {exc.count} device(s): "
                "migrate into an empty database",
                temporary=False,
            ) from None
        return self.rows()

    def rows(self) -> DeviceRows:
        found = self._db.run(
            "reading the device book",
            f"SELECT {COLUMNS}, last_contact_at FROM devices ORDER BY last_contact_at",
        )
        jobs = self._db.run(
            "reading the device book",
            "SELECT token, address, identity FROM device_jobs ORDER BY token",
        )
        return DeviceRows(
            [(device(r[:8]), float(r[8])) for r in found],
            [(str(t), str(a), str(i)) for t, a, i in jobs],
        )


class _NotEmpty(Exception):
    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count
