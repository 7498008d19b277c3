"""A small blocking HTTP(S) client for the ``dsc`` client commands: one POST (body streamed) or
one GET (the status endpoints) per connection.

A server may answer before it has read the whole body (413 when an image exceeds
``max_image_bytes``, 503, a fault) and then stop reading: the streamed body checks for such an
early answer between chunks, and a write that fails (broken pipe, reset) is followed by an attempt
to read the answer, so the user sees the server's reason instead of "broken pipe"
(RFC 9112 §9.5: a client that sends a body should watch for an early response).
"""

from __future__ import annotations

import http.client
import io
import select
import socket
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConnectionFailed(Exception):
    """The server could not be reached; the message says what to check."""


@dataclass(frozen=True)
class HttpReply:
    status: int
    content_type: str
    body: bytes
    #: The server answered before it had the whole body (the upload was not finished).
    early: bool = False


class _EarlyAnswer(Exception):
    """The server has answered while the body was still being sent; ``first`` holds what was
    already read of the answer (TLS only: see :func:`_answer_started`)."""

    def __init__(self, first: bytes = b"") -> None:
        super().__init__("early answer")
        self.first = first


def _watching(conn: http.client.HTTPConnection, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks``, stopping as soon as the server has something to say (an early answer)."""
    for chunk in chunks:
        sock = conn.sock
        if sock is not None and select.select([sock], [], [], 0)[0]:
            first = _answer_started(sock)
            if first is not None:
                raise _EarlyAnswer(first)
        yield chunk


def _answer_started(sock: socket.socket) -> bytes | None:
    """What a readable socket holds: None when it is no answer.  On TLS, readable may only be
    the server's session tickets (TLS 1.3 sends them after the handshake, RFC 8446 §4.6.1):
    a non-blocking read of one byte processes them, and returns application data only if the
    server really answered (that byte is kept for the answer's parser)."""
    if not isinstance(sock, ssl.SSLSocket):
        return b""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1)  # b"": the server closed the connection
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return None
    finally:
        sock.settimeout(timeout)


class _Prefixed(io.RawIOBase):
    """A socket's stream with bytes already read from it in front (for HTTPResponse)."""

    def __init__(self, first: bytes, sock: socket.socket) -> None:
        self._first = first
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._first:
            n = min(len(buffer), len(self._first))
            buffer[:n] = self._first[:n]
            self._first = self._first[n:]
            return n
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self)


def client_ssl_context(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def get(url: str, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 60.0) -> HttpReply:
    """GET ``url`` and read the whole reply (the server's status endpoints: small bodies)."""
    return _request("GET", url, None, "", None, ssl_context, timeout)


def post(
    url: str,
    body: bytes | Iterable[bytes],
    *,
    content_type: str,
    length: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
) -> HttpReply:
    """POST ``body`` (bytes, or chunks with a known ``length``) and read the whole reply."""
    return _request("POST", url, body, content_type, length, ssl_context, timeout)


def _request(
    method: str,
    url: str,
    body: bytes | Iterable[bytes] | None,
    content_type: str,
    length: int | None,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
) -> HttpReply:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConnectionFailed(f"not an http(s) URL: {url!r} (example: http://127.0.0.1:5362)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname,
            port,
            timeout=timeout,
            context=ssl_context or ssl.create_default_context(),
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    headers = {"User-Agent": "dsc-client"}
    if content_type:
        headers["Content-Type"] = content_type
    try:
        return _exchange(conn, method, path, body, headers, length)
    except ssl.SSLError as exc:
        if not isinstance(exc, ssl.SSLCertVerificationError) and _speaks_plain_http(
            parts.hostname, port, timeout
        ):
            raise ConnectionFailed(
                f"the server at {parts.netloc} answers plain HTTP, not HTTPS: use "
                f"--server {url.replace('https:', 'http:', 1)}"
            ) from exc
        raise ConnectionFailed(
            f"TLS with {parts.netloc} failed: {exc.reason or exc}; check "
            "--ca (the server's CA) and --cert/--key (your certificate)"
        ) from exc
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise _closed_without_answer(url, port, timeout, exc) from exc
    except (ConnectionError, TimeoutError, OSError) as exc:
        raise ConnectionFailed(
            f"cannot reach the scan server at {parts.scheme}://{parts.netloc}: "
            f"{exc.strerror or exc}; is `dsc serve` running there?"
        ) from exc
    finally:
        conn.close()


def _exchange(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None,
    headers: dict[str, str],
    length: int | None,
) -> HttpReply:
    """Send the request and read the whole reply, or the reply the server sent early."""
    try:
        if body is None:
            conn.request(method, path, headers=headers)
        elif isinstance(body, bytes):
            conn.request(method, path, body=body, headers=headers)
        else:
            if length is not None:
                headers["Content-Length"] = str(length)
            conn.request(
                method,
                path,
                body=_watching(conn, body),
                headers=headers,
                encode_chunked=length is None,
            )
    except (
        _EarlyAnswer,
        BrokenPipeError,
        ConnectionResetError,
        ssl.SSLEOFError,
        ssl.SSLZeroReturnError,
    ) as exc:
        # The server stopped reading (over TLS, its close shows as an EOF): its answer, if
        # it sent one, says why.
        early = _early_reply(conn, exc.first if isinstance(exc, _EarlyAnswer) else b"")
        if early is not None:
            return early
        if isinstance(exc, _EarlyAnswer):
            raise ConnectionResetError("the server closed the connection") from None
        raise
    response = conn.getresponse()
    data = response.read()
    return HttpReply(response.status, response.getheader("Content-Type", ""), data)


def _closed_without_answer(
    url: str, port: int, timeout: float, exc: ConnectionResetError | BrokenPipeError
) -> ConnectionFailed:
    """What a connection the server closed without an answer most likely means."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "https" and _speaks_tls(host, port, timeout):
        return ConnectionFailed(
            f"the server at {parts.netloc} speaks HTTPS, not plain HTTP: use "
            f"--server {url.replace('http:', 'https:', 1)} (with --ca, its CA, and "
            "--cert/--key if it asks for a client certificate)"
        )
    if parts.scheme != "https":
        return ConnectionFailed(
            f"cannot reach the scan server at {parts.scheme}://"
            f"{parts.netloc}: {exc.strerror or exc}; is `dsc serve` "
            "running there?"
        )
    # A server that requires client certificates may drop a client without one right
    # after the TLS 1.3 handshake, without an alert: say what is most likely wrong.
    return ConnectionFailed(
        f"TLS with {parts.netloc} failed: the server closed the "
        f"connection without an answer ({exc.strerror or exc}); if it "
        "requires client certificates, give --cert/--key (and --ca)"
    )


def _early_reply(conn: http.client.HTTPConnection, first: bytes) -> HttpReply | None:
    """The answer a server sent before it had read the whole request (``first``: its bytes
    already read), or None if there is none to read (the connection was only reset)."""
    try:
        if first and conn.sock is not None:
            response = http.client.HTTPResponse(_Prefixed(first, conn.sock), method="POST")  # type: ignore[arg-type]
            response.begin()
        else:
            response = conn.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException):
        return None
    return HttpReply(response.status, response.getheader("Content-Type", ""), data, early=True)


# A wrong scheme looks like a broken server from the inside (TLS "wrong version number", or a
# connection closed without an answer): these probes tell the user which scheme the port speaks.


def _speaks_plain_http(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` answers a plain HTTP request with an HTTP status line."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 5.0)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` completes a TLS handshake (whoever its certificate names: the
    probe only asks which protocol the port speaks, it sends nothing over the connection)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=min(timeout, 5.0)) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False
