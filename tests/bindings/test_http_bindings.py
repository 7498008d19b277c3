"""Both HTTP bindings (async: h11 over anyio/trio; blocking: sockets and threads) over real
sockets on 127.0.0.1, with a real ScanService (SQLite store, spool, file-share filter, delivery).

One suite, parametrized over the binding: the async server runs in an anyio blocking portal
(trio, and asyncio once) so that the same synchronous raw-socket client drives both.  One test
runs natively under pytest-trio (``await nursery.start(serve, ...)``, graceful cancellation).
The socket half: the driver's rules fed bytes without a socket, and ``admit``, are tested in
test_http_driver.py.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
import trio
import trustme
from lxml import etree

from dsc_bindings.directory.ldap import Directory
from dsc_bindings.filters import document_file_name
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.http.async_server import serve
from dsc_bindings.http.blocking_server import BlockingServer
from dsc_bindings.runtime.service import ScanService
from dsc_bindings.serve import compose
from dsc_bindings.store.sqlite import StoreError
from dsc_core import Limits, ServerConfig, names
from dsc_core import client as C
from dsc_core.config import max_request_bytes
from dsc_core.model import FileShareInstructions
from waiting import wait_for

A = names.Action
SID = "S-1-5-21-1001"
USER = "alice@corp.example"
SHARE = r"\\FileSrv\Scans\Finance"
BINDINGS = ["async", "blocking"]


# --- raw HTTP client --------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Raw:
    """A tiny HTTP/1.1 client on one socket: exactly the bytes we choose."""

    def __init__(
        self, port: int, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 30.0
    ) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    @staticmethod
    def head(
        method: str = "POST", path: str = "/ScanServer", headers: Iterable[tuple[str, str]] = ()
    ) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def expect_continue(self, length: int, content_type: str = C.SOAP_XML) -> None:
        """Send a POST head declaring ``length`` body bytes with ``Expect: 100-continue``; the
        body is the caller's to send, after reading the interim (or final) answer."""
        headers = [("Content-Type", content_type), ("Content-Length", str(length))]
        self.send(self.head(headers=[*headers, ("Expect", "100-continue")]))

    def post(
        self,
        body: bytes | Iterable[bytes],
        content_type: str = C.SOAP_XML,
        *,
        chunked: bool = False,
        length: int | None = None,
        extra: Iterable[tuple[str, str]] = (),
    ) -> Response:
        chunks = [body] if isinstance(body, bytes) else body
        headers = [("Content-Type", content_type), *extra]
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            if length is None:
                chunks = [b"".join(chunks)]
                length = len(chunks[0])
            headers.append(("Content-Length", str(length)))
        self.send(self.head(headers=headers))
        for chunk in chunks:
            if chunked:
                if chunk:
                    self.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            else:
                self.send(chunk)
        if chunked:
            self.send(b"0\r\n\r\n")
        return self.read_response()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def read_response(self) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before a response head: {self.buffer!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {}
        for line in lines:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0")) if status >= 200 else 0
        while len(self.buffer) < length:
            if not self._fill():
                raise ConnectionError("closed in the middle of a response body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(status, headers, body)

    def closed_by_server(self, within: float) -> bool:
        """True if the server closes (EOF or reset) within ``within`` seconds, sending nothing."""
        self.sock.settimeout(within)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError):
            return True
        finally:
            self.sock.settimeout(30.0)
        assert data == b"", f"unexpected bytes: {data[:200]!r}"
        return True

    def close(self) -> None:
        self.sock.close()


def soap(action: str, payload: etree._Element, to: str = "") -> bytes:
    return C.envelope(action, payload, message_id=f"urn:uuid:{uuid.uuid4()}", to=to)


def call(client: Raw, action: str, payload: etree._Element, to: str = "") -> C.Response:
    reply = client.post(soap(action, payload, to))
    return C.parse_response(reply.body, reply.status)


def repository_request() -> bytes:
    return soap(
        A.DSC_GET_REPOSITORY_ELEMENTS,
        C.repository_elements_request(["RepositoryStatus", "RepositoryConfiguration"]),
    )


def create_job(client: Raw) -> str:
    response = call(
        client,
        A.DSP_CREATE,
        C.create_post_scan_job(
            user_identifier=SID,
            psp_identifier="psp-finance",
            instructions=[FileShareInstructions((SHARE,))],
        ),
    )
    token = C.text_of(response.payload, names.DSP, "JobToken")
    assert token
    return token


def send_image_body(
    token: str, document_id: int, fmt: str, image: bytes, piece: int = 64 * 1024
) -> C.Mtom:
    cid = f"image{document_id}@scanner"
    root = soap(A.DSP_SEND_IMAGE, C.send_image_request(token, document_id, fmt, cid))
    pieces = [image[i : i + piece] for i in range(0, len(image), piece)]
    return C.mtom(root, cid, pieces, boundary=f"MIMEBoundary{uuid.uuid4().hex}")


def job_state(client: Raw, token: str) -> str:
    response = call(
        client, A.DSP_GET_JOB_ELEMENTS, C.job_elements_request(names.DSP, token, ["JobStatus"])
    )
    return C.read_job_elements(response.payload, names.DSP).state


def part_files(data_dir: Path) -> list[Path]:
    return list((data_dir / "spool").glob("*/.*.part"))


def assert_temporary_store_fault(reply: Any, data_dir: Path) -> None:
    """R4 step 9 over HTTP: 500 with ServerErrorTemporaryError, and no upload debris left."""
    assert reply.status == 500
    with pytest.raises(C.ClientFault) as fault:
        C.parse_response(reply.body, reply.status)
    assert (fault.value.subcode or "").endswith("ServerErrorTemporaryError")
    assert part_files(data_dir) == []


# --- servers --------------------------------------------------------------------------------


@dataclass
class Running:
    port: int
    service: ScanService
    data_dir: Path
    config: ServerConfig
    stop: Callable[[], None] = field(repr=False)


@contextmanager
def running(
    binding: str,
    tmp_path: Path,
    config: ServerConfig | None = None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    backend: str = "trio",
    filters: FilterSettings | None = None,
    directory: Directory | None = None,
    host: str = "127.0.0.1",
) -> Iterator[Running]:
    config = config or ServerConfig(user_directory={SID: USER})
    data_dir = tmp_path / "data"
    filters = filters or FilterSettings.embedded_default(data_dir)
    composition = compose(config, data_dir, filters, directory=directory)
    service = composition.service
    service.start()
    with ExitStack() as stack:
        stack.callback(service.shutdown, 5.0)
        if binding == "blocking":
            server = BlockingServer(
                composition.site, host, 0, ssl_context, config.limits, grace=2.0
            )
            port = server.start()
            stop: Callable[[], None] = functools.partial(server.shutdown)
        else:
            portal = stack.enter_context(anyio.from_thread.start_blocking_portal(backend))
            future, port = portal.start_task(
                functools.partial(
                    serve,
                    composition.site,
                    host=host,
                    port=0,
                    ssl_context=ssl_context,
                    limits=config.limits,
                    grace=2.0,
                )
            )

            def stop() -> None:
                future.cancel()
                try:
                    future.exception(timeout=10)
                except BaseException:
                    pass  # cancelled, as asked

        stopped = False

        def stop_once() -> None:
            nonlocal stopped
            if not stopped:
                stopped = True
                stop()

        stack.callback(stop_once)
        yield Running(port, service, data_dir, config, stop_once)


@pytest.fixture(params=BINDINGS)
def binding(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def small_limits(**changes: object) -> ServerConfig:
    return ServerConfig(user_directory={SID: USER}, limits=Limits(**changes))  # type: ignore


# --- round trips ---------------------------------------------------------------------------


def test_repository_elements_round_trip(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        connection = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        connection.request(
            "POST", "/ScanServer", repository_request(), {"Content-Type": C.SOAP_XML}
        )
        reply = connection.getresponse()
        body = reply.read()
        assert reply.status == 200
        assert reply.getheader("Server") == "dsc-server"
        assert reply.getheader("Content-Type") == "application/soap+xml; charset=utf-8"
        assert reply.getheader("Content-Length") == str(len(body))
        parsed = C.parse_response(body, reply.status)
        assert parsed.action == A.DSC_GET_REPOSITORY_ELEMENTS + "Response"
        assert b"Idle" in body
        connection.close()


def test_async_binding_under_asyncio(tmp_path: Path) -> None:
    with running("async", tmp_path, backend="asyncio") as srv:
        client = Raw(srv.port)
        reply = client.post(repository_request())
        assert reply.status == 200
        assert C.parse_response(reply.body).action == A.DSC_GET_REPOSITORY_ELEMENTS + "Response"
        client.close()


def test_scan_job_with_mtom_uploads_chunked_and_sized(binding: str, tmp_path: Path) -> None:
    images = [
        (1, "pdf-a", os.urandom(700_000), True),
        (2, "jfif", os.urandom(300_001), False),
        (3, "png", b"\x89PNG tiny", True),
    ]
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        token = create_job(client)
        for document_id, fmt, image, chunked in images:
            mtom = send_image_body(token, document_id, fmt, image)
            if chunked:
                reply = client.post(mtom.chunks(), mtom.content_type, chunked=True)
            else:
                reply = client.post(
                    mtom.chunks(), mtom.content_type, length=mtom.length(len(image))
                )
            assert reply.status == 200, reply.body
            assert C.parse_response(reply.body).action == A.DSP_SEND_IMAGE + "Response"
        call(client, A.DSP_END, C.token_request(names.DSP, "EndPostScanJobRequest", token))
        wait_for(lambda: job_state(client, token) == "Completed", what="job Completed")
        folder = srv.data_dir / "shares/filesrv/scans/Finance" / USER
        for counter, (_, fmt, image, _) in enumerate(images, start=1):
            assert (folder / document_file_name("Scan", counter, fmt)).read_bytes() == image
        assert part_files(srv.data_dir) == []
        client.close()


def test_jobs_survive_a_restart(binding: str, tmp_path: Path) -> None:
    image = os.urandom(50_000)
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        token = create_job(client)
        mtom = send_image_body(token, 1, "pdf-a", image)
        assert client.post(mtom.chunks(), mtom.content_type, chunked=True).status == 200
        client.close()
    with running(binding, tmp_path) as srv:  # same data directory: the store restores it
        client = Raw(srv.port)
        assert job_state(client, token) == "Creating"
        call(client, A.DSP_END, C.token_request(names.DSP, "EndPostScanJobRequest", token))
        wait_for(lambda: job_state(client, token) == "Completed", what="job Completed")
        folder = srv.data_dir / "shares/filesrv/scans/Finance" / USER
        assert (folder / document_file_name("Scan", 1, "pdf-a")).read_bytes() == image
        client.close()


# --- keep-alive, Expect, limits ------------------------------------------------------------


def test_keep_alive_and_pipelining(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        assert client.post(repository_request()).status == 200
        assert client.post(repository_request()).status == 200
        # Two requests in one write: two answers, in order, on the same connection.
        body = repository_request()
        one = (
            client.head(headers=[("Content-Type", C.SOAP_XML), ("Content-Length", str(len(body)))])
            + body
        )
        client.send(one + one)
        assert [client.read_response().status for _ in range(2)] == [200, 200]
        client.close()


def test_expect_100_continue(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        body = repository_request()
        client.expect_continue(len(body))
        interim = client.read_response()
        assert interim.status == 100
        client.send(body)
        reply = client.read_response()
        assert reply.status == 200 and C.parse_response(reply.body).action
        client.close()


def test_413_for_over_limit_content_length(binding: str, tmp_path: Path) -> None:
    config = small_limits(max_image_bytes=1000, max_envelope_bytes=1000)
    limit = max_request_bytes(config.limits)  # image + envelope + MIME framing slack
    with running(binding, tmp_path, config) as srv:
        # With Expect: the answer comes instead of 100 Continue, before any body byte.
        client = Raw(srv.port)
        client.expect_continue(limit + 1)
        reply = client.read_response()
        assert reply.status == 413
        assert reply.headers["connection"] == "close"
        assert str(limit).encode() in reply.body
        assert client.closed_by_server(30)
        client.close()
        # Without Expect, the client is already sending its body: it still reads the 413.
        client = Raw(srv.port)
        client.send(
            client.head(
                headers=[("Content-Type", C.SOAP_XML), ("Content-Length", str(limit + 30000))]
            )
            + b"x" * 20000
        )
        assert client.read_response().status == 413
        client.close()
        # At the limit is fine (the core then judges the bytes).
        client = Raw(srv.port)
        reply = client.post(b"<x/>" + b" " * (limit - 4))
        assert reply.status == 400  # a SOAP fault from the core (R4 step 1), not HTTP's 413
        assert reply.headers["content-type"].startswith("application/soap+xml")
        client.close()


def test_431_for_huge_headers(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path, small_limits(max_http_header_bytes=4096)) as srv:
        big = [("X-Filler", "a" * 8000), ("Content-Length", "0")]
        # All in one write (h11 alone would parse it: the binding feeds heads in slices) ...
        client = Raw(srv.port)
        client.send(client.head(headers=big))
        assert client.read_response().status == 431
        client.close()
        # ... and trickled in pieces.
        client = Raw(srv.port)
        data = client.head(headers=big)
        for i in range(0, 6000, 1000):
            client.send(data[i : i + 1000])
            time.sleep(0.01)
        assert client.read_response().status == 431
        client.close()
        # Under the limit is fine.
        client = Raw(srv.port)
        body = repository_request()
        client.send(
            client.head(
                headers=[
                    ("X-Filler", "b" * 3000),
                    ("Content-Type", C.SOAP_XML),
                    ("Content-Length", str(len(body))),
                ]
            )
            + body
        )
        assert client.read_response().status == 200
        client.close()


def test_405_for_get_and_400_for_garbage(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        client.send(client.head("GET", "/ScanServer"))
        reply = client.read_response()
        assert reply.status == 405 and reply.headers["allow"] == "POST"
        assert reply.headers["server"] == "dsc-server"
        # A refused request without a body keeps the connection usable.
        assert client.post(repository_request()).status == 200
        client.close()

        client = Raw(srv.port)
        client.send(b"THIS IS NOT HTTP\r\n\r\n")
        assert client.read_response().status == 400
        assert client.closed_by_server(30)
        client.close()


def test_503_over_the_connection_limit(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path, small_limits(max_connections=1)) as srv:
        first = Raw(srv.port)
        assert first.post(repository_request()).status == 200
        # Busy, not idle (a request in progress): it cannot be reclaimed (test_runtime).
        body = repository_request()
        first.expect_continue(len(body))
        assert first.read_response().status == 100  # the server has read the head
        second = Raw(srv.port)
        reply = second.post(repository_request())
        assert reply.status == 503 and reply.headers["connection"] == "close"
        assert second.closed_by_server(30)
        second.close()
        first.send(body)
        assert first.read_response().status == 200  # the first one is unaffected
        first.close()

        def third_ok() -> bool:
            client = Raw(srv.port)
            try:
                return client.post(repository_request()).status == 200
            finally:
                client.close()

        wait_for(third_ok, what="a free connection slot after close")


def test_timeouts_close_the_connection(binding: str, tmp_path: Path) -> None:
    config = small_limits(idle_timeout=0.3, head_timeout=0.5, body_timeout=0.5)
    with running(binding, tmp_path, config) as srv:
        idle = Raw(srv.port)
        assert idle.post(repository_request()).status == 200
        assert idle.closed_by_server(30)  # idle_timeout 0.3 s; 30 s only bounds a failure
        idle.close()

        head = Raw(srv.port)
        head.send(b"POST /ScanServer HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert head.closed_by_server(30)
        head.close()

        body = Raw(srv.port)
        body.send(
            body.head(headers=[("Content-Type", C.SOAP_XML), ("Content-Length", "100")]) + b"<soap"
        )
        assert body.closed_by_server(30)
        body.close()


def test_an_idle_connection_lives_until_its_timeout(binding: str, tmp_path: Path) -> None:
    """Idle longer than the deadline sweeper's interval (async: a quarter of the shortest
    timeout), shorter than the keep-alive timeout: the connection still serves."""
    config = small_limits(idle_timeout=4.0, head_timeout=4.0, body_timeout=4.0)
    with running(binding, tmp_path, config) as srv:
        client = Raw(srv.port)
        try:
            for _ in range(3):
                assert client.post(repository_request()).status == 200
                time.sleep(1.2)
            assert client.post(repository_request()).status == 200
        finally:
            client.close()


@pytest.mark.parametrize("how", ["disconnect", "stall"])
def test_interrupted_upload_leaves_no_debris(binding: str, tmp_path: Path, how: str) -> None:
    # A stall ends by the body timeout; a reset must end the upload by itself, so it gets a
    # timeout far away (at 0.5 s the timeout could have removed the .part before a loaded test
    # saw it, or cleaned up after a reset the server had missed).
    config = small_limits(body_timeout=0.5 if how == "stall" else 60.0)
    with running(binding, tmp_path, config) as srv:
        client = Raw(srv.port)
        token = create_job(client)
        image = os.urandom(1_000_000)
        mtom = send_image_body(token, 1, "pdf-a", image)
        upload = Raw(srv.port)
        upload.send(
            upload.head(
                headers=[
                    ("Content-Type", mtom.content_type),
                    ("Content-Length", str(mtom.length(len(image)))),
                ]
            )
        )
        upload.send(mtom.head + image[:400_000])
        wait_for(lambda: bool(part_files(srv.data_dir)), what="the upload to begin")
        if how == "disconnect":
            # Reset, like a scanner losing power.
            upload.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            upload.close()
        else:
            assert upload.closed_by_server(30)  # body timeout: closed without an answer
            upload.close()
        wait_for(lambda: not part_files(srv.data_dir), what="the .part file to go")
        # The same DocumentId is accepted again (the aborted upload released it).
        reply = client.post(mtom.chunks(), mtom.content_type, chunked=True)
        assert reply.status == 200, reply.body
        assert (srv.data_dir / "spool" / token / "1").read_bytes() == image
        client.close()


@pytest.mark.parametrize("failing", ["AppendDocument", "AppendDocument#3", "FinishDocument"])
def test_store_failure_answers_r4_step_9(
    binding: str, tmp_path: Path, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``AppendDocument#3``: a write in the middle of the image fails while the next piece
    is already being read (pieces are written while the body arrives)."""
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        token = create_job(client)
        store = srv.service._store
        assert store is not None
        real_apply = store.apply
        failures = []
        name, _, nth = failing.partition("#")
        seen = []

        def apply(command: object) -> None:
            if type(command).__name__ == name and not failures:
                seen.append(command)
                if len(seen) >= int(nth or 1):
                    failures.append(command)
                    raise StoreError("disk full (injected)", temporary=True)
            real_apply(command)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "apply", apply)
        image = os.urandom(3_000_000 if nth else 600_000)
        mtom = send_image_body(token, 1, "pdf-a", image)
        reply = client.post(mtom.chunks(), mtom.content_type, chunked=True)
        assert failures
        assert_temporary_store_fault(reply, srv.data_dir)
        # Nothing was acknowledged, so the device sends the image again, and it is kept.
        reply = client.post(mtom.chunks(), mtom.content_type, chunked=True)
        assert reply.status == 200, reply.body
        assert (srv.data_dir / "spool" / token / "1").read_bytes() == image
        client.close()


def test_stop_lets_the_request_in_flight_finish(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        idle = Raw(srv.port)
        assert idle.post(repository_request()).status == 200
        busy = Raw(srv.port)
        body = repository_request()
        busy.expect_continue(len(body))
        assert busy.read_response().status == 100  # the exchange is open
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        assert idle.closed_by_server(30)  # idle keep-alive: closed at once
        busy.send(body)
        final = busy.read_response()
        assert final.status == 200 and final.headers["connection"] == "close"
        stopper.join(10)
        assert not stopper.is_alive()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
        idle.close()
        busy.close()


# --- coalesced service calls over sockets (the sans-IO half: test_http_driver.py) ------------


def _trickle(client: Raw, data: bytes, pieces: int) -> None:
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
        client.send(data[i : i + step])
        time.sleep(0.02)


@pytest.mark.parametrize("chunked", [False, True])
def test_envelope_at_and_over_the_coalescing_bound(
    binding: str, tmp_path: Path, chunked: bool
) -> None:
    """Bodies just within max_envelope_bytes (held, one Call) and just over it (flushed and
    streamed) get the core's answers: 200, and the envelope-too-large fault."""
    with running(binding, tmp_path) as srv:
        bound = srv.config.limits.max_envelope_bytes
        client = Raw(srv.port)
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = repository_request()
        for size in (bound, bound + 1, bound - 1, bound + 40_000):
            body = request + b" " * (size - len(request))
            if chunked:
                framed = (
                    b"".join(
                        f"{len(p):x}\r\n".encode() + p + b"\r\n"
                        for p in (body[i : i + 20_000] for i in range(0, len(body), 20_000))
                    )
                    + b"0\r\n\r\n"
                )
                head = client.head(
                    headers=[("Content-Type", C.SOAP_XML), ("Transfer-Encoding", "chunked")]
                )
            else:
                framed = body
                head = client.head(
                    headers=[("Content-Type", C.SOAP_XML), ("Content-Length", str(len(body)))]
                )
            _trickle(client, head + framed, 4)
            reply = client.read_response()
            if size <= bound:
                assert reply.status == 200, (size, reply.body[-300:])
                parsed = C.parse_response(reply.body, reply.status)
                assert parsed.action == A.DSC_GET_REPOSITORY_ELEMENTS + "Response"
            else:
                assert reply.status == 400, size
                assert f"exceeds the limit of {bound} bytes".encode() in reply.body
        client.close()


@pytest.mark.parametrize(
    "where,failing",
    [("flush", "AppendDocument"), ("single", "AppendDocument"), ("single", "FinishDocument")],
)
def test_store_failure_in_a_coalesced_call(
    binding: str, tmp_path: Path, where: str, failing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R4 step 9 when the failing store command runs in the Call that opens the exchange:
    the one that crosses the coalescing bound ("flush", the rest of the body then arrives), or
    the only Call of a small SendImage ("single")."""
    with running(binding, tmp_path) as srv:
        bound = srv.config.limits.max_envelope_bytes
        client = Raw(srv.port)
        token = create_job(client)
        store = srv.service._store
        assert store is not None
        real_apply = store.apply
        failures: list[object] = []

        def apply(command: object) -> None:
            if type(command).__name__ == failing and not failures:
                failures.append(command)
                raise StoreError("disk full (injected)", temporary=True)
            real_apply(command)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "apply", apply)
        image = os.urandom(3 * bound if where == "flush" else bound // 4)
        mtom = send_image_body(token, 1, "pdf-a", image)
        length = mtom.length(len(image))
        upload = Raw(srv.port)
        upload.send(
            upload.head(
                headers=[("Content-Type", mtom.content_type), ("Content-Length", str(length))]
            )
        )
        if where == "flush":
            first = bound + 1 - len(mtom.head)
            upload.send(mtom.head + image[:first])  # just over the bound: the flush Call
            wait_for(lambda: bool(failures), what="the flush Call to fail in the store")
            upload.send(image[first:] + mtom.tail)
        else:
            upload.send(mtom.head + image + mtom.tail)
        reply = upload.read_response()
        assert failures
        assert_temporary_store_fault(reply, srv.data_dir)
        # Nothing was acknowledged: the device sends the image again, on the same connection.
        reply = upload.post(mtom.chunks(), mtom.content_type, length=length)
        assert reply.status == 200, reply.body
        assert (srv.data_dir / "spool" / token / "1").read_bytes() == image
        upload.close()
        client.close()


# --- TLS and identity (R10) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pki() -> dict[str, object]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server)
    ca.configure_trust(server)
    server.verify_mode = ssl.CERT_REQUIRED

    def client(name: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        if name is not None:
            ca.issue_cert(f"{name}.clients.example", common_name=name).configure_cert(context)
        return context

    return {
        "server": server,
        "admin": client("admin"),
        "bob": client("bob"),
        "anonymous": client(None),
    }


def test_tls_client_certificate_identity(
    binding: str, tmp_path: Path, pki: dict[str, ssl.SSLContext]
) -> None:
    config = ServerConfig(require_client_certificates=True, scan_admins=frozenset({"admin"}))
    with running(binding, tmp_path, config, ssl_context=pki["server"]) as srv:
        admin = Raw(srv.port, ssl_context=pki["admin"])
        response = call(admin, A.DSC_GET_ACTIVE_JOBS, C.empty_request("GetActiveJobsRequest"))
        assert response.action == A.DSC_GET_ACTIVE_JOBS + "Response"
        admin.close()

        bob = Raw(srv.port, ssl_context=pki["bob"])
        with pytest.raises(C.ClientFault) as fault:
            call(bob, A.DSC_GET_ACTIVE_JOBS, C.empty_request("GetActiveJobsRequest"))
        assert fault.value.subcode is not None
        assert fault.value.subcode.endswith("ClientErrorCurrentUserNotScanAdmin")
        # R10: the certificate identity is also the job's user.
        token = create_job(bob)
        assert srv.service.server.jobs.get(token).user_name == "bob"  # type: ignore[union-attr]
        bob.close()

        with pytest.raises((ssl.SSLError, ConnectionError)):
            anonymous = Raw(srv.port, ssl_context=pki["anonymous"])
            anonymous.post(repository_request())


# --- event delivery (R7) -------------------------------------------------------------------


class _Subscriber(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append(  # type: ignore[attr-defined]
            (self.path, self.headers["Content-Type"], body)
        )
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def subscriber() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Subscriber)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.received  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


def subscribe_request(base: str) -> etree._Element:
    request = etree.Element(f"{{{names.WSE}}}Subscribe")
    end_to = etree.SubElement(request, f"{{{names.WSE}}}EndTo")
    etree.SubElement(end_to, f"{{{names.WSA}}}Address").text = f"{base}/end"
    delivery = etree.SubElement(request, f"{{{names.WSE}}}Delivery", Mode=names.PUSH_MODE)
    notify_to = etree.SubElement(delivery, f"{{{names.WSE}}}NotifyTo")
    etree.SubElement(notify_to, f"{{{names.WSA}}}Address").text = f"{base}/events"
    return request


def test_event_delivery_to_a_subscriber(binding: str, tmp_path: Path) -> None:
    with subscriber() as (base, received), running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        response = call(client, A.SUBSCRIBE, subscribe_request(base), to=srv.config.dsp_url)
        assert response.action == A.SUBSCRIBE_RESPONSE
        token = create_job(client)
        wait_for(
            lambda: any(A.DSP_JOB_STATUS_EVENT.encode() in body for _, _, body in received),
            what="a PostScanJobStatusEvent",
        )
        path, content_type, body = next(
            item for item in received if A.DSP_JOB_STATUS_EVENT.encode() in item[2]
        )
        assert path == "/events" and content_type.startswith("application/soap+xml")
        assert token.encode() in body
        client.close()
        # Shutdown ends the subscription with SourceShuttingDown at its EndTo (R7).
        srv.stop()
        srv.service.shutdown(5.0)
        assert any(path == "/end" and b"SourceShuttingDown" in body for path, _, body in received)


# --- native trio: nursery.start and graceful cancellation ---------------------------------------


async def test_trio_nursery_start_and_graceful_cancel(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = ServerConfig(user_directory={SID: USER})
    composition = compose(config, data_dir, FilterSettings.embedded_default(data_dir))
    service = composition.service
    service.start()
    try:
        body = repository_request()
        headed = threading.Event()
        go = threading.Event()
        outcome: dict[str, object] = {}

        def slow_client(port: int) -> None:
            client = Raw(port)
            try:
                client.expect_continue(len(body))
                outcome["interim"] = client.read_response().status
                headed.set()
                go.wait(10)
                time.sleep(0.2)  # the server is draining by now
                client.send(body)
                outcome["final"] = client.read_response()
            except BaseException as exc:  # reported below
                outcome["error"] = exc
                headed.set()
            finally:
                client.close()

        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                functools.partial(
                    serve,
                    composition.site,
                    host="127.0.0.1",
                    port=0,
                    limits=config.limits,
                    grace=5.0,
                )
            )
            idle = Raw(port)  # an idle keep-alive connection: closed at once on cancel
            thread = threading.Thread(target=slow_client, args=(port,))
            thread.start()
            await trio.to_thread.run_sync(headed.wait, 10)
            nursery.cancel_scope.cancel()
            go.set()
        await trio.to_thread.run_sync(thread.join, 10)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["interim"] == 100
        final = outcome["final"]
        assert isinstance(final, Response)
        assert final.status == 200 and final.headers["connection"] == "close"
        assert idle.closed_by_server(30)
        idle.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        service.shutdown(5.0)


class _SecondWait(Exception):
    pass


async def test_one_wake_up_accepts_every_waiting_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connections waiting in the backlog are all accepted before the accept loop waits
    again (issue 7: accepting one per trip through a busy scheduler kept 64 new scanners
    waiting up to 0.8 s for their first byte to be read)."""
    from dsc_bindings.http import async_server as http_async

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    started: list[object] = []
    waits = 0
    real_wait = anyio.wait_readable

    async def counting_wait(obj: Any) -> None:
        nonlocal waits
        waits += 1
        if waits == 2:  # the first wake-up is over: everything waiting must be in hand
            raise _SecondWait
        await real_wait(obj)

    class Group:
        def start_soon(self, function: Any, *args: Any) -> None:
            started.append(args[0])

    monkeypatch.setattr(http_async.anyio, "wait_readable", counting_wait)
    try:
        with pytest.raises(_SecondWait):
            await http_async._accept_loop(listener, None, Group())  # type: ignore[arg-type]
        assert len(started) == 40
    finally:
        for sock in [*started, *clients]:
            assert isinstance(sock, socket.socket)
            sock.close()
        await listener.aclose()
