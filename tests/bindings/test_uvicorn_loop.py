"""``dsc_bindings.http.uvicorn_loop`` (issue 20): uvloop whose TCP servers take in every pending
connection at each poll.  Real sockets on loopback, real TLS (trustme); the loop counted in
turns (``asyncio.sleep(0)``), never in time.  The ASGI app under uvicorn with this loop is in
tests/bindings/test_uvicorn_protocol.py and the e2e scenarios (e2e_support.ServerProcess runs
uvicorn with the recommended loop and protocol)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import gc
import http.client
import signal
import socket
import ssl
import subprocess
import sys
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trustme

from dsc_bindings.http import uvicorn_loop
from dsc_bindings.http.uvicorn_loop import AcceptingLoop, new_event_loop
from dsc_core import client as dc
from dsc_core import names
from e2e_support import ServerProcess, child_env, free_port, serving
from waiting import wait_for

SOAP = "application/soap+xml; charset=utf-8"

# A socket or transport left to the garbage collector or to the loop's close warns: here that
# fails the test (each test closes what it opened, the loop the server's side once the peer is
# gone).
pytestmark = pytest.mark.filterwarnings("error::ResourceWarning")


class Echo(asyncio.Protocol):
    """Answers each read with its bytes; records the connections it was given."""

    made: list[Any]

    #: The server side of every connection not lost yet: the ``loop`` fixture fails a test
    #: that leaves one its peer hung up on, and closes it (else a ResourceWarning at the loop's
    #: close, which fails this file).
    open_transports: ClassVar[set[Any]] = set()

    def __init__(self, made: list[Any]) -> None:
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self.transport: Any = transport
        self.made.append(self.transport)
        Echo.open_transports.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        Echo.open_transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


@pytest.fixture
def loop() -> Iterator[AcceptingLoop]:
    loop = new_event_loop()
    try:
        yield loop
    finally:
        # Each test's clients are closed by now: the loop itself closes the server side of
        # those connections (the peer's EOF read at the next poll, connection_lost a turn
        # later), so any still open after a few turns is a connection the loop leaks.  Closed
        # here either way, so that the loop's close warns of nothing else.
        turns(loop, 5)
        leaked = list(Echo.open_transports)
        for transport in leaked:
            transport.close()
        Echo.open_transports.clear()
        turns(loop, 3)
        loop.close()
    assert leaked == [], "the loop left these open after their peers hung up"


def turns(loop: asyncio.AbstractEventLoop, count: int) -> None:
    """Run the loop for ``count`` turns (each ``sleep(0)`` is one poll and one run of the
    ready callbacks)."""

    async def spin() -> None:
        for _ in range(count):
            await asyncio.sleep(0)

    loop.run_until_complete(spin())


def reported_by(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    """What the loop reports to its exception handler from now on (each context, in order)."""
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    return reported


def sockets_of(server: asyncio.AbstractServer) -> tuple[socket.socket, ...]:
    """``server.sockets`` (asyncio's and uvloop's servers have it; AbstractServer does not)."""
    return tuple(getattr(server, "sockets"))  # noqa: B009


def port_of(server: asyncio.AbstractServer) -> int:
    sockets = sockets_of(server)
    assert sockets
    return int(sockets[0].getsockname()[1])


def test_a_burst_of_connections_is_taken_in_at_one_poll(loop: AcceptingLoop) -> None:
    """The reason for the module: 32 connections waiting together are all taken in within a
    few turns (uvloop's own server takes one per turn, so 32 turns)."""
    made: list[Any] = []
    server = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), "127.0.0.1", 0, backlog=128)
    )
    port = port_of(server)
    # A blocking connect returns once the kernel completed the handshake: all 32 wait in the
    # accept queue before the loop polls again.
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
    try:
        turns(loop, 4)
        assert len(made) == 32
        for client in clients:
            client.sendall(b"ping")
        turns(loop, 4)
        for client in clients:
            client.settimeout(5)
            assert client.recv(16) == b"ping"
    finally:
        for client in clients:
            client.close()
        server.close()
        loop.run_until_complete(server.wait_closed())


def test_connections_are_uvloops_own_tcp_transports_without_nagle(loop: AcceptingLoop) -> None:
    made: list[Any] = []
    server = loop.run_until_complete(loop.create_server(lambda: Echo(made), "127.0.0.1", 0))
    with socket.create_connection(("127.0.0.1", port_of(server))) as client:
        turns(loop, 3)
        (transport,) = made
        assert type(transport).__module__ == "uvloop.loop"
        assert type(transport).__name__ == "TCPTransport"
        accepted = transport.get_extra_info("socket")
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert transport.get_extra_info("peername") == client.getsockname()
    server.close()


def test_a_socket_passed_in_is_served_as_uvicorn_workers_pass_it(loop: AcceptingLoop) -> None:
    """``uvicorn --workers N`` binds the socket and passes it (``sock=``)."""
    made: list[Any] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = loop.run_until_complete(loop.create_server(lambda: Echo(made), sock=listener))
    assert sockets_of(server) == (listener,)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"hello")
        turns(loop, 4)
        client.settimeout(5)
        assert client.recv(16) == b"hello"
    server.close()


