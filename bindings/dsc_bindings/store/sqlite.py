"""The embedded job store (the default): SQLite job records in the data folder and the local
spool beside them.

Layout of ``data_dir``::

    jobs.sqlite3            one row per job and one per document of a job (WAL,
                            synchronous=FULL: a returned commit is on disk)
    lock                    flock'ed while open: one server per data directory (split.py)
    spool/...               the documents (localspool.py)

How commands are carried out, and what a failure answers, is split.py's (R4 step 9).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from dsc_bindings.store.errors import StoreError, as_store_error, is_temporary
from dsc_bindings.store.interface import StoredRecord
from dsc_bindings.store.jobcodec import DocumentRow, encode_job
from dsc_bindings.store.jobdocuments import KnownDocuments
from dsc_bindings.store.localspool import PART_SUFFIX, SPOOL_NAME, LocalSpool
from dsc_bindings.store.split import LOCK_NAME, QUARANTINE_NAME, SplitStore
from dsc_core.model import Job

__all__ = [
    "DB_NAME",
    "LOCK_NAME",
    "PART_SUFFIX",
    "QUARANTINE_NAME",
    "SCHEMA_VERSION",
    "SPOOL_NAME",
    "JobStore",
    "SqliteRecords",
    "StoreError",
    "is_temporary",
]

DB_NAME = "jobs.sqlite3"
#: Each entry brings the schema before it up by one (as PostgreSQL's, store/postgresql.py);
#: append only.  ``PRAGMA user_version`` is the number applied.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            token     TEXT PRIMARY KEY NOT NULL,
            seq       INTEGER NOT NULL UNIQUE,      -- creation order: load_jobs() is oldest first
            state     TEXT NOT NULL,                -- JobState value, for queries by hand
            active    INTEGER NOT NULL CHECK (active IN (0, 1)),
            created   TEXT NOT NULL,                -- ISO 8601 with UTC offset (R6)
            completed TEXT,
            job       TEXT NOT NULL                 -- the record, jobcodec.encode_job
        )""",
        "CREATE INDEX jobs_by_activity ON jobs (active, seq)",
    ),
    (
        # A job's documents beside its record, so that a SendImage writes its own row only
        # (store/jobdocuments.py); records written before keep theirs inside until rewritten.
        """CREATE TABLE job_documents (
            token       TEXT NOT NULL,
            ordinal     INTEGER NOT NULL,           -- its place in the job's documents
            document_id INTEGER NOT NULL,
            format      TEXT NOT NULL,
            size        INTEGER NOT NULL,
            PRIMARY KEY (token, ordinal)
        ) WITHOUT ROWID""",
    ),
)
#: ``PRAGMA user_version`` of the schema above; an older file is migrated, a newer one refused.
SCHEMA_VERSION = len(_MIGRATIONS)

_UPSERT = """
    INSERT INTO jobs (token, seq, state, active, created, completed, job)
    VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?, ?, ?, ?, ?)
    ON CONFLICT (token) DO UPDATE SET
        state = excluded.state, active = excluded.active, created = excluded.created,
        completed = excluded.completed, job = excluded.job
"""
_PUT_DOCUMENT = """
    INSERT OR REPLACE INTO job_documents (token, ordinal, document_id, format, size)
    VALUES (?, ?, ?, ?, ?)
"""


def record_columns(job: Job) -> tuple[str, str, bool, str, str | None, str]:
    """The columns both SQL stores keep per job: token, state, active, created, completed, record."""
    completed = None if job.completed is None else job.completed.isoformat()
    return (
        job.token,
        job.state.value,
        job.is_active,
        job.created.isoformat(),
        completed,
        encode_job(job),
    )


