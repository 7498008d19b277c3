"""The sans-IO half of the HTTP bindings: ``http/driver.py`` fed bytes by hand, no socket.

``HttpConnection`` is driven with a recording service, so that the Calls it asks for (and what
it holds between reads) are visible: the coalesced service calls (one hop per small request).
``admit`` decides about a new connection from a list of the open ones (R12's connection limit,
issue 7; the reserve for new clients, issue 14).  The same paths over real sockets, on both
bindings, are in test_http_bindings.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import h11
import pytest

from dsc_bindings.http.driver import Call, Close, HttpConnection, Receive, Send, address_cap, admit
from dsc_bindings.http.request_rules import reason, reply_headers
from dsc_bindings.http.site import Site
from dsc_core import Limits, Reply, names
from dsc_core import client as C
from dsc_core.config import max_request_bytes, reserved_slots

# --- coalesced service calls -------------------------------------------------------------------


class _RecordingService:
    """Logs every service call; ``fail_feed`` makes feed raise (a bug in the service)."""

    def __init__(self, *, fail_feed: bool = False) -> None:
        self.log: list[tuple[str, bytes]] = []
        self.fail_feed = fail_feed

    def open_request(
        self, content_type: str | None, identity: str | None, path: str, peer: str | None = None
    ) -> _RecordingRequest:
        self.log.append(("open", (content_type or "").encode()))
        return _RecordingRequest(self)

    def fed(self) -> bytes:
        return b"".join(data for what, data in self.log if what == "feed")

    def calls(self) -> list[str]:
        return [what for what, _ in self.log]


class _RecordingRequest:
    def __init__(self, service: _RecordingService) -> None:
        self.service = service

    def feed(self, data: bytes) -> None:
        self.service.log.append(("feed", data))
        if self.service.fail_feed:
            raise RuntimeError("feed failed (injected)")

    def finish(self) -> Reply:
        self.service.log.append(("finish", b""))
        return Reply(200, C.SOAP_XML, b"<ok/>")

    def abort(self) -> None:
        self.service.log.append(("abort", b""))


def _drive(
    conn: HttpConnection,
    service: _RecordingService,
    reads: list[bytes],
    *,
    head_bytes: int,
    bound: int,
) -> list[str]:
    """Run ``conn`` over ``reads`` (one per Receive; the first ``head_bytes`` bytes are the
    request head), Calls inline, until it wants to read with nothing left to give, or closes.
    Checks at every Receive that at most ``bound`` received body bytes are held back from the
    service, and none once the exchange is open.  Returns the actions taken."""
    trace: list[str] = []
    received = 0
    reads = list(reads)
    start = len(service.log)
    while True:
        action = conn.next_action()
        if isinstance(action, Receive):
            body_received = max(0, received - head_bytes)
            held = body_received - sum(
                len(data) for what, data in service.log[start:] if what == "feed"
            )
            assert 0 <= held <= bound, (held, bound)
            if "open" in service.calls()[start:]:
                assert held == 0, held
            if not reads:
                return trace
            trace.append("receive")
            data = reads.pop(0)
            received += len(data)
            conn.receive_data(data)
        elif isinstance(action, Call):
            before = len(service.log)
            try:
                result = action.function()
            except Exception as exc:
                trace.append("call:" + "+".join(service.calls()[before:]) + ":raised")
                conn.call_failed(exc)
            else:
                trace.append("call:" + "+".join(service.calls()[before:]))
                conn.call_done(result)
        elif isinstance(action, Send):
            trace.append("send:" + action.data.split(b" ", 2)[1].decode())
        else:
            assert isinstance(action, Close)
            trace.append("close")
            return trace


def _head(length: int, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    """A POST head with this Content-Length (and ``extra`` headers), as a scanner sends it."""
    lines = ["POST /ScanServer HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {C.SOAP_XML}"]
    lines += [f"Content-Length: {length}", *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def repository_request() -> bytes:
    return C.envelope(
        names.Action.DSC_GET_REPOSITORY_ELEMENTS,
        C.repository_elements_request(["RepositoryStatus", "RepositoryConfiguration"]),
        message_id="urn:uuid:5c0b2c1e-0000-4000-8000-000000000001",
    )


def test_sansio_small_body_is_one_call() -> None:
    """Open, every feed and finish of a body within max_envelope_bytes: ONE Call, at its end,
    with the pieces fed as they were received."""
    limits = Limits()
    body = repository_request()
    head = _head(len(body))
    service = _RecordingService()
    conn = HttpConnection(Site(service), limits)
    reads = [head + body[:100], body[100:500], body[500:]]
    trace = _drive(conn, service, reads, head_bytes=len(head), bound=limits.max_envelope_bytes)
    assert trace == ["receive", "receive", "receive", "call:open+feed+feed+feed+finish", "send:200"]
    assert service.fed() == body
    # Keep-alive: the next request (and an empty body) is one Call as well.
    trace = _drive(
        conn, service, [_head(0)], head_bytes=len(_head(0)), bound=limits.max_envelope_bytes
    )
    assert trace == ["receive", "call:open+finish", "send:200"]
    assert conn.cleanup() is None


@pytest.mark.parametrize("size", ["at", "over"])
def test_sansio_coalescing_bound(size: str) -> None:
    """A body of exactly max_envelope_bytes arriving in pieces is held and handled in one Call;
    one byte more, and the Call that crosses the bound opens and feeds what was held, after
    which every read is fed before the next (the last one together with finish)."""
    limits = Limits(max_envelope_bytes=1000)
    bound = limits.max_envelope_bytes
    length = bound + (size == "over")
    body = bytes(range(256)) * 4 + b"tail"
    body = body[:length] + b"x" * 300  # 300 more bytes arrive in two reads after the bound
    head = _head(len(body))
    service = _RecordingService()
    conn = HttpConnection(Site(service), limits)
    reads = [head, body[:400], body[400:length], body[length : length + 150], body[length + 150 :]]
    trace = _drive(conn, service, reads, head_bytes=len(head), bound=bound)
    if size == "at":
        # The first 1000 bytes are held; the 150 after them cross the bound.
        assert trace == ["receive"] * 4 + [
            "call:open+feed+feed+feed",
            "receive",
            "call:feed+finish",
            "send:200",
        ]
    else:
        assert trace == ["receive"] * 3 + [
            "call:open+feed+feed",
            "receive",
            "call:feed",
            "receive",
            "call:feed+finish",
            "send:200",
        ]
    assert service.fed() == body
    assert service.calls().count("open") == 1


def test_sansio_expect_100_before_the_exchange_opens() -> None:
    limits = Limits()
    body = repository_request()
    service = _RecordingService()
    conn = HttpConnection(Site(service), limits)
    head = _head(len(body), [("Expect", "100-continue")])
    trace = _drive(conn, service, [head], head_bytes=len(head), bound=limits.max_envelope_bytes)
    assert trace == ["receive", "send:100"] and service.log == []
    trace = _drive(conn, service, [body], head_bytes=0, bound=limits.max_envelope_bytes)
    assert trace == ["receive", "call:open+feed+finish", "send:200"]
    # A refused head gets its refusal instead of 100 Continue, and no exchange.
    service = _RecordingService()
    conn = HttpConnection(Site(service), limits)
    head = _head(max_request_bytes(limits) + 1, [("Expect", "100-continue")])
    trace = _drive(conn, service, [head], head_bytes=len(head), bound=limits.max_envelope_bytes)
    assert trace == ["receive", "send:413", "close"] and service.log == []


def test_sansio_lost_connection_aborts_only_an_opened_exchange() -> None:
    limits = Limits(max_envelope_bytes=1000)
    body = b"x" * 5000
    head = _head(len(body))
    # Lost while the first bytes are held: no exchange was ever opened, nothing to abort.
    service = _RecordingService()
    conn = HttpConnection(Site(service), limits)
    _drive(conn, service, [head + body[:800]], head_bytes=len(head), bound=1000)
    assert conn.cleanup() is None and service.log == []
    # Lost after the bound was crossed: the opened exchange is aborted (no .part debris).
    service = _RecordingService()
    conn = HttpConnection(Site(service), limits)
    _drive(conn, service, [head + body[:800], body[800:1500]], head_bytes=len(head), bound=1000)
    cleanup = conn.cleanup()
    assert cleanup is not None
    cleanup()
    assert service.calls() == ["open", "feed", "feed", "abort"]
    assert conn.cleanup() is None  # idempotent


def test_sansio_call_failing_after_it_opened_still_aborts() -> None:
    """A service bug in the feed of a coalesced Call: 500 and close, and the exchange that
    Call opened is aborted by cleanup."""
    limits = Limits()
    body = repository_request()
    service = _RecordingService(fail_feed=True)
    conn = HttpConnection(Site(service), limits)
    head = _head(len(body))
    trace = _drive(
        conn, service, [head + body], head_bytes=len(head), bound=limits.max_envelope_bytes
    )
    assert trace == ["receive", "call:open+feed:raised", "send:500", "close"]
    cleanup = conn.cleanup()
    assert cleanup is not None
    cleanup()
    assert service.calls() == ["open", "feed", "abort"]


# --- the usual answer, written without h11 ------------------------------------------------------


class _Answering:
    """A service whose every request is answered with the next of ``replies``."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies

    def open_request(
        self, content_type: str | None, identity: str | None, path: str, peer: str | None = None
    ) -> _Answering:
        return self

    def feed(self, data: bytes) -> None:
        pass

    def finish(self) -> Reply:
        return self.replies.pop(0)

    def abort(self) -> None:
        raise AssertionError("nothing to abort: every request was answered")