def test_a_unix_socket_passed_in_is_uvloops_own_server(loop: AcceptingLoop, tmp_path: Any) -> None:
    made: list[Any] = []
    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    server = loop.run_until_complete(loop.create_server(lambda: Echo(made), sock=listener))
    assert not isinstance(server, uvicorn_loop.AcceptingServer)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        client.sendall(b"unix")
        turns(loop, 4)
        client.settimeout(5)
        assert client.recv(16) == b"unix"
    server.close()


def test_close_stops_accepting_and_keeps_the_connections_taken_in(loop: AcceptingLoop) -> None:
    made: list[Any] = []
    server = loop.run_until_complete(loop.create_server(lambda: Echo(made), "127.0.0.1", 0))
    port = port_of(server)
    with socket.create_connection(("127.0.0.1", port)) as kept:
        turns(loop, 3)
        server.close()
        loop.run_until_complete(asyncio.wait_for(server.wait_closed(), 5))
        assert not server.is_serving()
        assert sockets_of(server) == ()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        kept.sendall(b"still")
        turns(loop, 3)
        kept.settimeout(5)
        assert kept.recv(16) == b"still"


def test_a_port_in_use_is_refused_as_asyncio_words_it_and_leaves_no_socket(
    loop: AcceptingLoop,
) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError) as refused:
            loop.run_until_complete(loop.create_server(asyncio.Protocol, "127.0.0.1", port))
        assert refused.value.errno == errno.EADDRINUSE
        assert "error while attempting to bind on address ('127.0.0.1'" in str(refused.value)
    finally:
        taken.close()


def test_start_serving_false_listens_only_when_asked(loop: AcceptingLoop) -> None:
    made: list[Any] = []
    server = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), "127.0.0.1", 0, start_serving=False)
    )
    port = port_of(server)
    assert not server.is_serving()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    loop.run_until_complete(server.start_serving())
    with socket.create_connection(("127.0.0.1", port)):
        turns(loop, 3)
        assert len(made) == 1
    server.close()


def listener_failing_once(error: OSError) -> socket.socket:
    """A TCP socket bound on loopback whose first accept() raises ``error`` (the kernel's
    errors are hard to provoke on purpose); the next ones accept."""
    failures = [error]

    class FailingOnce(socket.socket):
        def accept(self) -> tuple[socket.socket, Any]:
            if failures:
                raise failures.pop()
            return super().accept()

    listener = FailingOnce(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    return listener


def test_out_of_file_descriptors_pauses_accepting_then_takes_the_connection_in(
    loop: AcceptingLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept() failing with EMFILE: reported once, accepting pauses (Linux keeps reporting
    the socket readable, so trying at once would spin), then the waiting connection is taken
    in."""
    monkeypatch.setattr(uvicorn_loop, "ACCEPT_RETRY_SECONDS", 0.05)
    reported = reported_by(loop)
    made: list[Any] = []
    listener = listener_failing_once(OSError(errno.EMFILE, "Too many open files"))
    server = loop.run_until_complete(loop.create_server(lambda: Echo(made), sock=listener))
    with socket.create_connection(("127.0.0.1", listener.getsockname()[1])):
        turns(loop, 5)
        assert made == []
        assert [c["exception"].errno for c in reported] == [errno.EMFILE]
        assert "out of system resource" in reported[0]["message"]
        loop.run_until_complete(asyncio.sleep(0.2))
        turns(loop, 3)
        assert len(made) == 1
    assert len(reported) == 1
    server.close()


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context) from one trustme CA."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def test_tls_connections_are_served_and_a_failed_handshake_harms_no_other(
    loop: AcceptingLoop,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server_context, client_context = tls
    reported = reported_by(loop)
    made: list[Any] = []
    server = loop.run_until_complete(
        loop.create_server(
            lambda: Echo(made), "127.0.0.1", 0, ssl=server_context, ssl_handshake_timeout=5
        )
    )
    port = port_of(server)

    async def exchange(payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context, server_hostname="127.0.0.1"
        )
        writer.write(payload)
        answer = await reader.readexactly(len(payload))
        writer.close()
        return answer

    async def not_tls() -> bytes:
        # A peer speaking plain HTTP to the TLS port: the handshake fails, the server closes.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await reader.read()
        writer.close()
        return answer

    assert loop.run_until_complete(asyncio.wait_for(exchange(b"secret"), 10)) == b"secret"
    assert not loop.run_until_complete(asyncio.wait_for(not_tls(), 10)).startswith(b"GET")
    assert loop.run_until_complete(asyncio.wait_for(exchange(b"again"), 10)) == b"again"
    assert len(made) == 2  # the failed handshake never reached the protocol
    assert not [c for c in reported if "taking in" in c.get("message", "")]
    server.close()


def test_the_app_under_uvicorn_on_this_loop_answers_a_burst_of_tls_connections(
    tmp_path: Path,
) -> None:
    """The recommended deployment end to end (e2e_support.ServerProcess runs uvicorn with this
    loop): 32 TLS connections opened together, each asking GetRepositoryElements, are all
    answered; a peer speaking plain HTTP to the TLS port harms none of them."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    body = dc.envelope(
        names.Action.DSC_GET_REPOSITORY_ELEMENTS,
        dc.repository_elements_request(["RepositoryStatus"]),
        message_id=f"urn:uuid:{uuid.uuid4()}",
    )
    with serving(
        ServerProcess(tmp_path / "data", binding="uvicorn", tls=(cert_path, key_path))
    ) as server:
        assert server.proc is not None
        command = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"dsc_bindings.http.uvicorn_loop:new_event_loop" in command  # this loop runs
        with socket.create_connection(("127.0.0.1", server.port)) as plain:
            plain.sendall(b"POST /ScanServer HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            plain.settimeout(10)
            assert not plain.recv(100).startswith(b"HTTP/1.1 200")
        connections = [
            http.client.HTTPSConnection(
                "127.0.0.1", server.port, timeout=30, context=client_context
            )
            for _ in range(32)
        ]
        try:
            for connection in connections:
                connection.connect()
            for connection in connections:
                connection.request("POST", "/ScanServer", body, {"Content-Type": SOAP})
            for connection in connections:
                answer = connection.getresponse()
                reply = answer.read()
                assert answer.status == 200, reply[:300]
                assert dc.parse_response(reply).action.endswith("GetRepositoryElementsResponse")
        finally:
            for connection in connections:
                connection.close()


def test_a_connection_the_protocol_factory_fails_for_is_closed_and_serving_goes_on(
    loop: AcceptingLoop,
) -> None:
    """The protocol factory raising (uvloop's ``connect_accepted_socket`` calls it before the
    socket is its transport's): the failure is reported, the accepted socket is closed at once
    (the peer sees the end, not a connection left open until the garbage collector finds the
    socket), and the next connection is served."""
    reported = reported_by(loop)
    made: list[Any] = []
    failures = [RuntimeError("no protocol for this one")]

    def factory() -> Echo:
        if failures:
            raise failures.pop()
        return Echo(made)

    server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0))
    port = port_of(server)
    with socket.create_connection(("127.0.0.1", port)) as refused:
        turns(loop, 4)
        assert [str(c["exception"]) for c in reported] == ["no protocol for this one"]
        refused.settimeout(5)
        assert refused.recv(16) == b""  # closed by the server, not left hanging
    with socket.create_connection(("127.0.0.1", port)) as served:
        served.sendall(b"next")
        turns(loop, 4)
        served.settimeout(5)
        assert served.recv(16) == b"next"
    turns(loop, 4)  # the served connection sees its end and closes
    assert len(made) == 1
    server.close()


