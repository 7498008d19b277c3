"""What both HTTP bindings share: every HTTP rule, written once.

:class:`HttpConnection` is a sans-IO driver of one server connection over h11.  It decides
everything (request-head checks, the R12 limit answers 413/431/400/405/503, the issue-14
refusals 403 (.cross_site) and 415 (not SOAP), HEAD, ``Expect: 100-continue``, keep-alive, which timeout applies, when to close, aborting an unfinished
exchange) and asks its binding, one :data:`Action` at a time, to do the I/O::

    conn = HttpConnection(site, limits, identity=..., peer=...)   # .site.Site
    try:
        while True:
            action = conn.next_action()
            if isinstance(action, Receive):   # read <= action.size bytes within action.timeout
                conn.receive_data(data)       # b"" = EOF; or conn.timed_out()
            elif isinstance(action, Send):    # write all of action.data (conn.send_failed())
            elif isinstance(action, Call):    # run the service call in the core's context and
                conn.call_done(result)        # follow its Wait chain (module doc of .writer);
                                              # conn.call_failed(exc) if it raised
            elif isinstance(action, Close):   # linger (drain, so the client reads our last
                break                         # answer instead of a TCP reset) and close
    finally:
        cleanup = conn.cleanup()              # a call (run like a Call's function), or None:
        if cleanup: settle(cleanup())         # aborts a started exchange: no upload debris

The bindings keep only sockets, threads/tasks and their timeouts.  No SOAP or job rule lives
here either: request bodies go to :class:`~dsc_bindings.runtime.service.ScanService` untouched.

Calls are coalesced, because each one is a round of core work and store I/O: the
exchange is opened by the first Call a request needs, not at its head; body pieces are held
while the exchange is not yet open and they total at most ``limits.max_envelope_bytes`` (a
small SOAP request: open, feed and finish then run as ONE Call at the end of the body); beyond
that, one Call opens the exchange and feeds what is held, and from then on what was received is
fed before the next read (the pieces of one read in one Call, together with ``finish`` when the
body ends in it).  The service sees the same ``feed`` pieces in the same order as without
coalescing; no more than ``max_envelope_bytes`` is ever held while waiting for the network.

Identity (R10): see :mod:`.certidentity`; a connection whose certificate names no user gets
403 for every request.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import h11

from dsc_bindings.http.request_rules import (
    SERVER_NAME,
    Answered,
    Rejection,
    RequestHead,
    RequestRules,
    body_limit_setting,
    check_head,
    error_reply,
    header_fields,
    reason,
    reply_headers,
)
from dsc_bindings.http.site import RequestLike, Site
from dsc_bindings.runtime.peer import UNKNOWN_PEER, Peer
from dsc_bindings.runtime.ticket import Ticket, Wait
from dsc_core import Limits, Reply
from dsc_core.config import max_request_bytes, reserved_slots

__all__ = [
    "DEFAULT_GRACE",
    "HEAD_READ_SIZE",
    "LINGER_BYTES",
    "LINGER_SECONDS",
    "MAX_REJECTING",
    "READ_SIZE",
    "REJECT_HEAD_TIMEOUT",
    "SERVER_NAME",
    "Action",
    "Admission",
    "Admitted",
    "Call",
    "Close",
    "HttpConnection",
    "Receive",
    "Rejection",
    "RequestLike",
    "Send",
    "ServiceWork",
    "address_cap",
    "admit",
    "check_request_head",
    "error_reply",
]

log = logging.getLogger("dsc.http")

#: Bytes per socket read of a request body: large enough for upload throughput, small enough
#: to stay flat (R8).
READ_SIZE = 256 * 1024
#: Bytes per socket read between requests and of a request head.  Python allocates the whole
#: size for every recv() and then shrinks it; 256 KiB comes from mmap() each time: measured,
#: 13.7 us per recv() of a 1.3 KB request against 2.1 us with 64 KiB.
HEAD_READ_SIZE = 64 * 1024
#: Connections over limits.max_connections are answered 503 by at most this many handlers at
#: once (each reads the request head first, so the client gets a real HTTP answer); beyond that
#: they are closed at once, so the rejection path itself stays bounded (R12).
MAX_REJECTING = 16
#: An over-capacity connection gets at most this long to send its request head.
REJECT_HEAD_TIMEOUT = 5.0
#: After a final answer we half-close and read (and drop) what the client still sends, for at
#: most this long / this many bytes: closing with unread data makes the kernel send a reset,
#: and the client may then lose the answer (413 before the body, 503, errors).
#: Seconds in-flight requests get to finish once serving stops (both bindings, `dsc serve`).
DEFAULT_GRACE = 10.0
LINGER_SECONDS = 1.0

LINGER_BYTES = 1024 * 1024


# --- what a binding serves ---------------------------------------------------------------------


# --- actions a binding carries out ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Receive:
    """Read up to ``size`` bytes; give up after ``timeout`` seconds (then ``timed_out()``)."""

    timeout: float
    #: "head" (R12: 30 s to receive a request head), "body" (60 s without progress) or
    #: "idle" (120 s keep-alive).  Informational: the timeout is already computed.
    phase: str
    #: At most this many bytes per read (READ_SIZE for a body, HEAD_READ_SIZE otherwise).
    size: int = HEAD_READ_SIZE


@dataclass(frozen=True, slots=True)
class Send:
    """Write all of ``data``; give up after ``timeout`` seconds (then ``send_failed()``)."""

    data: bytes
    timeout: float


@dataclass(frozen=True, slots=True)
class Call:
    """Run a service call in the core's owner context (the loop; it does no I/O itself) and
    follow the :class:`Wait` chain it may return, waiting for each ticket without blocking
    the loop; report the final result with ``call_done`` (``call_failed`` if it raised)."""

    function: Callable[[], object]


class ServiceWork:
    """The service work of one Call for the current request: open the exchange unless it is
    open, feed the held body pieces in order, then finish it if the body is complete (the
    result is the Reply).  Core calls run in the calling context (the event loop); where the
    service hands I/O to its writer, the call returns a :class:`Wait` whose chain the binding
    follows (awaiting each ticket) to the result."""

    __slots__ = ("chunks", "fed", "finish", "opened", "opener", "request", "steps")

    def __init__(
        self,
        opener: Callable[[], RequestLike] | None,
        request: RequestLike | None,
        chunks: list[bytes],
        finish: bool,
    ) -> None:
        self.opener = opener
        #: The service request; set as soon as this Call opened it, so that it is aborted even
        #: if a later step of the same Call raises.
        self.request = request
        self.opened = request is None
        self.chunks = chunks
        self.fed = bool(chunks)
        self.finish = finish
        self.steps: Generator[Ticket, None, object] | None = None

    @property
    def what(self) -> str:
        """For the log: the service calls this Call makes ("open+feed+finish", ...); built
        only when a failure is logged (per call it was ~1 us of each request, issue 20)."""
        return "+".join(
            step
            for step, used in (("open", self.opened), ("feed", self.fed), ("finish", self.finish))
            if used
        )

    def __call__(self) -> object:
        # The usual case runs straight through (no store I/O to wait for); generators take
        # over only from the first Wait (profiled: they were ~2 us of each small request).
        request = self.request
        if request is None:
            assert self.opener is not None
            request = self.request = self.opener()
        chunks, self.chunks = self.chunks, []
        for index, chunk in enumerate(chunks):
            fed = request.feed(chunk)
            if isinstance(fed, Wait):
                self.steps = self._rest(request, fed, chunks[index + 1 :], finished=False)
                return self._advance()
        if not self.finish:
            return None
        finished = request.finish()
        if isinstance(finished, Wait):
            self.steps = self._rest(request, finished, [], finished=True)
            return self._advance()
        return finished

    def _advance(self) -> object:
        assert self.steps is not None
        try:
            ticket = next(self.steps)
        except StopIteration as stop:
            return stop.value
        return Wait(ticket, self._advance)

    def _rest(
        self, request: RequestLike, step: Wait, chunks: list[bytes], *, finished: bool
    ) -> Generator[Ticket, None, object]:
        """From a Wait on: the step it belongs to, then the remaining ``chunks`` and finish."""
        result = yield from _follow(step)
        if finished:
            return result
        for chunk in chunks:
            yield from _follow(request.feed(chunk))
        del chunks
        if not self.finish:
            return None
        return (yield from _follow(request.finish()))


def _follow(step: object) -> Generator[Ticket, None, object]:
    while isinstance(step, Wait):
        yield step.ticket
        step = step.resume()
    return step


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection.  ``linger``: half-close and drain first (see LINGER_SECONDS)."""

    linger: bool


