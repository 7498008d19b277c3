"""The file share filter (R9): copy every document to each UNC path of the instructions, in a
sub-folder named after the user, never overwriting a file, and idempotent across a crash (R13):
run again, it delivers only what the interrupted run had not, under the same names."""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from dsc_bindings.filters.common import (
    Deliveries,
    FilterOutcome,
    SourceError,
    check_cancel,
    document_file_name,
    never_raises,
    read_full,
    sanitize_name,
)
from dsc_bindings.filters.settings import FilterSettings, parse_unc
from dsc_bindings.filters.sharefolder import open_share_folder
from dsc_bindings.filters.sharefs import ExistingFile, NewFile, ShareFolder
from dsc_bindings.filters.sharejournal import DeliveryJournal, ResumeJournal
from dsc_bindings.filters.smbfolder import SmbConnectionLost, open_smb_folder
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
    delivered: Deliveries,
) -> FilterOutcome:
    instructions = job.filters[filter_index].instructions
    if not isinstance(instructions, FileShareInstructions) or not instructions.shares:
        return FilterOutcome.errors(FilterStateReason.INVALID_ARGS)

    # Map every path before writing anything: a refused path cancels the filter (R9) and a
    # Canceled filter should not have delivered half of its documents.  A host that is neither
    # mapped to a local folder nor one of [smb] servers is refused here, before any connection
    # (issue 21: the credentials go to those servers only).
    targets: list[_Target] = []
    for unc in instructions.shares:
        target = _target_of(unc, settings)
        if target is None:
            log.warning("job %s: share %r is outside the configured roots", job.token, unc)
            return FilterOutcome.canceled(FilterStateReason.FILE_SHARE_ACCESS_DENIED)
        if target not in targets:
            targets.append(target)

    # R9: a sub-folder named after the user (name@domain), file names from DocumentRootName.
    user_dir = sanitize_name(job.user_name, fallback="unknown-user")
    reasons: list[FilterStateReason] = []
    for target in targets:
        check_cancel(cancelled)
        try:
            _deliver_with_retry(
                target, user_dir, job, filter_index, documents, settings, cancelled, delivered
            )
        except SourceError as exc:
            log.error("job %s: cannot read a stored document: %s", job.token, exc)
            return FilterOutcome.errors(FilterStateReason.UNKNOWN_ERROR)
        except OSError as exc:
            # One share failing does not keep the documents from the others.
            log.warning("job %s: writing to %s failed: %s", job.token, target.name, exc)
            reasons.append(_reason_for(exc))
    return FilterOutcome.errors(*reasons) if reasons else FilterOutcome.success()


@dataclass(frozen=True)
class _Target:
    """Where one UNC path of the instructions lands: a local folder (``[shares]``) or a share
    on an ``[smb]`` server; ``below`` are the components under the root, named by users."""

    root: Path | None
    smb_share: tuple[str, str] | None  # (host, share)
    below: tuple[str, ...]

    @property
    def name(self) -> str:
        if self.smb_share is not None:
            return "\\\\" + "\\".join((*self.smb_share, *self.below))
        assert self.root is not None
        return str(self.root.joinpath(*self.below))

    def open(self, settings: FilterSettings, user_dir: str) -> AbstractContextManager[ShareFolder]:
        components = (*self.below, user_dir)
        if self.smb_share is not None:
            assert settings.smb is not None
            host, share = self.smb_share
            return open_smb_folder(settings.smb, host, share, components)
        assert self.root is not None
        return open_share_folder(self.root, components)


def _target_of(unc: str, settings: FilterSettings) -> _Target | None:
    location = settings.share_location(unc)
    if location is not None:
        return _Target(location[0], None, location[1])
    parts = parse_unc(unc)
    if parts is None or len(parts) < 2 or settings.smb is None:
        return None
    if not settings.smb.allows(parts[0]):
        return None
    return _Target(None, (parts[0].lower(), parts[1]), parts[2:])


#: Delivery attempts to one SMB share when the connection breaks: the server restarted or a
#: connection of the pool went stale.  The journal makes a second attempt deliver only what the
#: first did not; a second break is reported (UnknownError, R9) and `dsc retry` runs it again.
SMB_ATTEMPTS = 2


def _deliver_with_retry(
    target: _Target,
    user_dir: str,
    job: Job,
    filter_index: int,
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event,
    delivered: Deliveries,
) -> None:
    attempts = SMB_ATTEMPTS if target.smb_share is not None else 1
    for attempt in range(1, attempts + 1):
        try:
            _deliver(
                target.open(settings, user_dir),
                job,
                filter_index,
                documents,
                settings,
                cancelled,
                delivered,
            )
            return
        except SmbConnectionLost as exc:
            assert settings.smb is not None and target.smb_share is not None
            settings.smb.pool.forget(target.smb_share[0])
            if attempt == attempts:
                raise
            log.warning(
                "job %s: connection to %s lost (%s); delivering again (attempt %d of %d)",
                job.token,
                target.name,
                exc,
                attempt + 1,
                attempts,
            )


