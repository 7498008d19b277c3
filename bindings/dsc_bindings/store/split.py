"""A job store made of job records and a spool (interface.py): carries out the core's store
commands (dsc_core.commands) in order, restores the jobs at start, finds their documents.

The core emits store commands; the binding carries each one out with :meth:`SplitStore.apply`
before it sends the reply of the exchange.  If one fails, the core answers with the R4 step 9
fault instead: ``ServerErrorTemporaryError`` when :attr:`StoreError.temporary`, else
``ServerErrorInternalError``.  So once ``apply(FinishDocument(...))`` returns, the image is
durable in the spool and may be acknowledged; a crash at any point before leaves nothing that
:meth:`SplitStore.assemble` does not clean up.

One server per data folder (``DATA/lock``, flock'ed while open): the open-time cleanup removes
unfinished documents, which would be another server's uploads in progress.  With shared records
(PostgreSQL, issue 18) other instances may write the same spool: the cleanup then removes only
what is older than :data:`SHARED_DEBRIS_SECONDS` (an upload, or a job created after this
instance read the rows, is younger), and each image being received is an ``uploads`` row.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self, cast

from dsc_bindings.store.errors import StoreError, as_store_error
from dsc_bindings.store.interface import (
    Closable,
    EventsWrite,
    JobChanges,
    JobRecords,
    Rang,
    SharedJobRecords,
    Spool,
    Storable,
    StorageFigures,
    StoredDocuments,
    VersionedWrite,
    check_token,
)
from dsc_bindings.store.subcodec import encode_subscription
from dsc_bindings.store.undecodable import (
    QUARANTINE_NAME,
    UndecodableRecords,
    decode_stored,
    quarantine,
)
from dsc_core.commands import (
    AbortDocument,
    AppendDocument,
    BeginDocument,
    CreateJob,
    Deliver,
    DiscardDocuments,
    DropJob,
    EndSubscription,
    FinishDocument,
    RecordDeliveryFailures,
    StoreSubscription,
    UpdateJob,
)
from dsc_core.model import Job

if TYPE_CHECKING:
    from dsc_bindings.store.pgoutbox import OutboxRows

try:  # POSIX advisory lock; without it (Windows) two servers on one directory are not detected.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("dsc.store")

__all__ = [
    "LOCK_NAME",
    "QUARANTINE_NAME",
    "SHARED_DEBRIS_SECONDS",
    "OpenedParts",
    "SplitStore",
    "flock_file",
    "lock_data_dir",
    "open_parts",
]

LOCK_NAME = "lock"
#: With shared records, spool debris is what is older than this (a day: no upload or Creating
#: job lasts that long, the R6 timeout ends the latter).
SHARED_DEBRIS_SECONDS = 24 * 3600


def lock_data_dir(data_dir: Path) -> int | None:
    """Take ``DATA/lock`` (one server per data folder); StoreError when another has it."""
    try:
        return flock_file(data_dir / LOCK_NAME)
    except BlockingIOError:
        raise StoreError(f"{data_dir} is in use by another job store", False) from None


def flock_file(path: Path) -> int | None:
    """Open ``path`` (created) and take its exclusive flock without waiting; the descriptor,
    which holds the lock until it is closed or the process ends (a killed process frees it),
    or None where there is no flock.  BlockingIOError when another process holds it."""
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class OpenedParts:
    """What :func:`open_parts` opened: the records, the spool and the data folder's lock."""

    records: JobRecords
    spool: Spool
    #: ``DATA/lock``'s descriptor; None when not taken (or where there is no flock).
    lock_fd: int | None