def test_an_accept_error_is_reported_and_accepting_goes_on(loop: AcceptingLoop) -> None:
    """accept() failing for a reason other than a lack of resources (Linux passes on a network
    error of the pending connection, EPROTO among them): the loop reports it and goes on
    accepting, the waiting connection is taken in at a later poll."""
    reported = reported_by(loop)
    made: list[Any] = []
    listener = listener_failing_once(OSError(errno.EPROTO, "Protocol error"))
    server = loop.run_until_complete(loop.create_server(lambda: Echo(made), sock=listener))
    with socket.create_connection(("127.0.0.1", listener.getsockname()[1])) as client:
        turns(loop, 6)
        assert [c["exception"].errno for c in reported] == [errno.EPROTO]
        assert len(made) == 1
        client.sendall(b"after")
        turns(loop, 3)
        client.settimeout(5)
        assert client.recv(16) == b"after"
    server.close()


def test_a_tls_peer_that_never_shakes_hands_is_closed_at_the_handshake_timeout(
    loop: AcceptingLoop, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """uvicorn's TLS listener with a peer that connects and says nothing: closed when
    ``ssl_handshake_timeout`` runs out, never given to the protocol, not reported as a fault;
    a TLS client meanwhile is served."""
    server_context, client_context = tls
    reported = reported_by(loop)
    made: list[Any] = []
    server = loop.run_until_complete(
        loop.create_server(
            lambda: Echo(made), "127.0.0.1", 0, ssl=server_context, ssl_handshake_timeout=1
        )
    )
    port = port_of(server)

    async def silent_then_served() -> tuple[bytes, bytes]:
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context, server_hostname="127.0.0.1"
        )
        writer.write(b"served")
        answer = await reader.readexactly(6)
        writer.close()
        ended = await silent_reader.read()  # b"" once the server closed it
        silent_writer.close()
        return answer, ended

    answer, ended = loop.run_until_complete(asyncio.wait_for(silent_then_served(), 10))
    assert (answer, ended) == (b"served", b"")
    turns(loop, 4)
    assert len(made) == 1
    assert reported == []
    server.close()


