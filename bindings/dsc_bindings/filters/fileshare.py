"""The file share filter (R9): copy every document to each UNC path of the instructions, in a
sub-folder named after the user, never overwriting a file."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

from dsc_core.model import Document, FileShareInstructions, FilterStateReason, Job

from ..durable import fsync_dir, write_all
from .common import (
    FilterOutcome,
    SourceError,
    check_cancel,
    document_file_name,
    never_raises,
    sanitize_name,
)
from .settings import FilterSettings

log = logging.getLogger(__name__)

#: Give up looking for a free counter after this many taken names.
MAX_COUNTER = 99_999
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


@never_raises
def run(
    job: Job,
    filter_index: int,
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event,
) -> FilterOutcome:
    instructions = job.filters[filter_index].instructions
    if not isinstance(instructions, FileShareInstructions) or not instructions.shares:
        return FilterOutcome.errors(FilterStateReason.INVALID_ARGS)

    # Map every path before writing anything: a refused path cancels the filter (R9) and a
    # Canceled filter should not have delivered half of its documents.
    targets: list[Path] = []
    for unc in instructions.shares:
        local = settings.map_unc(unc)
        if local is None:
            log.warning("job %s: share %r is outside the configured roots", job.token, unc)
            return FilterOutcome.canceled(FilterStateReason.FILE_SHARE_ACCESS_DENIED)
        if local not in targets:
            targets.append(local)

    # R9: a sub-folder named after the user (name@domain), file names from DocumentRootName.
    user_dir = sanitize_name(job.user_name, fallback="unknown-user")
    reasons: list[FilterStateReason] = []
    for target in targets:
        check_cancel(cancelled)
        try:
            _deliver(target / user_dir, job.document_root_name, documents, settings, cancelled)
        except SourceError as exc:
            log.error("job %s: cannot read a stored document: %s", job.token, exc)
            return FilterOutcome.errors(FilterStateReason.UNKNOWN_ERROR)
        except OSError as exc:
            # One share failing does not keep the documents from the others.
            log.warning("job %s: writing to %s failed: %s", job.token, target, exc)
            reasons.append(_reason_for(exc))
    return FilterOutcome.errors(*reasons) if reasons else FilterOutcome.success()


def _reason_for(exc: OSError) -> FilterStateReason:
    if exc.errno in _OUT_OF_SPACE:
        return FilterStateReason.FILE_SHARE_OUT_OF_DISK_SPACE
    if exc.errno in _DENIED:
        return FilterStateReason.FILE_SHARE_ACCESS_DENIED
    return FilterStateReason.UNKNOWN_ERROR


def _deliver(
    directory: Path,
    root_name: str,
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    counter = 1
    for document, source in documents:
        check_cancel(cancelled)
        counter = (
            _copy_one(
                source,
                directory,
                root_name,
                document.format,
                counter,
                settings.chunk_size,
                cancelled,
            )
            + 1
        )
    fsync_dir(directory)  # the new names survive a crash, not only the contents


def _copy_one(
    source: Path,
    directory: Path,
    root_name: str,
    fmt: str,
    counter: int,
    chunk_size: int,
    cancelled: threading.Event,
) -> int:
    """Copy one document to the first free ``<root>_<NNNN>.<ext>``; return the counter used."""
    try:
        src = open(source, "rb", buffering=0)
    except OSError as exc:
        raise SourceError(f"{source}: {exc}") from exc
    with src:
        fd, path, counter = _create_exclusive(directory, root_name, fmt, counter)
        try:
            buffer = bytearray(chunk_size)
            view = memoryview(buffer)
            while True:
                check_cancel(cancelled)
                try:
                    n = src.readinto(buffer)
                except OSError as exc:
                    raise SourceError(f"{source}: {exc}") from exc
                if not n:
                    break
                write_all(fd, view[:n])
            os.fsync(fd)
            os.close(fd)
            fd = -1
        except BaseException:
            # Never leave a truncated document behind that looks like a complete one.
            if fd >= 0:
                os.close(fd)
            _unlink_quietly(path)
            raise
    return counter


def _create_exclusive(
    directory: Path, root_name: str, fmt: str, counter: int
) -> tuple[int, Path, int]:
    # O_EXCL: never overwrite (R9); it also refuses a symlink planted under the name.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for n in range(counter, MAX_COUNTER + 1):
        path = directory / document_file_name(root_name, n, fmt)
        try:
            return os.open(path, flags, 0o644), path, n
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, f"no free file name for {root_name!r} in {directory}")


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("could not remove partial file %s: %s", path, exc)


__all__ = ["run"]