def open_parts(
    opened: ExitStack,
    data_dir: Path,
    open_records: Callable[[], JobRecords],
    open_spool: Callable[[], Spool],
    *,
    lock: bool,
) -> OpenedParts:
    """Make ``data_dir``; take its lock when ``lock`` (one server per data folder); open the
    records, then the spool.  Each part is closed by ``opened`` as soon as it is open (the
    spool, the records, the lock: the reverse order), so whatever fails, here or in the
    caller's later steps, leaves nothing open once the stack unwinds; ``opened.pop_all()``
    hands them on to whoever closes them instead (:meth:`SplitStore.assemble`).  The one
    place for the server's start, ``dsc db quarantine``, which locks only the embedded store
    and must not clean a spool other servers use, and ``dsc db migrate``'s destination, whose
    data folder the source holds locked (console/db.py)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = lock_data_dir(data_dir) if lock else None
    if lock_fd is not None:
        opened.callback(os.close, lock_fd)  # releases the flock
    records = open_records()
    opened.callback(records.close)
    spool = open_spool()
    opened.callback(spool.close)
    return OpenedParts(records, spool, lock_fd)


class SplitStore:
    """Job records plus a spool; thread-safe as its parts are.  Use :meth:`assemble`."""

    def __init__(
        self, data_dir: Path, records: JobRecords, spool: Spool, lock_fd: int | None
    ) -> None:
        self.data_dir = data_dir
        self.records = records
        self.spool = spool
        self._lock_fd = lock_fd
        #: Where this server runs from (its ``uploads`` rows, issue 18): one server per data
        #: folder and host, so a run that finds rows of its home knows their writer is dead.
        self.home = f"{socket.gethostname()}:{data_dir.resolve()}"
        #: The rows of a shared store this instance leaves out (store/undecodable.py); the
        #: catch-up shares it, so that each is logged once.
        self.undecodable = UndecodableRecords()

    @classmethod
    def assemble(
        cls,
        data_dir: Path,
        open_records: Callable[[], JobRecords],
        open_spool: Callable[[], Spool],
    ) -> Self:
        """Lock ``data_dir``, open the records and the spool, remove crash debris from the spool;
        on failure whatever was opened is closed again.  Raises :class:`StoreError`."""
        try:
            with ExitStack() as opened:
                parts = open_parts(opened, data_dir, open_records, open_spool, lock=True)
                records, spool = parts.records, parts.spool
                store = cls(data_dir, records, spool, parts.lock_fd)
                if isinstance(records, SharedJobRecords):
                    # We hold the data folder's lock: the run that wrote these rows is dead.
                    for token, document_id in records.release_uploads(store.home):
                        spool.remove_unfinished(token, document_id)
                tokens = {row[1] for row in records.rows()}
                if records.shared:
                    older = datetime.now(UTC) - timedelta(seconds=SHARED_DEBRIS_SECONDS)
                    spool.remove_debris(tokens, older_than=older)
                else:
                    spool.remove_debris(tokens)
                opened.pop_all()  # the store closes them from now on
                return store
        except (OSError, sqlite3.Error, MemoryError) as exc:
            raise as_store_error(f"opening the job store in {data_dir}", exc) from exc

    def close(self) -> None:
        """Close both parts; documents still open are aborted."""
        self.spool.close()
        self.records.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> SplitStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- commands -----------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether other instances write these records too (issue 18)."""
        return self.records.shared

    def job_changes(self, cursor: int, tokens: frozenset[str]) -> JobChanges:
        """What other instances changed since ``cursor`` (SharedJobRecords.changes)."""
        return self._shared().changes(cursor, tokens)

    def outbox(self) -> OutboxRows:
        """The delivery side of the outbox (issue 18 point 3): PostgreSQL only."""
        outbox = getattr(self.records, "outbox", None)
        if outbox is None:
            raise StoreError("these job records have no outbox", temporary=False)
        return cast("OutboxRows", outbox())

    def listen(
        self, ring: Callable[[Rang | None], None], heard: Callable[[bool], None]
    ) -> Closable:
        """The feed's doorbell (SharedJobRecords.listen)."""
        return self._shared().listen(ring, heard)

    def join(self, instance: str) -> None:
        """Name this run's uploads rows by its id in the cluster's ``instances`` table, so that
        the others stop counting them once it is down (issue 18)."""
        self._shared().instance = instance

    def _shared(self) -> SharedJobRecords:
        records = self.records
        if not isinstance(records, SharedJobRecords):
            raise StoreError("these job records are not shared", temporary=False)
        return records

    def apply(self, command: Storable | VersionedWrite) -> None:
        """Carry out one store command; raises only :class:`StoreError` (or ``TypeError`` for
        something that is not a store command).

        A document whose Append or Finish failed is gone: the SendImage was not acknowledged,
        so the device sends it again; a later AbortDocument for it is a no-op.
        """
        try:
            shared = self.records.shared
            match command:
                case VersionedWrite():
                    if isinstance(command.command, DropJob):
                        check_token(command.command.token)
                    self._shared().write(command)
                    if isinstance(command.command, DropJob):
                        self.spool.discard(command.command.token)
                case CreateJob(job=job) | UpdateJob(job=job):
                    self.records.put(job)
                case BeginDocument():
                    if shared:  # R6 duplicates and idle timeouts on every instance
                        self._shared().upload_began(command.token, command.document_id, self.home)
                    self.spool.begin(command.token, command.document_id)
                case AppendDocument():
                    self.spool.append(command.token, command.document_id, command.data)
                case FinishDocument():
                    # Its uploads row goes with the job's record (PostgresRecords.write).
                    self.spool.finish(command.token, command.document_id, command.size)
                case AbortDocument():
                    self.spool.abort(command.token, command.document_id)
                    if shared:
                        self._shared().upload_ended(command.token, command.document_id)
                case DiscardDocuments():
                    self.spool.discard(command.token)
                case DropJob():
                    check_token(command.token)
                    # Row first, documents second: a crash in between leaves documents without
                    # a row, which the next start removes; the other order could leave a row whose
                    # documents are gone.
                    self.records.drop(command.token)
                    self.spool.discard(command.token)
                case (
                    StoreSubscription()
                    | EndSubscription()
                    | RecordDeliveryFailures()
                    | Deliver()
                    | EventsWrite()
                ):
                    self._apply_events(command, shared)
                case _:
                    raise TypeError(f"not a store command: {command!r}")
        except (OSError, sqlite3.Error, MemoryError) as exc:
            raise as_store_error(type(command).__name__, exc) from exc

    def _apply_events(
        self,
        command: StoreSubscription
        | EndSubscription
        | RecordDeliveryFailures
        | Deliver
        | EventsWrite,
        shared: bool,
    ) -> None:
        """Subscriptions and the outbox of a shared store (runtime/outbox.py sends them); one
        server keeps its subscriptions and failure counts in memory (R7) and hands
        notifications to its hub (an AnnounceRepositoryState's events too: it never reaches
        a store, runtime/writer.py).  On a shared store an AnnounceRepositoryState became an
        Announcement of a write (runtime/catchup.py; issue 18 point 4)."""
        if not shared:
            return
        records = self._shared()
        if isinstance(command, StoreSubscription):
            sub = command.subscription
            records.store_subscription(sub.identifier, sub.expires, encode_subscription(sub))
        elif isinstance(command, EndSubscription):
            records.end_subscription(command.identifier)
        elif isinstance(command, RecordDeliveryFailures):
            records.record_failures(command.identifier, command.failures)
        elif isinstance(command, EventsWrite):
            records.write_events(command)
        else:
            records.enqueue((command,))

    # --- queries ------------------------------------------------------------------------------

    def quick_check(self) -> str | None:
        """None while records and spool are sound, else what is wrong (for /healthz)."""
        return self.records.check() or self.spool.check()

    @property
    def local_dir(self) -> Path:
        return self.spool.local_dir

    def figures(self) -> StorageFigures:
        """The engines' figures for /metrics (cheap, never blocks: read on the event loop)."""
        return StorageFigures(self.records.pool_stats(), self.spool.error_count())

    def load_jobs(self) -> list[Job]:
        """Every stored job, oldest first (to restore the core at start).  A record that does
        not decode does not stop the server (store/undecodable.py): with the embedded default
        it is quarantined (:meth:`_quarantine`); on a shared store it is left where it is, for
        the other instances (a newer server's?), and this instance does not serve it."""
        try:
            rows = self.records.rows()
        except (sqlite3.Error, MemoryError) as exc:
            raise as_store_error("loading jobs", exc) from exc
        jobs = []
        for seq, token, text, documents in rows:
            if self.shared:
                job = self.undecodable.decode(token, text, documents)
                if job is not None:
                    jobs.append(job)
                continue
            try:
                jobs.append(decode_stored(token, text, documents))
            except ValueError as exc:
                self._quarantine(seq, token, text, documents, str(exc))
        return jobs

    def _quarantine(
        self, seq: int, token: object, record: object, documents: StoredDocuments, why: str
    ) -> None:
        """Move a record that does not decode out of the way (store/undecodable.py
        :func:`quarantine`), logged at ERROR.  Every other job is served as usual."""
        where = quarantine(
            self.data_dir, self.records, self.spool, (seq, token, record, documents), why
        )
        log.error(
            "job %s: the stored record does not decode (%s): moved to %s; the server "
            "starts without it",
            token,
            why,
            where,
        )

    def document_path(self, token: str, document_id: int) -> Path:
        """A local file with the finished document (for the processing engine)."""
        return self.spool.document_path(token, document_id)

    def documents(self, token: str) -> list[Path]:
        """The finished documents of a job, by DocumentId."""
        return [self.spool.document_path(token, i) for i in self.spool.documents(token)]
