"""Job records a server cannot decode: one rule for the start (SplitStore.load_jobs) and, on a
shared store, the catch-up with the other instances (runtime/catchup.py).

:func:`decode_stored` is what a stored row must be to be served: a record
:func:`~dsc_bindings.store.jobcodec.decode_job` reads, of the row's own token.

What happens to a row that is not, depends on who owns the data:

- the embedded default (SQLite + the local folder): this server is its only reader, so the row
  is corruption and is moved aside at start (SplitStore._quarantine);
- a shared store (PostgreSQL, issue 18): the row is most likely a NEWER server's (a later codec
  version, a rolling upgrade under way) that the other instances serve.  Moving it aside would
  delete a live job for every instance (the row's tombstone) and take its shared documents into
  this instance's local folder.  So it is left where it is: this instance does not take it up
  and says so once (:class:`UndecodableRecords`); an operator who finds it truly corrupt moves
  it aside on purpose with ``dsc db quarantine TOKEN`` (console/db.py).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from dsc_bindings.durable import fsync_dir, write_all
from dsc_bindings.store.errors import StoreError, as_store_error
from dsc_bindings.store.interface import JobRecords, Spool, check_token
from dsc_bindings.store.jobcodec import CODEC_VERSION, decode_job
from dsc_core.model import Job

__all__ = [
    "QUARANTINE_NAME",
    "UndecodableRecords",
    "decode_stored",
    "discard_set_aside",
    "newer_codec",
    "quarantine",
    "set_aside",
]

log = logging.getLogger("dsc.store")

#: Job records moved aside (:func:`quarantine`), in the data folder.
QUARANTINE_NAME = "quarantine"


def decode_stored(token: str, text: str, documents: Sequence[Sequence[object]]) -> Job:
    """The job of the row ``token`` (its record ``text`` and document rows); ``ValueError``
    saying why when the record does not decode or is another job's."""
    try:
        job = decode_job(text, documents)
    except TypeError as exc:  # a hand-written row: a field of the wrong kind
        raise ValueError(str(exc)) from exc
    if job.token != token:
        raise ValueError(f"the record has token {job.token}")
    return job


