"""The file share filter's resume journal (R13): which documents it already delivered, kept
beside the job's documents in the spool (``.fileshare-<filter>.journal``, one JSON line per
delivered document).

After a crash the filter runs again; a document in the journal keeps its file and name and is
not written again.  The journal is read tolerantly (issue 14 §4): a line torn by a crash, bytes
that are not UTF-8 or not JSON are skipped with a WARNING, never an error that fails the filter
on every retry.  A journal with such lines is :attr:`ResumeJournal.damaged`: the filter then
recognises a document it delivered by its name and content instead (see fileshare), so the
lost lines cost no duplicates either."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Protocol

from dsc_bindings.durable import write_all
from dsc_core.model import Document, Job

log = logging.getLogger(__name__)

#: What one damaged line can raise while it is decoded (bad UTF-8 is a ValueError too).
_DAMAGE = (ValueError, KeyError, TypeError, ArithmeticError, RecursionError)


class DeliveryJournal(Protocol):
    """What the file share filter records of its deliveries (R13: a re-run delivers nothing
    twice).  Two kinds: :class:`ResumeJournal`, a file beside the job's documents (one
    server), and with a shared store the ``filter_deliveries`` rows (store/pgdeliveries.py),
    which a rescuer on another host reads too (issue 18 point 2)."""

    #: Some records could not be read: delivered documents are recognised on the share.
    damaged: bool
    #: Which run of the job's filters this is: the lease epoch with a shared store (each claim
    #: a new one), 0 on one server.  It names the run's temporary files (fileshare), so two
    #: runs of one job at once (a stalled instance whose lease was rescued) never share one.
    run: int

    def get(self, directory: PurePath, document_id: int) -> tuple[int, str] | None:
        """(counter, file name) of a document already delivered to ``directory``."""
        ...

    def names_in(self, directory: PurePath) -> set[str]:
        """The file names already recorded in ``directory``."""
        ...

    def check(self) -> None:
        """Raise :class:`DeliveryRefused` when this run may no longer deliver (its lease was
        lost): called before a file takes its final name."""
        ...

    def add(self, directory: PurePath, document_id: int, counter: int, name: str) -> None:
        """Record a delivery (durably, before the next document); DeliveryRefused as check."""
        ...


class DeliveryRefused(Exception):
    """This run of the filter no longer holds the job (its lease went to another instance):
    it must deliver nothing more (issue 18 point 2, fencing)."""


#: Which journal a run of the file share filter keeps: (job, its documents, filter index).
JournalOf = Callable[[Job, list[tuple[Document, Path]], int], DeliveryJournal]


class ResumeJournal:
    #: One server runs a job's filters once at a time (DeliveryJournal.run).
    run = 0

    def __init__(self, path: Path | None, token: str) -> None:
        self.path = path
        self.token = token
        self.done: dict[tuple[str, int], tuple[int, str]] = {}
        #: Some lines could not be read: what they recorded must be found another way.
        self.damaged = False
        #: The journal ends in a torn line: the next line must not be glued to it.
        self._needs_newline = False
        if path is not None:
            self._load(path)

    @classmethod
    def of(
        cls, job: Job, documents: list[tuple[Document, Path]], filter_index: int
    ) -> ResumeJournal:
        if not documents:
            return cls(None, job.token)
        return cls(documents[0][1].parent / f".fileshare-{filter_index}.journal", job.token)

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning(
                "resume journal %s cannot be read (%s): delivered documents are "
                "recognised on the share instead",
                path,
                exc,
            )
            self.damaged = True
            return
        skipped = 0
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode("utf-8"))
                if entry["job"] != self.token:
                    continue
                key = (str(entry["dir"]), int(entry["doc"]))
                self.done[key] = (int(entry["n"]), str(entry["name"]))
            except _DAMAGE:
                skipped += 1
        self._needs_newline = bool(raw) and not raw.endswith(b"\n")
        if skipped:
            self.damaged = True
            log.warning(
                "resume journal %s: %d damaged line(s) skipped (torn by a crash, or not UTF-8 "
                "JSON); documents they recorded are recognised on the share by name and "
                "content instead of being written again",
                path,
                skipped,
            )

    def get(self, directory: PurePath, document_id: int) -> tuple[int, str] | None:
        return self.done.get((str(directory), document_id))

    def check(self) -> None:
        """One server: nobody else runs this job's filters."""

    def names_in(self, directory: PurePath) -> set[str]:
        """The file names already recorded in ``directory`` (each belongs to one document)."""
        key = str(directory)
        return {name for (folder, _doc), (_n, name) in self.done.items() if folder == key}

    def add(self, directory: PurePath, document_id: int, counter: int, name: str) -> None:
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
        data = ("\n" if self._needs_newline else "") + line + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._needs_newline = False


__all__ = ["DeliveryJournal", "DeliveryRefused", "JournalOf", "ResumeJournal"]
