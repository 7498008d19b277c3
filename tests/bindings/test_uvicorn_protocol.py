"""``dsc_bindings.http.uvicorn_protocol`` (issue 20): the ASGI app under a real uvicorn with
the protocol that sends each response head with its body.  On a real socket: an answer arrives
whole in one read (head and body were one send), keep-alive goes on, and a ``100 Continue``
is sent before the body is read (never held)."""

from __future__ import annotations

import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsc_core import client as dc
from dsc_core import names
from e2e_support import ServerProcess, serving

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "bench"))
from asgi import COALESCING_OPTIONS  # noqa: E402

BODY = dc.envelope(
    names.Action.DSC_GET_REPOSITORY_ELEMENTS,
    dc.repository_elements_request(["RepositoryStatus", "RepositoryConfiguration"]),
    message_id=f"urn:uuid:{uuid.uuid4()}",
)


def post_head(extra: str = "") -> bytes:
    return (
        "POST /ScanServer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/soap+xml; charset=utf-8\r\n"
        f"Content-Length: {len(BODY)}\r\n{extra}\r\n"
    ).encode("ascii")


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "data", binding="uvicorn", extra=COALESCING_OPTIONS)
    with serving(process):
        yield process


@pytest.fixture
def conn(server: ServerProcess) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        yield sock


def test_each_answer_arrives_whole_in_one_read_over_keep_alive(conn: socket.socket) -> None:
    for _ in range(3):  # the same connection: keep-alive goes on after each answer
        conn.sendall(post_head() + BODY)
        data = conn.recv(1 << 20)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), data
        assert len(body) == content_length(head), data  # head and body were one send
        assert dc.parse_response(body).action.endswith("GetRepositoryElementsResponse")


def test_100_continue_is_sent_before_the_body(conn: socket.socket) -> None:
    conn.sendall(post_head("Expect: 100-continue\r\n"))
    interim = conn.recv(1 << 20)
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    conn.sendall(BODY)
    data = interim.partition(b"\r\n\r\n")[2] or conn.recv(1 << 20)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), data
    assert len(body) == content_length(head), data


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_get_or_head_with_only_a_host_header_is_answered(
    conn: socket.socket, method: str
) -> None:
    """A HEAD answer is its head alone (uvicorn writes no body for it): it is sent at once,
    not held for a body write that never comes; the connection then serves the next request."""
    for _ in range(2):
        conn.sendall(f"{method} /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("ascii"))
        data = conn.recv(1 << 20)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), data
        assert body == (b"" if method == "HEAD" else b"ok\n"), data
