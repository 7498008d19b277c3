"""The one failure of the job store (R4 step 9) and how an engine's error becomes one.

Every backend (SQLite, PostgreSQL, the local and the S3 spool) raises only :class:`StoreError`;
``temporary`` chooses the fault the core answers with: ``ServerErrorTemporaryError`` when a retry
may succeed, else ``ServerErrorInternalError``.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dsc_core.faults import SoapFault

__all__ = [
    "CreationRefused",
    "JobChanged",
    "StoreError",
    "TermRowBusy",
    "as_store_error",
    "is_temporary",
    "one_line",
]

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


def one_line(message: str) -> str:
    """libpq's messages span lines (a hint after a tab); an error of dsc is one line."""
    return " ".join(message.split())


class StoreError(Exception):
    """A store command could not be carried out.

    ``temporary`` selects the R4 step 9 fault: True -> ``ServerErrorTemporaryError`` (disk full,
    quota, out of memory, database busy or unreachable), False -> ``ServerErrorInternalError``.
    """

    def __init__(self, message: str, temporary: bool) -> None:
        super().__init__(message)
        self.message = message
        self.temporary = temporary

    def __repr__(self) -> str:
        return f"StoreError({self.message!r}, temporary={self.temporary})"


class JobChanged(StoreError):
    """A compare-and-set write of a job record lost: another instance changed the job first
    (issue 18).  Temporary: the retry decides from the winner's record.  Not a store fault
    (the store works), so it is logged as what it is, not counted as a failure."""

    def __init__(self, token: str) -> None:
        super().__init__(f"job {token} was changed by another instance meanwhile; retry", True)
        self.token = token


class TermRowBusy(StoreError):
    """Taking a term found the row of the term held by another transaction (store/postgresql.py
    ``_TERM_ROW_NOWAIT``): ordinary contention for a moment (another instance's take, a
    leader's announcement in flight), a failure only if it stays held (runtime/announcing.py
    ``TERM_ROW_BUSY_SECONDS``: one left open).  Temporary: the next tick tries again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, True)


class CreationRefused(StoreError):
    """A new job refused by the store for a limit of the core's, counted in SQL across
    instances (issue 18 point 1: ``max_active_jobs``, the R13 quota
    ``max_creating_jobs_per_user``, the slots kept for new clients; the rules are
    ``dsc_core.dsp.creation_refused``).  Temporary, as the core's own fault; the runtime
    answers with ``fault``, the one the core gives when it counts itself, not a store fault.
    Not a store fault either: a refusal, logged as one."""

    def __init__(self, fault: SoapFault) -> None:
        super().__init__(f"{fault.reason} (counted across instances)", True)
        self.fault = fault


def is_temporary(exc: BaseException) -> bool:
    """Whether a retry of what raised ``exc`` may succeed (R4 step 9): the local conditions
    (disk, memory, SQLite).  The network engines classify their own errors (.postgresql,
    .s3spool) and pass the rest here."""
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


def as_store_error(what: str, exc: BaseException, temporary: bool | None = None) -> StoreError:
    """``exc`` as a :class:`StoreError` naming ``what`` failed; ``temporary`` overrides the
    local classification (:func:`is_temporary`)."""
    return StoreError(
        f"{what}: {type(exc).__name__}: {exc}",
        is_temporary(exc) if temporary is None else temporary,
    )
