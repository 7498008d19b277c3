"""The local spool: each document a file in ``DATA/spool/<token>/<DocumentId>`` (the default).

    spool/<token>/<id>        a finished document (decimal DocumentId)
    spool/<token>/.<id>.part  a document being received (debris after a crash; removed at open)

Image bytes are written straight to the file descriptor as they come (R8: memory must not grow
with the image size): no buffer in between, so a full disk is reported by the very append that
hit it.  :meth:`LocalSpool.finish` fsyncs the file, renames it into place and fsyncs the folder:
once it returns the image survives a crash and may be acknowledged.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from dsc_bindings.durable import fsync_dir, write_all
from dsc_bindings.store.errors import StoreError, as_store_error
from dsc_bindings.store.interface import check_document_id, check_token

__all__ = ["PART_SUFFIX", "SPOOL_NAME", "LocalSpool"]

SPOOL_NAME = "spool"
PART_SUFFIX = ".part"


@dataclass(slots=True)
class _OpenDocument:
    fd: int
    part: Path
    final: Path
    written: int = 0


class LocalSpool:
    """Documents as files under ``spool_dir``.  Thread-safe; see the module."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self.location = str(spool_dir)
        self.local_dir = spool_dir
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], _OpenDocument] = {}
        self._closed = False

    @classmethod
    def open(cls, data_dir: Path) -> LocalSpool:
        spool = data_dir / SPOOL_NAME
        try:
            spool.mkdir(parents=True, exist_ok=True)
            fsync_dir(data_dir)
        except OSError as exc:
            raise as_store_error(f"creating the spool {spool}", exc) from exc
        return cls(spool)

    def close(self) -> None:
        """Documents still open are aborted (their ``.part`` deleted)."""
        with self._lock:
            self._closed = True
            docs = list(self._open.values())
            self._open.clear()
        for doc in docs:
            _drop_open(doc)

    def error_count(self) -> None:
        return None

    def check(self) -> str | None:
        return None  # the data folder's own probe (writable_directory) covers the disk

    # --- documents --------------------------------------------------------------------------

    def begin(self, token: str, document_id: int) -> None:
        folder = self.spool_dir / check_token(token)
        key = (token, check_document_id(document_id))
        with self._lock:
            if self._closed:
                raise StoreError("the job store is closed", temporary=False)
            if key in self._open:
                raise StoreError(f"document {document_id} of {token} is already open", False)
            try:
                folder.mkdir()
                fsync_dir(self.spool_dir)  # the new folder's entry must survive a crash too
            except FileExistsError:
                pass
            part = folder / f".{document_id}{PART_SUFFIX}"
            # O_TRUNC: a leftover .part of the same id holds nothing acknowledged.
            fd = os.open(
                part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600
            )
            self._open[key] = _OpenDocument(fd, part, folder / str(document_id))

    def _take(self, token: str, document_id: int, pop: bool) -> _OpenDocument:
        with self._lock:
            doc = (self._open.pop if pop else self._open.get)((token, document_id), None)
        if doc is None:
            raise StoreError(f"document {document_id} of {token} is not open", False)
        return doc

    def append(self, token: str, document_id: int, data: bytes) -> None:
        doc = self._take(token, document_id, pop=False)
        try:
            doc.written += write_all(doc.fd, data)
        except BaseException:
            with self._lock:
                self._open.pop((token, document_id), None)
            _drop_open(doc)
            raise

    def finish(self, token: str, document_id: int, size: int) -> None:
        doc = self._take(token, document_id, pop=True)
        renamed = False
        try:
            # Writes went straight to the descriptor, so there is no user-space buffer to flush.
            os.fsync(doc.fd)
            on_disk = os.fstat(doc.fd).st_size
            os.close(doc.fd)
            doc.fd = -1
            if on_disk != size or doc.written != size:
                raise StoreError(
                    f"document {document_id} of {token}: {on_disk} bytes stored, {size} expected",
                    temporary=False,
                )
            os.replace(doc.part, doc.final)
            renamed = True
            fsync_dir(doc.final.parent)  # the rename itself is durable only with this
        except BaseException:
            _drop_open(doc)
            if renamed:  # not acknowledged, so not a document: leave nothing behind
                doc.final.unlink(missing_ok=True)
            raise

    def abort(self, token: str, document_id: int) -> None:
        folder = self.spool_dir / check_token(token)
        with self._lock:
            doc = self._open.pop((token, check_document_id(document_id)), None)
        if doc is not None:
            _drop_open(doc)
        else:  # already cleaned up by a failed append/finish, or never begun: idempotent
            (folder / f".{document_id}{PART_SUFFIX}").unlink(missing_ok=True)
        # A document finished on disk but whose job record then failed to persist was never
        # acknowledged (R4 step 9): remove it too.  The core never aborts an acknowledged
        # DocumentId (a second upload of one is refused before BeginDocument), so this cannot
        # delete a document a scanner was told is safe.
        (folder / str(document_id)).unlink(missing_ok=True)

    def discard(self, token: str) -> None:
        folder = self.spool_dir / check_token(token)
        with self._lock:
            docs = [self._open.pop(k) for k in [k for k in self._open if k[0] == token]]
        for doc in docs:
            _drop_open(doc)
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            return
        # R6: a timed-out job's images are discarded while its row stays in the history; if
        # the deletion were lost in a crash, the open-time cleanup would not redo it.
        fsync_dir(self.spool_dir)

    def document_path(self, token: str, document_id: int) -> Path:
        """Where the finished document is; it may not exist."""
        return self.spool_dir / check_token(token) / str(check_document_id(document_id))

    def documents(self, token: str) -> list[int]:
        folder = self.spool_dir / check_token(token)
        try:
            entries = list(folder.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise as_store_error(f"listing documents of {token}", exc) from exc
        found = []
        for entry in entries:
            try:
                document_id = int(entry.name)
            except ValueError:
                continue  # a .part file
            if str(document_id) == entry.name:  # exactly the name finish() gives
                found.append(document_id)
        return sorted(found)

    def set_aside(self, token: str, target: Path) -> bool:
        """Move the job's documents to ``target`` (quarantine); False when it had none."""
        documents = self.spool_dir / check_token(token)
        if not documents.is_dir():
            return False
        documents.rename(target)
        return True

    def remove_unfinished(self, token: str, document_id: int) -> None:
        part = (
            self.spool_dir / check_token(token) / f".{check_document_id(document_id)}{PART_SUFFIX}"
        )
        part.unlink(missing_ok=True)

    def remove_debris(self, tokens: set[str], older_than: datetime | None = None) -> None:
        """``.part`` files (never acknowledged, R4 step 9) and folders of tokens without a job
        row (a DropJob interrupted after its row was deleted, or documents begun for a job whose
        CreateJob never committed); with ``older_than`` (shared records, issue 18) only those
        last modified before it."""
        limit = None if older_than is None else older_than.timestamp()

        def old(path: Path) -> bool:
            return limit is None or path.stat().st_mtime < limit

        changed = False
        for entry in self.spool_dir.iterdir():
            if entry.is_symlink() or not entry.is_dir():
                continue  # not ours: we only ever create directories here
            if entry.name not in tokens:
                if old(entry):
                    shutil.rmtree(entry)
                    changed = True
                continue
            removed = False
            for item in entry.iterdir():
                if item.name.startswith(".") and item.name.endswith(PART_SUFFIX) and old(item):
                    item.unlink()
                    removed = True
            if removed:
                fsync_dir(entry)
        if changed:
            fsync_dir(self.spool_dir)


def _drop_open(doc: _OpenDocument) -> None:
    """Close and delete an unfinished document; closing errors do not matter any more."""
    if doc.fd >= 0:
        try:
            os.close(doc.fd)
        except OSError:
            pass
        doc.fd = -1
    doc.part.unlink(missing_ok=True)
