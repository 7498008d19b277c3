"""Event delivery that no subscriber can hurt (issue 7 point 4, R7, R13), over real sockets
against a real ``dsc serve`` with its DEFAULT configuration.

Hostile subscribers: 100 blackholed (the connection is accepted by the kernel, nothing ever
answers), 50 answering with an endless head, 50 with an endless body, one with
``Content-Length: 10**11``.  One healthy subscriber must still get every event of a scan, in
order; scans keep working; the server's peak RSS stays under 150 MB.  The time from each cause
to its event is measured and printed, never asserted (GUIDE: tests assert no times).

Then the hub's own rules with a small queue and short timeouts, in process: consecutive
failures end a subscription with SubscriptionEnd DeliveryFailure and nothing more is sent to it
(R13); a full queue ends it the same way.
"""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from lxml import etree

from dsc_bindings.runtime.delivery import DeliveryHub, DeliveryLimits
from dsc_core import Deliver, names
from dsc_core.model import FileShareInstructions
from e2e_support import ServerProcess, Soap
from waiting import wait_for

A = names.Action
LOCAL_SHARE = r"\\localhost\scans"
BLACKHOLED = 100
ENDLESS_HEAD = 50
ENDLESS_BODY = 50


# --- subscribers ------------------------------------------------------------------------------


class Healthy(http.server.ThreadingHTTPServer):
    daemon_threads = True
    #: The answer to every notification (202: delivered).
    status = 202

    def __init__(self) -> None:
        self.received: list[tuple[float, bytes]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    outer.received.append((time.monotonic(), body))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/events"


class Failing(Healthy):
    """A subscriber that answers every notification HTTP 500 (a failed delivery, R7)."""

    status = 500

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.received)


class Hostile:
    """Endless answers, served by trio in a thread: each connection reads the request head and
    then writes forever (until the server hangs up)."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        # Blackhole: listening, never accepting; the kernel completes connections (backlog).
        self.blackhole = socket.socket()
        self.blackhole.bind(("127.0.0.1", 0))
        self.blackhole.listen(4096)
        self.ports["blackhole"] = self.blackhole.getsockname()[1]

    def start(self) -> Hostile:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            self._token.run_sync_soon(self._stop.set)
        self._thread.join(10)
        self.blackhole.close()

    async def _main(self) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            for kind in ("head", "body", "huge"):
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                self.ports[kind] = listeners[0].socket.getsockname()[1]
                handler = getattr(self, f"_{kind}")
                nursery.start_soon(trio.serve_listeners, handler, listeners)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    @staticmethod
    async def _read_head(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise trio.BrokenResourceError
            data += chunk

    async def _forever(self, stream: trio.SocketStream, first: bytes, filler: bytes) -> None:
        try:
            await self._read_head(stream)
            await stream.send_all(first)
            while True:
                await stream.send_all(filler)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _head(self, stream: trio.SocketStream) -> None:
        await self._forever(stream, b"HTTP/1.1 200 OK\r\n", b"X-Endless: " + b"a" * 1000 + b"\r\n")

    async def _body(self, stream: trio.SocketStream) -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        await self._forever(stream, head, b"1000\r\n" + b"b" * 4096 + b"\r\n")

    async def _huge(self, stream: trio.SocketStream) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n"
        await self._forever(stream, head, b"c" * 65536)


def subscribe(client: Soap, address: str) -> None:
    request = etree.Element(f"{{{names.WSE}}}Subscribe")
    end_to = etree.SubElement(request, f"{{{names.WSE}}}EndTo")
    etree.SubElement(end_to, f"{{{names.WSA}}}Address").text = address
    delivery = etree.SubElement(request, f"{{{names.WSE}}}Delivery", Mode=names.PUSH_MODE)
    notify_to = etree.SubElement(delivery, f"{{{names.WSE}}}NotifyTo")
    etree.SubElement(notify_to, f"{{{names.WSA}}}Address").text = address
    assert client.call(A.SUBSCRIBE, request).action == A.SUBSCRIBE_RESPONSE


@contextmanager
def hostile_world() -> Iterator[tuple[Healthy, Hostile]]:
    healthy = Healthy()
    thread = threading.Thread(target=healthy.serve_forever, daemon=True)
    thread.start()
    hostile = Hostile().start()
    try:
        yield healthy, hostile
    finally:
        healthy.shutdown()
        healthy.server_close()
        hostile.close()


# --- the proof ------------------------------------------------------------------------------


def _events(healthy: Healthy, token: str) -> list[tuple[float, str, etree._Element]]:
    """(arrival, action, body payload) of the healthy sink's notifications about ``token``."""
    out = []
    with healthy.lock:
        received = list(healthy.received)
    for arrived, body in received:
        root = etree.fromstring(body)
        action = root.findtext(f"{{{names.SOAP}}}Header/{{{names.WSA}}}Action") or ""
        payload = root.find(f"{{{names.SOAP}}}Body/*")
        if payload is not None and token.encode() in body:
            out.append((arrived, action, payload))
    return out


