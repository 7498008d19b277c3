"""Helpers shared by the filter tests (no tests here): job records, documents and a real HTTP
server that takes PUT uploads."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PosixPath
from typing import Any

from dsc_bindings.filters.sites import SitePrefix
from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.interruption import interrupting
from dsc_core import names
from dsc_core.model import (
    Document,
    EmailInstructions,
    FileShareInstructions,
    FilterStatus,
    Instructions,
    Job,
    JobState,
    JobStateReason,
    SharePointInstructions,
)

_DIALECTS = {
    FileShareInstructions: names.FSF,
    EmailInstructions: names.EMLF,
    SharePointInstructions: names.SPF,
}


def make_job(
    *instructions: Instructions | None, documents: tuple[Document, ...] = (), **changes: Any
) -> Job:
    now = datetime.now(UTC)
    filters = tuple(
        FilterStatus(dialect=_DIALECTS.get(type(i), names.FSF), instructions=i)
        for i in instructions
    )
    job = Job(
        token=str(uuid.uuid4()),
        state=JobState.PENDING,
        reasons=(JobStateReason.NONE,),
        filters=filters,
        psp_identifier=str(uuid.uuid4()),
        psp_display_name="Invoices",
        user_name="alice@corp.example",
        owner="alice@corp.example",
        created=now,
        last_activity=now,
        documents=documents,
    )
    return job.evolve(**changes) if changes else job


def make_documents(directory: Path, *contents: tuple[str, bytes]) -> list[tuple[Document, Path]]:
    """Spool files for (format, bytes) pairs, numbered from 1."""
    directory.mkdir(parents=True, exist_ok=True)
    result = []
    for number, (fmt, data) in enumerate(contents, start=1):
        path = directory / f"doc{number}.bin"
        path.write_bytes(data)
        result.append((Document(number, fmt, len(data)), path))
    return result


class DocumentAway(PosixPath):
    """A stored document the store cannot give now: reading it meets a temporary StoreError,
    which the one rule (store/interruption.py) makes Interrupted.  Each filter meets it where it
    opens the document, deep inside its run: its share folder open, its SMTP DATA begun, its
    earlier documents delivered."""

    def __fspath__(self) -> str:
        with interrupting():
            raise StoreError(f"reading {self.name}: the spool does not answer", temporary=True)
        raise AssertionError("interrupting() let a temporary StoreError pass")


def second_away(documents: list[tuple[Document, Path]]) -> list[tuple[Document, Path]]:
    """``documents`` with the second one away (:class:`DocumentAway`): the run delivers the
    first, then the store stops answering (the others come after it, untouched)."""
    first, (document, path), *rest = documents
    return [first, (document, DocumentAway(path)), *rest]


def refused_port() -> int:
    """A local port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UploadServer:
    """A ThreadingHTTPServer that stores complete PUT bodies by path.

    ``/denied/...`` answers 403, ``/full/...`` 507, ``/slow/...`` reads the body slowly and
    drops it if the client goes away before Content-Length bytes arrived (as a real server
    does with an aborted upload); anything else is stored and answered 201.
    """

    def __init__(self, tls: ssl.SSLContext | None = None, slow_receive_buffer: bool = False):
        self.stored: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.incomplete: list[str] = []
        self.received: dict[str, int] = {}
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                with outer.changed:
                    outer.headers[self.path] = dict(self.headers.items())
                slow = self.path.startswith("/slow/")
                body = bytearray()
                while len(body) < length and not outer.stopping.is_set():
                    data = self.rfile.read(min(32 * 1024 if slow else 1 << 20, length - len(body)))
                    if not data:
                        break
                    body += data
                    if slow:
                        with outer.changed:
                            outer.received[self.path] = len(body)
                            outer.changed.notify_all()
                        time.sleep(0.01)
                if len(body) < length:
                    with outer.changed:
                        outer.incomplete.append(self.path)
                        outer.changed.notify_all()
                    self.close_connection = True
                    return
                status = 201
                if self.path.startswith("/denied/"):
                    status = 403
                elif self.path.startswith("/full/"):
                    status = 507
                else:
                    with outer.changed:
                        outer.stored[self.path] = bytes(body)
                        outer.changed.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(ThreadingHTTPServer):
            def server_bind(self) -> None:
                if slow_receive_buffer:
                    # A small receive window keeps the client from parking megabytes in
                    # socket buffers, so "mid-upload" really is mid-upload.
                    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                super().server_bind()

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = super().get_request()
                if tls is not None:
                    sock = tls.wrap_socket(sock, server_side=True)
                return sock, addr

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def wait(self, predicate: Any, timeout: float = 30.0) -> bool:
        with self.changed:
            return bool(self.changed.wait_for(predicate, timeout))

    def __enter__(self) -> UploadServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def allow(*servers: Any) -> tuple[SitePrefix, ...]:
    """SharePoint site prefixes (R13) that let the filter upload to these local test servers."""
    return tuple(SitePrefix(server.url("/"), allow_http=True) for server in servers)


class Listener:
    """A socket that accepts and counts connections (and never answers)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.received = b""
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(0.5)
            try:
                self.received += conn.recv(65536)
            except OSError:
                pass
            conn.close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()