def _reason_for(exc: OSError) -> FilterStateReason:
    if isinstance(exc, SmbConnectionLost):
        return FilterStateReason.UNKNOWN_ERROR
    if exc.errno in _OUT_OF_SPACE:
        return FilterStateReason.FILE_SHARE_OUT_OF_DISK_SPACE
    if exc.errno in _DENIED:
        return FilterStateReason.FILE_SHARE_ACCESS_DENIED
    return FilterStateReason.UNKNOWN_ERROR


def _deliver(
    opened: AbstractContextManager[ShareFolder],
    job: Job,
    filter_index: int,
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event,
    delivered: Deliveries,
) -> None:
    journal_of = settings.journal_of or ResumeJournal.of
    journal = journal_of(job, documents, filter_index)
    with opened as folder:
        counter = 0
        for document, source in documents:
            check_cancel(cancelled)
            delivery = _Delivery(job.document_root_name, document.format, source)
            counter = _copy_one(
                delivery, folder, job, document, counter + 1, journal, settings, cancelled
            )
            written = journal.get(folder.path, document.document_id)
            if written is not None:
                delivered.add("fileshare", str(folder.path / written[1]))
        folder.sync()  # the new names survive a crash, not only the contents


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

    def is_copy(self, folder: ShareFolder, name: str, links: int, chunk_size: int) -> bool:
        if self.counter_of(name) is None:
            return False
        facts = folder.facts(name)
        if (
            facts is None
            or not facts.regular
            or not facts.ours
            or facts.links != links
            or facts.size != _size_of(self.source)
        ):
            return False
        found = folder.open_existing(name)
        if found is None:
            return False  # a link, gone, unreadable: not ours
        try:
            return _same_bytes(found, self.source, chunk_size)
        finally:
            found.close()


_COUNTER = re.compile(r"_(\d{4,})\.[^.]*$")


def _size_of(source: Path) -> int:
    try:
        return os.stat(source).st_size
    except OSError as exc:
        raise SourceError(f"{source}: {exc}") from exc


def _same_bytes(found: ExistingFile, source: Path, chunk_size: int) -> bool:
    try:
        with open(source, "rb", buffering=0) as src:
            while True:
                want = src.read(chunk_size)
                if want != read_full(found, len(want) or 1):
                    return False
                if not want:
                    return True
    except OSError as exc:
        raise SourceError(f"{source}: {exc}") from exc


def _copy_one(
    delivery: _Delivery,
    folder: ShareFolder,
    job: Job,
    document: Document,
    counter: int,
    journal: DeliveryJournal,
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

    With a shared store each run of the job's filters names its temporary file by its lease
    epoch (``.dsc-<token>-<id>-<epoch>.part``, :func:`_temporary`): a rescuer and the stalled
    instance it took the job from may write at once, and a shared name let one unlink or place
    the other's file (seen: the rescuer's document gone, its filter failed).  The rescuer takes
    the earlier runs' files before it looks at them (:func:`_taken_over`), so a stalled run can
    place nothing after the look, and what it placed before is found.
    """
    tmp, *earlier = _temporary(job.token, document.document_id, journal.run)
    known = journal.get(folder.path, document.document_id)
    if known is not None:
        _unlink_all(folder, (tmp, *earlier))
        return known[0]
    found = _linked_name(folder, tmp, delivery, settings.chunk_size)
    for name in earlier:
        found = found or _taken_over(folder, name, tmp, delivery, settings.chunk_size)
    if found is None and journal.damaged:
        found = _unjournaled_copy(folder, delivery, counter, journal, settings.chunk_size)
    if found is not None:
        n = delivery.counter_of(found)
        n = counter if n is None else n
        journal.add(folder.path, document.document_id, n, found)
        _unlink_all(folder, (tmp, *earlier))
        return n
    try:
        src = open(delivery.source, "rb", buffering=0)
    except OSError as exc:
        raise SourceError(f"{delivery.source}: {exc}") from exc
    with src:
        # A partial file of an interrupted run is replaced by a new one, never written through:
        # whatever sits under the temporary name (a hard link or symlink to another file
        # planted by a user of the share) is unlinked, and O_EXCL|O_NOFOLLOW create afresh.
        _unlink_all(folder, (tmp, *earlier))
        new = folder.create(tmp)
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
                new.write(view[:n])
            new.sync()
        except BaseException:
            _close_quietly(new)
            _unlink_quietly(folder, tmp)  # never leave a truncated document behind
            raise
        new.close()
    # A run whose lease went to another instance gives nothing a final name (issue 18 point 2),
    # and takes its temporary file away: the rescuer writes its own, and one already past this
    # document (a stalled run going on after the job ended) would leave it on the share.  The
    # name is this run's own (its epoch), so no other run's file goes.  The same for a check
    # the store could not answer (Interrupted): the resumed run writes the file afresh.
    try:
        journal.check()
    except BaseException:
        _unlink_quietly(folder, tmp, missing_ok=True)
        raise
    try:
        counter, name = _place(folder, tmp, delivery, counter)
    except BaseException:
        _unlink_quietly(folder, tmp, missing_ok=True)
        raise
    folder.sync()
    journal.add(folder.path, document.document_id, counter, name)
    _unlink_quietly(folder, tmp, missing_ok=True)  # gone already when it was renamed
    return counter


def _temporary(token: str, document_id: int, run: int) -> list[str]:
    """The temporary file names of one document: this run's first, then those of the earlier
    runs of the job's filters (DeliveryJournal.run; run 0, one server, has no suffix)."""
    return [f".dsc-{token}-{document_id}{f'-{n}' if n else ''}.part" for n in range(run, -1, -1)]