def test_every_host_of_a_list_is_served_each_family_on_its_own_socket(
    loop: AcceptingLoop,
) -> None:
    """``host`` a list (asyncio's and uvloop's ``create_server`` take one), IPv4 and IPv6
    loopback on one port: a socket each, the IPv6 one IPv6-only (as asyncio binds them), and
    both answer."""
    made: list[Any] = []
    with socket.socket(socket.AF_INET6) as probe:  # a port free on both families
        probe.bind(("::", 0))
        port = probe.getsockname()[1]
    server = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), ["127.0.0.1", "::1"], port)
    )
    families = sorted(s.family for s in sockets_of(server))
    assert families == sorted([socket.AF_INET, socket.AF_INET6])
    (v6,) = [s for s in sockets_of(server) if s.family == socket.AF_INET6]
    assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as client:
            client.settimeout(5)
            client.connect((address, port))
            client.sendall(address.encode())
            turns(loop, 4)
            assert client.recv(16) == address.encode()
    assert len(made) == 2
    server.close()


def test_reuse_port_lets_two_servers_listen_on_one_port(loop: AcceptingLoop) -> None:
    made: list[Any] = []
    first = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), "127.0.0.1", 0, reuse_port=True)
    )
    port = port_of(first)
    second = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), "127.0.0.1", port, reuse_port=True)
    )
    assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in sockets_of(second))
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"either")
        turns(loop, 4)
        client.settimeout(5)
        assert client.recv(16) == b"either"
    first.close()
    second.close()


def test_sigterm_under_uvicorn_with_keep_alive_connections_open_shuts_down_cleanly(
    tmp_path: Path,
) -> None:
    """uvicorn's graceful shutdown on this loop (``server.close()``, each connection asked to
    shut down, ``wait_closed()``): with idle keep-alive connections and connections that never
    sent a request open, SIGTERM ends the process cleanly (``stop_cleanly`` fails the test if
    it does not within its wait) and the server closes every one of them."""
    body = dc.envelope(
        names.Action.DSC_GET_REPOSITORY_ELEMENTS,
        dc.repository_elements_request(["RepositoryStatus"]),
        message_id=f"urn:uuid:{uuid.uuid4()}",
    )
    process = ServerProcess(tmp_path / "data", binding="uvicorn")
    with serving(process) as server:
        kept_alive = [
            http.client.HTTPConnection("127.0.0.1", server.port, timeout=30) for _ in range(8)
        ]
        for connection in kept_alive:
            connection.request("POST", "/ScanServer", body, {"Content-Type": SOAP})
            answer = connection.getresponse()
            answer.read()
            assert answer.status == 200
            assert answer.getheader("Connection", "keep-alive").lower() != "close"
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
        try:
            # Each connection taken in before SIGTERM (the server answers on it).
            for connection in kept_alive:
                connection.request("POST", "/ScanServer", body, {"Content-Type": SOAP})
                connection.getresponse().read()
            server.stop_cleanly()
            for connection in kept_alive:
                assert connection.sock is not None
                connection.sock.settimeout(10)
                assert connection.sock.recv(16) == b""
            for client in silent:
                client.settimeout(10)
                assert client.recv(16) == b""
        finally:
            for connection in kept_alive:
                connection.close()
            for client in silent:
                client.close()


def test_serve_forever_cancelled_closes_the_server(loop: AcceptingLoop) -> None:
    """As asyncio's and uvloop's servers: ``serve_forever()`` cancelled (``asyncio.run`` given
    Ctrl-C, a supervisor's task group ending) closes the server, so the port stops taking
    connections in and the listening socket is closed, not left to the garbage collector."""
    made: list[Any] = []
    server = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), "127.0.0.1", 0, start_serving=False)
    )
    port = port_of(server)
    forever = loop.create_task(server.serve_forever())
    turns(loop, 2)
    assert server.is_serving()
    forever.cancel()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(forever)
    assert not server.is_serving()
    assert sockets_of(server) == ()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_closing_the_loop_closes_its_servers_listening_sockets() -> None:
    """uvloop's own servers' sockets are closed with the loop (uvicorn's loop ends without
    ``server.close()`` when its main loop raises): so are these, else the kernel would go on
    completing handshakes no one will ever answer."""
    loop = new_event_loop()
    server = loop.run_until_complete(loop.create_server(asyncio.Protocol, "127.0.0.1", 0))
    port = port_of(server)
    loop.close()
    assert not server.is_serving()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_connection_taken_in_is_made_before_anything_woken_after_its_poll_runs(
    loop: AcceptingLoop,
) -> None:
    """The order uvicorn's graceful shutdown relies on: uvloop's own server has a connection's
    ``connection_made`` queued at the poll that accepted it, ahead of any task that poll or a
    later timer wakes.  uvicorn's shutdown (``server.close()``, then each connection it knows
    asked to shut down) runs in such a task: a connection made after it is never asked, so the
    shutdown waits for the peer to hang up.  Here the shutdown is woken by a socket that
    became readable just after the connection arrived, so one poll reports both."""
    made: list[Any] = []
    server = loop.run_until_complete(loop.create_server(lambda: Echo(made), "127.0.0.1", 0))
    trigger, wake = socket.socketpair()
    trigger.setblocking(False)

    async def shut_down_when_woken() -> int:
        woken = loop.create_future()
        loop.add_reader(trigger.fileno(), lambda: woken.done() or woken.set_result(None))
        await woken
        loop.remove_reader(trigger.fileno())
        server.close()
        return len(made)  # the connections the shutdown would ask to close

    with socket.create_connection(("127.0.0.1", port_of(server))), trigger, wake:
        wake.send(b"x")
        assert loop.run_until_complete(shut_down_when_woken()) == 1
        turns(loop, 3)


