"""The file share filter (R9): copy every document to each UNC path of the instructions, in a
sub-folder named after the user, never overwriting a file, and idempotent across a crash (R13):
run again, it delivers only what the interrupted run had not, under the same names."""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from dsc_bindings.durable import fsync_dir_fd, write_all
from dsc_bindings.filters.common import (
    FilterOutcome,
    SourceError,
    check_cancel,
    document_file_name,
    log_delivered,
    never_raises,
    sanitize_name,
)
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.filters.sharefolder import (
    EXISTING_FILE,
    NEW_FILE,
    Folder,
    open_share_folder,
    place_exclusive,
    unlink_if_present,
)
from dsc_bindings.filters.sharejournal import ResumeJournal
from dsc_core.model import Document, FileShareInstructions, FilterStateReason, Job

log = logging.getLogger(__name__)

#: Give up looking for a free counter after this many taken names.
MAX_COUNTER = 99_999
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}
#: ELOOP: a folder below the share root is a symbolic link a user planted (PlantedLink).
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ELOOP}


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
    targets: list[tuple[Path, tuple[str, ...]]] = []
    for unc in instructions.shares:
        location = settings.share_location(unc)
        if location is None:
            log.warning("job %s: share %r is outside the configured roots", job.token, unc)
            return FilterOutcome.canceled(FilterStateReason.FILE_SHARE_ACCESS_DENIED)
        if location not in targets:
            targets.append(location)

    # R9: a sub-folder named after the user (name@domain), file names from DocumentRootName.
    user_dir = sanitize_name(job.user_name, fallback="unknown-user")
    reasons: list[FilterStateReason] = []
    for root, below in targets:
        check_cancel(cancelled)
        target = root.joinpath(*below)
        try:
            _deliver(root, (*below, user_dir), job, filter_index, documents, settings, cancelled)
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
    root: Path,
    components: tuple[str, ...],
    job: Job,
    filter_index: int,
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event,
) -> None:
    journal = ResumeJournal.of(job, documents, filter_index)
    with open_share_folder(root, components) as folder:
        counter = 0
        for document, source in documents:
            check_cancel(cancelled)
            delivery = _Delivery(job.document_root_name, document.format, source)
            counter = _copy_one(
                delivery, folder, job, document, counter + 1, journal, settings, cancelled
            )
            delivered = journal.get(folder.path, document.document_id)
            if delivered is not None:
                log_delivered(job, filter_index, "fileshare", str(folder.path / delivered[1]))
        fsync_dir_fd(folder.fd)  # the new names survive a crash, not only the contents


@dataclass(frozen=True)
class _Delivery:
    """What a delivered copy of one document looks like, so a re-run recognises it (R13)
    and nothing planted by a user of the share passes for it (issue 14 §4): the R9 name
    ``<root>_NNNN.<ext>``, a regular file of the server's own user with the expected links,
    and the stored document's bytes."""

    root_name: str
    fmt: str
    source: Path

    def counter_of(self, name: str) -> int | None:
        match = _COUNTER.search(name)
        if match is None:
            return None
        n = int(match.group(1))
        return n if document_file_name(self.root_name, n, self.fmt) == name else None

    def is_copy(self, folder: Folder, name: str, links: int, chunk_size: int) -> bool:
        if self.counter_of(name) is None:
            return False
        try:
            fd = os.open(name, EXISTING_FILE, dir_fd=folder.fd)
        except OSError:
            return False  # a link, gone, unreadable: not ours
        try:
            st = os.fstat(fd)
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_uid != os.geteuid()
                or st.st_nlink != links
                or st.st_size != _size_of(self.source)
            ):
                return False
            return _same_bytes(fd, self.source, chunk_size)
        finally:
            os.close(fd)


_COUNTER = re.compile(r"_(\d{4,})\.[^.]*$")


def _size_of(source: Path) -> int:
    try:
        return os.stat(source).st_size
    except OSError as exc:
        raise SourceError(f"{source}: {exc}") from exc


def _same_bytes(fd: int, source: Path, chunk_size: int) -> bool:
    try:
        with open(source, "rb", buffering=0) as src:
            while True:
                want = src.read(chunk_size)
                if want != os.read(fd, len(want) or 1):
                    return False
                if not want:
                    return True
    except OSError as exc:
        raise SourceError(f"{source}: {exc}") from exc


