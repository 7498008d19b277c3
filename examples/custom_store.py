"""A custom job store: one directory per job with a JSON manifest, no SQLite.

What it shows:

- the store side of the core's contract: every store command (CreateJob, UpdateJob,
  BeginDocument, AppendDocument, FinishDocument, AbortDocument, DiscardDocuments, DropJob) carried
  out in order, *before* the reply is sent, and ``FinishDocument`` made durable (fsync, rename,
  fsync of the directory) because the reply that follows acknowledges the image;
- a failing command: the first attempt of image 2 hits an injected "disk full" (ENOSPC) in the
  middle of its bytes, the binding tells the core with ``exchange.store_failed(temporary=True)``,
  the scanner gets ``ServerErrorTemporaryError`` (R4 step 9), no ``.part`` file is left behind, and
  the retry succeeds;
- a whole job driven with the client request builders: create, two images streamed as MTOM in
  chunks, end, then this program plays the processing engine with ``server.processing(...)``
  (its "file share filter" copies the documents out of the store) and prints the final state.

Layout under ``--dir`` (default: a temporary directory)::

    <token>/manifest.json     the job record (state, reasons, filters, documents), replaced atomically
    <token>/<id>.<ext>        a finished document
    <token>/.<id>.part        a document being received (removed on abort)
    delivered/<token>/...     what the example's engine "filed"

Run it: ``python examples/custom_store.py [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lxml import etree

from dsc_core import (
    AbortDocument,
    AnnounceRepositoryState,
    AppendDocument,
    BeginDocument,
    Command,
    CreateJob,
    Deliver,
    DiscardDocuments,
    DropJob,
    FilterFinished,
    FilterStarted,
    FilterState,
    FinishDocument,
    Job,
    ProcessingFinished,
    ProcessingStarted,
    Reply,
    RequestInfo,
    ScanServer,
    ServerConfig,
    StartProcessing,
    StopProcessing,
    UpdateJob,
    client,
    names,
)
from dsc_core.model import FileShareInstructions, extension_for

A = names.Action


class StoreFailure(Exception):
    """A command could not be carried out.  ``temporary`` (disk full, out of memory) selects
    ServerErrorTemporaryError, otherwise ServerErrorInternalError (R4 step 9)."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


