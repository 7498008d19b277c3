"""Which of a job's document rows a record write carries, and which ones a catch-up reads (both
SQL stores; reads on shared PostgreSQL only).

A job's documents are rows of their own beside its record (``job_documents``: token, ordinal,
document_id, format, size; jobcodec version 3), because each SendImage adds one document and
writing the whole list again made a job of n images cost O(n^2) (the last review).  A write
carries the rows from the first document the table may not hold yet: the store remembers, per
job, the document rows the table held at a row version (:class:`KnownDocuments`): those its
last committed write left there or, on shared PostgreSQL, those it last read from the change
feed (another instance's write), and a job whose documents still begin with those adds only
the rest.  Anything else (a job neither written nor read since this start, a failed write
whose outcome is unknown, a shorter list after an undo, or on shared PostgreSQL a row version
this store did not write nor read: another instance wrote the job in between) writes every
row again and deletes those past the end: slower, never wrong.

Documents of a job only grow, one SendImage at a time (R6); the core's undo of a failed write
(R4 step 9) gives back the list before it, which is the case above that rewrites.

The change feed mirrors this (postgresql.py ``PostgresRecords.changes``, issue 18): each row of
``job_documents`` carries the job's row version that wrote it last, so a catch-up that knows
the job's rows at version v reads only the rows written after v, each with its ordinal, and
the job's count of rows.  Every other row is the one it knew at v: a write after v gives each
row it writes its version, and deletes the rows past its end.  So an append reads one row, a
whole rewrite (an undo, another list) reads them all.  A row without a version (written before
schema 14, or by a server of an earlier version, whose updates a trigger makes forget theirs)
is always read; the upgrade to schema 17 gave those of active jobs their job's version once
(postgresql.py, docs/architecture.md "Several instances" says why that is safe).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from dsc_bindings.store.jobcodec import document_row
from dsc_core.model import Document, Job

__all__ = ["DocumentsWrite", "Known", "KnownDocuments"]


@dataclass(frozen=True, slots=True)
class DocumentsWrite:
    """The document rows of one record write: the job has ``count`` documents; the rows from
    ordinal ``start`` on are written (upserted by ordinal); with ``start`` 0 the rows from
    ``count`` on are deleted too (a whole rewrite)."""

    token: str
    count: int
    start: int
    #: (ordinal, document_id, format, size) of each row written.
    rows: tuple[tuple[int, int, str, int], ...]

    @property
    def whole(self) -> bool:
        return self.start == 0

    def columns(self) -> dict[str, object]:
        """The rows as the array parameters of PostgreSQL's ``unnest`` (one per column)."""
        return {
            "count": self.count,
            "ordinals": [row[0] for row in self.rows],
            "ids": [row[1] for row in self.rows],
            "formats": [row[2] for row in self.rows],
            "sizes": [row[3] for row in self.rows],
        }


@dataclass(frozen=True, slots=True)
class Known:
    """The document rows the table held for a job at a row version."""

    #: The row version (shared records), None for SQLite's.
    version: int | None
    documents: tuple[Document, ...]


class KnownDocuments:
    """Per active job, the document rows the table held at the latest row version this store
    wrote or read (module doc).  Thread-safe (the writer thread writes, the catch-up reads, a
    tool may too)."""

    def __init__(self) -> None:
        self._known: dict[str, Known] = {}
        self._lock = threading.Lock()

    def plan(self, job: Job, version: int | None = None, *, whole: bool = False) -> DocumentsWrite:
        """The rows a write of ``job`` carries; ``version``: the row version it replaces (a
        compare-and-set write; None on SQLite), ``whole``: every row, whatever is known."""
        documents = job.documents
        with self._lock:
            known = None if whole else self._known.get(job.token)
        start = 0
        if (
            known is not None
            and known.version == version
            and len(documents) >= len(known.documents)
            # Tuples of frozen documents: mostly the same objects, compared by identity first.
            and documents[: len(known.documents)] == known.documents
        ):
            start = len(known.documents)
        rows = tuple(
            (ordinal, *document_row(d)) for ordinal, d in enumerate(documents[start:], start)
        )
        return DocumentsWrite(job.token, len(documents), start, rows)

    def committed(self, job: Job, version: int | None = None) -> None:
        """The write of ``job`` committed, leaving the row at ``version`` (shared records).  An
        ended job is not remembered: it gets no more images, and what is remembered stays
        bounded by the active jobs (on shared records another instance may end and drop a job
        this one wrote; a later write of an ended job, a retry, is whole)."""
        self.read(job.token, version, job.is_active, job.documents)

    def read(
        self, token: str, version: int | None, active: bool, documents: tuple[Document, ...]
    ) -> None:
        """The table held ``documents`` for the job at row ``version``: remembered unless a
        later version is (a read and a write of this store may finish in either order), or
        the job ended (:meth:`committed`)."""
        with self._lock:
            if not active:
                self._known.pop(token, None)
                return
            known = self._known.get(token)
            if (
                known is None
                or version is None
                or known.version is None
                or version >= known.version
            ):
                self._known[token] = Known(version, documents)

    def known(self, minimum: int) -> dict[str, Known]:
        """The jobs known at a row version with at least ``minimum`` documents: those a
        catch-up reads only the rows written since (module doc)."""
        with self._lock:
            return {
                token: known
                for token, known in self._known.items()
                if known.version is not None and len(known.documents) >= minimum
            }

    def forget(self, token: str) -> None:
        """The job is gone, or a write's outcome is unknown: its next write is whole."""
        with self._lock:
            self._known.pop(token, None)