def _as_h11_writes(request: bytes, reply: Reply) -> bytes:
    """The answer to ``request`` as h11 itself writes it (its events, its header checks)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request)
    while type(conn.next_event()) is not h11.EndOfMessage:
        pass
    headers = [(bytes(k), bytes(v)) for k, v in reply_headers(reply)]
    data = conn.send(
        h11.Response(status_code=reply.status, headers=headers, reason=reason(reply.status))
    )
    data += conn.send(h11.Data(data=reply.body)) + conn.send(h11.EndOfMessage())
    assert conn.our_state is h11.DONE and conn.their_state is h11.DONE  # kept alive
    return data


def test_kept_alive_answers_are_the_bytes_h11_writes_and_pipelined_requests_follow() -> None:
    """Issue 20: an answer that keeps the connection open is written by the driver itself
    (h11 would only have framed it by its Content-Length); the bytes are h11's own, for
    any status and length, and the requests pipelined behind it (in the same read, and one
    whose head is split across reads) are answered in order on the fresh h11 connection,
    which still closes on EOF."""
    replies = [
        Reply(200, C.SOAP_XML, repository_request()),
        Reply(500, C.SOAP_XML, b"<fault/>" * 50),
        Reply(400, "text/plain; charset=utf-8", b""),
        Reply(299, C.SOAP_XML, b"x"),  # no reason phrase: h11 writes "299 " too
        Reply(200, C.SOAP_XML, b"<ok/>"),  # the first one's status and type, its own length
        Reply(500, C.SOAP_XML, b"<fault/>" * 50),  # the second one's shape again
    ]
    bodies = [b"a" * 10, b"", b"c" * 70000, b"d", b"e", b"f"]
    requests = [_head(len(body)) + body for body in bodies]
    expected = [_as_h11_writes(r, reply) for r, reply in zip(requests, replies, strict=True)]
    conn = HttpConnection(Site(_Answering(list(replies))), Limits())
    stream = b"".join(requests)
    split = len(requests[0]) + len(requests[1]) + 20  # inside the third request's head
    reads = [stream[:split], stream[split:], b""]
    sent: list[bytes] = []
    while True:
        action = conn.next_action()
        if isinstance(action, Receive):
            conn.receive_data(reads.pop(0))
        elif isinstance(action, Call):
            conn.call_done(action.function())
        elif isinstance(action, Send):
            sent.append(action.data)
        else:
            assert isinstance(action, Close)
            break
    assert sent == expected
    assert reads == []  # every read was taken: the close came from the EOF
    assert conn.cleanup() is None


def _statuses(conn: HttpConnection, reads: list[bytes]) -> list[int]:
    """The statuses ``conn`` answers over ``reads`` (one per Receive), until it closes or
    wants to read with nothing left to give."""
    statuses: list[int] = []
    while True:
        action = conn.next_action()
        if isinstance(action, Receive):
            if not reads:
                return statuses
            conn.receive_data(reads.pop(0))
        elif isinstance(action, Call):
            conn.call_done(action.function())
        elif isinstance(action, Send):
            statuses.append(int(action.data.split(b" ", 2)[1]))
        else:
            assert isinstance(action, Close)
            return statuses


@pytest.mark.parametrize("first", [True, False], ids=["first request", "after a kept-alive one"])
@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("over the limit in one read", 431),
        ("limit+1 bytes, unfinished", 431),
        ("trickled over the limit", 431),
        ("a 25-digit Content-Length", 413),
        ("at the limit", 200),
    ],
)
def test_every_request_head_meets_the_header_limit(first: bool, case: str, status: int) -> None:
    """R12: the next request on a kept-alive connection (whose first read goes straight to
    h11 when it fits the head limit, issue 20) is held to max_http_header_bytes and to the
    413 of an over-long Content-Length exactly as a connection's first request."""
    limits = Limits(max_http_header_bytes=4096)
    limit = limits.max_http_header_bytes
    body = repository_request()
    head = {
        "over the limit in one read": _head(0, [("X-Filler", "a" * 8000)]),
        "limit+1 bytes, unfinished": _head(0, [("X-Filler", "a" * 8000)])[: limit + 1],
        "trickled over the limit": _head(0, [("X-Filler", "a" * 8000)]),
        "a 25-digit Content-Length": _head(0).replace(b"Length: 0", b"Length: " + b"9" * 25),
        "at the limit": b"",
    }[case]
    if case == "at the limit":
        head = _head(len(body), [("X-Filler", "")])
        head = _head(len(body), [("X-Filler", "b" * (limit - len(head)))])
        assert len(head) == limit
        head += body
    reads = (
        [head[i : i + 1000] for i in range(0, len(head), 1000)] if "trickled" in case else [head]
    )
    answered = [] if first else [_head(len(body)) + body]
    conn = HttpConnection(Site(_Answering([Reply(200, C.SOAP_XML, b"<ok/>")] * 2)), limits)
    assert _statuses(conn, answered + reads) == [200] * len(answered) + [status]


