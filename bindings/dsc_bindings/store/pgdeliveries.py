"""The file share filter's delivery records in PostgreSQL (issue 18 point 2): with a shared
store, what a run delivered is a ``filter_deliveries`` row, not a file beside the job's
documents on one host, so an instance that rescues the job on another host delivers nothing
twice (filters/sharejournal.py has the interface and the file kind).

Each record is written only while the run holds the job's lease (the same owner and epoch
the job row has; store/leases.py): a run whose lease was lost gets
:class:`~dsc_bindings.filters.sharejournal.DeliveryRefused` and places nothing more
(:meth:`PgDeliveryJournal.check` before a file takes its final name).  The rows go with the
job's row (postgresql.py's drop).  One record can land after a rescue: an INSERT that waits for
another transaction holding the same key checked the lease before it waited (READ COMMITTED).
It then records the file its run placed before the rescue, which the rescuer recognised by the
linked temporary name and records the same (seen in tests/e2e/test_cluster_fileshare.py's
frozen-instance test); no file is placed after a lost lease.

A database that does not answer for a moment (PostgreSQL restarting, the pool reconnecting)
must not fail a filter that delivered correctly: a failed filter ends the job Aborted, for
good (seen in the failover test: a PostgreSQL restart during a run of scans aborted a job
whose files were all on the share).  A temporary StoreError of any statement here interrupts
the run (.interruption): the job resumes once the database answers, its lease lapsed and
taken again by a sweep (runtime/leasing.py), and the resumed run finds in these rows, and by
the temporary names linked on the share, what this one delivered.  There is no time limit to
wait out: an outage of any length costs no job."""

from __future__ import annotations

from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from dsc_bindings.filters.sharejournal import DeliveryRefused
from dsc_bindings.store.interruption import interrupting

if TYPE_CHECKING:  # the PostgreSQL client is an extra: imported where it is chosen
    from dsc_bindings.store.postgresql import PgDatabase

__all__ = ["PgDeliveryJournal"]

_LOAD = """
    SELECT folder, document_id, counter, name FROM filter_deliveries
    WHERE token = %(token)s AND filter_index = %(index)s
"""
_HELD = """
    SELECT 1 FROM jobs
    WHERE token = %(token)s AND lease_owner = %(owner)s AND lease_epoch = %(epoch)s
"""
_ADD = f"""
    INSERT INTO filter_deliveries (token, filter_index, folder, document_id, counter, name)
    SELECT %(token)s, %(index)s, %(folder)s, %(doc)s, %(counter)s, %(name)s
    WHERE EXISTS ({_HELD})
    ON CONFLICT (token, filter_index, folder, document_id)
        DO UPDATE SET counter = excluded.counter, name = excluded.name
    RETURNING 1
"""


class PgDeliveryJournal:
    """The deliveries of one run of one file share filter of one job (module doc).
    ``lease``: the (owner, epoch) the run holds, None when it holds none (it delivers
    nothing).  Raises Interrupted when the database does not answer for a moment (module doc),
    StoreError when it refuses for good (the filter fails; nothing was recorded as delivered
    that was not)."""

    damaged = False

    def __init__(
        self, db: PgDatabase, token: str, filter_index: int, lease: tuple[str, int] | None
    ) -> None:
        self._db = db
        self._token = token
        self._index = filter_index
        self._lease = lease
        #: DeliveryJournal.run: the epoch of the lease this run holds.
        self.run = 0 if lease is None else lease[1]
        self.done: dict[tuple[str, int], tuple[int, str]] = {}
        for folder, document_id, counter, name in self._run(
            f"reading the deliveries of job {token}", _LOAD, {"token": token, "index": filter_index}
        ):
            self.done[(str(folder), int(document_id))] = (int(counter), str(name))

    def _run(self, what: str, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with interrupting():
            return self._db.run(what, sql, params)

    def get(self, directory: PurePath, document_id: int) -> tuple[int, str] | None:
        return self.done.get((str(directory), document_id))

    def names_in(self, directory: PurePath) -> set[str]:
        key = str(directory)
        return {name for (folder, _doc), (_n, name) in self.done.items() if folder == key}

    def _fence(self) -> dict[str, object]:
        if self._lease is None:
            raise DeliveryRefused(f"job {self._token}: this instance holds no lease")
        owner, epoch = self._lease
        return {"token": self._token, "owner": owner, "epoch": epoch}

    def check(self) -> None:
        if not self._run(f"checking the lease of job {self._token}", _HELD, self._fence()):
            raise DeliveryRefused(f"job {self._token}: the lease was lost")

    def add(self, directory: PurePath, document_id: int, counter: int, name: str) -> None:
        params = {
            **self._fence(),
            "index": self._index,
            "folder": str(directory),
            "doc": document_id,
            "counter": counter,
            "name": name,
        }
        if not self._run(f"recording a delivery of job {self._token}", _ADD, params):
            raise DeliveryRefused(f"job {self._token}: the lease was lost")
        self.done[(str(directory), document_id)] = (counter, name)
