"""What the server needs of its durable state, whatever keeps it (issue 17).

A job store is two parts with one job each:

* :class:`JobRecords`: one row per job (SQLite in the data folder, or PostgreSQL);
* :class:`Spool`: the documents (a local folder, or an S3 bucket).

:class:`dsc_bindings.store.split.SplitStore` joins any records with any spool into the
:class:`JobStore` the runtime uses: it carries out the core's store commands in order (R4: the
reply goes out only after :meth:`JobStore.apply` returned, so an acknowledged image and record
are durable), restores the jobs at start and hands the processing engine its documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dsc_bindings.store.errors import StoreError
from dsc_core.commands import StoreCommand
from dsc_core.model import Job

__all__ = [
    "JobRecords",
    "JobStore",
    "PoolStats",
    "Spool",
    "StorageFigures",
    "StoredRecord",
    "check_document_id",
    "check_token",
]

#: One stored row as read at start: (its place in creation order, token, encoded record).
StoredRecord = tuple[int, str, str]


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A connection pool's state (PostgreSQL), for /metrics."""

    in_use: int
    idle: int
    #: Requests waiting for a connection: above 0 for long, the pool is too small or the
    #: database too slow.
    waiting: int


@dataclass(frozen=True, slots=True)
class StorageFigures:
    """What /metrics says about the engines (issue 17 point 7); None where an engine has no
    such figure (SQLite has no pool, the local spool counts no request errors)."""

    pool: PoolStats | None
    spool_errors: int | None


class JobRecords(Protocol):
    """The job table.  Every method raises only :class:`StoreError`."""

    #: Where the records are, for the log (a path, or a DSN without its password).
    location: str

    def put(self, job: Job) -> None:
        """Insert or replace the job's record; durable (committed) when it returns."""

    def drop(self, token: str) -> None:
        """Delete the job's record (absent: nothing to do)."""

    def rows(self) -> list[StoredRecord]:
        """Every record, oldest first."""

    def remove(self, seq: int) -> None:
        """Delete the row at ``seq`` (a record that does not decode, moved aside)."""

    def check(self) -> str | None:
        """None while the records can be read and written, else what is wrong (/healthz)."""

    def pool_stats(self) -> PoolStats | None:
        """The connection pool's state; None without a pool.  Never blocks."""

    def close(self) -> None: ...


class Spool(Protocol):
    """The documents of the jobs.  Commands for one document come in order (as the core emits
    them); every method raises only :class:`StoreError`."""

    #: Where the documents are, for the log.
    location: str
    #: The local folder the spool writes to (documents, or copies and staged parts): the
    #: health check ``data`` makes sure the server can write there.
    local_dir: Path

    def begin(self, token: str, document_id: int) -> None: ...

    def append(self, token: str, document_id: int, data: bytes) -> None: ...

    def finish(self, token: str, document_id: int, size: int) -> None:
        """Complete the document: once this returns it is durable and may be acknowledged."""

    def abort(self, token: str, document_id: int) -> None:
        """Drop an unfinished (or finished but unacknowledged) document; idempotent."""

    def discard(self, token: str) -> None:
        """Drop every document of the job (R6 timeout, purge); idempotent."""

    def document_path(self, token: str, document_id: int) -> Path:
        """A local file with the finished document, for the filters."""

    def documents(self, token: str) -> list[int]:
        """The DocumentIds of the job's finished documents, ascending."""

    def set_aside(self, token: str, target: Path) -> bool:
        """Move the job's documents into the local folder ``target`` (quarantine) and out of
        the spool; False when it had none."""

    def remove_debris(self, tokens: set[str]) -> None:
        """Delete what a crash left: unfinished documents and documents of jobs not in
        ``tokens``."""

    def check(self) -> str | None:
        """None while documents can be stored, else what is wrong (/healthz)."""

    def error_count(self) -> int | None:
        """Requests to the spool's server that failed since the start; None for a local
        spool (its faults are the disk's, seen by the data folder's check)."""

    def close(self) -> None: ...


class JobStore(Protocol):
    """What the runtime, the engine and the health checks call (sqlite.JobStore, SplitStore)."""

    data_dir: Path

    @property
    def local_dir(self) -> Path: ...

    def apply(self, command: StoreCommand) -> None: ...

    def load_jobs(self) -> list[Job]: ...

    def quick_check(self) -> str | None: ...

    def figures(self) -> StorageFigures: ...

    def document_path(self, token: str, document_id: int) -> Path: ...

    def close(self) -> None: ...


def check_token(token: str) -> str:
    """Tokens are GUIDs made by the core (R6); still, a token becomes a folder or object key
    name, so make sure it cannot leave the spool or hide as a dot file."""
    if (
        not isinstance(token, str)
        or not token
        or len(token) > 200
        or token.startswith(".")
        or any(c in token for c in "/\\\0")
    ):
        raise StoreError(f"not a usable job token: {token!r}", temporary=False)
    return token


def check_document_id(document_id: int) -> int:
    if not isinstance(document_id, int) or isinstance(document_id, bool):
        raise StoreError(f"not a document id: {document_id!r}", temporary=False)
    return document_id