def _copy_one(
    delivery: _Delivery,
    folder: Folder,
    job: Job,
    document: Document,
    counter: int,
    journal: ResumeJournal,
    settings: FilterSettings,
    cancelled: threading.Event,
) -> int:
    """Deliver one document to the first free ``<root>_<NNNN>.<ext>`` from ``counter`` on;
    return the counter used.

    The bytes go to a hidden temporary file first (``.dsc-<token>-<id>.part``, made afresh if
    a crash left one), which becomes visible under its final name only when complete, by a hard
    link that fails rather than overwrite (R9).  So a partial file never looks like a document,
    and a re-run after a crash (R13) finds what the interrupted run did: a journal entry (done),
    or a temporary file already linked to its final name (done, the journal entry was lost).
    """
    tmp = f".dsc-{job.token}-{document.document_id}.part"
    known = journal.get(folder.path, document.document_id)
    if known is not None:
        _unlink_quietly(folder, tmp, missing_ok=True)
        return known[0]
    found = _linked_name(folder, tmp, delivery, settings.chunk_size)
    if found is None and journal.damaged:
        found = _unjournaled_copy(folder, delivery, counter, journal, settings.chunk_size)
    if found is not None:
        n = delivery.counter_of(found)
        n = counter if n is None else n
        journal.add(folder.path, document.document_id, n, found)
        _unlink_quietly(folder, tmp, missing_ok=True)
        return n
    try:
        src = open(delivery.source, "rb", buffering=0)
    except OSError as exc:
        raise SourceError(f"{delivery.source}: {exc}") from exc
    with src:
        # A partial file of an interrupted run is replaced by a new one, never written through:
        # whatever sits under the temporary name (a hard link or symlink to another file
        # planted by a user of the share) is unlinked, and O_EXCL|O_NOFOLLOW create afresh.
        _unlink_quietly(folder, tmp, missing_ok=True)
        fd = os.open(tmp, NEW_FILE, 0o640, dir_fd=folder.fd)  # §5: not world-readable
        try:
            buffer = bytearray(settings.chunk_size)
            view = memoryview(buffer)
            while True:
                check_cancel(cancelled)
                try:
                    n = src.readinto(buffer)
                except OSError as exc:
                    raise SourceError(f"{delivery.source}: {exc}") from exc
                if not n:
                    break
                write_all(fd, view[:n])
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(folder, tmp)  # never leave a truncated document behind
            raise
        os.close(fd)
    try:
        counter, name = _place(folder, tmp, delivery, counter)
    except BaseException:
        _unlink_quietly(folder, tmp, missing_ok=True)
        raise
    fsync_dir_fd(folder.fd)
    journal.add(folder.path, document.document_id, counter, name)
    _unlink_quietly(folder, tmp, missing_ok=True)  # gone already when it was renamed
    return counter


def _place(folder: Folder, tmp: str, delivery: _Delivery, counter: int) -> tuple[int, str]:
    for n in range(counter, MAX_COUNTER + 1):
        name = document_file_name(delivery.root_name, n, delivery.fmt)
        if place_exclusive(folder, tmp, name):
            return n, name
    raise OSError(errno.EEXIST, f"no free file name for {delivery.root_name!r} in {folder.path}")


def _linked_name(folder: Folder, tmp: str, delivery: _Delivery, chunk_size: int) -> str | None:
    """The visible name a complete temporary file was already linked to by an earlier run.

    Only a copy the server made counts (:class:`_Delivery`): a hard link a user of the share
    planted under the temporary name, to another file, is no delivery of this document."""
    try:
        st = os.stat(tmp, dir_fd=folder.fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 2:
        return None  # unfinished, or not what the filter leaves: written again from the start
    with os.scandir(folder.fd) as entries:
        for entry in entries:
            if (
                entry.name != tmp
                and entry.inode() == st.st_ino
                and delivery.is_copy(folder, entry.name, 2, chunk_size)
            ):
                return entry.name
    return None


def _unjournaled_copy(
    folder: Folder, delivery: _Delivery, counter: int, journal: ResumeJournal, chunk_size: int
) -> str | None:
    """With a damaged journal: the copy of this document an earlier run placed and lost the
    line of, if any (a name from ``counter`` on that no other document of the job claims)."""
    claimed = journal.names_in(folder.path)
    with os.scandir(folder.fd) as entries:
        candidates = sorted(
            (n, entry.name)
            for entry in entries
            if entry.name not in claimed
            and (n := delivery.counter_of(entry.name)) is not None
            and n >= counter
        )
    for _n, name in candidates:
        if delivery.is_copy(folder, name, 1, chunk_size):
            return name
    return None


def _unlink_quietly(folder: Folder, name: str, missing_ok: bool = False) -> None:
    try:
        if not unlink_if_present(folder, name) and not missing_ok:
            log.warning("partial file %s was already gone", folder.path / name)
    except OSError as exc:
        log.warning("could not remove partial file %s: %s", folder.path / name, exc)


__all__ = ["run"]