Action = Receive | Send | Call | Close


# --- admission (R12 connection limit, issue 7) ---------------------------------------------------


class Admitted(Protocol):
    """What admission needs to know about an open connection."""

    @property
    def host(self) -> str: ...
    @property
    def reclaimable_since(self) -> float | None:
        """When it became idle, if it is an idle keep-alive connection now; else None."""
        ...

    @property
    def busy(self) -> bool:
        """A request is in progress on it (its head, body or answer), or its TLS handshake."""
        ...


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision about a new connection (:func:`admit`)."""

    admitted: bool
    #: An idle keep-alive connection to close first, to make room.
    reclaim: Admitted | None = None
    #: Why it was refused (the 503's text and the log's), when not admitted.
    refusal: str = ""


def address_cap(limits: Limits) -> int:
    """Connections one client address may hold: its share of the limit (at least one)."""
    return max(1, int(limits.max_connections * limits.max_connection_share))


def admit(host: str, connections: Iterable[Admitted], limits: Limits) -> Admission:
    """Decide about a new connection from ``host`` (the one rule of both bindings).

    At this address's share (``address_cap``) its own longest-idle connection is reclaimed.
    An address with a request in progress may not take the last ``reserved_slots`` of
    ``max_connections`` (issue 14, lockouts: a few addresses with slow requests held every
    slot); an address with none may, up to the limit.  At the limit that applies, the
    longest-idle connection of all is reclaimed; only when there is none to reclaim is the
    new connection refused (503).  So idle keep-alive connections never lock scanners out,
    one address cannot take every slot, and busy addresses leave room for new clients.
    """
    total = mine = busy_mine = 0
    oldest: Admitted | None = None
    oldest_mine: Admitted | None = None
    for connection in connections:
        total += 1
        own = connection.host == host
        mine += own
        since = connection.reclaimable_since
        if since is None:
            busy_mine += own and connection.busy
            continue
        if oldest is None or since < (oldest.reclaimable_since or 0.0):
            oldest = connection
        if own and (oldest_mine is None or since < (oldest_mine.reclaimable_since or 0.0)):
            oldest_mine = connection
    cap = address_cap(limits)
    if mine >= cap:
        if oldest_mine is not None:
            return Admission(True, oldest_mine)
        return Admission(
            False,
            refusal=f"The client {host} holds {mine} connections, its share of the "
            f"{limits.max_connections} ([limits] max_connection_share = "
            f"{limits.max_connection_share}); retry later.",
        )
    reserved = reserved_slots(limits.max_connections, limits) if busy_mine else 0
    if total >= limits.max_connections - reserved:
        if oldest is not None:
            return Admission(True, oldest)
        if total < limits.max_connections:
            return Admission(
                False,
                refusal=f"The last {reserved} of the {limits.max_connections} connections are "
                f"kept for clients with no request in progress, and the client {host} has "
                f"{busy_mine} ([limits] new_client_share = {limits.new_client_share}); "
                "retry later.",
            )
        return Admission(
            False,
            refusal=f"Every one of the {limits.max_connections} connections is in use "
            "([limits] max_connections); retry later.",
        )
    return Admission(True)


# --- answers ---------------------------------------------------------------------------------

#: The statuses of a Response that h11 frames by its Content-Length (it refuses a Response
#: outside 200-999; 204 and 304 have no content, RFC 9110 6.4.1): only these may be written
#: by response_head, the others go through h11.
_LENGTH_FRAMED = frozenset(range(200, 1000)) - {204, 304}


def response_head(status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The status line and header block of an answer, byte for byte as h11 writes them
    (h11/_writers.py write_any_response, write_headers: no Host in an answer, names as
    given), for :meth:`HttpConnection._respond`'s usual answer.  ``headers`` are the
    server's own (.request_rules.reply_headers), one Content-Length among them."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status))]
    lines += [b"%s: %s\r\n" % header for header in headers]
    lines.append(b"\r\n")
    return b"".join(lines)


@functools.lru_cache(maxsize=256)
def _plain_answer_head(status: int, content_type: str, length: int) -> bytes:
    """:func:`response_head` of an answer without headers of its own (extra ones carry
    cookies and ETags: never kept here), kept for the next answer of the same shape."""
    return response_head(status, header_fields(status, content_type, length))


# --- request-head rules -------------------------------------------------------------------------


#: A Content-Length header line whose value is a number too long for h11 (20+ digits).
_HUGE_CONTENT_LENGTH = re.compile(
    rb"\r?\ncontent-length[ \t]*:[ \t]*0*([1-9][0-9]{19,})[ \t]*\r?\n", re.IGNORECASE
)


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:  # h11 lower-cases header names
            return bytes(value)
    return None


def check_request_head(request: h11.Request, limits: Limits) -> Rejection | None:
    """405 for anything but POST (every SOAP operation is a POST, R1; the read-only GET
    endpoints of .statuspage are answered before this check); 413 when the declared
    Content-Length exceeds max_image_bytes + max_envelope_bytes (R12), before the body is read
    (and before any 100 Continue)."""
    return check_head(request.method, _header(request, b"content-length"), limits)


# --- the connection driver ------------------------------------------------------------------------

Phase = Literal["head", "idle", "body", "respond", "closed"]


class HttpConnection:
    """One server connection: h11 plus the project's HTTP rules, without I/O (module doc)."""

    def __init__(
        self,
        site: Site,
        limits: Limits,
        *,
        identity: str | None = None,
        peer: Peer = UNKNOWN_PEER,
        over_capacity: str | None = None,
        unusable_certificate: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: What each request head gets (shared with the ASGI app).
        self._rules = RequestRules(site, limits)
        self._limits = limits
        self._identity = identity
        #: Why the verified client certificate names no user (.certidentity): every request
        #: on this connection is then refused, never served as an anonymous one.
        self._unusable_certificate = unusable_certificate
        self._peer = peer
        #: Why admission refused this connection (:class:`Admission`): every request on it
        #: gets 503 with this text.
        self._over_capacity = over_capacity
        self._clock = clock
        self._h11 = self._new_h11()
        self._pending: deque[Action] = deque()
        #: The open service request of the current exchange.
        self._request: RequestLike | None = None
        #: Opens it: set for an accepted request head until the first Call (see module doc).
        self._opener: Callable[[], RequestLike] | None = None
        #: Body pieces received and not yet given to the service, and their total size.
        self._held: list[bytes] = []
        self._held_bytes = 0
        #: The Call in flight (its result is the Reply when it finishes the request).
        self._calling: ServiceWork | None = None
        self._phase: Phase = "head"
        head_timeout = limits.head_timeout
        if over_capacity is not None:
            head_timeout = min(head_timeout, REJECT_HEAD_TIMEOUT)
        self._head_timeout = head_timeout
        self._head_deadline = clock() + head_timeout
        self._idle_receive = Receive(limits.idle_timeout, "idle")
        self._draining = False
        #: RFC 9112 §6.1: the current request had both Transfer-Encoding and Content-Length;
        #: it is answered (framed by Transfer-Encoding alone, as h11 does) and then the
        #: connection is closed, so no request smuggled behind it is read.
        self._close_after_answer = False
        #: The first bytes of the request head being received, as given to h11: h11 refuses a
        #: Content-Length of more than 20 digits with a bare "bad Content-Length", after which
        #: only this copy can tell that the answer is 413 like any other over-limit length.
        self._head_copy = bytearray()
        #: Received bytes not yet given to h11 (see _feed: h11's own header limit only holds
        #: for heads that arrive in pieces, so a head is fed to it in bounded slices).
        self._backlog = bytearray()
        self._eof = False
        self._eof_fed = False
        self._requests = 0
        #: When the connection last became idle (clock()): the longest-idle one is reclaimed
        #: first at the connection limit.
        self.idle_since = clock()
        self._observer = site.observer
        #: The current request is a HEAD: its answer has the head of the GET answer, no body.
        self._head_only = False
        #: The current request is a GET of a web endpoint answered by a Call (.observe.web.StatusRequest).
        self._web_answer = False
        self._counted = self._observer is not None
        if self._observer is not None:
            self._observer.connection_opened()

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(
            h11.SERVER, max_incomplete_event_size=self._limits.max_http_header_bytes
        )

    # --- state a binding may look at ---------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Between requests (or before the first) with nothing of the next one received: the
        connection may be closed at once when the server stops."""
        if self._backlog:
            return False
        return self._phase == "idle" or (
            self._phase == "head" and self._requests == 0 and not self._h11.trailing_data[0]
        )

    @property
    def busy(self) -> bool:
        """It holds its slot for a request: from its start (a new connection is busy until
        its first request is answered, whether or not a byte arrived: the binding may not
        have read it yet) until the answer, and again from the next request's first byte;
        not between requests, nor once its answer is out (an answer given at the head, to a
        GET, leaves the request's end to read).  Admission keeps slots for addresses with none
        busy (issue 14)."""
        return self._phase not in ("idle", "closed") and self._h11.our_state is not h11.DONE

    @property
    def draining(self) -> bool:
        return self._draining

    # --- inputs ---------------------------------------------------------------------------------

    def next_action(self) -> Action:
        while not self._pending:
            if self._calling is not None:
                raise RuntimeError("next_action() while a Call is running (call_done first)")
            self._step()
        return self._pending.popleft()

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the socket; ``b""`` is EOF."""
        if self._phase == "closed" or self._eof:
            return
        if not data:
            self._eof = True
            return
        if self._phase == "idle":
            # The next request begins: R12 head timeout from its first byte.
            self._phase = "head"
            self._head_deadline = self._clock() + self._head_timeout
            if len(data) <= self._limits.max_http_header_bytes + 1:
                # Idle, so h11's buffer, the backlog and the head's copy are empty: _feed
                # would give h11 all of it in one slice (as many bytes as its head limit
                # admits, and one more), and copy it as the head's first bytes.
                self._head_copy += data
                self._h11.receive_data(data)
                return
        if not self._backlog and self._h11.their_state is not h11.IDLE:
            self._h11.receive_data(data)  # body bytes: straight through, no copy
        else:
            self._backlog += data

    def timed_out(self) -> None:
        if self._draining and self.idle:
            log.debug("%s: closing an idle connection at shutdown", self._peer)
        elif self._phase == "idle":
            log.info(
                "%s: idle keep-alive timeout (%.1f s): closing",
                self._peer,
                self._limits.idle_timeout,
            )
        elif self._phase == "body":
            log.warning(
                "%s: no body progress for %.1f s: closing (exchange aborted)",
                self._peer,
                self._limits.body_timeout,
            )
        else:
            log.warning(
                "%s: request head not received within %.1f s: closing",
                self._peer,
                self._head_timeout,
            )
        self._close(False)

    def reclaimed(self) -> None:
        """The binding closed this idle keep-alive connection to admit a new one (the
        connection limit, or this address's share of it: Limits.max_connection_share)."""
        log.info("%s: idle keep-alive connection reclaimed for a new one: closing", self._peer)
        self._close(False)

    def send_failed(self) -> None:
        log.info("%s: sending failed (client gone or too slow): closing", self._peer)
        self._h11.send_failed()
        self._close(False)

    def call_done(self, result: object) -> None:
        work, self._calling = self._calling, None
        if work is None:
            return
        self._request = work.request
        if work.finish:
            assert isinstance(result, Reply)
            self._request = None
            web, self._web_answer = self._web_answer, False
            self._respond(result, extra=self._rules.reply_extra(result, web))

    def call_failed(self, exc: BaseException) -> None:
        """A service call raised (a bug: the service answers faults, never raises)."""
        work, self._calling = self._calling, None
        what = "?"
        if work is not None:
            what = work.what
            self._request = work.request  # opened (even by this Call): cleanup aborts it
        log.error("%s: service %s call failed: %r", self._peer, what, exc, exc_info=exc)
        self._respond(error_reply(500, "The server failed to process the request."), close=True)

    def drain(self) -> None:
        """The server stops: finish the request in progress, then close; close at once if idle
        (the binding interrupts an idle Receive and reports ``timed_out``)."""
        self._draining = True

    def cleanup(self) -> Callable[[], object] | None:
        """Call when the connection is closed, however that happened.  Returns a call that
        aborts a started exchange (R12: a lost or timed-out upload leaves no debris; run it
        like a Call's function, following its Wait), or None.  Idempotent."""
        self._phase = "closed"
        if self._counted and self._observer is not None:
            self._counted = False
            self._observer.connection_closed()
        request, self._request = self._request, None
        if request is None and self._calling is not None:
            request = self._calling.request  # a Call whose outcome was never reported
        self._calling = None
        self._opener = None
        self._held, self._held_bytes = [], 0
        if request is None:
            return None
        log.debug("%s: aborting an unfinished exchange", self._peer)
        return request.abort

    # --- the engine ---------------------------------------------------------------------------

    def _step(self) -> None:
        if self._phase == "closed":
            self._pending.append(Close(False))
            return
        if self._phase in ("idle", "head") and self._draining and self.idle:
            self._close(False)
            return
        if self._phase == "head" and self._clock() >= self._head_deadline:
            self.timed_out()
            return
        if self._phase == "idle" and not self._backlog and not self._eof:
            # Between requests with nothing received: h11 would only say NEED_DATA (its
            # buffer is empty, _after_cycle checked), so wait for the next request at once.
            self._pending.append(self._idle_receive)
            return
        self._take_events()

    def _take_events(self) -> None:
        """Feed h11 and act on its events until one asks for an action (the request's body
        is taken in the same step as its head: each step's checks above are about a head)."""
        while True:
            self._feed()
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            # By exact type, as h11 itself tells its events apart: its events derive from an
            # ABC, and an isinstance() that fails goes through ABCMeta (3 per request, issue 20).
            if event is h11.NEED_DATA:
                self._need_data()
            elif event is h11.PAUSED:
                self._after_cycle()
            elif type(event) is h11.Request:
                self._on_request(event)
                if not self._pending:
                    continue  # accepted: its body next (phase "body")
            elif type(event) is h11.Data:
                if self._exchange_pending:
                    data = bytes(event.data)
                    if data:
                        self._held.append(data)  # given to the service at the latest before
                        self._held_bytes += len(data)  # the next read, unless small (module doc)
                # else: the body of a refused request we chose to read to keep the connection
                continue
            elif type(event) is h11.EndOfMessage:
                if self._exchange_pending:
                    self._phase = "respond"
                    self._call(finish=True)
                else:
                    self._after_cycle()
            elif type(event) is h11.ConnectionClosed:
                self._close(False)
            else:  # pragma: no cover - h11 has no other server-side events
                self._close(False)
            return

    def _need_data(self) -> None:
        """h11 has no event without more bytes: give it what is received, hand the held body
        to the service, say 100 Continue, or wait for the client."""
        if self._backlog or (self._eof and not self._eof_fed):
            return  # more of what was received goes to h11 at the next step
        if self._held and (
            self._request is not None or self._held_bytes > self._limits.max_envelope_bytes
        ):
            # What was received goes to the service before we wait for more (R8), in one
            # Call (which opens the exchange first if needed).
            self._call(finish=False)
        elif self._eof_fed:  # h11 raises for EOF mid-event; this is EOF between events
            self._close(False)
        elif (
            self._phase == "body"
            and self._exchange_pending
            and self._h11.they_are_waiting_for_100_continue
        ):
            # Only reached for an accepted head (R12 checks first); the exchange itself
            # opens with the first Call.
            self._send(
                h11.InformationalResponse(
                    status_code=100, headers=self._headers(), reason=b"Continue"
                )
            )
        else:
            self._pending.append(self._receive())

    @property
    def _exchange_pending(self) -> bool:
        """An accepted request is being received: its exchange is open or yet to open."""
        return self._request is not None or self._opener is not None

    def _call(self, *, finish: bool) -> None:
        """One Call for everything the current request needs now (see module doc)."""
        work = ServiceWork(self._opener, self._request, self._held, finish)
        self._opener = None
        self._held, self._held_bytes = [], 0
        self._calling = work
        self._pending.append(Call(work))

    def _feed(self) -> None:
        """Give h11 what was received.  While it waits for a request head, at most enough to
        fill its buffer to max_http_header_bytes + 1: h11 parses a complete head of any size
        that arrives in one piece, and raises its 431 only for an incomplete one, so feeding
        in bounded slices makes the R12 limit hold however the bytes arrive."""
        if self._backlog:
            if self._h11.their_state is h11.IDLE:
                buffered = len(self._h11.trailing_data[0])
                room = max(1, self._limits.max_http_header_bytes + 1 - buffered)
                chunk = bytes(self._backlog[:room])
                del self._backlog[:room]
                keep = self._limits.max_http_header_bytes + 1 - len(self._head_copy)
                if keep > 0:
                    self._head_copy += chunk[:keep]
            else:
                chunk = bytes(self._backlog)
                self._backlog.clear()
            self._h11.receive_data(chunk)
        elif self._eof and not self._eof_fed:
            self._eof_fed = True
            self._h11.receive_data(b"")

    def _receive(self) -> Receive:
        if self._phase == "body":
            return Receive(self._limits.body_timeout, "body", READ_SIZE)
        if self._phase == "idle":
            return self._idle_receive
        return Receive(max(0.001, self._head_deadline - self._clock()), "head")

    def _on_request(self, request: h11.Request) -> None:
        self._requests += 1
        self._phase = "body"
        self._head_copy.clear()
        self._head_only = request.method == b"HEAD"
        head = RequestHead.parse(
            request.method, request.target.decode("ascii", "replace"), request.headers
        )
        if head.transfer_encoding is not None and head.content_length is not None:
            log.warning(
                "%s: request with both Transfer-Encoding and Content-Length: answered, then "
                "the connection is closed (RFC 9112 6.1)",
                self._peer,
            )
            self._close_after_answer = True
        self._opener, self._held, self._held_bytes = None, [], 0
        if self._over_capacity is not None:
            log.warning("%s: refused with 503: %s", self._peer, self._over_capacity)
            self._rules.refused(503)
            self._respond(
                error_reply(503, self._over_capacity),
                close=True,
                extra=(("Retry-After", "1"),),
            )
            return
        decision = self._rules.decide(head, self._identity, self._peer, self._unusable_certificate)
        if isinstance(decision, Answered):
            # A body is not read after an answer at the head: close after it, unless none.
            self._respond(decision.reply, close=head.has_body, extra=decision.headers)
            return
        # Opened by the first Call this request needs (coalescing: module doc).
        self._opener = decision.opener
        self._web_answer = decision.web

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint or 400
        if self._eof_fed:
            # The client closed in the middle of a request: nobody is left to answer.
            log.info("%s: connection closed mid-request", self._peer)
            self._close(False)
            return
        huge = _HUGE_CONTENT_LENGTH.search(bytes(self._head_copy))
        if status == 431:
            message = (
                f"The request head exceeds the limit of {self._limits.max_http_header_bytes} bytes."
            )
        elif huge is not None and self._phase in ("head", "idle"):
            # R12: an over-limit length is 413, however many digits it has (h11 stops at 20).
            status = 413
            message = (
                f"The declared request body (a {len(huge.group(1))}-digit Content-Length) "
                f"exceeds the limit of {max_request_bytes(self._limits)} bytes"
                f"{body_limit_setting(self._limits)}."
            )
        else:
            message = f"Malformed HTTP request: {exc}"
        log.warning("%s: %d: %s", self._peer, status, message)
        self._rules.refused(status)
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._respond(error_reply(status, message), close=True)
        else:
            self._close(False)

    def _headers(self, extra: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, str]]:
        return [("Server", SERVER_NAME), *extra]

    def _respond(
        self, reply: Reply, *, close: bool = False, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self._close(False)
            return
        close = close or self._draining or self._close_after_answer
        if (
            not close
            and reply.status in _LENGTH_FRAMED
            and self._h11.their_state is h11.DONE
            and self._h11.our_state is h11.SEND_RESPONSE
        ):
            # The usual answer: the whole request is in, the connection stays open, and the
            # answer is framed by its Content-Length.  h11 would only write these bytes and
            # move both sides to DONE; sending its three events and starting its next cycle
            # was ~15 us of a small request (issue 20), a fresh h11 connection is <1 us.
            # Everything else (closing, 204/304, an answer before the request's end)
            # still goes through h11 below.
            if extra:
                data = response_head(reply.status, reply_headers(reply, extra))
            else:  # SOAP's answers: a few shapes, over and over
                data = _plain_answer_head(reply.status, reply.content_type, len(reply.body))
            if not self._head_only:  # the answer to a HEAD is the GET answer's head alone
                data += reply.body
            self._pending.append(Send(data, self._limits.body_timeout))
            self._next_cycle(fresh=True)
            return
        # Every header name and value here is the server's own (never a client's bytes), so
        # h11's validation regexes are skipped (profiled: about 4% of a small request's CPU).
        headers = reply_headers(reply, extra)
        if close:
            headers.append((b"Connection", b"close"))
        try:
            data = self._h11.send(
                h11.Response(
                    status_code=reply.status,
                    headers=headers,
                    reason=reason(reply.status),
                    _parsed=True,
                )
            )
            if not self._head_only:  # h11 frames the answer to a HEAD as bodiless
                data = (data or b"") + (self._h11.send(h11.Data(data=reply.body)) or b"")
            data = (data or b"") + (self._h11.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError as exc:  # pragma: no cover - a bug here
            log.error("%s: cannot send the answer: %s", self._peer, exc)
            self._close(False)
            return
        self._pending.append(Send(data, self._limits.body_timeout))
        self._after_cycle()

    def _send(self, event: h11.InformationalResponse) -> None:
        data = self._h11.send(event)
        if data:
            self._pending.append(Send(data, self._limits.body_timeout))

    def _after_cycle(self) -> None:
        """After our answer (or the end of a refused request): keep alive or close."""
        ours, theirs = self._h11.our_state, self._h11.their_state
        if (
            ours is h11.MUST_CLOSE
            or ours is h11.CLOSED
            or theirs in (h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)
        ):
            self._close(True)
        elif ours is h11.DONE and theirs is h11.DONE:
            self._next_cycle(fresh=False)
        elif ours is h11.DONE:
            # We answered early (a refused head without a body): read the request's end.
            self._phase = "body"
        # else: still waiting for our answer (cannot happen: we answer in one piece)

    def _next_cycle(self, *, fresh: bool) -> None:
        """Keep alive: wait for the next request.  ``fresh``: our answer was written without
        h11 (see _respond), so the next request goes to a new h11 connection, given what
        the old one had received past this request (pipelined bytes, EOF): what h11's own
        start_next_cycle would have left it with."""
        if fresh:
            held, closed = self._h11.trailing_data
            self._h11 = self._new_h11()
            if held:
                self._h11.receive_data(held)
            if closed:
                self._h11.receive_data(b"")
        else:
            self._h11.start_next_cycle()
            held = self._h11.trailing_data[0]
        self._head_only = False
        # What h11 already holds of the next request starts the next head's copy.
        self._head_copy = bytearray(held[: self._limits.max_http_header_bytes + 1])
        self._phase = "head" if held else "idle"
        self.idle_since = now = self._clock()
        self._head_deadline = now + self._head_timeout

    def _close(self, linger: bool) -> None:
        self._phase = "closed"
        self._pending.append(Close(linger))
