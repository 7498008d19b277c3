"""The status page's totals in PostgreSQL (``[store] kind = "postgresql"``, issue 17): the
``counters`` table of the job store's schema (.postgresql, schema 4), shared by every instance
on the database, so the page shows the installation's totals, not one process's.

Each :meth:`PostgresTally.add` is one atomic statement (``value = counters.value + %s``, an
upsert), never a read-modify-write of a copy, so instances counting at once lose nothing; it
returns the new total, which the copy in memory takes.  :meth:`values` answers from that copy
(the page asks on the event loop), reloaded in the background when older than
``.refresh.MAX_AGE`` (2 s): what other instances counted shows within about 2 s.  A counter
that cannot be written is logged and the request goes on, as on SQLite (.tally).
"""

from __future__ import annotations

from pathlib import Path

from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.postgresql import PgDatabase
from dsc_bindings.store.refresh import MAX_AGE, BackgroundReload
from dsc_bindings.store.tally import NAMES, Tally, log

__all__ = ["PostgresTally"]

_ADD = """
    INSERT INTO counters (name, value) VALUES (%s, %s)
    ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value
    RETURNING value
"""


class PostgresTally(Tally):
    """The counters of every instance on one PostgreSQL database (module doc)."""

    def __init__(self, db: PgDatabase, max_age: float = MAX_AGE) -> None:
        super().__init__()
        self._db = db
        self._reload = BackgroundReload("the status page's totals", self._load, max_age)
        self._load()

    @classmethod
    def open(cls, dsn: str, *, password_file: Path | None = None) -> PostgresTally:
        return cls(PgDatabase.open(dsn, password_file=password_file, max_size=2, name="dsc-tally"))

    def _load(self) -> None:
        found = self.stored()
        with self._lock:
            for name in NAMES:
                self._values[name] = found.get(name, 0)

    def stored(self) -> dict[str, int]:
        """Every counter as the database holds it."""
        rows = self._db.run("reading the totals", "SELECT name, value FROM counters")
        return {str(name): int(value) for name, value in rows}

    def add(self, name: str, amount: int = 1) -> None:
        if name not in self._values:
            raise KeyError(f"no counter {name!r}")
        try:
            [(total,)] = self._db.run(f"counting {name}", _ADD, (name, amount))
        except StoreError as exc:  # shown, not fatal: the page's count is off until a reload
            log.error("counter %s not kept: %s", name, exc.message)
            with self._lock:
                self._values[name] += amount
            return
        with self._lock:
            self._values[name] = int(total)

    def values(self) -> dict[str, int]:
        self._reload.due()
        return super().values()

    def close(self) -> None:
        self._db.close()

    def copy_in(self, counters: dict[str, int]) -> dict[str, int]:
        """``dsc db migrate``: add ``counters`` to this database's (empty) ones; the counters
        as read back."""
        present = self.stored()
        if any(present.values()):
            raise StoreError(
                f"the destination {self._db.location} already counts "
                f"{sum(present.values())} event(s): migrate into an empty database",
                temporary=False,
            )
        for name, value in counters.items():
            self._db.run(f"copying counter {name}", _ADD, (name, value))
        return self.stored()
