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

import logging
import threading
from collections.abc import Sequence

from dsc_bindings.store.jobcodec import decode_job
from dsc_core.model import Job

__all__ = ["UndecodableRecords", "decode_stored"]

log = logging.getLogger("dsc.store")


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
    does not decode either is logged again.  Thread-safe (catch-up reads run in pool threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._logged: dict[str, str] = {}

    def decode(self, token: str, text: str, documents: Sequence[Sequence[object]]) -> Job | None:
        """The job of the row, or None (logged once) when it does not decode."""
        try:
            return decode_stored(token, text, documents)
        except ValueError as exc:
            self.leave_out(token, text, str(exc))
            return None

    def leave_out(self, token: str, text: str, why: str) -> None:
        """Log that this instance leaves the row out, unless it said so for this record."""
        with self._lock:
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
