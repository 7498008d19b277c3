"""The durable job store: an SQLite table of job records and a spool directory of documents.

The core emits store commands (dsc_core.commands) in order; the binding carries each one out with
:meth:`JobStore.apply` before it sends the reply of the exchange.  If one fails, the core answers
with the R4 step 9 fault instead: ``ServerErrorTemporaryError`` when :attr:`StoreError.temporary`
(disk full, out of memory, database busy: a retry may succeed), else ``ServerErrorInternalError``.
So once ``apply(FinishDocument(...))`` returns, the image is on disk (fsynced and renamed into
place) and may be acknowledged; a crash at any point before leaves nothing that :meth:`open`
does not clean up.

Layout of ``data_dir``::

    jobs.sqlite3            one row per job (WAL, synchronous=FULL: a returned commit is on disk)
    lock                    flock'ed while open: one server per data directory
    spool/<token>/<id>      a finished document (decimal DocumentId)
    spool/<token>/.<id>.part  a document being received (debris after a crash; removed at open)

Image bytes are written straight to the file descriptor as they come (R8: memory must not grow
with the image size): no buffer in between, so a full disk is reported by the very AppendDocument
that hit it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from dsc_bindings.durable import fsync_dir, write_all
from dsc_bindings.store.jobcodec import decode_job, encode_job
from dsc_core.commands import (
    AbortDocument,
    AppendDocument,
    BeginDocument,
    CreateJob,
    DiscardDocuments,
    DropJob,
    FinishDocument,
    StoreCommand,
    UpdateJob,
)
from dsc_core.model import Job

try:  # POSIX advisory lock; without it (Windows) two servers on one directory are not detected.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("dsc.store")

__all__ = ["DB_NAME", "SCHEMA_VERSION", "SPOOL_NAME", "JobStore", "StoreError", "is_temporary"]

DB_NAME = "jobs.sqlite3"
SPOOL_NAME = "spool"
LOCK_NAME = "lock"
#: Job records that did not decode at start, moved aside (JobStore._quarantine).
QUARANTINE_NAME = "quarantine"
PART_SUFFIX = ".part"
#: ``PRAGMA user_version`` of the schema below; an older file is migrated, a newer one refused.
SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE jobs (
        token     TEXT PRIMARY KEY NOT NULL,
        seq       INTEGER NOT NULL UNIQUE,      -- creation order: load_jobs() is oldest first
        state     TEXT NOT NULL,                -- JobState value, for queries by hand
        active    INTEGER NOT NULL CHECK (active IN (0, 1)),
        created   TEXT NOT NULL,                -- ISO 8601 with UTC offset (R6)
        completed TEXT,
        job       TEXT NOT NULL                 -- the whole record, jobcodec.encode_job
    )""",
    "CREATE INDEX jobs_by_activity ON jobs (active, seq)",
)

_UPSERT = """
    INSERT INTO jobs (token, seq, state, active, created, completed, job)
    VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?, ?, ?, ?, ?)
    ON CONFLICT (token) DO UPDATE SET
        state = excluded.state, active = excluded.active, created = excluded.created,
        completed = excluded.completed, job = excluded.job
"""

# R4 step 9: conditions a retry may get past.
_TEMPORARY_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.ENOMEM) if e is not None
)
_TEMPORARY_SQLITE = frozenset({5, 6, 7, 13})  # SQLITE_BUSY, _LOCKED, _NOMEM, _FULL
_TEMPORARY_SQLITE_TEXT = (
    "database is locked",
    "database is busy",
    "database table is locked",
    "database or disk is full",
    "out of memory",
)


class StoreError(Exception):
    """A store command could not be carried out.

    ``temporary`` selects the R4 step 9 fault: True -> ``ServerErrorTemporaryError`` (disk full,
    quota, out of memory, database busy), False -> ``ServerErrorInternalError``.
    """

    def __init__(self, message: str, temporary: bool) -> None:
        super().__init__(message)
        self.message = message
        self.temporary = temporary

    def __repr__(self) -> str:
        return f"StoreError({self.message!r}, temporary={self.temporary})"