# --- admit(): who gets a connection ------------------------------------------------------------

#: 10 connections; one address may hold 5 of them; the last 2 are kept for addresses with no
#: request in progress.
LIMITS = Limits(max_connections=10, max_connection_share=0.5, new_client_share=0.2)


@dataclass(frozen=True, slots=True)
class Conn:
    """An open connection as admission sees it (driver.Admitted)."""

    host: str
    #: When it became idle, for an idle keep-alive connection; else None.
    reclaimable_since: float | None = None
    busy: bool = False


def idle(host: str, since: float) -> Conn:
    return Conn(host, reclaimable_since=since)


def busy(host: str) -> Conn:
    return Conn(host, busy=True)


def test_the_limits_of_these_tests() -> None:
    assert address_cap(LIMITS) == 5
    assert reserved_slots(LIMITS.max_connections, LIMITS) == 2
    assert address_cap(Limits(max_connections=1)) == 1  # never below one


def test_admitted_while_under_every_limit() -> None:
    decision = admit("10.0.0.1", [busy("10.0.0.2"), idle("10.0.0.3", 5.0)], LIMITS)
    assert decision.admitted and decision.reclaim is None and decision.refusal == ""
    assert admit("10.0.0.1", [], LIMITS).admitted


def test_at_its_share_an_address_gives_up_its_own_longest_idle_connection() -> None:
    """Not another address's, even an older one: its share is its own business."""
    others = [idle("10.0.0.9", 1.0)]
    mine = [busy("10.0.0.1"), busy("10.0.0.1"), idle("10.0.0.1", 7.0), idle("10.0.0.1", 3.0)]
    mine.append(idle("10.0.0.1", 5.0))
    decision = admit("10.0.0.1", others + mine, LIMITS)
    assert decision.admitted and decision.reclaim == idle("10.0.0.1", 3.0)


