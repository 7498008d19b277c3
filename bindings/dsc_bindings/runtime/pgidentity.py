"""The installation identity in PostgreSQL (``[store] kind = "postgresql"``, issue 17 point 1).

With the PostgreSQL store the device and service UUIDs and the start counter live in the
database's one-row ``installation`` table instead of the data folder's ``identity.json``
(.installation), so every instance serving from this database is the same device and
each start, on whichever instance, gets a larger wsd:AppSequence InstanceId (R13 on R11): the
counter is incremented by one statement, atomically in the database.

The row is created once, from a seed: the data folder's identity when there is one (a server
moved onto PostgreSQL stays the device its clients know, and its counter goes on growing), else
fresh UUIDs.  ``dsc db migrate`` copies the data folder's identity on purpose (:meth:`adopt`).

Identity is read at start and on SIGHUP only, so each call uses a connection of its own (no
pool) and makes sure the schema is current first (the same ``upgrade`` under its advisory lock).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from dsc_bindings.runtime.installation import Installation
from dsc_bindings.store.errors import StoreError, as_store_error
from dsc_bindings.store.postgresql import connection_kwargs, is_temporary_pg, redacted, upgrade

__all__ = ["PostgresIdentity"]

_COLUMNS = "device_uuid, dsp_service_uuid, dsc_service_uuid, starts"

_CREATE = f"""
    INSERT INTO installation (id, {_COLUMNS}) VALUES (1, %s, %s, %s, %s)
    ON CONFLICT (id) DO NOTHING
"""

# One statement: two instances starting together get two different counts.
_START = f"UPDATE installation SET starts = starts + 1 WHERE id = 1 RETURNING {_COLUMNS}"

# Adopting the same identity again keeps the larger counter (it must never go back, R11).
_ADOPT = f"""
    UPDATE installation SET starts = GREATEST(starts, %s)
    WHERE id = 1 AND device_uuid = %s AND dsp_service_uuid = %s AND dsc_service_uuid = %s
    RETURNING {_COLUMNS}
"""


def _installation(row: tuple[Any, ...]) -> Installation:
    return Installation(str(row[0]), str(row[1]), str(row[2]), starts=int(row[3]))


def _values(installation: Installation) -> tuple[object, ...]:
    return (
        installation.device_uuid,
        installation.dsp_service_uuid,
        installation.dsc_service_uuid,
        installation.starts,
    )


class PostgresIdentity:
    """The ``installation`` row of one database."""

    def __init__(self, dsn: str, password_file: Path | None = None) -> None:
        self._dsn = dsn
        self._password_file = password_file
        self.location = f"PostgreSQL {redacted(dsn)}"

    def _transaction(
        self, what: str, work: Callable[[psycopg.Connection[Any]], Installation]
    ) -> Installation:
        try:
            with psycopg.connect(self._dsn, **connection_kwargs(self._password_file)) as conn:
                upgrade(conn)
                with conn.transaction():
                    return work(conn)
        except psycopg.Error as exc:
            raise as_store_error(f"{what} at {self.location}", exc, is_temporary_pg(exc)) from exc

    def stored(self) -> Installation | None:
        """The row, or None before the first start."""
        try:
            return self._transaction("reading the installation identity", self._row)
        except LookupError:
            return None

    @staticmethod
    def _row(conn: psycopg.Connection[Any]) -> Installation:
        row = conn.execute(f"SELECT {_COLUMNS} FROM installation WHERE id = 1").fetchone()
        if row is None:
            raise LookupError("no installation row")
        return _installation(row)

    def load(self, seed: Callable[[], Installation]) -> Installation:
        """The identity, created from ``seed()`` when the database has none yet."""

        def work(conn: psycopg.Connection[Any]) -> Installation:
            conn.execute(_CREATE, _values(seed()))
            return self._row(conn)

        return self._transaction("reading the installation identity", work)

    def record_start(self, seed: Callable[[], Installation]) -> Installation:
        """Count one more start (created from ``seed()`` first if need be); the new count."""

        def work(conn: psycopg.Connection[Any]) -> Installation:
            conn.execute(_CREATE, _values(seed()))
            row = conn.execute(_START).fetchone()
            assert row is not None  # the row exists: created just above or before
            return _installation(row)

        return self._transaction("recording this start", work)

    def adopt(self, installation: Installation) -> Installation:
        """Make ``installation`` this database's identity (``dsc db migrate``); returns the row
        as read back.  StoreError when the database is already another device."""

        def work(conn: psycopg.Connection[Any]) -> Installation:
            conn.execute(_CREATE, _values(installation))
            row = conn.execute(
                _ADOPT,
                (
                    installation.starts,
                    installation.device_uuid,
                    installation.dsp_service_uuid,
                    installation.dsc_service_uuid,
                ),
            ).fetchone()
            if row is None:
                other = self._row(conn)
                raise StoreError(
                    f"{self.location} is already the installation of device {other.device_uuid}, "
                    f"not {installation.device_uuid}: migrate into an empty database",
                    temporary=False,
                )
            return _installation(row)

        return self._transaction("copying the installation identity", work)
