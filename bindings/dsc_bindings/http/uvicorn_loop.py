"""uvloop, its TCP servers taking in every pending connection at each poll (issue 20).

::

    uvicorn --factory dsc_bindings.asgi:create_app \\
        --loop dsc_bindings.http.uvicorn_loop:new_event_loop \\
        --http dsc_bindings.http.uvicorn_protocol:CoalescingHttpToolsProtocol

(``--loop module:factory`` needs uvicorn 0.36 or later.)

**Why.**  uvloop's TCP server accepts one connection each time the loop polls for I/O: under
``strace``, each ``epoll_wait`` that reports the listening socket is followed by exactly one
``accept4``, never by the ``EAGAIN`` that would show a drained queue.  On a busy server a turn
of the loop answers a whole batch of requests (about 4 ms with 64 connections), so a burst of N
connections opened together (a load test starting, scanners reconnecting after a restart, a
proxy filling its pool) is taken in over N turns: under ``wrk -t2 -c64`` the second wrk
thread's 32 connections were taken in over 90 ms, the last one's first answer took 56 ms against
9 ms from the hand-written aiohttp server on asyncio's loop, and the p99 of GetPostScanJobElements
was 1.05x the hand-written server's (p99.9 48 ms against 9 ms).  With this loop: 0.86x, every one
of 8 rounds under 1.0x (p99.9 8 ms), requests/s unchanged (docs/performance.md, "Taken in one at
a time").  asyncio's own loop accepts up to ``backlog`` connections per poll; this does the same.

**How.**  :meth:`AcceptingLoop.create_server` binds and listens itself (as asyncio's
``create_server`` does: every address of the host, ``SO_REUSEADDR``, ``IPV6_V6ONLY``), and when
a listening socket is readable accepts until the queue is empty (at most ``backlog`` at once).
Each connection is handed to uvloop as an accepted socket (``connect_accepted_socket``: uvloop's
own TCP transport, with ``TCP_NODELAY``, and TLS when ``ssl`` is given), so from there on
everything is uvloop's.  The hand-over begins in the poll that accepted the connection, not in a
task a turn later, so that ``connection_made`` is queued where uvloop's own server queues it
(:meth:`AcceptingLoop.hand_over`: uvicorn's graceful shutdown relies on that order).
``wait_closed()`` returns once the listening sockets are closed, not when the connections are
(uvloop's behaviour, which uvicorn's shutdown is written for: :meth:`AcceptingServer.wait_closed`).  Unix sockets, and a socket passed in that is not TCP, are served by uvloop's own server; a TCP
socket passed by ``uvicorn --fd`` (which labels it AF_UNIX) is recognised and served here.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import socket
import ssl as ssl_module
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import uvloop

from dsc_bindings.http.accept_errors import OUT_OF_RESOURCES

__all__ = [
    "ACCEPT_RETRY_SECONDS",
    "SHARED_ACCEPT_BATCH",
    "SHARED_ACCEPT_PAUSE_SECONDS",
    "AcceptingLoop",
    "new_event_loop",
]

log = logging.getLogger("dsc.http")

#: How long accepting pauses when the process is out of file descriptors or memory (asyncio's
#: ``ACCEPT_RETRY_DELAY``): Linux keeps reporting the listening socket readable meanwhile, so
#: trying again at once would spin.
ACCEPT_RETRY_SECONDS = 1.0

#: A listening socket passed in (``sock=``: ``uvicorn --workers N``, gunicorn) is shared with
#: other workers, each polling it on its own loop.  The worker that wakes first would take the
#: whole burst (2 workers, 64 connections opened together: all 64 to one worker in 5 of 8
#: bursts, so one worker of two served every one of their keep-alive requests), so on a
#: shared socket a worker takes at most this many per wake-up and then stops listening for
#: :data:`SHARED_ACCEPT_PAUSE_SECONDS`, leaving the rest to the others.  Measured so: 32/32 in
#: 5 of 6 bursts, 24/40 in 1 (docs/performance.md, "One listening socket, several workers").
SHARED_ACCEPT_BATCH = 8

#: The pause after a full batch on a shared socket: the window in which another worker, woken
#: with this one, takes its batch.  Counted in loop turns it would be none (an idle loop turns
#: in microseconds, so a worker waiting for a core got nothing: all 64 to one worker in 4 of 6
#: bursts); one millisecond lets it in, and costs a lone worker on a shared socket 1 ms per 8
#: connections of a burst.
SHARED_ACCEPT_PAUSE_SECONDS = 0.001


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


def new_event_loop() -> AcceptingLoop:
    """The loop factory for ``uvicorn --loop dsc_bindings.http.uvicorn_loop:new_event_loop``."""
    return AcceptingLoop()


class AcceptingLoop(uvloop.Loop):
    """uvloop whose TCP servers accept every pending connection at each poll (module doc)."""

    def __init__(self) -> None:
        super().__init__()
        #: The servers not closed yet: closed with the loop, as uvloop closes its own.
        self.open_servers: set[AcceptingServer] = set()

    def close(self) -> None:
        # uvloop closes its own servers' listening sockets with the loop; without this, the
        # kernel would go on completing handshakes for a port no one will ever answer (and the
        # sockets would be left to the garbage collector).  A running loop refuses to close,
        # and stays as it was.  (A hand-over still waiting, a TLS handshake, ends with the
        # loop: uvloop closes its transport.)
        if not self.is_running() and not self.is_closed():
            for server in list(self.open_servers):
                server.close()
        super().close()

    def hand_over(
        self, handing_over: Coroutine[Any, Any, Any], connection: socket.socket, _: object = None
    ) -> None:
        """Run ``handing_over`` (``connect_accepted_socket`` of the accepted ``connection``)
        as a task would, but its first step now, in the poll that accepted the connection:
        its transport is made and ``connection_made`` queued ahead of any task this poll or a
        later timer wakes, as uvloop's own server queues it.  uvicorn's graceful shutdown
        (close the server, then ask each connection it knows to shut down, in a task woken by
        a timer) relies on that order: a task started a turn later made connections the
        shutdown never knew of, and it waited for their peers to hang up.  The coroutine
        awaits only its waiter (the connection made; TLS: the handshake done); it resumes
        when the waiter is done."""
        try:
            waiter = handing_over.send(None)
        except StopIteration:
            return
        except BaseException as exc:
            self._not_handed_over(connection, exc)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit
            return
        # The waiter (held by the transport) holds the callback that holds the coroutine.
        resume = functools.partial(self.hand_over, handing_over, connection)
        if asyncio.isfuture(waiter):
            waiter.add_done_callback(resume)
        else:
            self.call_soon(resume)  # a bare yield, as a task takes it

    def _not_handed_over(self, connection: socket.socket, exc: BaseException) -> None:
        # The protocol factory raised (uvloop calls it before the socket is its transport's),
        # a TLS handshake failed, the peer left.  Close the socket now, not when the garbage
        # collector finds it (the peer would wait until then; a ResourceWarning).  Once
        # uvloop's transport holds the socket it counts a reference on it, so this close
        # leaves the transport's descriptor alone.
        connection.close()
        if isinstance(exc, OSError):
            # A TLS handshake that failed, a peer gone before its transport existed: uvloop's
            # own server reports these through the protocol (asyncio logs them in debug only).
            log.debug("connection not taken in: %r", exc)
            return
        self.call_exception_handler(
            {"message": "taking in an accepted connection failed", "exception": exc}
        )

    # asyncio's stubs promise its own Server class; uvloop's servers, and this one, are
    # AbstractServers (what uvicorn uses of them: sockets, close, wait_closed).
    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        host: str | Iterable[str] | None = None,
        port: int | None = None,
        *,
        family: int = socket.AF_UNSPEC,
        flags: int = socket.AI_PASSIVE,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: ssl_module.SSLContext | bool | None = None,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
    ) -> asyncio.AbstractServer:
        _check_arguments(host, port, sock, ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if sock is not None and sock.family == socket.AF_UNIX:
            sock = _in_its_own_family(sock)
        if sock is not None and sock.family not in (socket.AF_INET, socket.AF_INET6):
            return await super().create_server(
                protocol_factory,
                sock=sock,
                backlog=backlog,
                ssl=ssl,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
                start_serving=start_serving,
            )
        if sock is not None:
            sockets = [sock]
        else:
            sockets = await self._bound_sockets(
                host, port, family, flags, reuse_address=reuse_address, reuse_port=reuse_port
            )
        tls: dict[str, Any] = {}
        if ssl is not None:
            tls = {
                "ssl": ssl,
                "ssl_handshake_timeout": ssl_handshake_timeout,
                "ssl_shutdown_timeout": ssl_shutdown_timeout,
            }
        # A socket passed in is shared with other workers (SHARED_ACCEPT_BATCH); one bound here
        # is this process's own.
        server = AcceptingServer(
            self, sockets, protocol_factory, backlog, tls, shared=sock is not None
        )
        self.open_servers.add(server)
        if start_serving:
            await server.start_serving()
        return server

    async def _bound_sockets(
        self,
        host: str | Iterable[str] | None,
        port: int | None,
        family: int,
        flags: int,
        *,
        reuse_address: bool | None,
        reuse_port: bool | None,
    ) -> list[socket.socket]:
        """A socket bound to each address of ``host`` (every address when None or ""), as
        asyncio's ``create_server`` binds them."""
        hosts: list[str | None]
        if host is None or host == "":
            hosts = [None]
        elif isinstance(host, str):
            hosts = [host]
        else:
            hosts = list(host)
        resolved = [
            await self.getaddrinfo(h, port, family=family, type=socket.SOCK_STREAM, flags=flags)
            for h in hosts
        ]
        sockets: list[socket.socket] = []
        try:
            for af, kind, proto, _, address in dict.fromkeys(itertools.chain(*resolved)):
                listener = socket.socket(af, kind, proto)
                sockets.append(listener)
                if reuse_address is not False:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if af == socket.AF_INET6:
                    # One socket per address family, as asyncio binds them (else "::" would
                    # take the IPv4 port its own socket is about to bind).
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    listener.bind(address)
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"error while attempting to bind on address {address!r}: "
                        f"{(exc.strerror or str(exc)).lower()}",
                    ) from None
        except BaseException:
            for listener in sockets:
                listener.close()
            raise
        if not sockets:
            raise OSError(f"no address to listen on for host {host!r}")
        return sockets