def test_sigterm_under_uvicorn_while_peers_connect_shuts_down_cleanly(tmp_path: Path) -> None:
    """SIGTERM while new connections keep arriving (a proxy filling its pool, scanners
    reconnecting): every connection taken in before the server closed is known to uvicorn's
    shutdown and closed by it, so the process ends (``stop_cleanly`` fails the test if it does
    not within its wait).  Before the fix the shutdown waited for peers to hang up."""
    process = ServerProcess(tmp_path / "data", binding="uvicorn")
    opened: list[socket.socket] = []
    stop = threading.Event()

    def connect_again_and_again() -> None:
        while not stop.is_set() and len(opened) < 400:  # well under the open-file limit
            peer = socket.socket()
            peer.setblocking(False)
            opened.append(peer)
            if peer.connect_ex(("127.0.0.1", process.port)) == errno.ECONNREFUSED:
                return  # the server closed its port
            stop.wait(0.0005)

    with serving(process) as server:
        opener = threading.Thread(target=connect_again_and_again)
        opener.start()
        try:
            while len(opened) < 200 and opener.is_alive():
                stop.wait(0.01)
            server.stop_cleanly()
        finally:
            stop.set()
            opener.join()
            for peer in opened:
                peer.close()


# uvloop warns of the peer's TCP transport, which a TLS handshake still holds at the loop's
# close: its own server does the same (a scratch check on stock uvloop 0.23 gave the same
# "unclosed resource <TCPTransport"), and ending the hand-over first does not close it (the
# TLS shutdown waits for a turn the closing loop never runs).  Only there is a ResourceWarning
# recorded rather than an error (as an error inside uvloop's close it hangs the close).
def test_closing_the_loop_ends_a_tls_handshake_still_in_progress(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A hand-over still waiting when the loop closes (a TLS peer that has not finished its
    handshake when ``asyncio.run`` ends uvicorn's loop) is closed with the loop, as a task is
    cancelled: the peer's connection ends, and nothing is left for the garbage collector to
    finish on a closed loop (which would fail: "Event loop is closed")."""
    server_context, _ = tls
    loop = new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl=server_context)
    )
    with socket.create_connection(("127.0.0.1", port_of(server))) as peer:
        turns(loop, 4)  # taken in, the handshake waits for the peer's hello
        server.close()
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always", ResourceWarning)
            loop.close()
            gc.collect()
        # uvloop's own (stock uvloop warns the same): the handshake's transport, nothing else.
        assert all("TCPTransport" in str(w.message) for w in warned), warned
        peer.settimeout(5)
        try:
            ended = peer.recv(16)
        except ConnectionResetError:
            ended = b""
        assert ended == b""


def test_a_shared_socket_is_taken_from_a_batch_at_a_time_leaving_the_rest_to_other_workers(
    loop: AcceptingLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket passed in (``uvicorn --workers N``: one listening socket, a loop per worker)
    is shared: a wake-up takes at most SHARED_ACCEPT_BATCH connections, then this worker stops
    listening for a pause and the rest wait in the queue for another worker (here the test,
    accepting from the socket as a second worker would)."""
    monkeypatch.setattr(uvicorn_loop, "SHARED_ACCEPT_PAUSE_SECONDS", 3600.0)  # never ends here
    made: list[Any] = []
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    server = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), sock=listener, backlog=128)
    )
    clients = [socket.create_connection(listener.getsockname()) for _ in range(32)]
    taken_by_the_other: list[socket.socket] = []
    try:
        turns(loop, 4)
        assert len(made) == uvicorn_loop.SHARED_ACCEPT_BATCH == 8
        listener.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                taken_by_the_other.append(listener.accept()[0])
        assert len(taken_by_the_other) == 32 - 8
    finally:
        for connection in [*clients, *taken_by_the_other]:
            connection.close()
        server.close()
        turns(loop, 4)


def test_a_shared_socket_with_a_backlog_no_larger_than_a_batch_still_pauses_after_it(
    loop: AcceptingLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``uvicorn --workers N --backlog 4``: a wake-up takes the whole backlog, and the worker
    still stops listening for the pause; the connections left wait for another worker."""
    monkeypatch.setattr(uvicorn_loop, "SHARED_ACCEPT_PAUSE_SECONDS", 3600.0)  # never ends here
    made: list[Any] = []
    listener = socket.create_server(("127.0.0.1", 0), backlog=4)
    server = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), sock=listener, backlog=4)
    )
    # Linux queues backlog + 1 completed connections; each connect() here completes.
    clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
    taken_by_the_other: list[socket.socket] = []
    try:
        turns(loop, 6)
        assert len(made) == 4
        listener.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                taken_by_the_other.append(listener.accept()[0])
        assert len(taken_by_the_other) == 1
    finally:
        for connection in [*clients, *taken_by_the_other]:
            connection.close()
        server.close()
        turns(loop, 4)


def test_closing_a_shared_socket_server_during_its_pause_ends_it_there(
    loop: AcceptingLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while the worker pauses (SIGTERM under ``uvicorn --workers N``): the end of the
    pause listens to nothing and reports nothing; the connections taken in go on, and those
    left in the queue are for the other workers."""
    monkeypatch.setattr(uvicorn_loop, "SHARED_ACCEPT_PAUSE_SECONDS", 0.01)
    reported = reported_by(loop)
    made: list[Any] = []
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    address = listener.getsockname()
    server = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), sock=listener, backlog=128)
    )
    clients = [socket.create_connection(address) for _ in range(12)]
    try:
        turns(loop, 4)
        assert len(made) == 8
        server.close()
        assert listener.fileno() == -1
        loop.run_until_complete(asyncio.sleep(0.1))  # the pause ends meanwhile
        turns(loop, 3)
        assert len(made) == 8
        assert reported == []
        assert not server.is_serving()
        for client in clients[:8]:
            client.sendall(b"kept")
        turns(loop, 4)
        for client in clients[:8]:
            client.settimeout(5)
            assert client.recv(16) == b"kept"
    finally:
        for client in clients:
            client.close()