def _fsync_dir(path: Path) -> None:
    """A create/rename/delete is durable only once the directory entry is."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest_of(job: Job) -> dict[str, object]:
    """The job as JSON: what a person (or another program) wants to read in the folder."""
    return {
        "token": job.token,
        "state": job.state.value,
        "reasons": [r.value for r in job.reasons],
        "psp_identifier": job.psp_identifier,
        "psp_display_name": job.psp_display_name,
        "user_name": job.user_name,
        "created": job.created.isoformat(),
        "completed": job.completed.isoformat() if job.completed else None,
        "filters": [
            {"dialect": f.dialect, "state": f.state.value, "reasons": [r.value for r in f.reasons]}
            for f in job.filters
        ],
        "documents": [
            {
                "id": d.document_id,
                "format": d.format,
                "size": d.size,
                "file": f"{d.document_id}.{extension_for(d.format)}",
            }
            for d in job.documents
        ],
    }


@dataclass
class _Open:
    fd: int
    part: Path
    final: Path
    written: int = 0


class DirectoryStore:
    """Documents in one directory per job, the job record in ``manifest.json`` beside them.

    ``fail_append_after`` injects an ENOSPC once that many bytes of one document have been
    written (to show the failure path); it fires once.
    """

    def __init__(self, root: Path, *, fail_append_after: int | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._open: dict[tuple[str, int], _Open] = {}
        self._formats: dict[tuple[str, int], str] = {}
        self.fail_append_after = fail_append_after

    def folder(self, token: str) -> Path:
        if not token or token.startswith(".") or any(c in token for c in "/\\\0"):
            raise StoreFailure(f"unusable token {token!r}", temporary=False)
        return self.root / token

    def apply(self, command: Command) -> None:
        try:
            self._apply(command)
        except OSError as exc:
            temporary = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM)
            raise StoreFailure(f"{type(command).__name__}: {exc}", temporary=temporary) from exc

    def _apply(self, command: Command) -> None:
        if isinstance(command, (CreateJob, UpdateJob)):
            self._write_manifest(command.job)
        elif isinstance(command, BeginDocument):
            folder = self.folder(command.token)
            folder.mkdir(exist_ok=True)
            part = folder / f".{command.document_id}.part"
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            final = folder / f"{command.document_id}.{extension_for(command.format)}"
            self._open[(command.token, command.document_id)] = _Open(fd, part, final)
        elif isinstance(command, AppendDocument):
            self._append(command)
        elif isinstance(command, FinishDocument):
            doc = self._open.pop((command.token, command.document_id))
            try:
                os.fsync(doc.fd)
                if doc.written != command.size:
                    raise StoreFailure(
                        f"{doc.written} bytes written, {command.size} expected", temporary=False
                    )
            finally:
                os.close(doc.fd)
            os.replace(doc.part, doc.final)
            _fsync_dir(doc.final.parent)
        elif isinstance(command, AbortDocument):
            self._drop_open(command.token, command.document_id)
        elif isinstance(command, DiscardDocuments):
            for path in self.folder(command.token).iterdir():
                if path.name != "manifest.json":
                    path.unlink()
        elif isinstance(command, DropJob):
            shutil.rmtree(self.folder(command.token), ignore_errors=True)
        else:
            raise TypeError(f"not a store command: {command!r}")

    def _append(self, command: AppendDocument) -> None:
        key = (command.token, command.document_id)
        doc = self._open.get(key)
        if doc is None:
            raise StoreFailure(f"document {command.document_id} is not open", temporary=False)
        try:
            limit = self.fail_append_after
            if limit is not None and doc.written + len(command.data) > limit:
                self.fail_append_after = None
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            view = memoryview(command.data)
            while view:
                view = view[os.write(doc.fd, view) :]
            doc.written += len(command.data)
        except OSError:
            # The upload is lost: remove it now, so a later AbortDocument finds nothing.
            self._drop_open(*key)
            raise

    def _drop_open(self, token: str, document_id: int) -> None:
        doc = self._open.pop((token, document_id), None)
        if doc is not None:
            os.close(doc.fd)
            doc.part.unlink(missing_ok=True)

    def _write_manifest(self, job: Job) -> None:
        folder = self.folder(job.token)
        new_folder = not folder.exists()
        folder.mkdir(exist_ok=True)
        tmp = folder / ".manifest.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest_of(job), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / "manifest.json")
        _fsync_dir(folder)
        if new_folder:
            _fsync_dir(self.root)

    def documents(self, token: str) -> list[Path]:
        manifest = json.loads((self.folder(token) / "manifest.json").read_text(encoding="utf-8"))
        return [self.folder(token) / d["file"] for d in manifest["documents"]]


class Binding:
    """The small loop every binding has: exchanges in, commands carried out, replies out."""

    def __init__(self, store: DirectoryStore) -> None:
        ids = itertools.count(1)
        self.server = ScanServer(ServerConfig(), new_id=lambda: str(uuid.UUID(int=next(ids))))
        self.store = store
        self.now = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
        self.pending: list[Job] = []  # StartProcessing commands for the engine
        self._messages = itertools.count(1)

    def run(self, commands: Iterable[Command]) -> None:
        for command in commands:
            if isinstance(command, StartProcessing):
                self.pending.append(command.job)
            elif isinstance(command, (StopProcessing, Deliver)):
                pass  # no engine to stop mid-filter, no subscribers in this example
            elif isinstance(command, AnnounceRepositoryState):
                # Only a store shared by several instances records what was announced; one
                # server sends its events (``command.events``) like any Deliver: none here.
                pass
            else:
                self.store.apply(command)

    def post(self, chunks: Iterable[bytes], content_type: str) -> Reply:
        self.now += timedelta(seconds=1)
        exchange = self.server.open_exchange(RequestInfo(now=self.now, content_type=content_type))
        try:
            for chunk in chunks:
                self.run(exchange.feed(chunk))
        except StoreFailure as exc:
            failed = exchange.store_failed(temporary=exc.temporary)
            self.run(failed.commands)
            return failed.reply
        outcome = exchange.end()
        try:
            self.run(outcome.commands)
        except StoreFailure as exc:
            outcome = exchange.store_failed(temporary=exc.temporary)
            self.run(outcome.commands)
        return outcome.reply

    def envelope(self, action: str, payload: etree._Element) -> bytes:
        return client.envelope(
            action, payload, message_id=f"urn:uuid:{uuid.UUID(int=2**64 + next(self._messages))}"
        )

    def call(self, action: str, payload: etree._Element) -> client.Response:
        reply = self.post([self.envelope(action, payload)], client.SOAP_XML)
        return client.parse_response(reply.body, reply.status)

    def send_image(self, token: str, document_id: int, image: Iterable[bytes]) -> Reply:
        cid = f"image{document_id}@custom-store"
        body = client.mtom(
            self.envelope(
                A.DSP_SEND_IMAGE, client.send_image_request(token, document_id, "png", cid)
            ),
            cid,
            image,
            boundary="custom-store-boundary",
        )
        return self.post(body.chunks(), body.content_type)

    def play_engine(self, delivered: Path) -> None:
        """The processing engine: "file" each document by copying it, report as it goes."""
        while self.pending:
            job = self.pending.pop(0)
            self.run(self.server.processing(ProcessingStarted(job.token), self.now))
            for index, status in enumerate(job.filters):
                if status.instructions is None:
                    continue
                self.run(self.server.processing(FilterStarted(job.token, index), self.now))
                target = delivered / job.token
                target.mkdir(parents=True, exist_ok=True)
                for path in self.store.documents(job.token):
                    shutil.copyfile(path, target / path.name)
                self.run(
                    self.server.processing(
                        FilterFinished(job.token, index, FilterState.COMPLETED_SUCCESSFULLY),
                        self.now,
                    )
                )
            self.run(self.server.processing(ProcessingFinished(job.token), self.now))


def image_chunks(seed: int, size: int, chunk: int = 16 * 1024) -> Iterator[bytes]:
    """A fake image, produced chunk by chunk as a scanner would send it."""
    block = bytes((seed * 31 + i) % 251 for i in range(chunk))
    for offset in range(0, size, chunk):
        yield block[: min(chunk, size - offset)]


def fault_line(reply: Reply) -> str:
    try:
        client.parse_response(reply.body, reply.status)
    except client.ClientFault as fault:
        return fault.line()
    return "no fault"


def run_demo(root: Path) -> int:
    image_size = 100_000
    store = DirectoryStore(root / "jobs")
    b = Binding(store)
    created = b.call(
        A.DSP_CREATE,
        client.create_post_scan_job(
            user_identifier="S-1-5-21-0-0-0-1000",
            psp_identifier="scan-to-folder",
            instructions=[FileShareInstructions(("\\\\localhost\\scans",))],
        ),
    )
    token = client.text_of(created.payload, names.DSP, "JobToken")
    print(f"created job {token}")

    reply = b.send_image(token, 1, image_chunks(1, image_size))
    print(f"image 1: HTTP {reply.status}")
    store.fail_append_after = 50_000  # the disk fills up half way through image 2
    reply = b.send_image(token, 2, image_chunks(2, image_size))
    leftovers = sorted(p.name for p in store.folder(token).iterdir() if p.suffix == ".part")
    print(
        f"image 2: HTTP {reply.status} {fault_line(reply)}; .part files left: {leftovers or 'none'}"
    )
    reply = b.send_image(token, 2, image_chunks(2, image_size))
    print(f"image 2 again: HTTP {reply.status}")

    b.call(A.DSP_END, client.token_request(names.DSP, "EndPostScanJobRequest", token))
    print(f"ended; engine has {len(b.pending)} job(s) to process")
    b.play_engine(root / "delivered")

    status = b.call(
        A.DSP_GET_JOB_ELEMENTS, client.job_elements_request(names.DSP, token, ["JobStatus"])
    )
    view = client.read_job_elements(status.payload, names.DSP)
    print(
        f"final state: {view.state} {','.join(view.reasons)}, images {view.images_received}, "
        f"filters {[f.state for f in view.filters]}"
    )
    manifest = json.loads((store.folder(token) / "manifest.json").read_text(encoding="utf-8"))
    print("manifest.json:", json.dumps({k: manifest[k] for k in ("state", "reasons", "documents")}))
    files = sorted(p.name for p in store.folder(token).iterdir())
    delivered = sorted(p.name for p in (root / "delivered" / token).iterdir())
    print(f"job folder: {files}; delivered: {delivered}")
    ok = (
        view.state == "Completed"
        and view.images_received == 2
        and not leftovers
        and all((root / "delivered" / token / f).stat().st_size == image_size for f in delivered)
    )
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A whole job through a directory job store.")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to keep the jobs (default: a temporary directory)",
    )
    args = parser.parse_args(argv)
    if args.dir is not None:
        return run_demo(args.dir)
    with tempfile.TemporaryDirectory() as tmp:
        return run_demo(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
