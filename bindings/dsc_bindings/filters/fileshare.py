"""The file share filter (R9): copy every document to each UNC path of the instructions, in a
sub-folder named after the user, never overwriting a file, and idempotent across a crash (R13):
run again, it delivers only what the interrupted run had not, under the same names."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import threading
from pathlib import Path

from dsc_core.model import Document, FileShareInstructions, FilterStateReason, Job

from ..durable import fsync_dir, write_all
from .common import (
    FilterOutcome,
    SourceError,
    check_cancel,
    document_file_name,
    log_delivered,
    never_raises,
    sanitize_name,
)
from .settings import FilterSettings

log = logging.getLogger(__name__)

#: Give up looking for a free counter after this many taken names.
MAX_COUNTER = 99_999
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
#: link() is not supported where the file share lives (some network or FAT file systems).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


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
            _deliver(target / user_dir, job, filter_index, documents, settings, cancelled)
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
    job: Job,
    filter_index: int,
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    journal = _Journal.of(job, documents, filter_index)
    counter = 0
    for document, source in documents:
        check_cancel(cancelled)
        counter = _copy_one(
            source, directory, job, document, counter + 1, journal, settings.chunk_size, cancelled
        )
        delivered = journal.get(directory, document.document_id)
        if delivered is not None:
            log_delivered(job, filter_index, "fileshare", str(directory / delivered[1]))
    fsync_dir(directory)  # the new names survive a crash, not only the contents


class _Journal:
    """Which documents this filter already delivered, kept beside the job's documents in the
    spool (``.fileshare-<filter>.journal``, one JSON line per delivered document).

    R13: after a crash the filter runs again; a document in the journal keeps its file and
    name and is not written again, so nothing reaches the share twice."""

    def __init__(self, path: Path | None, token: str) -> None:
        self.path = path
        self.token = token
        self.done: dict[tuple[str, int], tuple[int, str]] = {}
        if path is None:
            return
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                if entry["job"] != token:
                    continue
                key = (str(entry["dir"]), int(entry["doc"]))
                self.done[key] = (int(entry["n"]), str(entry["name"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash: that document is simply delivered again

    @classmethod
    def of(cls, job: Job, documents: list[tuple[Document, Path]], filter_index: int) -> _Journal:
        if not documents:
            return cls(None, job.token)
        return cls(documents[0][1].parent / f".fileshare-{filter_index}.journal", job.token)

    def get(self, directory: Path, document_id: int) -> tuple[int, str] | None:
        return self.done.get((str(directory), document_id))

    def add(self, directory: Path, document_id: int, counter: int, name: str) -> None:
        self.done[(str(directory), document_id)] = (counter, name)
        if self.path is None:
            return
        line = json.dumps(
            {
                "job": self.token,
                "dir": str(directory),
                "doc": document_id,
                "n": counter,
                "name": name,
            }
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_one(
    source: Path,
    directory: Path,
    job: Job,
    document: Document,
    counter: int,
    journal: _Journal,
    chunk_size: int,
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
    tmp = directory / f".dsc-{job.token}-{document.document_id}.part"
    known = journal.get(directory, document.document_id)
    if known is not None:
        _unlink_quietly(tmp, missing_ok=True)
        return known[0]
    linked = _linked_name(tmp)
    if linked is not None:
        n = _counter_of(linked, counter)
        journal.add(directory, document.document_id, n, linked)
        _unlink_quietly(tmp)
        return n
    try:
        src = open(source, "rb", buffering=0)
    except OSError as exc:
        raise SourceError(f"{source}: {exc}") from exc
    with src:
        # A partial file of an interrupted run is replaced by a new one, never written through:
        # whatever sits under the temporary name (a hard link or symlink to another file
        # planted by a user of the share) is unlinked, and O_EXCL|O_NOFOLLOW create afresh.
        _unlink_quietly(tmp, missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(tmp, flags, 0o640)  # issue 14 §5: scans are not world-readable
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
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)  # never leave a truncated document behind
            raise
        os.close(fd)
    try:
        counter, name = _link_exclusive(
            tmp, directory, job.document_root_name, document.format, counter
        )
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(directory)
    journal.add(directory, document.document_id, counter, name)
    _unlink_quietly(tmp)
    return counter


def _link_exclusive(
    tmp: Path, directory: Path, root_name: str, fmt: str, counter: int
) -> tuple[int, str]:
    for n in range(counter, MAX_COUNTER + 1):
        name = document_file_name(root_name, n, fmt)
        try:
            # link() never replaces an existing name (R9: never overwrite), symlinks included.
            os.link(tmp, directory / name, follow_symlinks=False)
            return n, name
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            return _rename_exclusive(tmp, directory, root_name, fmt, n)
    raise OSError(errno.EEXIST, f"no free file name for {root_name!r} in {directory}")


def _rename_exclusive(
    tmp: Path, directory: Path, root_name: str, fmt: str, counter: int
) -> tuple[int, str]:
    """For a file system without hard links: reserve the name (O_EXCL), then rename over the
    reservation.  A crash in between may leave an empty reserved file, never a partial one."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for n in range(counter, MAX_COUNTER + 1):
        name = document_file_name(root_name, n, fmt)
        try:
            os.close(os.open(directory / name, flags, 0o640))
        except FileExistsError:
            continue
        os.replace(tmp, directory / name)
        return n, name
    raise OSError(errno.EEXIST, f"no free file name for {root_name!r} in {directory}")


def _linked_name(tmp: Path) -> str | None:
    """The visible name a complete temporary file was already linked to by an earlier run."""
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
        return None  # unfinished: written again from the start
    with os.scandir(tmp.parent) as entries:
        for entry in entries:
            same = entry.name != tmp.name and entry.inode() == st.st_ino
            if same and entry.is_file(follow_symlinks=False):
                return entry.name
    return None


def _counter_of(name: str, default: int) -> int:
    match = re.search(r"_(\d+)\.[^.]*$", name)
    return int(match.group(1)) if match else default


def _unlink_quietly(path: Path, missing_ok: bool = False) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            log.warning("partial file %s was already gone", path)
    except OSError as exc:
        log.warning("could not remove partial file %s: %s", path, exc)


__all__ = ["run"]
