"""The one rule "a temporary store error inside a filter run is an interruption" (issue 18
point 2; filters/interruption.py says what an interruption is).

A filter run meets the store twice: it reads the job's documents (the S3 spool downloads
them) and, with a shared store, the file share records its deliveries in PostgreSQL
(.pgdeliveries).  A StoreError that a retry may get past (``temporary``, R4 step 9: the
database restarting, S3 unreachable) says nothing about the job: failing the filter would end
the job Aborted for good (PostScanJobProcessingFailed) although its scan was acknowledged.
It becomes :class:`~dsc_bindings.filters.interruption.Interrupted`: the engine stops the run
and the job resumes once the store answers (R13); the file share's journal keeps the resumed
run from delivering anything twice.  A lasting fault (``temporary`` False: a document that is
gone, a schema too new) still fails the filter, which a retry would not mend."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dsc_bindings.filters.interruption import Interrupted
from dsc_bindings.store.errors import StoreError

__all__ = ["interrupting"]


@contextmanager
def interrupting() -> Iterator[None]:
    """Inside a filter run: a temporary StoreError raised in the block becomes Interrupted."""
    try:
        yield
    except StoreError as exc:
        if not exc.temporary:
            raise
        raise Interrupted(exc.message) from exc