def _unlink_all(folder: ShareFolder, names: tuple[str, ...]) -> None:
    for name in names:
        _unlink_quietly(folder, name, missing_ok=True)


def _place(folder: ShareFolder, tmp: str, delivery: _Delivery, counter: int) -> tuple[int, str]:
    for n in range(counter, MAX_COUNTER + 1):
        name = document_file_name(delivery.root_name, n, delivery.fmt)
        if folder.place_exclusive(tmp, name):
            return n, name
    raise OSError(errno.EEXIST, f"no free file name for {delivery.root_name!r} in {folder.path}")


def _taken_over(
    folder: ShareFolder, earlier: str, mine: str, delivery: _Delivery, chunk_size: int
) -> str | None:
    """The visible name an earlier run (a stalled instance, maybe running again) gave its
    temporary file ``earlier``, taken from it first: linked to this run's name ``mine``, then
    unlinked.  A run places its file only through its temporary name, so once that name is
    gone the file's links are final: two (``mine`` and a visible name) when the earlier run
    placed it, before the unlink, one when it did not, and then it never will (its link fails).
    Looked at first and unlinked after, a file the stalled run placed in between went unseen
    and the rescuer placed a second copy (a duplicate; tests/bindings/test_fileshare_takeover.py).
    Where the share has no hard links ``place_exclusive`` renames: as atomic, and the count
    is one."""
    _unlink_quietly(folder, mine, missing_ok=True)
    try:
        if not folder.place_exclusive(earlier, mine):
            return None  # just unlinked, there again: not ours to judge; written afresh
    except FileNotFoundError:
        return None  # no such file: nothing to take
    # Not quietly: while ``earlier`` stays, the stalled run may still place it.
    folder.unlink_if_present(earlier)
    return _linked_name(folder, mine, delivery, chunk_size)


def _linked_name(folder: ShareFolder, tmp: str, delivery: _Delivery, chunk_size: int) -> str | None:
    """The visible name a complete temporary file was already linked to by an earlier run.

    Only a copy the server made counts (:class:`_Delivery`): a hard link a user of the share
    planted under the temporary name, to another file, is no delivery of this document."""
    facts = folder.facts(tmp)
    if facts is None or not facts.regular or facts.links != 2:
        return None  # unfinished, or not what the filter leaves: written again from the start
    for name, file_id in folder.entries():
        if (
            name != tmp
            and file_id == facts.file_id
            and delivery.is_copy(folder, name, 2, chunk_size)
        ):
            return name
    return None


def _unjournaled_copy(
    folder: ShareFolder,
    delivery: _Delivery,
    counter: int,
    journal: DeliveryJournal,
    chunk_size: int,
) -> str | None:
    """With a damaged journal: the copy of this document an earlier run placed and lost the
    line of, if any (a name from ``counter`` on that no other document of the job claims)."""
    claimed = journal.names_in(folder.path)
    candidates = sorted(
        (n, name)
        for name, _file_id in folder.entries()
        if name not in claimed and (n := delivery.counter_of(name)) is not None and n >= counter
    )
    for _n, name in candidates:
        if delivery.is_copy(folder, name, 1, chunk_size):
            return name
    return None


def _close_quietly(new: NewFile) -> None:
    try:
        new.close()
    except OSError as exc:  # the connection that broke the write may break the close too
        log.debug("closing a partial file failed: %s", exc)


def _unlink_quietly(folder: ShareFolder, name: str, missing_ok: bool = False) -> None:
    try:
        if not folder.unlink_if_present(name) and not missing_ok:
            log.warning("partial file %s was already gone", folder.path / name)
    except OSError as exc:
        log.warning("could not remove partial file %s: %s", folder.path / name, exc)


__all__ = ["run"]