def test_at_its_share_with_nothing_idle_an_address_is_refused_naming_the_setting() -> None:
    decision = admit("10.0.0.1", [busy("10.0.0.1")] * 5 + [idle("10.0.0.9", 1.0)], LIMITS)
    assert not decision.admitted and decision.reclaim is None
    assert "10.0.0.1 holds 5 connections" in decision.refusal
    assert "max_connection_share = 0.5" in decision.refusal


def test_at_the_limit_the_longest_idle_connection_of_all_is_reclaimed() -> None:
    """A newcomer holding nothing may use the kept slots; at the limit itself, the idle
    connection that waited longest makes room, whoever holds it."""
    held = [busy(f"10.0.0.{n}") for n in range(2, 9)] + [idle("10.0.1.1", 4.0)]
    held.append(idle("10.0.1.2", 2.0))
    held.append(idle("10.0.1.3", 6.0))
    assert len(held) == LIMITS.max_connections
    decision = admit("10.0.0.1", held, LIMITS)
    assert decision.admitted and decision.reclaim == idle("10.0.1.2", 2.0)


def test_at_the_limit_with_nothing_idle_a_newcomer_is_refused_naming_the_setting() -> None:
    held = [busy(f"10.0.0.{n}") for n in range(2, 12)]
    decision = admit("10.0.0.1", held, LIMITS)
    assert not decision.admitted and decision.reclaim is None
    assert "Every one of the 10 connections is in use ([limits] max_connections)" in (
        decision.refusal
    )