class UndecodableRecords:
    """The rows of a shared store this instance leaves out (module doc), each logged at WARNING
    once per record: the start and every catch-up read of the same record (its token and text:
    each write of the row is a new record) say nothing more; a newer record of that job that
    does not decode either is logged again.  :meth:`tokens` are the jobs whose last record read
    does not decode: this instance never takes up their leases (store/leases.py, ``rescue``),
    so that an instance that can decode them runs them without waiting for a lease to run out
    on one that cannot.  Thread-safe (catch-up reads run in pool threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logged: dict[str, str] = {}
        #: token -> whether its last record read is a newer server's (:func:`newer_codec`).
        self._left_out: dict[str, bool] = {}

    def decode(self, token: str, text: str, documents: Sequence[Sequence[object]]) -> Job | None:
        """The job of the row, or None (logged once) when it does not decode."""
        try:
            job = decode_stored(token, text, documents)
        except ValueError as exc:
            self.leave_out(token, text, str(exc))
            return None
        self.forget(token)
        return job

    def forget(self, token: str) -> None:
        """The row of ``token`` decodes now, or is gone (its tombstone was read)."""
        with self._lock:
            self._left_out.pop(token, None)

    def tokens(self) -> frozenset[str]:
        """The jobs whose last record read does not decode here."""
        with self._lock:
            return frozenset(self._left_out)

    def corrupt(self) -> frozenset[str]:
        """Those of :meth:`tokens` whose record is no newer server's (:func:`newer_codec`): no
        instance reads it, and a retry cannot succeed until ``dsc db quarantine`` moves it
        aside (a request for one is ServerErrorInternalError, Exchange.rows_unreadable)."""
        with self._lock:
            return frozenset(token for token, newer in self._left_out.items() if not newer)

    def leave_out(self, token: str, text: str, why: str) -> None:
        """Log that this instance leaves the row out, unless it said so for this record."""
        newer = newer_codec(text) is not None
        with self._lock:
            self._left_out[token] = newer
            if self._logged.get(token) == text:
                return
            self._logged[token] = text
        log.warning(
            "job %s: the stored record does not decode (%s): this instance leaves it where it "
            "is and does not serve it; the other instances go on serving it. Written by a "
            "newer server? upgrade this instance. Corrupt? `dsc db quarantine %s` moves it "
            "aside for every instance",
            token,
            why,
            token,
        )


def newer_codec(text: object) -> int | None:
    """The codec version of a record a newer server wrote (above this server's
    ``CODEC_VERSION``), else None: such a record is not corrupt, this server is too old."""
    try:
        record = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    version = record.get("v") if isinstance(record, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > CODEC_VERSION:
        return version
    return None


def quarantine(
    data_dir: Path,
    records: JobRecords,
    spool: Spool,
    row: tuple[int, object, object, Sequence[Sequence[object]]],
    why: str,
) -> str:
    """Move a stored row ``(seq, token, record, documents)`` out of the way
    (:func:`set_aside`), then delete the row (on PostgreSQL with a tombstone: every instance
    forgets the job).  Where they went, for the log.  Raises StoreError.  Unconditional: for
    a store no other server writes meanwhile (the data folder's lock); ``dsc db quarantine``
    on a shared store deletes compare-and-set instead (``PostgresRecords.remove_unchanged``)."""
    where = set_aside(data_dir, spool, row, why)
    try:
        records.remove(row[0])
    except sqlite3.Error as exc:
        raise as_store_error("quarantining a job record", exc) from exc
    discard_set_aside(spool, row[1])
    return where


def discard_set_aside(spool: Spool, token: object) -> None:
    """After the row's delete committed: what :func:`set_aside` copied leaves the spool (S3's
    objects; a local spool's folder was moved already).  Before it, a quarantine cut off would
    have left the row without its documents.  A failure here loses nothing (the copies are in
    the quarantine folder) and leaves objects of a token without a row: the servers' debris
    sweep deletes them, so it is logged, not raised."""
    try:
        usable = check_token(str(token))
    except StoreError:
        return  # a token that cannot be a folder has no documents
    try:
        spool.discard(usable)
    except StoreError as exc:
        log.warning(
            "job %s: its documents were set aside but not removed from the spool (%s); "
            "the servers' debris sweep removes them",
            token,
            exc,
        )


def set_aside(
    data_dir: Path,
    spool: Spool,
    row: tuple[int, object, object, Sequence[Sequence[object]]],
    why: str,
) -> str:
    """Copy a stored row out of the way before it is deleted: the row (token, ``why``, the
    record and its document rows as stored) to ``DATA/quarantine/job-SEQ.json``, its documents
    next to it (``job-SEQ.spool``; from S3 copied: :func:`discard_set_aside` removes them once
    the row is gone).  Where they went, for the log."""
    seq, token, record, documents = row
    folder = data_dir / QUARANTINE_NAME
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = folder / f"job-{seq}.json"
    text = record if isinstance(record, str) else repr(record)
    payload = json.dumps(
        {
            "token": str(token),
            "error": why,
            "record": text,
            "documents": [list(r) for r in documents],
        },
        indent=1,
        default=repr,  # what a hand-written row holds, as it is
    )
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, payload.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(folder)
    where = str(target)
    try:
        check_token(str(token))
    except StoreError:
        return where  # a token that cannot be a folder has no documents
    # Any other failure (S3 refusing or unreachable) is raised, so that the row is not deleted:
    # documents left in the spool under a token without a row are debris the servers delete.
    if spool.set_aside(str(token), folder / f"job-{seq}.spool"):
        where += f" and its documents to {folder / f'job-{seq}.spool'}"
    return where