def test_out_of_file_descriptors_within_a_batch_pauses_for_the_retry_not_the_batch_pause(
    loop: AcceptingLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE in the middle of a batch from a shared socket: accepting waits the out-of-resources
    pause (ACCEPT_RETRY_SECONDS), not the shorter pause after a batch, and is reported once."""
    monkeypatch.setattr(uvicorn_loop, "ACCEPT_RETRY_SECONDS", 3600.0)  # never ends here
    monkeypatch.setattr(uvicorn_loop, "SHARED_ACCEPT_PAUSE_SECONDS", 0.001)
    reported = reported_by(loop)
    accepted = 0

    class FailingFifth(socket.socket):
        def accept(self) -> tuple[socket.socket, Any]:
            nonlocal accepted
            if accepted == 4:
                raise OSError(errno.EMFILE, "Too many open files")
            accepted += 1
            return super().accept()

    made: list[Any] = []
    listener = FailingFifth(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    server = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), sock=listener, backlog=128)
    )
    clients = [socket.create_connection(listener.getsockname()) for _ in range(12)]
    try:
        loop.run_until_complete(asyncio.sleep(0.1))  # many batch pauses' worth
        turns(loop, 3)
        assert len(made) == 4
        assert [c["exception"].errno for c in reported] == [errno.EMFILE]
    finally:
        for client in clients:
            client.close()
        server.close()
        turns(loop, 4)


def test_a_lone_worker_on_a_shared_socket_takes_in_the_whole_burst_batch_by_batch(
    loop: AcceptingLoop,
) -> None:
    """No other worker takes a share: after each pause the next batch is taken in, until the
    whole burst is served."""
    made: list[Any] = []
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    server = loop.run_until_complete(
        loop.create_server(lambda: Echo(made), sock=listener, backlog=128)
    )
    clients = [socket.create_connection(listener.getsockname()) for _ in range(32)]

    async def all_taken_in() -> None:
        while len(made) < 32:
            await asyncio.sleep(uvicorn_loop.SHARED_ACCEPT_PAUSE_SECONDS)

    try:
        loop.run_until_complete(asyncio.wait_for(all_taken_in(), 10))
        for client in clients:
            client.sendall(b"all")
        turns(loop, 4)
        for client in clients:
            client.settimeout(5)
            assert client.recv(16) == b"all"
    finally:
        for client in clients:
            client.close()
        server.close()
        turns(loop, 4)


#: An ASGI app that answers with the id of the worker process that serves the connection.
WORKER_PID_APP = """
import os

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    pid = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(pid)).encode())]})
    await send({"type": "http.response.body", "body": pid})
"""


def worker_of(connection: socket.socket) -> bytes:
    """Ask once on ``connection`` (blocking) which worker serves it."""
    connection.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.split(b"\r\n\r\n", 1)[1]:
        received = connection.recv(4096)
        assert received, answer
        answer += received
    head, pid = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return pid


#: A uvicorn worker as ``uvicorn --workers N`` runs one (``Server.run(sockets=...)``) on the
#: listening socket whose descriptor is its argument, its pause after a batch never ending.
PAUSED_WORKER = f"""
import socket, sys
import uvicorn
from dsc_bindings.http import uvicorn_loop
{WORKER_PID_APP}
uvicorn_loop.SHARED_ACCEPT_PAUSE_SECONDS = 3600.0
config = uvicorn.Config(app, lifespan="off", log_level="info",
                        loop="dsc_bindings.http.uvicorn_loop:new_event_loop")