def _scan(client: Soap, image: bytes) -> tuple[str, dict[str, float]]:
    """One whole job; returns its token and when each cause happened (monotonic)."""
    causes: dict[str, float] = {}
    token = client.create([FileShareInstructions((LOCAL_SHARE,))])
    causes["created"] = time.monotonic()
    for document_id in (1, 2):
        client.send_image(token, document_id, image)
        causes[f"image {document_id}"] = time.monotonic()
    client.end(token)
    causes["ended"] = time.monotonic()
    view = client.wait_ended(token, timeout=60)
    assert view.state == "Completed", view
    return token, causes


@pytest.mark.parametrize("binding", ["async", "blocking"])
def test_hostile_subscribers_cannot_hurt_a_healthy_one(tmp_path: Path, binding: str) -> None:
    with hostile_world() as (healthy, hostile):
        server = ServerProcess(tmp_path / "data", binding=binding).start()
        try:
            client = Soap(server.url)
            ports = hostile.ports
            for _ in range(BLACKHOLED):
                subscribe(client, f"http://127.0.0.1:{ports['blackhole']}/sink")
            for _ in range(ENDLESS_HEAD):
                subscribe(client, f"http://127.0.0.1:{ports['head']}/sink")
            for _ in range(ENDLESS_BODY):
                subscribe(client, f"http://127.0.0.1:{ports['body']}/sink")
            subscribe(client, f"http://127.0.0.1:{ports['huge']}/sink")
            subscribe(client, healthy.url)

            image = os.urandom(256 * 1024)
            for round_ in range(2):  # scans keep working, round after round
                token, causes = _scan(client, image)

                def complete(token: str = token) -> bool:
                    actions = {a for _, a, _p in _events(healthy, token)}
                    return {A.DSP_JOB_END_STATE_EVENT, A.DSC_JOB_END_STATE_EVENT} <= actions

                wait_for(complete, 30, f"every event of scan {round_}", interval=0.05)
                events = _events(healthy, token)
                actions = [a for _, a, _p in events]
                # Every event of the scan arrived (both namespaces) ...
                assert A.DSP_JOB_END_STATE_EVENT in actions and A.DSC_JOB_END_STATE_EVENT in actions
                dsp_states = [
                    p.findtext(f".//{{{names.DSP}}}JobState")
                    for _, a, p in events
                    if a == A.DSP_JOB_STATUS_EVENT
                ]
                images = [
                    int(p.findtext(f".//{{{names.DSP}}}ImagesReceived") or "-1")
                    for _, a, p in events
                    if a == A.DSP_JOB_STATUS_EVENT
                ]
                # ... in order: the states follow the life cycle, images only grow.
                order = ["Creating", "Pending", "Started", "Processing", "Completed"]
                ranks = [order.index(s or "") for s in dsp_states]
                assert ranks == sorted(ranks) and ranks[0] == 0 and ranks[-1] == 4, dsp_states
                assert images == sorted(images) and images[-1] == 2, images
                assert actions.index(A.DSP_JOB_END_STATE_EVENT) > max(
                    i for i, a in enumerate(actions) if a == A.DSP_JOB_STATUS_EVENT
                )
                # Measured, printed, not asserted: from each cause to its event.
                status = [(t, p) for t, a, p in events if a == A.DSP_JOB_STATUS_EVENT]

                def first(
                    images: str, status: list[tuple[float, etree._Element]] = status
                ) -> float:
                    return next(
                        t
                        for t, p in status
                        if p.findtext(f".//{{{names.DSP}}}ImagesReceived") == images
                    )

                lag = {
                    "created": first("0") - causes["created"],
                    "image 1": first("1") - causes["image 1"],
                    "image 2": first("2") - causes["image 2"],
                }
                print(
                    f"[{binding}] round {round_}: healthy subscriber got {len(events)} events; "
                    + ", ".join(f"{k} -> event {v * 1000:.0f} ms" for k, v in lag.items())
                )
            peak = server.status("VmHWM")
            print(f"[{binding}] server peak RSS {peak / 2**20:.1f} MiB")
            assert peak < 150 * 2**20
            assert "Traceback" not in server.log
        finally:
            server.stop()


# --- the hub's rules, in process ------------------------------------------------------------


def _deliver(address: str, subscription: str = "urn:uuid:s1", final: bool = False) -> Deliver:
    return Deliver(subscription, address, (b"<x>", b"", b"</x>"), final=final)