def test_the_last_slots_are_kept_for_addresses_with_no_request_in_progress() -> None:
    """Eight connections open (two slots left, both kept): an address with a request in
    progress gets none of them, a newcomer does (issue 14, lockouts)."""
    held = [busy("10.0.0.1")] + [busy(f"10.0.0.{n}") for n in range(2, 9)]
    assert len(held) == LIMITS.max_connections - reserved_slots(LIMITS.max_connections, LIMITS)
    refused = admit("10.0.0.1", held, LIMITS)
    assert not refused.admitted and refused.reclaim is None
    assert "The last 2 of the 10 connections are kept" in refused.refusal
    assert "new_client_share = 0.2" in refused.refusal
    newcomer = admit("10.0.0.99", held, LIMITS)
    assert newcomer.admitted and newcomer.reclaim is None
    # With an idle connection to reclaim, the busy address is admitted in its place.
    held[-1] = idle("10.0.0.8", 1.0)
    decision = admit("10.0.0.1", held, LIMITS)
    assert decision.admitted and decision.reclaim == idle("10.0.0.8", 1.0)


def test_idle_keep_alive_connections_do_not_make_an_address_busy() -> None:
    """An address whose only connections are idle holds no request: the kept slots are open
    to it as to a newcomer."""
    held = [idle("10.0.0.1", 1.0)] + [busy(f"10.0.0.{n}") for n in range(2, 9)]
    decision = admit("10.0.0.1", held, LIMITS)
    assert decision.admitted and decision.reclaim is None


def test_without_a_reserve_a_busy_address_may_take_the_last_slot() -> None:
    limits = Limits(max_connections=10, max_connection_share=0.5, new_client_share=0.0)
    held = [busy("10.0.0.1")] + [busy(f"10.0.0.{n}") for n in range(2, 10)]
    decision = admit("10.0.0.1", held, limits)
    assert decision.admitted and decision.reclaim is None