class SqliteRecords:
    """The job table in ``DATA/jobs.sqlite3``: one connection guarded by a lock."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.location = str(path)
        #: One server per data folder (DATA/lock): nobody else writes these records.
        self.shared = False
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._documents = KnownDocuments()

    @classmethod
    def open(cls, data_dir: Path, *, busy_timeout: float = 5.0) -> SqliteRecords:
        """``busy_timeout``: how long a write waits for another SQLite writer before it fails
        as a temporary error."""
        path = data_dir / DB_NAME
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: cannot use WAL (got {mode})", False)
            # FULL: the WAL is fsynced at every commit, so a returned put() survives power loss.
            conn.execute("PRAGMA synchronous=FULL")
            _migrate(conn)
            return cls(path, conn)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, (OSError, sqlite3.Error, MemoryError)):
                raise as_store_error(f"opening the job store in {data_dir}", exc) from exc
            raise

    def db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the job store is closed", temporary=False)
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def put(self, job: Job) -> None:
        token, state, active, created, completed, text = record_columns(job)
        documents = self._documents.plan(job)
        with self._lock:
            db = self.db()
            # One transaction: the record and its new document rows are durable together
            # when COMMIT returns (synchronous=FULL), or neither is.
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(_UPSERT, (token, state, int(active), created, completed, text))
                if documents.whole:
                    db.execute(
                        "DELETE FROM job_documents WHERE token = ? AND ordinal >= ?",
                        (token, documents.count),
                    )
                db.executemany(_PUT_DOCUMENT, [(token, *row) for row in documents.rows])
                db.execute("COMMIT")
            except BaseException:
                self._documents.forget(token)
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        self._documents.committed(job)

    def drop(self, token: str) -> None:
        with self._lock:
            self._delete("token = ?", (token,))
        self._documents.forget(token)

    def _delete(self, where: str, params: tuple[object, ...]) -> None:
        """Delete the jobs matching ``where`` and their document rows, in one transaction."""
        db = self.db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                f"DELETE FROM job_documents WHERE token IN (SELECT token FROM jobs WHERE {where})",
                params,
            )
            db.execute(f"DELETE FROM jobs WHERE {where}", params)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def rows(self) -> list[StoredRecord]:
        with self._lock:
            db = self.db()
            rows = db.execute("SELECT seq, token, job FROM jobs ORDER BY seq").fetchall()
            found: dict[str, list[DocumentRow]] = {}
            for token, document_id, format_, size in db.execute(
                "SELECT token, document_id, format, size FROM job_documents ORDER BY token, ordinal"
            ):
                found.setdefault(token, []).append((document_id, format_, size))
        return [(int(seq), str(token), text, found.get(token, ())) for seq, token, text in rows]

    def row(self, token: str) -> StoredRecord | None:
        with self._lock:
            db = self.db()
            found = db.execute(
                "SELECT seq, token, job FROM jobs WHERE token = ?", (token,)
            ).fetchone()
            if found is None:
                return None
            documents: list[DocumentRow] = [
                (document_id, format_, size)
                for document_id, format_, size in db.execute(
                    "SELECT document_id, format, size FROM job_documents WHERE token = ? "
                    "ORDER BY ordinal",
                    (token,),
                )
            ]
        seq, stored, text = found
        return (int(seq), str(stored), text, documents or ())

    def remove(self, seq: int) -> None:
        with self._lock:
            self._delete("seq = ?", (seq,))

    def pool_stats(self) -> None:
        return None  # one connection of its own, no pool

    def check(self) -> str | None:
        """``PRAGMA quick_check`` (b-tree and page structure, without the indexes' contents)
        on a connection of its own, so that it runs beside the writer (WAL)."""
        if self._conn is None:
            return "the job store is closed"
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
            try:
                rows = conn.execute("PRAGMA quick_check").fetchall()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return f"{self.path}: {exc}"
        found = [str(row[0]) for row in rows]
        if found == ["ok"]:
            return None
        return f"{self.path}: PRAGMA quick_check: {'; '.join(found[:5])}"


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"job store schema {version} is newer than this server ({SCHEMA_VERSION})",
                False,
            )
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        if version != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class JobStore(SplitStore):
    """The embedded store: :class:`SqliteRecords` and :class:`LocalSpool` in ``data_dir``."""

    records: SqliteRecords
    spool: LocalSpool

    @classmethod
    def open(cls, data_dir: Path, *, busy_timeout: float = 5.0) -> JobStore:
        """Open (creating if needed) the store in ``data_dir`` and remove crash debris.
        Raises :class:`StoreError`, also when another process has the directory open."""
        data_dir = Path(data_dir)
        return cls.assemble(
            data_dir,
            lambda: SqliteRecords.open(data_dir, busy_timeout=busy_timeout),
            lambda: LocalSpool.open(data_dir),
        )

    @property
    def spool_dir(self) -> Path:
        return self.spool.spool_dir

    def _db(self) -> sqlite3.Connection:
        return self.records.db()