def is_temporary(exc: BaseException) -> bool:
    """Whether a retry of what raised ``exc`` may succeed (R4 step 9)."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _TEMPORARY_ERRNOS
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)  # extended code; primary = low byte
        if code is not None and code & 0xFF in _TEMPORARY_SQLITE:
            return True
        text = str(exc).lower()
        return any(t in text for t in _TEMPORARY_SQLITE_TEXT)
    return False


def _as_store_error(what: str, exc: BaseException) -> StoreError:
    return StoreError(f"{what}: {type(exc).__name__}: {exc}", is_temporary(exc))


def _check_token(token: str) -> str:
    # Tokens are GUIDs made by the core (R6); still, the token becomes a directory name, so make
    # sure it cannot leave the spool or hide as a dot file.
    if (
        not isinstance(token, str)
        or not token
        or len(token) > 200
        or token.startswith(".")
        or any(c in token for c in "/\\\0")
    ):
        raise StoreError(f"not a usable job token: {token!r}", temporary=False)
    return token


def _check_document_id(document_id: int) -> int:
    if not isinstance(document_id, int) or isinstance(document_id, bool):
        raise StoreError(f"not a document id: {document_id!r}", temporary=False)
    return document_id


@dataclass(slots=True)
class _OpenDocument:
    fd: int
    part: Path
    final: Path
    written: int = 0


class JobStore:
    """Job records in SQLite, documents in a spool directory.  Use :meth:`open`.

    Thread-safe: the one connection is guarded by a lock; open documents by another (so that
    writing or fsyncing a large image does not hold up job updates of other exchanges).
    Commands for one document must come in order (as the core emits them).
    """

    def __init__(self, data_dir: Path, conn: sqlite3.Connection, lock_fd: int | None) -> None:
        self.data_dir = data_dir
        self.spool_dir = data_dir / SPOOL_NAME
        self._conn: sqlite3.Connection | None = conn
        self._lock_fd = lock_fd
        self._db_lock = threading.Lock()
        self._docs_lock = threading.Lock()
        self._open: dict[tuple[str, int], _OpenDocument] = {}

    # --- opening and closing ------------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: Path, *, busy_timeout: float = 5.0) -> JobStore:
        """Open (creating if needed) the store in ``data_dir`` and remove crash debris.

        ``busy_timeout`` is how long a write waits for another SQLite writer before it fails as
        a temporary error.  Raises :class:`StoreError`, also when another process has the
        directory open.
        """
        data_dir = Path(data_dir)
        lock_fd: int | None = None
        conn: sqlite3.Connection | None = None
        try:
            spool = data_dir / SPOOL_NAME
            spool.mkdir(parents=True, exist_ok=True)
            fsync_dir(data_dir)
            lock_fd = cls._lock(data_dir / LOCK_NAME)
            conn = sqlite3.connect(
                data_dir / DB_NAME,
                timeout=busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{data_dir / DB_NAME}: cannot use WAL (got {mode})", False)
            # FULL: the WAL is fsynced at every commit, so a returned apply() survives power loss.
            conn.execute("PRAGMA synchronous=FULL")
            cls._migrate(conn)
            store = cls(data_dir, conn, lock_fd)
            store._remove_debris()
            return store
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if lock_fd is not None:
                os.close(lock_fd)
            if isinstance(exc, (OSError, sqlite3.Error, MemoryError)):
                raise _as_store_error(f"opening the job store in {data_dir}", exc) from exc
            raise

    @staticmethod
    def _lock(path: Path) -> int | None:
        # Open-time cleanup deletes every .part file: a second server on the same directory
        # would delete the first one's uploads in progress.  So one process per directory.
        if fcntl is None:  # pragma: no cover
            return None
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{path.parent} is in use by another job store", False) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"job store schema {version} is newer than this server ({SCHEMA_VERSION})",
                    False,
                )
            if version == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _remove_debris(self) -> None:
        """Delete what a crash left: ``.part`` files (never acknowledged, R4 step 9) and spool
        folders of tokens without a job row (a DropJob interrupted after its row was deleted,
        or documents begun for a job whose CreateJob never committed)."""
        tokens = {row[0] for row in self._db().execute("SELECT token FROM jobs")}
        changed = False
        for entry in self.spool_dir.iterdir():
            if entry.is_symlink() or not entry.is_dir():
                continue  # not ours: we only ever create directories here
            if entry.name not in tokens:
                shutil.rmtree(entry)
                changed = True
                continue
            removed = False
            for item in entry.iterdir():
                if item.name.startswith(".") and item.name.endswith(PART_SUFFIX):
                    item.unlink()
                    removed = True
            if removed:
                fsync_dir(entry)
        if changed:
            fsync_dir(self.spool_dir)

    def close(self) -> None:
        """Close the database; documents still open are aborted (their ``.part`` deleted)."""
        with self._docs_lock:
            docs = list(self._open.values())
            self._open.clear()
        for doc in docs:
            self._drop_open(doc)
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> JobStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the job store is closed", temporary=False)
        return self._conn

    # --- commands -----------------------------------------------------------------------------

    def apply(self, command: StoreCommand) -> None:
        """Carry out one store command; raises only :class:`StoreError` (or ``TypeError`` for
        something that is not a store command).

        A document whose Append or Finish failed is gone (its file deleted): the SendImage was
        not acknowledged, so the device sends it again; a later AbortDocument for it is a no-op.
        """
        try:
            match command:
                case CreateJob(job=job) | UpdateJob(job=job):
                    self._put(job)
                case BeginDocument():
                    self._begin(command.token, command.document_id)
                case AppendDocument():
                    self._append(command.token, command.document_id, command.data)
                case FinishDocument():
                    self._finish(command.token, command.document_id, command.size)
                case AbortDocument():
                    self._abort(command.token, command.document_id)
                case DiscardDocuments():
                    self._discard(command.token)
                case DropJob():
                    self._drop(command.token)
                case _:
                    raise TypeError(f"not a store command: {command!r}")
        except (OSError, sqlite3.Error, MemoryError) as exc:
            raise _as_store_error(type(command).__name__, exc) from exc

    def _put(self, job: Job) -> None:
        text = encode_job(job)
        completed = None if job.completed is None else job.completed.isoformat()
        with self._db_lock:
            # One statement in autocommit mode: atomic, and durable when it returns.
            self._db().execute(
                _UPSERT,
                (
                    job.token,
                    job.state.value,
                    int(job.is_active),
                    job.created.isoformat(),
                    completed,
                    text,
                ),
            )

    def _begin(self, token: str, document_id: int) -> None:
        folder = self.spool_dir / _check_token(token)
        key = (token, _check_document_id(document_id))
        with self._docs_lock:
            self._db()  # refuse when closed
            if key in self._open:
                raise StoreError(f"document {document_id} of {token} is already open", False)
            try:
                folder.mkdir()
                fsync_dir(self.spool_dir)  # the new folder's entry must survive a crash too
            except FileExistsError:
                pass
            part = folder / f".{document_id}{PART_SUFFIX}"
            # O_TRUNC: a leftover .part of the same id holds nothing acknowledged.
            fd = os.open(
                part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600
            )
            self._open[key] = _OpenDocument(fd, part, folder / str(document_id))

    def _take(self, token: str, document_id: int, pop: bool) -> _OpenDocument:
        with self._docs_lock:
            doc = (self._open.pop if pop else self._open.get)((token, document_id), None)
        if doc is None:
            raise StoreError(f"document {document_id} of {token} is not open", False)
        return doc

    def _append(self, token: str, document_id: int, data: bytes) -> None:
        doc = self._take(token, document_id, pop=False)
        try:
            doc.written += write_all(doc.fd, data)
        except BaseException:
            with self._docs_lock:
                self._open.pop((token, document_id), None)
            self._drop_open(doc)
            raise

    def _finish(self, token: str, document_id: int, size: int) -> None:
        doc = self._take(token, document_id, pop=True)
        renamed = False
        try:
            # Writes went straight to the descriptor, so there is no user-space buffer to flush.
            os.fsync(doc.fd)
            on_disk = os.fstat(doc.fd).st_size
            os.close(doc.fd)
            doc.fd = -1
            if on_disk != size or doc.written != size:
                raise StoreError(
                    f"document {document_id} of {token}: {on_disk} bytes stored, {size} expected",
                    temporary=False,
                )
            os.replace(doc.part, doc.final)
            renamed = True
            fsync_dir(doc.final.parent)  # the rename itself is durable only with this
        except BaseException:
            self._drop_open(doc)
            if renamed:  # not acknowledged, so not a document: leave nothing behind
                doc.final.unlink(missing_ok=True)
            raise

    def _abort(self, token: str, document_id: int) -> None:
        folder = self.spool_dir / _check_token(token)
        with self._docs_lock:
            doc = self._open.pop((token, _check_document_id(document_id)), None)
        if doc is not None:
            self._drop_open(doc)
        else:  # already cleaned up by a failed Append/Finish, or never begun: idempotent
            (folder / f".{document_id}{PART_SUFFIX}").unlink(missing_ok=True)
        # A document finished on disk but whose job record then failed to persist was never
        # acknowledged (R4 step 9): remove it too.  The core never aborts an acknowledged
        # DocumentId (a second upload of one is refused before BeginDocument), so this cannot
        # delete a document a scanner was told is safe.
        (folder / str(document_id)).unlink(missing_ok=True)

    @staticmethod
    def _drop_open(doc: _OpenDocument) -> None:
        """Close and delete an unfinished document; closing errors do not matter any more."""
        if doc.fd >= 0:
            try:
                os.close(doc.fd)
            except OSError:
                pass
            doc.fd = -1
        doc.part.unlink(missing_ok=True)

    def _discard(self, token: str) -> None:
        folder = self.spool_dir / _check_token(token)
        with self._docs_lock:
            docs = [self._open.pop(k) for k in [k for k in self._open if k[0] == token]]
        for doc in docs:
            self._drop_open(doc)
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            return
        # R6: a timed-out job's images are discarded while its row stays in the history; if
        # the deletion were lost in a crash, the open-time cleanup would not redo it.
        fsync_dir(self.spool_dir)

    def _drop(self, token: str) -> None:
        _check_token(token)
        with self._db_lock:
            self._db().execute("DELETE FROM jobs WHERE token = ?", (token,))
        # Row first, files second: a crash in between leaves a folder without a row, which
        # open() removes; the other order could leave a row whose documents are gone.
        self._discard(token)

    # --- queries ------------------------------------------------------------------------------

    def quick_check(self) -> str | None:
        """``PRAGMA quick_check`` (SQLite: b-tree and page structure, without the indexes'
        contents) on a connection of its own, so that it runs beside the writer (WAL); None
        when the database is sound, else what SQLite found.  For /healthz (issue 14)."""
        if self._conn is None:
            return "the job store is closed"
        try:
            conn = sqlite3.connect(f"file:{self.data_dir / DB_NAME}?mode=ro", uri=True, timeout=5)
            try:
                rows = conn.execute("PRAGMA quick_check").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return f"{self.data_dir / DB_NAME}: {exc}"
        found = [str(row[0]) for row in rows]
        if found == ["ok"]:
            return None
        return f"{self.data_dir / DB_NAME}: PRAGMA quick_check: {'; '.join(found[:5])}"

    def load_jobs(self) -> list[Job]:
        """Every stored job, oldest first (to restore the core at start).  A record that does
        not decode is quarantined (:meth:`_quarantine`), not a server that cannot start."""
        try:
            with self._db_lock:
                rows = (
                    self._db().execute("SELECT seq, token, job FROM jobs ORDER BY seq").fetchall()
                )
        except (sqlite3.Error, MemoryError) as exc:
            raise _as_store_error("loading jobs", exc) from exc
        jobs = []
        for seq, token, text in rows:
            try:
                job = decode_job(text)
                if job.token != token:
                    raise ValueError(f"the record has token {job.token}")
            except (ValueError, TypeError) as exc:
                self._quarantine(seq, token, text, str(exc))
                continue
            jobs.append(job)
        return jobs

    def _quarantine(self, seq: int, token: object, record: object, why: str) -> None:
        """Move a job record that does not decode out of the way: its row (token, error, the
        record as stored) to ``quarantine/job-SEQ.json`` and its spool folder next to it, then
        delete the row, logged at ERROR.  Every other job is served as usual."""
        folder = self.data_dir / QUARANTINE_NAME
        folder.mkdir(mode=0o700, exist_ok=True)
        target = folder / f"job-{seq}.json"
        text = record if isinstance(record, str) else repr(record)
        payload = json.dumps({"token": str(token), "error": why, "record": text}, indent=1)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, payload.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(folder)
        spool = ""
        try:
            documents = self.spool_dir / _check_token(str(token))
            if documents.is_dir():
                documents.rename(folder / f"job-{seq}.spool")
                spool = f" and its documents to {folder / f'job-{seq}.spool'}"
        except StoreError:
            pass  # a token that cannot be a folder has no documents
        try:
            with self._db_lock:
                self._db().execute("DELETE FROM jobs WHERE seq = ?", (seq,))
        except sqlite3.Error as exc:
            raise _as_store_error("quarantining a job record", exc) from exc
        log.error(
            "job %s: the stored record does not decode (%s): moved to %s%s; the server "
            "starts without it",
            token,
            why,
            target,
            spool,
        )

    def document_path(self, token: str, document_id: int) -> Path:
        """Where the finished document is (for the processing engine); it may not exist."""
        return self.spool_dir / _check_token(token) / str(_check_document_id(document_id))

    def documents(self, token: str) -> list[Path]:
        """The finished documents of a job, by DocumentId (no ``.part`` files)."""
        folder = self.spool_dir / _check_token(token)
        found: list[tuple[int, Path]] = []
        try:
            entries = list(folder.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _as_store_error(f"listing documents of {token}", exc) from exc
        for entry in entries:
            try:
                document_id = int(entry.name)
            except ValueError:
                continue  # a .part file
            if str(document_id) == entry.name:  # exactly the name _finish gives
                found.append((document_id, entry))
        return [path for _, path in sorted(found)]
