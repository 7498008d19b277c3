"""``dsc_bindings.http.uvicorn_protocol`` (issue 20): the ASGI app under a real uvicorn with
the protocol that sends what a turn of the loop wrote to a connection as one write, after the
loop's next poll.  On a real socket: an answer arrives whole in one read (head and body were
one send), keep-alive goes on, pipelined answers keep their order, and a ``100 Continue`` is
sent before the body is read (never held for a body).  The holding itself on asyncio's loop
and uvloop, with a transport that records what is sent (unit tests)."""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from dsc_bindings.http.uvicorn_protocol import HOLD_BYTES, _HeldWrites
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


def test_pipelined_answers_come_in_order_each_whole(conn: socket.socket) -> None:
    """Two requests in one send: uvicorn answers the second after the first, and holding
    what a turn wrote never reorders them."""
    get = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    conn.sendall(post_head() + BODY + get)
    data = b""
    while data.count(b"HTTP/1.1 200 ") < 2 or not data.endswith(b"ok\n"):
        chunk = conn.recv(1 << 20)
        assert chunk, data
        data += chunk
    first, _, rest = data.partition(b"\r\n\r\n")
    body = rest[: content_length(first)]
    assert dc.parse_response(body).action.endswith("GetRepositoryElementsResponse")
    second = rest[content_length(first) :]
    assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b"\r\n\r\nok\n"), data


# --- the holding, unit tests on both loops -------------------------------------------------


class RecordingTransport(asyncio.Transport):
    """What a connection's transport was asked to do."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False
        self.half_closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def write_eof(self) -> None:
        self.half_closed = True

    def get_write_buffer_size(self) -> int:
        return 0


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def on_loop(name: str, test: Callable[[RecordingTransport, _HeldWrites], Awaitable[None]]) -> None:
    """Run ``test`` (a coroutine function) on the loop ``name`` with a fresh held transport."""

    async def main() -> None:
        transport = RecordingTransport()
        await test(transport, _HeldWrites(transport, asyncio.get_running_loop()))

    with asyncio.Runner(loop_factory=LOOPS[name]) as runner:
        runner.run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_what_a_turn_writes_is_sent_as_one_write_after_the_loop_turns(loop: str) -> None:
    async def test(transport: RecordingTransport, held: _HeldWrites) -> None:
        held.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        held.write(b"")  # nothing to hold
        held.writelines([b"bo", b"dy"])
        assert transport.sent == []  # held while the turn runs
        assert held.get_write_buffer_size() == 42
        await asyncio.sleep(0)  # the loop polls, then runs the callback the first write asked
        assert transport.sent == [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"]
        held.write(b"next")  # the next turn's answer, after the first
        await asyncio.sleep(0)
        assert transport.sent[1:] == [b"next"]
        assert held.get_write_buffer_size() == 0

    on_loop(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_more_than_hold_bytes_is_sent_at_once_after_what_was_held(loop: str) -> None:
    """A large answer is not kept in memory, and the transport's flow control sees it."""

    async def test(transport: RecordingTransport, held: _HeldWrites) -> None:
        held.write(b"head")
        held.write(b"x" * HOLD_BYTES)
        assert transport.sent == [b"head" + b"x" * HOLD_BYTES]
        await asyncio.sleep(0)  # the callback finds nothing left
        assert len(transport.sent) == 1

    on_loop(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_what_is_held_is_sent_before_a_close_or_half_close(loop: str) -> None:
    async def test(transport: RecordingTransport, held: _HeldWrites) -> None:
        held.write(b"last answer")
        held.write_eof()
        assert transport.sent == [b"last answer"] and transport.half_closed
        held.write(b"bye")
        held.close()
        assert transport.sent == [b"last answer", b"bye"] and transport.closed
        await asyncio.sleep(0)
        assert len(transport.sent) == 2

    on_loop(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_nothing_is_sent_to_a_connection_the_client_left(loop: str) -> None:
    async def test(transport: RecordingTransport, held: _HeldWrites) -> None:
        held.write(b"answer")
        assert not held.is_closing()
        transport.closed = True  # the client went away before the loop turned
        assert held.is_closing()  # what uvicorn asks before it answers
        await asyncio.sleep(0)
        assert transport.sent == []
        held.write(b"another")
        held.abort()  # aborting drops what is held
        await asyncio.sleep(0)
        assert transport.sent == []

    on_loop(loop, test)