@contextmanager
def hub_with(limits: DeliveryLimits) -> Iterator[tuple[DeliveryHub, list, list]]:
    reports: list[tuple[str, bool]] = []
    given_up: list[str] = []
    hub = DeliveryHub(limits, lambda s, ok: reports.append((s, ok)), given_up.append)
    hub.start()
    try:
        yield hub, reports, given_up
    finally:
        hub.close(1.0)


def test_three_failures_stop_deliveries_and_drop_the_queue() -> None:
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    port = refused.getsockname()[1]
    refused.close()  # nothing listens: every connect fails at once
    limits = DeliveryLimits(queue_size=32, failures_before_end=3)
    with hub_with(limits) as (hub, reports, given_up):
        for _ in range(10):
            hub.deliver(_deliver(f"http://127.0.0.1:{port}/n"))
        wait_for(lambda: len(reports) >= 3, what="three reports")
        time.sleep(0.3)  # would be enough for more attempts, if any were made
        assert reports == [("urn:uuid:s1", False)] * 3  # exactly three, then nothing
        assert hub.sent == 3
        hub.deliver(_deliver(f"http://127.0.0.1:{port}/n"))  # after the end: dropped
        time.sleep(0.1)
        assert hub.sent == 3 and not given_up


def test_a_full_queue_ends_the_subscription() -> None:
    with hostile_world() as (healthy, hostile):
        blackhole = f"http://127.0.0.1:{hostile.ports['blackhole']}/n"
        limits = DeliveryLimits(queue_size=4, answer_timeout=30.0)
        with hub_with(limits) as (hub, reports, given_up):
            for _ in range(6):  # one in flight (stuck), four queued, one too many
                hub.deliver(_deliver(blackhole, "urn:uuid:stuck"))
            hub.deliver(_deliver(healthy.url, "urn:uuid:fine"))
            wait_for(lambda: given_up == ["urn:uuid:stuck"], what="the stuck subscriber given up")
            wait_for(
                lambda: ("urn:uuid:fine", True) in reports, what="the fine delivery"
            )  # others are not held up
            assert len(healthy.received) == 1


def test_answers_are_read_with_caps() -> None:
    """Endless head: a failure; endless or huge body: read up to the cap, then dropped (the
    status decided it was delivered)."""
    with hostile_world() as (_healthy, hostile):
        limits = DeliveryLimits(answer_timeout=30.0)
        with hub_with(limits) as (hub, reports, _given_up):
            for kind in ("head", "body", "huge"):
                hub.deliver(_deliver(f"http://127.0.0.1:{hostile.ports[kind]}/n", kind))
            wait_for(lambda: len(reports) == 3, what="three reports")
            assert dict(reports) == {"head": False, "body": True, "huge": True}


# --- the core and the hub together, over a real binding ----------------------------------------


@pytest.mark.parametrize("binding", ["async", "blocking"])
def test_delivery_failure_ends_the_subscription_and_nothing_more_is_sent(
    tmp_path: Path, binding: str
) -> None:
    """R7/R13: three consecutive failures end the subscription with SubscriptionEnd
    DeliveryFailure at its EndTo; the notifications raised meanwhile are dropped."""
    from test_http_bindings import Raw, call, create_job, running, subscriber

    failing = Failing()
    threading.Thread(target=failing.serve_forever, daemon=True).start()
    try:
        with subscriber() as (base, received), running(binding, tmp_path) as srv:
            request = etree.Element(f"{{{names.WSE}}}Subscribe")
            end_to = etree.SubElement(request, f"{{{names.WSE}}}EndTo")
            etree.SubElement(end_to, f"{{{names.WSA}}}Address").text = f"{base}/end"
            delivery = etree.SubElement(request, f"{{{names.WSE}}}Delivery", Mode=names.PUSH_MODE)
            notify_to = etree.SubElement(delivery, f"{{{names.WSE}}}NotifyTo")
            address = failing.url
            etree.SubElement(notify_to, f"{{{names.WSA}}}Address").text = address
            client = Raw(srv.port)
            assert call(client, A.SUBSCRIBE, request, to=srv.config.dsp_url).action == (
                A.SUBSCRIBE_RESPONSE
            )
            for _ in range(8):  # eight job-status events for this subscriber
                create_job(client)
            wait_for(
                lambda: any(path == "/end" for path, _, _ in received), what="the /end delivery"
            )
            (end,) = [body for path, _, body in received if path == "/end"]
            assert b"SubscriptionEnd" in end and b"DeliveryFailure" in end
            for _ in range(4):  # later events: the subscription is gone, nothing is sent
                create_job(client)
            time.sleep(0.3)
            assert failing.count == 3
            client.close()
    finally:
        failing.shutdown()
        failing.server_close()
