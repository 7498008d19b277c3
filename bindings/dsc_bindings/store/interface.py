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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from dsc_bindings.store.errors import StoreError
from dsc_core.commands import (
    CreateJob,
    Deliver,
    DropJob,
    StoreCommand,
    SubscriptionCommand,
    UpdateJob,
)
from dsc_core.model import Job

__all__ = [
    "Announcement",
    "EventsWrite",
    "JobChanges",
    "JobRecords",
    "JobStore",
    "PoolStats",
    "SharedJobRecords",
    "Spool",
    "Storable",
    "StorageFigures",
    "StoredDocuments",
    "StoredRecord",
    "VersionedWrite",
    "check_document_id",
    "check_token",
]

#: A job's documents as stored beside its record, in the job's order: (document_id, format,
#: size) each, as read (jobcodec.decode_job checks them).
StoredDocuments = Sequence[Sequence[object]]
#: One stored row as read at start: (its place in creation order, token, encoded record, its
#: documents).
StoredRecord = tuple[int, str, str, StoredDocuments]


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


@dataclass(frozen=True, slots=True)
class Announcement:
    """A repository state announced by the cluster's leader (issue 18 point 4): written only
    while the shared row of the state announced last says ``previous`` and names this leader's
    term (``leader``, ``term``: :meth:`SharedJobRecords.take_lead`), together with its events,
    in one transaction; otherwise neither is written (a deposed leader, or an announcement the
    row never got), and the store says so (``SharedJobRecords.announcement_refused``)."""

    state: str
    previous: str
    leader: str
    term: int
    #: The RepositoryStatusSummaryEvent, one outbox row per subscriber (none without any).
    events: tuple[Deliver, ...] = ()
    #: How many of the carrying write's events the core emitted before the announcement:
    #: those are stored before its events, the rest after, so that every subscriber hears
    #: them in the order the core emitted them (runtime/catchup.py ``stamp``).
    after: int = 0


@dataclass(frozen=True, slots=True)
class VersionedWrite:
    """A job record command checked against the row's version (issue 18, shared records):
    ``expected`` is the version the record replaces (None: a new row, or a drop).  The runtime
    stamps each record command of a shared store with it (runtime/catchup.py)."""

    command: CreateJob | UpdateJob | DropJob
    expected: int | None
    #: The runtime's conflict count for the token when stamped: a write stamped before a
    #: conflict of its job is refused without asking the database (catchup.JobCatchUp).
    epoch: int
    #: The notifications this change causes (outbox rows, issue 18 point 3): written in the
    #: same transaction as the row, so an event exists exactly when its change committed.
    events: tuple[Deliver, ...] = ()
    #: (owner, lease epoch) of a write caused by the engine holding the job's lease: the row
    #: is written only while that lease is the job's (fencing, store/leases.py).
    lease: tuple[str, int] | None = None
    #: The repository state this change moved, announced in the same transaction (issue 18
    #: point 4); refused alone, it leaves the row's write standing.
    announcement: Announcement | None = None


@dataclass(frozen=True, slots=True)
class EventsWrite:
    """Notifications no job record write of their batch carried (a reload's event, a state
    the leader derived from other instances' rows), with the announcement they make if any:
    one transaction (issue 18 point 4, runtime/catchup.py ``stamp``)."""

    events: tuple[Deliver, ...] = ()
    announcement: Announcement | None = None


@dataclass(frozen=True, slots=True)
class JobChanges:
    """What other writers changed since a cursor (:meth:`SharedJobRecords.changes`)."""

    #: Where the next read starts (opaque; the store's own).
    cursor: int
    #: (token, version, encoded record, documents) of rows changed since the cursor (or
    #: asked for).
    rows: tuple[tuple[str, int, str, StoredDocuments], ...]
    #: Tokens whose rows were deleted since the cursor (tombstones).
    dropped: tuple[str, ...]
    #: (token, document_id) of uploads in flight on other instances.
    uploads_elsewhere: tuple[tuple[str, int], ...]
    #: (identifier, version, encoded record) of subscriptions created or renewed since the
    #: cursor (issue 18 point 3: the same feed as the jobs).
    subscriptions: tuple[tuple[str, int, str], ...] = ()
    #: Identifiers of subscriptions ended since the cursor.
    subscriptions_ended: tuple[str, ...] = ()


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Rang:
    """One ring of the job feed's doorbell (store/pgdoorbell.py): which job changed, and how."""

    token: str
    #: The row's new version (a job row written).
    version: int | None = None
    #: The row was deleted (a tombstone written).
    dropped: bool = False
    #: The instance whose uploads row of the job changed ("" for neither).
    upload_instance: str = ""
    #: The job waits for an engine and nobody holds it (postgresql.py schema 10): an instance
    #: with a free engine place may claim it (runtime/leasing.py).  No change of the record.
    claimable: bool = False


