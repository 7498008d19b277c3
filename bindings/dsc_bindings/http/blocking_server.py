"""The blocking HTTP/1.1 binding: plain sockets, one thread per connection, h11.

Same behaviour as :mod:`.http_async` (every HTTP rule lives in :mod:`.http_common`); here the
R12 timeouts are socket timeouts and at most ``limits.max_connections`` connection threads run.
Connection threads do HTTP and socket I/O; their service calls run one at a time in one
:class:`~.service_thread.ServiceThread` (as the async binding's loop runs them).
Connections beyond that are answered 503 by at most ``MAX_REJECTING`` short-lived threads (and
closed at once beyond those), so the thread count stays bounded.

Usage::

    server = BlockingServer(site, "0.0.0.0", 5362, None, config.limits)
    port = server.start()          # binds, serves in a background thread
    ...
    server.shutdown()              # stop accepting; in-flight requests get `grace` seconds

or ``server.serve_forever()`` in the calling thread (``shutdown()`` from another one ends it).
TLS and the R10 identity mapping as in :mod:`.http_async`.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

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
from dsc_bindings.http.service_thread import ServiceThread
from dsc_bindings.http.site import Site
from dsc_bindings.runtime.peer import Peer
from dsc_core import Limits

__all__ = ["DEFAULT_GRACE", "BlockingServer"]

log = logging.getLogger("dsc.http")

#: How often the accept loop looks at the stop flag.
_ACCEPT_POLL = 0.2


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: Peer
    #: Why admission refused it (every request gets 503), or None: admitted.
    over: str | None
    host: str = "?"
    protocol: HttpConnection | None = None
    thread: threading.Thread | None = field(default=None, repr=False)
    reclaimed: bool = False

    @property
    def reclaimable_since(self) -> float | None:
        protocol = self.protocol
        if protocol is None or self.reclaimed or not protocol.idle or protocol.draining:
            return None
        return protocol.idle_since

    @property
    def busy(self) -> bool:
        protocol = self.protocol
        return protocol is None or protocol.busy  # None: in its TLS handshake, or just accepted

    def reclaim(self) -> None:
        """Close this idle keep-alive connection to make room (http_common.admit): its
        thread's recv() sees EOF and the connection closes."""
        self.reclaimed = True
        log.info("%s: idle keep-alive connection reclaimed for a new one: closing", self.peer)
        _shutdown_socket(self.sock, socket.SHUT_RD)


def _choose_cpu(choice: int | Literal["auto"] | None) -> int | None:
    """The one CPU for the threads that run Python for the connections, or None (anywhere).

    The GIL lets one thread run Python at a time; spread over several CPUs, connection threads
    hand it to each other across CPUs, each hand-over a wake-up of another CPU (measured, 8
    keep-alive connections, 2 CPUs: 5,200-5,400 requests/s spread, 7,400 on one CPU, and
    from run to run the spread case alternated between that and ~0.75 of it).  "auto" picks
    the highest allowed CPU when there are several; the writer, filter and delivery threads
    are not pinned (their work is mostly I/O and C code).  None leaves every thread free."""
    if choice is None or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if choice == "auto":
        return max(allowed) if len(allowed) > 1 else None
    if choice not in allowed:
        log.warning("CPU %d is not available to this process: connection threads unpinned", choice)
        return None
    return choice