uvicorn.Server(config).run(sockets=[socket.socket(fileno=int(sys.argv[1]))])
"""


def test_sigterm_to_a_uvicorn_worker_during_its_pause_ends_it_and_leaves_the_rest_queued(
    tmp_path: Path,
) -> None:
    """A worker of ``uvicorn --workers N`` told to stop (SIGTERM) while it pauses after a
    batch: its shutdown does not wait for the pause, closes the connections it took in, and
    the connections it left in the shared queue are still there for another worker (here
    the test)."""
    (tmp_path / "paused_worker.py").write_text(PAUSED_WORKER)
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    # All queued before the worker starts: its first wake-up finds a full batch and more.
    clients = [socket.create_connection(listener.getsockname()) for _ in range(12)]
    taken_by_the_other: list[socket.socket] = []
    command = [sys.executable, str(tmp_path / "paused_worker.py"), str(listener.fileno())]
    try:
        with subprocess.Popen(
            command,
            env=child_env(),
            pass_fds=[listener.fileno()],
            stderr=subprocess.PIPE,
            text=True,
        ) as worker:
            try:
                for client in clients[:8]:
                    client.settimeout(30)
                    assert worker_of(client) == str(worker.pid).encode()
            finally:
                worker.terminate()
                _, log = worker.communicate(timeout=30)
        # uvicorn re-raises the signal once it shut down gracefully (exit -15); its last line
        # says the shutdown ran to its end.
        assert worker.returncode in (0, -signal.SIGTERM), log
        assert "Finished server process" in log, log
        assert "Traceback" not in log, log
        for client in clients[:8]:
            assert client.recv(16) == b""  # closed by the worker's shutdown
        listener.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                taken_by_the_other.append(listener.accept()[0])
        assert len(taken_by_the_other) == 4
        for client, taken in zip(clients[8:], taken_by_the_other, strict=True):
            client.sendall(b"still here")
            taken.settimeout(30)
            assert taken.recv(16) == b"still here"
    finally:
        for connection in [*clients, *taken_by_the_other]:
            connection.close()
        listener.close()


def test_uvicorn_workers_on_this_loop_each_take_a_share_of_a_burst(tmp_path: Path) -> None:
    """A real ``uvicorn --workers 2`` on this loop (one listening socket shared by both): over
    bursts of 64 connections opened together, each worker takes in a share (before, the worker
    that woke first took every connection of most bursts, and served all their requests while
    the other idled).  An app that names its worker isolates the accept policy.

    Who wakes first is the scheduler's choice, and a loaded machine can keep one worker off the
    cores through a whole burst: the shares are summed over up to 12 bursts until each worker
    has an eighth (a fair share is half).  The policy itself is proven without the scheduler by
    the tests of a shared socket above; this one shows it is what uvicorn's workers get."""
    (tmp_path / "worker_pid_app.py").write_text(WORKER_PID_APP)
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "worker_pid_app:app", "--app-dir", str(tmp_path)]
    command += ["--port", str(port), "--workers", "2", "--log-level", "warning"]
    command += ["--loop", "dsc_bindings.http.uvicorn_loop:new_event_loop"]
    with subprocess.Popen(command, env=child_env()) as uvicorn:
        try:

            def both_workers_answer() -> bool:
                seen: set[bytes] = set()
                for _ in range(20):
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=10) as one:
                            seen.add(worker_of(one))
                    except ConnectionRefusedError:
                        return False
                return len(seen) == 2

            wait_for(both_workers_answer, 60, "both uvicorn workers serving")
            shares: list[collections.Counter[bytes]] = []
            taken_in: collections.Counter[bytes] = collections.Counter()
            while len(shares) < 12 and not (
                len(taken_in) == 2 and min(taken_in.values()) >= taken_in.total() // 8
            ):
                burst = [socket.socket() for _ in range(64)]
                try:
                    for connection in burst:
                        connection.setblocking(False)
                        connection.connect_ex(("127.0.0.1", port))
                    for connection in burst:
                        connection.setblocking(True)
                        connection.settimeout(10)
                    shares.append(collections.Counter(worker_of(c) for c in burst))
                    taken_in += shares[-1]
                finally:
                    for connection in burst:
                        connection.close()
            assert len(taken_in) == 2, shares
            assert min(taken_in.values()) >= taken_in.total() // 8, shares
        finally:
            uvicorn.terminate()
            uvicorn.wait(30)