class JobRecords(Protocol):
    """The job table.  Every method raises only :class:`StoreError`."""

    #: Where the records are, for the log (a path, or a DSN without its password).
    location: str
    #: Whether other servers may write these records too (PostgreSQL): then the runtime
    #: catches up with their changes and writes compare-and-set (issue 18).
    shared: bool

    def put(self, job: Job) -> None:
        """Insert or replace the job's record; durable (committed) when it returns."""

    def drop(self, token: str) -> None:
        """Delete the job's record (absent: nothing to do)."""

    def rows(self) -> list[StoredRecord]:
        """Every record, oldest first."""

    def row(self, token: str) -> StoredRecord | None:
        """The record of job ``token`` as :meth:`rows` gives it, read by its key; None when
        there is none."""

    def remove(self, seq: int) -> None:
        """Delete the row at ``seq`` (a record that does not decode, moved aside)."""

    def check(self) -> str | None:
        """None while the records can be read and written, else what is wrong (/healthz)."""

    def pool_stats(self) -> PoolStats | None:
        """The connection pool's state; None without a pool.  Never blocks."""

    def close(self) -> None: ...


#: What a job store carries out: the core's store commands, its subscription commands (kept
#: by a shared store only) and, on a shared store, notifications (outbox rows).
Storable = StoreCommand | SubscriptionCommand | Deliver | EventsWrite


@runtime_checkable
class SharedJobRecords(JobRecords, Protocol):
    """Job records several instances write (issue 18): versioned rows, a change feed, and
    the uploads each instance has in flight."""

    #: This run's name in the ``uploads`` rows: the cluster's instance id once it joined.
    instance: str
    #: Called (in the writer's thread) when an announcement was not written: its row says
    #: another state or term (set by the runtime, which then takes the lead again).
    announcement_refused: Callable[[], None] | None

    def release_uploads(self, home: str) -> list[tuple[str, int]]:
        """At start, holding the data folder's lock: delete the uploads rows an earlier run
        from ``home`` (host and data folder) left, which is dead; returns their (token,
        document_id), whose unfinished documents are debris."""

    def write(self, write: VersionedWrite) -> None:
        """Carry out a versioned record command: a row whose version is not ``expected`` any
        more raises a temporary StoreError (another instance changed the job)."""

    def changes(self, cursor: int, tokens: frozenset[str]) -> JobChanges:
        """Rows changed and deleted since ``cursor`` (0: every row), plus the rows of
        ``tokens`` (jobs', and subscriptions' by identifier) whatever their age, and the other
        instances' uploads in flight."""

    def upload_began(self, token: str, document_id: int, home: str) -> None:
        """Record an image being received here (from ``home``); a temporary StoreError when
        another live instance receives the same DocumentId."""

    def upload_ended(self, token: str, document_id: int) -> None: ...

    def store_subscription(self, identifier: str, expires: datetime, record: str) -> None:
        """Create or replace a subscription's row (its version bumped: the feed reports it)."""

    def end_subscription(self, identifier: str) -> None:
        """Mark a subscription ended (the feed reports it) and drop its outbox rows."""

    def enqueue(self, events: tuple[Deliver, ...]) -> None:
        """Outbox rows for notifications not caused by a job record write (ring the bell)."""

    def write_events(self, write: EventsWrite) -> None:
        """Outbox rows and the announcement they make, in one transaction (:class:`Announcement`
        says when it is refused)."""

    def record_failures(self, identifier: str, failures: int) -> None:
        """A subscription's count of failed deliveries (the feed reports it)."""

    def take_lead(self, leader: str, last: bool = False) -> tuple[str, int] | None:
        """This instance leads now: a new term in the row of the state announced last; (that
        state, the term) (issue 18 point 4).  None when the instance ``leader`` does not hold
        the leader's lock as the statement runs (another instance may lead: no term), unless
        ``last``: the last instance stopping, which announces Stopped whether it holds the
        lock or not (R7: nobody else is up), but takes none over an instance up that holds it
        (one started since it counted the others: that one leads).  StoreError when the
        database fails it; TermRowBusy (a StoreError) when another transaction holds the row
        of the term (an engine that does not wait for it), or the row is held for longer than
        a few seconds (it does not wait for good)."""

    def listen(
        self, ring: Callable[[Rang | None], None], heard: Callable[[bool], None]
    ) -> Closable:
        """Start the feed's doorbell (store/pgdoorbell.py): ``ring`` per change committed by
        anyone, ``heard`` the listener's state; close it before the records."""


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
        """Put the job's documents into the local folder ``target`` (quarantine); False when
        it had none.  A local spool moves them (one rename); S3 copies them, and they leave
        the bucket with :meth:`discard` once the job's row is deleted (store/undecodable.py),
        so that a quarantine cut off before its delete committed leaves them in place."""

    def remove_unfinished(self, token: str, document_id: int) -> None:
        """Drop what an earlier run of this server left of an unfinished document (it was
        receiving it when it died; issue 18: the uploads rows say which)."""

    def remove_debris(self, tokens: set[str], older_than: datetime | None = None) -> None:
        """Delete what a crash left: unfinished documents and documents of jobs not in
        ``tokens``; with ``older_than``, only what was last written before it (a shared
        spool: younger ones may be another instance's upload or new job, issue 18)."""

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

    def apply(self, command: Storable | VersionedWrite) -> None: ...

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