def _shutdown_socket(sock: socket.socket, how: int) -> None:
    """Wake a thread blocked on ``sock``.  The base-class call also works for an SSLSocket
    without dropping its TLS state under the other thread's feet."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


class BlockingServer:
    """HTTP(S) over blocking sockets and threads (module docstring)."""

    def __init__(
        self,
        site: Site,
        host: str = "127.0.0.1",
        port: int = 5362,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits = Limits(),
        *,
        grace: float = DEFAULT_GRACE,
        cpu: int | Literal["auto"] | None = "auto",
        reuse_port: bool = False,
    ) -> None:
        self.site = site
        #: SO_REUSEPORT: several processes (``dsc serve --workers``) listen on one port and
        #: the kernel spreads the connections among them.
        self.reuse_port = reuse_port
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.limits = limits
        self.grace = grace
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._rejecting: set[_Connection] = set()
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._accept_done = threading.Event()
        self._serving = False
        #: The CPU the connection threads and the service thread run on (see _choose_cpu).
        self.cpu = _choose_cpu(cpu)
        #: Runs the connections' service calls, one at a time (.service_thread), and owns
        #: the core while serving (as the async binding's event loop does).
        self._calls = ServiceThread(initializer=self._pin)
        self._detach: Callable[[], None] | None = None

    # --- life cycle -----------------------------------------------------------------------------

    def bind(self) -> int:
        """Create the listening socket (port 0 picks a free port); returns the bound port."""
        if self._listener is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                listener.bind((self.host, self.port))
                listener.listen(min(socket.SOMAXCONN, 1024))
                listener.settimeout(_ACCEPT_POLL)
            except BaseException:
                listener.close()
                raise
            self._listener = listener
            self.port = int(listener.getsockname()[1])
            log.info(
                "listening on %s port %d (%s), up to %d connections, %s",
                self.host,
                self.port,
                "https" if self.ssl_context is not None else "http",
                self.limits.max_connections,
                "connection threads on any CPU"
                if self.cpu is None
                else f"connection threads on CPU {self.cpu}",
            )
        return self.port

    def start(self) -> int:
        """Bind and serve in a background thread; returns the bound port."""
        port = self.bind()
        self._accept_thread = threading.Thread(
            target=self.serve_forever, name="dsc-http-accept", daemon=True
        )
        self._accept_thread.start()
        return port

    def serve_forever(self) -> None:
        """Accept connections until :meth:`shutdown` (binds first if needed)."""
        self.bind()
        listener = self._listener
        assert listener is not None
        self._calls.start()
        if self.site.owner is not None and self._detach is None:
            self._detach = self.site.owner.attach(self._calls)
        self._serving = True
        try:
            while not self._stopping.is_set():
                try:
                    sock, address = listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    if self._stopping.is_set():
                        break
                    # EMFILE and friends: keep serving the open connections, retry shortly.
                    log.error("accept failed: %s", exc)
                    time.sleep(_ACCEPT_POLL)
                    continue
                self._dispatch(sock, address)
        finally:
            self._accept_done.set()

    def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, close idle connections, give in-flight requests ``grace`` seconds
        (default: the constructor's), then cut what is left (their exchanges are aborted)."""
        grace = self.grace if grace is None else grace
        self._stopping.set()
        if self._serving:
            self._accept_done.wait(_ACCEPT_POLL * 5)  # the accept loop sees the flag
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            connections = list(self._connections | self._rejecting)
        for connection in connections:
            self._drain(connection)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._connections and not self._rejecting:
                    break
            time.sleep(0.02)
        with self._lock:
            left = list(self._connections | self._rejecting)
        if left:
            log.warning("%d connection(s) still busy after %.1f s: closing them", len(left), grace)
        for connection in left:
            _shutdown_socket(connection.sock, socket.SHUT_RDWR)
        for connection in left:
            if connection.thread is not None:
                connection.thread.join(2.0)
        # Stopped first: it finishes the core calls queued to it; the owner's lock takes over
        # for what still comes (a connection thread that did not end in time).
        self._calls.stop()
        if self._detach is not None:
            self._detach()
            self._detach = None
        log.info("stopped listening on port %d", self.port)

    # --- connections -------------------------------------------------------------------------

    def _dispatch(self, sock: socket.socket, address: object) -> None:
        peer = Peer.of(address)
        host = peer.host
        with self._lock:
            admission = admit(host, self._connections, self.limits)
            victim = admission.reclaim
            if victim is not None:
                assert isinstance(victim, _Connection)
                victim.reclaim()
                self._connections.discard(victim)
            over = None if admission.admitted else admission.refusal
            if over is not None and len(self._rejecting) >= MAX_REJECTING:
                log.warning(
                    "%s: closed at once (%d refusals already running): %s",
                    peer,
                    MAX_REJECTING,
                    over,
                )
                sock.close()
                return
            connection = _Connection(sock, peer, over, host)
            (self._connections if over is None else self._rejecting).add(connection)
        thread = threading.Thread(
            target=self._serve_connection, args=(connection,), name="dsc-http-conn", daemon=True
        )
        connection.thread = thread
        try:
            thread.start()
        except RuntimeError as exc:  # cannot start a thread: refuse this one connection
            log.error("%s: cannot start a connection thread: %s", peer, exc)
            self._forget(connection)
            sock.close()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
            self._rejecting.discard(connection)

    def _drain(self, connection: _Connection) -> None:
        protocol = connection.protocol
        if protocol is None:  # still in the TLS handshake: nothing to finish
            _shutdown_socket(connection.sock, socket.SHUT_RDWR)
            return
        protocol.drain()
        if protocol.idle:
            _shutdown_socket(connection.sock, socket.SHUT_RD)  # wakes its recv() with EOF

    def _pin(self) -> None:
        """Keep the calling thread on ``self.cpu`` (see _choose_cpu)."""
        if self.cpu is not None:
            try:
                os.sched_setaffinity(0, {self.cpu})
            except OSError:  # the CPU went away (hot-unplug, a changed cpuset): run anywhere
                pass

    def _serve_connection(self, connection: _Connection) -> None:
        self._pin()
        sock = connection.sock
        try:
            # A reply goes out as soon as it is written, not after the client's delayed ACK of
            # the previous one (Nagle; trio's sockets, hence the async binding, do the same).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # not TCP (a test's socketpair) or already closed: nothing to tune
            identity: str | None = None
            unusable: str | None = None
            if self.ssl_context is not None:
                try:
                    sock.settimeout(self.limits.head_timeout)
                    tls = self.ssl_context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                    connection.sock = sock = tls
                    tls.do_handshake()
                except (OSError, ssl.SSLError, ValueError) as exc:
                    log.info("%s: TLS handshake failed: %r", connection.peer, exc)
                    return
                identity, unusable = connection_identity(tls.getpeercert(binary_form=True))
            protocol = HttpConnection(
                self.site,
                self.limits,
                identity=identity,
                peer=connection.peer,
                over_capacity=connection.over,
                unusable_certificate=unusable,
            )
            connection.protocol = protocol
            if self._stopping.is_set():
                protocol.drain()
            self._run(protocol, sock)
        except Exception:  # a bug: log it and close this connection only
            log.exception("%s: connection handler failed", connection.peer)
        finally:
            try:
                sock.close()
            except OSError:
                pass
            self._forget(connection)

    def _run(self, protocol: HttpConnection, sock: socket.socket) -> None:
        io: _SocketIO = (
            _TimeoutIO(sock) if isinstance(sock, ssl.SSLSocket) else _KernelTimeoutIO(sock)
        )
        try:
            while True:
                action = protocol.next_action()
                if isinstance(action, Receive):
                    try:
                        data = io.receive(action.timeout, action.size)
                    except TimeoutError:
                        protocol.timed_out()
                        continue
                    except (OSError, ssl.SSLError):
                        data = b""  # reset or TLS failure: the peer is gone
                    protocol.receive_data(data)
                elif isinstance(action, Send):
                    try:
                        io.send(action.data, action.timeout)
                    except (OSError, ssl.SSLError):
                        protocol.send_failed()
                elif isinstance(action, Call):
                    try:
                        result = self._calls.settle(action.function)
                    except Exception as exc:
                        protocol.call_failed(exc)
                    else:
                        protocol.call_done(result)
                elif isinstance(action, Close):
                    if action.linger:
                        _linger(sock)  # sets a Python timeout, which takes over
                    return
        finally:
            cleanup = protocol.cleanup()
            if cleanup is not None:
                try:
                    self._calls.settle(cleanup)  # abort the exchange: no debris (R12)
                except Exception:
                    log.exception("aborting the exchange failed")