def _in_its_own_family(sock: socket.socket) -> socket.socket:
    """``sock`` as the kernel knows it.  ``uvicorn --fd N`` wraps the descriptor as AF_UNIX
    whatever it is (``socket.fromfd(fd, AF_UNIX, SOCK_STREAM)``), so a TCP socket passed by a
    supervisor (systemd's socket activation, circus) would get uvloop's own server, taking in
    one connection per turn.  One ``getsockopt(SO_DOMAIN)`` tells; a TCP socket is then
    re-wrapped in its own family (the wrapper passed in gives up its descriptor: uvicorn uses
    ``server.sockets`` from then on, as asyncio's server owns the socket it is given)."""
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        return sock
    own = socket.socket(fileno=sock.detach())  # family, type and protocol from the kernel
    try:
        # The type checked before was the label's too (fromfd's SOCK_STREAM).
        _check_stream(own)
    except ValueError:
        own.close()  # the descriptor the wrapper passed in gave up
        raise
    return own


def _check_arguments(
    host: str | Iterable[str] | None,
    port: int | None,
    sock: socket.socket | None,
    ssl: ssl_module.SSLContext | bool | None,
    ssl_handshake_timeout: float | None,
    ssl_shutdown_timeout: float | None,
) -> None:
    """Refuse what asyncio's ``create_server`` refuses, in its words: arguments that contradict
    each other would otherwise be ignored without a word (a handshake timeout on a server
    without TLS, a host and port beside the socket that is served)."""
    if ssl is not None and not isinstance(ssl, ssl_module.SSLContext):
        raise TypeError("ssl argument must be an SSLContext or None")
    if ssl_handshake_timeout is not None and ssl is None:
        raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
    if ssl_shutdown_timeout is not None and ssl is None:
        raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
    if host is not None or port is not None:
        if sock is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
        return
    if sock is None:
        raise ValueError("Neither host/port nor sock were specified")
    _check_stream(sock)


