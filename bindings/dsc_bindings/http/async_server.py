"""The async HTTP/1.1 binding: h11 over anyio (trio by default; asyncio programs can host it).

Every HTTP rule is in :mod:`.http_common` (shared with the blocking binding); this module only
moves bytes and applies the R12 timeouts with cancel scopes.  While it serves, the event loop
owns the core (``Site.owner``, :mod:`dsc_bindings.runtime.owner`): service calls run inline, with no thread hop, and
the disk work they hand to the service's writer is awaited without blocking the loop (a
:class:`~dsc_bindings.runtime.ticket.Ticket` completed from the writer thread sets an event through the
loop's thread-safe call-soon).

Usage::

    async with anyio.create_task_group() as tg:           # or a trio nursery
        port = await tg.start(functools.partial(serve, site, host="0.0.0.0", port=5362,
                                                limits=config.limits))
        ...
        tg.cancel_scope.cancel()   # stops accepting; in-flight requests get `grace` seconds

TLS: pass an ``ssl.SSLContext`` (server side).  When it requires client certificates, the
identity given to the service is taken from the verified peer certificate (R10; mapping in
:mod:`~dsc_bindings.http.certidentity`: the one subject commonName, else the first subjectAltName
e-mail, else UPN; a certificate with none of them, or with two commonNames, gets 403).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
import anyio.abc
import trio as _trio
from anyio.streams.tls import TLSAttribute, TLSStream

from dsc_bindings.http.accept_errors import OUT_OF_RESOURCES
from dsc_bindings.http.certidentity import connection_identity
from dsc_bindings.http.driver import (
    DEFAULT_GRACE,
    LINGER_BYTES,
    LINGER_SECONDS,
    MAX_REJECTING,
    READ_SIZE,
    Call,
    Close,
    HttpConnection,
    Receive,
    Send,
    admit,
)
from dsc_bindings.http.running_loop import RunningLoop
from dsc_bindings.http.site import Site
from dsc_bindings.runtime.peer import UNKNOWN_PEER, Peer
from dsc_bindings.runtime.ticket import Wait
from dsc_core import Limits

__all__ = ["DEFAULT_GRACE", "serve"]

log = logging.getLogger("dsc.http")

#: How often, at most, the sweeper wakes receives whose deadline passed (trio fast path).
SWEEP_SECONDS = 0.25
#: Connections accepted per wake-up of the accept loop (see _accept_loop).
ACCEPT_BATCH = 128

_STREAM_ERRORS = (
    anyio.EndOfStream,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ssl.SSLError,
    OSError,
)


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class _RawWait:
    """A connection's wait for readability on its raw socket (the trio fast path), woken
    without a cancel scope: ``cancel`` makes the waiting ``wait_readable`` raise
    ClosedResourceError (``trio.lowlevel.notify_closing``; the connection closes next).  If
    the task was already woken by data, nothing happens and the data is served."""

    __slots__ = ("deadline", "interrupted", "raw")

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.deadline = 0.0
        self.interrupted = False

    def cancel(self) -> None:
        self.interrupted = True
        _trio.lowlevel.notify_closing(self.raw)


class _Connection:
    """Book-keeping for one connection, so that shutdown and admission can reach it."""

    __slots__ = ("host", "protocol", "raw_wait", "receive_scope", "reclaimed", "scope")

    def __init__(self, scope: anyio.CancelScope, host: str) -> None:
        self.scope = scope
        self.host = host
        self.protocol: HttpConnection | None = None
        #: The cancel scope of a Receive in progress on an idle connection (shutdown and
        #: reclaiming cancel it): anyio's, or trio's on the plain-TCP fast path.
        self.receive_scope: _Cancellable | None = None
        #: The raw socket's wait (the trio fast path), or None.
        self.raw_wait: _RawWait | None = None
        self.reclaimed = False

    @property
    def reclaimable_since(self) -> float | None:
        protocol = self.protocol
        if (
            protocol is None
            or self.receive_scope is None
            or self.reclaimed
            or not protocol.idle
            or protocol.draining
        ):
            return None
        return protocol.idle_since

    @property
    def busy(self) -> bool:
        protocol = self.protocol
        return protocol is None or protocol.busy  # None: in its TLS handshake, or just accepted

    def reclaim(self) -> None:
        """Close this idle keep-alive connection to make room (http_common.admit)."""
        self.reclaimed = True
        if self.receive_scope is not None:
            self.receive_scope.cancel()

    def drain(self) -> None:
        if self.protocol is None:
            self.scope.cancel()  # still in the TLS handshake: nothing to finish
            return
        self.protocol.drain()
        if self.protocol.idle and self.receive_scope is not None:
            self.receive_scope.cancel()


def _send_at_once(raw: socket.socket, data: bytes) -> bytes | None:
    """What one non-blocking send on ``raw`` left of ``data`` (b"" when all of it went), or
    None when the socket failed."""
    try:
        sent = raw.send(data)
    except (BlockingIOError, InterruptedError):
        return data
    except OSError:
        return None
    return data[sent:]


async def _send(
    protocol: HttpConnection, stream: anyio.abc.ByteStream, data: bytes, timeout: float
) -> None:
    try:
        with anyio.fail_after(timeout):
            await stream.send(data)
    except (TimeoutError, *_STREAM_ERRORS):
        protocol.send_failed()


class _Server:
    def __init__(self, site: Site, limits: Limits, ssl_context: ssl.SSLContext | None) -> None:
        self.site = site
        self.limits = limits
        self.ssl_context = ssl_context
        self.loop = RunningLoop()
        self.connections: set[_Connection] = set()
        #: Receives waiting on a raw socket, with their deadlines (the sweeper looks).
        self.waiting: set[_RawWait] = set()
        self.rejecting = 0
        self.draining = False

    async def handle(self, stream: anyio.abc.SocketStream) -> None:
        # Shielded: cancelling serve() must not cut a request in the middle; drain() decides
        # when this connection ends (at once if idle, after its answer, or after the grace).
        with anyio.CancelScope(shield=True) as scope:
            peer = _peer(stream)
            host = peer.host
            admission = admit(host, self.connections, self.limits)
            victim = admission.reclaim
            if victim is not None:
                assert isinstance(victim, _Connection)
                victim.reclaim()
                self.connections.discard(victim)
            over = None if admission.admitted else admission.refusal
            if self.draining or (over is not None and self.rejecting >= MAX_REJECTING):
                await anyio.aclose_forcefully(stream)
                return
            connection = _Connection(scope, host)
            if over is not None:
                self.rejecting += 1
            else:
                self.connections.add(connection)
            try:
                await self._serve_connection(connection, stream, over, peer)
            except Exception:  # a bug: log it, close this connection, keep serving the others
                log.exception("connection handler failed")
            finally:
                if over is not None:
                    self.rejecting -= 1
                else:
                    self.connections.discard(connection)
                await anyio.aclose_forcefully(stream)

    async def _serve_connection(
        self,
        connection: _Connection,
        stream: anyio.abc.ByteStream,
        over: str | None,
        peer: Peer,
    ) -> None:
        opened = await self._open(connection, stream, over, peer)
        if opened is None:
            return
        protocol, stream, raw = opened
        try:
            while True:
                action = protocol.next_action()
                if isinstance(action, Receive):
                    if raw is not None:
                        await self._receive_raw(connection, protocol, raw, action)
                    else:
                        await self._receive(connection, protocol, stream, action)
                elif isinstance(action, Send):
                    rest = action.data if raw is None else _send_at_once(raw, action.data)
                    if rest is None:
                        protocol.send_failed()
                    elif rest:
                        await _send(protocol, stream, rest, action.timeout)
                elif isinstance(action, Call):
                    try:
                        result = action.function()
                        if isinstance(result, Wait):
                            result = await self.loop.follow(result)
                    except Exception as exc:
                        protocol.call_failed(exc)
                    else:
                        protocol.call_done(result)
                elif isinstance(action, Close):
                    if action.linger:
                        await _linger(stream)
                    return
        finally:
            await self._clean_up(protocol, peer)

    async def _open(
        self,
        connection: _Connection,
        stream: anyio.abc.ByteStream,
        over: str | None,
        peer: Peer,
    ) -> tuple[HttpConnection, anyio.abc.ByteStream, socket.socket | None] | None:
        """The connection's driver, its stream (TLS once the handshake is done) and, on plain
        TCP under trio, its raw socket; None when the TLS handshake failed."""
        identity: str | None = None
        unusable: str | None = None
        if self.ssl_context is not None:
            try:
                with anyio.fail_after(self.limits.head_timeout):
                    stream = await TLSStream.wrap(
                        stream,
                        server_side=True,
                        ssl_context=self.ssl_context,
                        standard_compatible=False,
                    )
            except (TimeoutError, *_STREAM_ERRORS) as exc:
                log.info("%s: TLS handshake failed: %r", peer, exc)
                return None
            identity, unusable = connection_identity(
                stream.extra(TLSAttribute.peer_certificate_binary, None)
            )
        protocol = HttpConnection(
            self.site,
            self.limits,
            identity=identity,
            peer=peer,
            over_capacity=over,
            unusable_certificate=unusable,
        )
        connection.protocol = protocol
        if self.draining:
            protocol.drain()
        # Plain TCP: a reply that fits the socket buffer is written with one non-blocking send,
        # without a cancel scope or a trip through the scheduler (profiled: most replies are a
        # few KiB; this is a large share of the per-request cost at high request rates).
        raw: socket.socket | None = None
        if self.ssl_context is None and self.loop.trio:
            found = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
            raw = found if isinstance(found, socket.socket) else None
            if raw is not None:
                connection.raw_wait = _RawWait(raw)
        return protocol, stream, raw

    async def _clean_up(self, protocol: HttpConnection, peer: Peer) -> None:
        cleanup = protocol.cleanup()
        if cleanup is not None:
            # Also when cancelled after the grace: the exchange must be aborted so that no
            # upload debris remains (R12).
            with anyio.CancelScope(shield=True):
                try:
                    await self.loop.follow(cleanup())
                except Exception:
                    log.exception("%s: aborting the exchange failed", peer)

    async def _receive_raw(
        self,
        connection: _Connection,
        protocol: HttpConnection,
        raw: socket.socket,
        action: Receive,
    ) -> None:
        """``_receive`` for plain TCP under trio, without anyio's stream and scope layers
        (profiled: they were a large share of a small request's cost): read what is already
        there at once; otherwise wait for readability.  The wait has no cancel scope: its
        deadline is kept by the server's sweeper, and a deadline, a reclaim or a drain wakes
        it through ``_RawWait`` (a scope with a deadline was ~7 us of each request)."""
        if connection.reclaimed:  # reclaimed while it was busy: it ends now (http_common.admit)
            protocol.reclaimed()
            return
        wait = connection.raw_wait
        assert wait is not None
        waited = deadline_set = False
        if action.phase == "idle":
            # Right after an answer: let the other connections run first, while our client
            # sends its next request.  Under load it is then there to read, without
            # registering with epoll and waiting (measured: 64 connections), and it waits no
            # longer than it would for readability.
            await _trio.lowlevel.checkpoint()
            waited = True
        while True:
            try:
                data = raw.recv(action.size)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                protocol.receive_data(b"")  # reset: the peer is gone
                return
            else:
                if not waited:
                    # Nothing awaited yet for this read: let the other connections run first
                    # (without this checkpoint a busy keep-alive connection starves the rest).
                    # After a wait the task already went through the scheduler: a second
                    # trip would only add a whole round of the other connections' work to
                    # this request's latency (measured: the p99 at 64 connections).
                    await _trio.lowlevel.checkpoint()
                protocol.receive_data(data)
                return
            if not deadline_set:
                deadline_set = waited = True
                wait.deadline = _trio.current_time() + action.timeout
            if protocol.draining and protocol.idle:
                protocol.timed_out()  # the server began to stop while we were not waiting
                return
            wait.interrupted = False
            connection.receive_scope = wait if protocol.idle else None
            self.waiting.add(wait)
            try:
                await _trio.lowlevel.wait_readable(raw)
            except _trio.ClosedResourceError:
                if not wait.interrupted:  # pragma: no cover - nobody else closes it
                    protocol.receive_data(b"")
                    return
            except (OSError, _trio.BusyResourceError):
                protocol.receive_data(b"")
                return
            finally:
                self.waiting.discard(wait)
                connection.receive_scope = None
            if wait.interrupted:
                if connection.reclaimed:
                    protocol.reclaimed()
                else:
                    protocol.timed_out()  # the deadline passed, or the server drains
                return

    async def sweep(self) -> None:
        """Wake receives whose deadline passed (see ``_receive_raw``), every SWEEP seconds
        at most: R12's timeouts fire up to that much late."""
        limits = self.limits
        shortest = min(limits.head_timeout, limits.body_timeout, limits.idle_timeout)
        interval = max(0.01, min(SWEEP_SECONDS, shortest / 4))
        while True:
            await _trio.sleep(interval)
            now = _trio.current_time()
            expired = [wait for wait in self.waiting if wait.deadline <= now]
            for wait in expired:
                wait.cancel()

    async def _receive(
        self,
        connection: _Connection,
        protocol: HttpConnection,
        stream: anyio.abc.ByteStream,
        action: Receive,
    ) -> None:
        data = b""
        with anyio.move_on_after(action.timeout) as scope:
            connection.receive_scope = scope if protocol.idle else None
            try:
                data = await stream.receive(action.size)
            except _STREAM_ERRORS:
                data = b""  # EOF, reset or TLS failure: the peer is gone
        connection.receive_scope = None
        if scope.cancelled_caught:
            if connection.reclaimed:
                protocol.reclaimed()
            else:
                protocol.timed_out()
        else:
            protocol.receive_data(data)

    async def drain(self, grace: float) -> None:
        """Stop: idle connections close now, in-flight requests get ``grace`` seconds."""
        self.draining = True
        for connection in list(self.connections):
            connection.drain()
        with anyio.move_on_after(grace):
            while self.connections or self.rejecting:
                await anyio.sleep(0.02)
        if self.connections:
            log.warning(
                "%d connection(s) still busy after %.1f s: cancelling them",
                len(self.connections),
                grace,
            )
        for connection in list(self.connections):
            connection.scope.cancel()


async def _linger(stream: anyio.abc.ByteStream) -> None:
    """Half-close and drop what the client still sends, briefly (see LINGER_SECONDS)."""
    try:
        await stream.send_eof()
    except (NotImplementedError, *_STREAM_ERRORS):
        pass  # TLS cannot half-close; reading until the client closes is enough
    received = 0
    with anyio.move_on_after(LINGER_SECONDS):
        try:
            while received < LINGER_BYTES:
                received += len(await stream.receive(READ_SIZE))
        except _STREAM_ERRORS:
            pass


async def _accept_loop(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    handle: Callable[[anyio.abc.SocketStream], Awaitable[None]],
    task_group: anyio.abc.TaskGroup,
) -> None:
    """Accept every connection that is waiting, then wait for more.

    ``listener.serve`` accepts one connection per trip through the scheduler; under load a
    trip is a whole round of the other connections' requests (64 keep-alive connections at
    ~190 us each: 12 ms), so 64 scanners connecting at once waited up to 0.8 s for their
    first byte to be read (measured with wrk: that start-up was the whole p99 of a 4 s run).
    Here one wake-up accepts up to ACCEPT_BATCH connections with non-blocking accept()."""
    raw = listener.extra(anyio.abc.SocketAttribute.raw_socket)
    raw.setblocking(False)  # already so under trio and asyncio; accept() below relies on it

    async def serve_socket(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stream = await anyio.abc.SocketStream.from_socket(sock)
        except OSError as exc:  # reset before we got to it
            log.debug("accepted connection unusable: %r", exc)
            sock.close()
            return
        await handle(stream)

    while True:
        await anyio.wait_readable(raw)
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _address = raw.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    # Out of descriptors or memory: the connections wait in the kernel's
                    # backlog until some close (what trio.serve_listeners does too).
                    log.error("cannot accept connections (%s): retrying in 0.1 s", exc)
                    await anyio.sleep(0.1)
                    break
                continue  # anything else is a connection that died in the backlog: skip it
            task_group.start_soon(serve_socket, sock)


def _peer(stream: anyio.abc.ByteStream) -> Peer:
    try:
        return Peer.of(stream.extra(anyio.abc.SocketAttribute.remote_address))
    except Exception:
        return UNKNOWN_PEER


async def serve(
    site: Site,
    *,
    host: str = "127.0.0.1",
    port: int = 5362,
    ssl_context: ssl.SSLContext | None = None,
    limits: Limits = Limits(),
    grace: float = DEFAULT_GRACE,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ready: Callable[[int], object] | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve HTTP(S) until cancelled.  ``reuse_port``: SO_REUSEPORT, several processes
    (``dsc serve --workers``) on one port, the kernel spreading the connections.

    ``port`` 0 picks a free port; the bound port is reported through ``task_status`` (so
    ``await tg.start(serve, ...)`` returns it) and to ``ready`` if given.  Cancelling stops
    accepting at once, closes idle keep-alive connections, and lets requests in progress finish
    for up to ``grace`` seconds (then they are cancelled and their exchanges aborted).
    """
    listener = await anyio.create_tcp_listener(
        local_host=host, local_port=port, reuse_port=reuse_port
    )
    bound = int(listener.extra(anyio.abc.SocketAttribute.local_port))
    server = _Server(site, limits, ssl_context)
    owner = site.owner
    detach: Callable[[], None] | None = owner.attach(server.loop) if owner is not None else None
    log.info(
        "listening on %s port %d (%s), up to %d connections",
        host,
        bound,
        "https" if ssl_context is not None else "http",
        limits.max_connections,
    )
    accept_scope = anyio.CancelScope()
    accept_done = anyio.Event()

    async def accept(task_group: anyio.abc.TaskGroup) -> None:
        try:
            with accept_scope:
                # One loop per bound socket (a host name may bind IPv4 and IPv6).
                async with anyio.create_task_group() as loops:
                    for one in listener.listeners:
                        loops.start_soon(_accept_loop, one, server.handle, task_group)
        finally:
            accept_done.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(accept, tg)
            if ssl_context is None and server.loop.trio:
                tg.start_soon(server.sweep)  # deadlines of the raw-socket receives
            task_status.started(bound)
            if ready is not None:
                ready(bound)
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    # Stop accepting first, then close the listener (closing it under a
                    # pending accept() would raise in the accept task instead).
                    server.draining = True
                    accept_scope.cancel()
                    await accept_done.wait()
                    await listener.aclose()
                    await server.drain(grace)
                    log.info("stopped listening on port %d", bound)
    finally:
        if detach is not None:
            detach()
        with anyio.CancelScope(shield=True):
            await listener.aclose()