class _SocketIO(Protocol):
    def receive(self, timeout: float, size: int) -> bytes: ...
    def send(self, data: bytes, timeout: float) -> None: ...


class _TimeoutIO:
    """TLS: the socket's own timeouts (an SSLSocket reads and writes records as it needs)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def receive(self, timeout: float, size: int) -> bytes:
        self._sock.settimeout(timeout)
        return self._sock.recv(size)

    def send(self, data: bytes, timeout: float) -> None:
        self._sock.settimeout(timeout)
        self._sock.sendall(data)


class _KernelTimeoutIO:
    """Plain TCP: a blocking socket whose timeouts the kernel applies (SO_RCVTIMEO,
    SO_SNDTIMEO), so a read is one recv() and a reply one send().

    Every system call lets another connection thread take the GIL, and under load each such
    hand-over costs two context switches (measured: 17 per request at 8 connections against
    the async binding's 2).  Python's own socket timeouts add a poll() before every recv()
    and send() and an ioctl() per settimeout(); here the timeouts are set only when they
    change (the keep-alive, body and send timeouts are constants).  shutdown() from another
    thread (reclaim, drain) still wakes a blocked recv() with EOF."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.settimeout(None)
        self._receive_timeout = -1.0
        self._send_timeout = -1.0

    def receive(self, timeout: float, size: int) -> bytes:
        if timeout != self._receive_timeout:
            self._receive_timeout = timeout
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
        try:
            return self._sock.recv(size)
        except BlockingIOError:  # EAGAIN: SO_RCVTIMEO expired
            raise TimeoutError from None

    def send(self, data: bytes, timeout: float) -> None:
        if timeout != self._send_timeout:
            self._send_timeout = timeout
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
        try:
            self._sock.sendall(data)
        except BlockingIOError:  # EAGAIN: SO_SNDTIMEO expired
            raise TimeoutError("send timed out") from None


def _timeval(seconds: float) -> bytes:
    """A struct timeval; at least 1 ms (0 would mean no timeout at all)."""
    whole = int(seconds)
    micro = max(0, int((seconds - whole) * 1_000_000))
    if whole == 0 and micro < 1000:
        micro = 1000
    return struct.pack("@ll", whole, micro)


def _linger(sock: socket.socket) -> None:
    """Half-close and drop what the client still sends, briefly (see LINGER_SECONDS)."""
    if not isinstance(sock, ssl.SSLSocket):  # TLS cannot half-close without ending TLS
        _shutdown_socket(sock, socket.SHUT_WR)
    deadline = time.monotonic() + LINGER_SECONDS
    received = 0
    try:
        while received < LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
            data = sock.recv(READ_SIZE)
            if not data:
                return
            received += len(data)
    except (OSError, ssl.SSLError):
        return