def _check_stream(sock: socket.socket) -> None:
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(f"A Stream Socket was expected, got {sock!r}")


class AcceptingServer(asyncio.AbstractServer):
    """The listening sockets of one :meth:`AcceptingLoop.create_server` call."""

    def __init__(
        self,
        loop: AcceptingLoop,
        sockets: list[socket.socket],
        protocol_factory: ProtocolFactory,
        backlog: int,
        tls: dict[str, Any],
        *,
        shared: bool,
    ) -> None:
        self._loop = loop
        self._sockets = sockets
        self._protocol_factory = protocol_factory
        self._backlog = backlog
        self._tls = tls
        #: The sockets are shared with other workers: a full batch is followed by a pause,
        #: whatever the backlog (one no larger than a batch is no reason to keep listening).
        self._shared = shared
        #: At most this many accepted per wake-up (SHARED_ACCEPT_BATCH on a shared socket).
        self._batch = min(backlog, SHARED_ACCEPT_BATCH) if shared else backlog
        self._serving = False
        self._serving_forever = False
        #: Set once closed (what wait_closed waits for).
        self._closed = asyncio.Event()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed.is_set() else tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving or self._closed.is_set():
            return
        self._serving = True
        for listener in self._sockets:
            listener.listen(self._backlog)
            listener.setblocking(False)
            self._listen(listener)

    async def serve_forever(self) -> None:
        # As asyncio's: a closed server cannot serve again, and one serve_forever() at a time.
        if self._serving_forever:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._closed.is_set():
            raise RuntimeError(f"server {self!r} is closed")
        self._serving_forever = True
        await self.start_serving()
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            self.close()  # as asyncio's and uvloop's: cancelled, the server closes
            raise
        finally:
            self._serving_forever = False

    def close(self) -> None:
        """Stop accepting and close the listening sockets; connections already accepted go
        on (as asyncio's ``Server.close``)."""
        if self._closed.is_set():
            return
        self._serving = False
        self._loop.open_servers.discard(self)
        for listener in self._sockets:
            self._loop.remove_reader(listener.fileno())
            listener.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        """Return once the server is closed (its listening sockets), whatever connections it
        took in are still open: uvloop's behaviour (0.23) and asyncio's up to 3.11; asyncio
        3.12 also waits for every connection to close.  uvicorn's shutdown is why: it closes
        the servers, asks each connection it knows to shut down, waits for them itself (until
        ``--timeout-graceful-shutdown``, or not at all on a second Ctrl-C, ``force_exit``) and
        only then awaits ``wait_closed()``.  Waiting for the connections here would make a
        forced exit, or one past the graceful timeout, wait for peers to hang up."""
        await self._closed.wait()

    def _listen(self, listener: socket.socket) -> None:
        self._loop.add_reader(listener.fileno(), self._accept_pending, listener)

    def _accept_pending(self, listener: socket.socket) -> None:
        """Take in every connection waiting on ``listener`` (at most ``backlog`` at once; on a
        shared socket, at most :data:`SHARED_ACCEPT_BATCH`, then a pause)."""
        for _ in range(self._batch):
            try:
                connection, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except ConnectionAbortedError:
                continue  # this peer gave up before it was taken in; others may wait
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    raise  # the loop logs it and goes on
                self._loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource: accepting again in "
                        f"{ACCEPT_RETRY_SECONDS:g} s",
                        "exception": exc,
                        "socket": listener,
                    }
                )
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(ACCEPT_RETRY_SECONDS, self._listen_again, listener)
                return
            connection.setblocking(False)
            self._loop.hand_over(
                self._loop.connect_accepted_socket(self._protocol_factory, connection, **self._tls),
                connection,
            )
        if self._shared:
            # A full batch from a shared socket: more may wait, left to the other workers for
            # the pause (SHARED_ACCEPT_PAUSE_SECONDS), then this one takes its next batch.
            self._loop.remove_reader(listener.fileno())
            self._loop.call_later(SHARED_ACCEPT_PAUSE_SECONDS, self._listen_again, listener)

    def _listen_again(self, listener: socket.socket) -> None:
        if self._serving:
            self._listen(listener)