def test_host_and_port_beside_a_socket_are_refused_as_asyncio_refuses_them(
    loop: AcceptingLoop,
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, pytest.raises(ValueError, match="host/port and sock can not be specified"):
        loop.run_until_complete(loop.create_server(asyncio.Protocol, "127.0.0.1", 0, sock=listener))
    with pytest.raises(ValueError, match="Neither host/port nor sock were specified"):
        loop.run_until_complete(loop.create_server(asyncio.Protocol))
    datagrams = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with datagrams, pytest.raises(ValueError, match="A Stream Socket was expected"):
        loop.run_until_complete(loop.create_server(asyncio.Protocol, sock=datagrams))
    assert loop.open_servers == set()


def test_tls_timeouts_without_tls_are_refused_as_asyncio_refuses_them(
    loop: AcceptingLoop,
) -> None:
    for timeout in ("ssl_handshake_timeout", "ssl_shutdown_timeout"):
        with pytest.raises(ValueError, match=f"{timeout} is only meaningful with ssl"):
            loop.run_until_complete(
                loop.create_server(asyncio.Protocol, "127.0.0.1", 0, **{timeout: 5.0})
            )
    assert loop.open_servers == set()


def test_serve_forever_on_a_closed_server_raises_as_asyncio_does(loop: AcceptingLoop) -> None:
    server = loop.run_until_complete(loop.create_server(asyncio.Protocol, "127.0.0.1", 0))
    server.close()
    with pytest.raises(RuntimeError, match="is closed"):
        loop.run_until_complete(asyncio.wait_for(server.serve_forever(), 10))


def test_serve_forever_twice_at_once_raises_as_asyncio_does(loop: AcceptingLoop) -> None:
    server = loop.run_until_complete(loop.create_server(asyncio.Protocol, "127.0.0.1", 0))
    forever = loop.create_task(server.serve_forever())
    turns(loop, 2)
    with pytest.raises(RuntimeError, match="already being awaited on serve_forever"):
        loop.run_until_complete(asyncio.wait_for(server.serve_forever(), 10))
    assert server.is_serving()
    forever.cancel()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(forever)


def test_wait_closed_returns_once_closed_while_connections_go_on(loop: AcceptingLoop) -> None:
    """uvloop's ``wait_closed`` (and asyncio's up to 3.11): it waits for ``close()``, not for
    the connections taken in, which uvicorn's shutdown waits for itself (and stops waiting
    for on a forced exit; AcceptingServer.wait_closed)."""
    made: list[Any] = []
    server = loop.run_until_complete(loop.create_server(lambda: Echo(made), "127.0.0.1", 0))
    with socket.create_connection(("127.0.0.1", port_of(server))) as kept:
        turns(loop, 3)
        assert len(made) == 1
        waiting = loop.create_task(server.wait_closed())
        turns(loop, 3)
        assert not waiting.done()  # not closed yet
        server.close()
        turns(loop, 2)
        assert waiting.done() and waiting.exception() is None
        assert not made[0].is_closing()  # the connection taken in is still open, and served
        kept.sendall(b"on")
        turns(loop, 3)
        kept.settimeout(5)
        assert kept.recv(16) == b"on"


#: An ASGI app that answers how many of dsc's accepting servers its loop runs (0: uvloop's own).
ACCEPTING_SERVERS_APP = """
import asyncio

async def app(scope, receive, send):
    body = str(len(getattr(asyncio.get_running_loop(), "open_servers", ()))).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


def test_a_tcp_socket_passed_by_uvicorn_fd_gets_the_accepting_server(tmp_path: Path) -> None:
    """``uvicorn --fd N`` (a socket a supervisor bound) labels the descriptor AF_UNIX whatever
    it is: a TCP one is recognised and served by this loop's accepting server, not uvloop's."""
    (tmp_path / "accepting_servers_app.py").write_text(ACCEPTING_SERVERS_APP)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    command = [sys.executable, "-m", "uvicorn", "accepting_servers_app:app"]
    command += ["--app-dir", str(tmp_path), "--fd", str(listener.fileno()), "--lifespan", "off"]
    command += ["--loop", "dsc_bindings.http.uvicorn_loop:new_event_loop"]
    with (
        listener,
        subprocess.Popen(command, env=child_env(), pass_fds=[listener.fileno()]) as uvicorn,
    ):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                assert worker_of(client) == b"1"  # (the answer's body: one accepting server)
        finally:
            uvicorn.terminate()
            uvicorn.wait(30)


def test_a_tcp_socket_labelled_unix_is_served_by_the_accepting_server(loop: AcceptingLoop) -> None:
    """As ``uvicorn --fd`` passes it (``socket.fromfd(fd, AF_UNIX, SOCK_STREAM)``)."""
    made: list[Any] = []
    bound = socket.create_server(("127.0.0.1", 0))
    with bound:
        labelled = socket.fromfd(bound.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
    server = loop.run_until_complete(loop.create_server(lambda: Echo(made), sock=labelled))
    assert isinstance(server, uvicorn_loop.AcceptingServer)
    (served,) = sockets_of(server)
    assert served.family == socket.AF_INET
    # The wrapper passed in gave up its descriptor: closing it (uvicorn's shutdown closes the
    # sockets it passed) cannot close the one served, nor a descriptor reused meanwhile.
    assert labelled.fileno() == -1
    labelled.close()
    with socket.create_connection(served.getsockname()) as client:
        client.sendall(b"tcp")
        turns(loop, 4)
        client.settimeout(5)
        assert client.recv(16) == b"tcp"
    assert len(made) == 1
    server.close()
    assert served.fileno() == -1


def test_a_datagram_socket_labelled_unix_is_refused_as_asyncio_refuses_it(
    loop: AcceptingLoop,
) -> None:
    """``uvicorn --fd`` given a UDP socket by mistake: refused in asyncio's words, as the kernel
    knows the socket (not a bare EOPNOTSUPP from listen()), and its descriptor is closed."""
    bound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with bound:
        bound.bind(("127.0.0.1", 0))
        labelled = socket.fromfd(bound.fileno(), socket.AF_UNIX, socket.SOCK_STREAM)
    with labelled, pytest.raises(ValueError, match="A Stream Socket was expected") as refused:
        loop.run_until_complete(loop.create_server(asyncio.Protocol, sock=labelled))
    assert f"type={socket.SOCK_DGRAM:d}," in str(refused.value)  # the kernel's, not the label
    assert loop.open_servers == set()
