"""The runtime's ticker (runtime/service.py, runtime/alarm.py): it sleeps until the core's next
deadline instead of waking each second, and a deadline that appears while it sleeps (a new
subscription, a new job) wakes it in time to honour it (R6 job timeout, R7 expiry).

Counts are asserted, never times: the ticker's reads of ``next_deadline`` and its ticks are
counted while the test waits for the expiry or the timeout itself."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from core_support import soap, subscribe_body
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.runtime import service as service_module
from dsc_bindings.runtime.alarm import Alarm, Wake
from dsc_bindings.runtime.service import ScanService
from dsc_bindings.runtime.ticket import settle
from dsc_bindings.serve import compose
from dsc_core import Command, Job, JobState, ServerConfig, names
from dsc_core import client as C
from dsc_core.model import EmailInstructions
from waiting import wait_for

SID = "S-1-5-21-1001"


class Counted:
    """The ticker's calls into the core, counted (they run as the core's owner)."""

    def __init__(self, service: ScanService) -> None:
        self.reads = 0
        self.ticks = 0
        #: "read" and "tick", in the order the owner ran them.
        self.calls: list[str] = []
        server = service.server
        next_deadline, tick = server.next_deadline, server.tick

        def counted_next_deadline() -> datetime | None:
            self.reads += 1
            self.calls.append("read")
            return next_deadline()

        def counted_tick(now: datetime) -> list[Command]:
            self.ticks += 1
            self.calls.append("tick")
            return tick(now)

        server.next_deadline = counted_next_deadline  # type: ignore[method-assign]
        server.tick = counted_tick  # type: ignore[method-assign]


@pytest.fixture
def ticking(tmp_path: Path) -> Iterator[Callable[[ServerConfig], tuple[ScanService, Counted]]]:
    services: list[ScanService] = []

    def start(config: ServerConfig) -> tuple[ScanService, Counted]:
        data = tmp_path / "data"
        service = compose(config, data, FilterSettings.embedded_default(data)).service
        counted = Counted(service)  # before start: the ticker's first read is counted too
        services.append(service)
        service.start()
        wait_for(lambda: counted.reads >= 1, what="the ticker's first read of the deadline")
        return service, counted

    yield start
    for service in services:
        service.shutdown(5.0)


def test_an_idle_ticker_sleeps_until_a_new_subscription_expires(
    ticking: Callable[[ServerConfig], tuple[ScanService, Counted]],
) -> None:
    service, counted = ticking(ServerConfig(user_directory={SID: "alice@corp.example"}))
    body = soap(subscribe_body(expires="PT5S"), names.Action.SUBSCRIBE, to=service.config.dsp_url)
    reply = service.handle(body, content_type=C.SOAP_XML)
    assert reply.status == 200
    assert len(service.server.subscriptions.by_id) == 1
    # The subscription's expiry came while the ticker slept (nothing was due before it): it is
    # still ended, by a tick (R7).
    wait_for(lambda: not service.server.subscriptions.by_id, timeout=30, what="the expiry (R7)")
    assert counted.ticks >= 1
    # Over those 5 s a ticker waking each second ticked at least 4 times and read the deadline
    # as often; this one read it at start, after the Subscribe's nudge, and after the tick that
    # expired it (a tick a hair before the expiry adds one round).
    assert counted.ticks <= 2, counted.ticks
    assert counted.reads <= 5, counted.reads


def test_a_job_created_while_the_ticker_sleeps_still_times_out(
    ticking: Callable[[ServerConfig], tuple[ScanService, Counted]],
) -> None:
    config = ServerConfig(user_directory={SID: "alice@corp.example"}, job_timeout_seconds=4.0)
    service, counted = ticking(config)
    token = _create_job(service)
    job = wait_for(lambda: _ended(service, token), timeout=30, what="the job's timeout (R6)")
    assert job.state is JobState.ABORTED
    assert [r.value for r in job.reasons] == ["PostScanJobTimedOut"]
    assert 1 <= counted.ticks <= 2, counted.ticks


def test_a_reload_that_shortens_the_job_timeout_wakes_the_ticker(
    ticking: Callable[[ServerConfig], tuple[ScanService, Counted]],
) -> None:
    """A reload makes no command when nobody subscribed and the history keeps its jobs: the
    ticker, asleep until a timeout ten minutes away, hears of the shorter one only from the
    owner's nudge (ScanServer.reconfigure moves the core's deadline count)."""
    config = ServerConfig(user_directory={SID: "alice@corp.example"}, job_timeout_seconds=600.0)
    service, counted = ticking(config)
    token = _create_job(service)
    reads = counted.reads
    wait_for(lambda: counted.reads > reads, what="the ticker's read of the job's deadline")
    service.reconfigure(config.replace(job_timeout_seconds=1.0))
    job = wait_for(lambda: _ended(service, token), timeout=30, what="the job's timeout (R6)")
    assert [r.value for r in job.reasons] == ["PostScanJobTimedOut"]


def _create_job(service: ScanService) -> str:
    body = C.envelope(
        names.Action.DSP_CREATE,
        C.create_post_scan_job(
            user_identifier=SID,
            psp_identifier="PSP-1",
            instructions=[EmailInstructions(False, ("user@contoso.com",))],
        ),
        message_id="urn:uuid:1",
    )
    reply = service.handle(body, content_type=C.SOAP_XML)
    token = C.text_of(C.parse_response(reply.body).payload, names.DSP, "JobToken")
    assert token
    return token


def _ended(service: ScanService, token: str) -> Job | None:
    job = service.job_record(token)
    assert job is not None
    return None if job.is_active else job


@pytest.mark.parametrize("end", ["cut off", "refused", "undecodable"])
def test_a_job_whose_send_image_ends_before_its_image_began_still_times_out(
    ticking: Callable[[ServerConfig], tuple[ScanService, Counted]], end: str
) -> None:
    """A SendImage reserves its DocumentId once its SOAP part is read, and while it is
    reserved the job has no R6 deadline (an image is arriving: ScanServer.next_deadline).
    Cut off or refused before the image part began, the reservation goes without a command
    (nothing was written), and the deadline is back: the ticker, asleep since it read none,
    reads it again.  An image part the server cannot decode lets it go while the rest of the
    body may still be arriving: the job times out meanwhile."""
    # Long enough for the job to be Creating when its SendImage begins, however slow the
    # machine; shortened below, while the job is receiving.
    config = ServerConfig(user_directory={SID: "alice@corp.example"}, job_timeout_seconds=600.0)
    service, counted = ticking(config)
    token = _create_job(service)
    root = C.envelope(
        names.Action.DSP_SEND_IMAGE,
        C.send_image_request(token, 1, "png", "i@x"),
        message_id="urn:uuid:2",
    )
    mtom = C.mtom(root, "i@x", [b"image"], boundary="b-test")
    body = b"".join(mtom.chunks())
    image_part = body.index(b"--b-test", body.index(b"--b-test") + 1) + len(b"--b-test\r\n")
    request = service.open_request(mtom.content_type, None, "/ScanServer")
    assert request.feed(body[:image_part]) is None  # the SOAP part, not the image's headers
    assert service.owner.call(lambda: (token, 1) in service.server.jobs.uploads)
    # The job is overdue once it stops receiving.  The reload's nudge makes the ticker read the
    # deadline while the job is receiving: none, so it sleeps TICK_IDLE_SECONDS.
    calls = len(counted.calls)
    service.reconfigure(config.replace(job_timeout_seconds=0.5))
    wait_for(
        lambda: "read" in counted.calls[calls:],
        timeout=30,
        what="the ticker's read of the deadline while the job is receiving",
    )
    assert service.job_record(token).is_active  # type: ignore[union-attr]
    if end == "cut off":
        assert settle(request.abort()) is None
    elif end == "refused":  # an image part that is not the one the SOAP part names (R8)
        assert request.feed(b"Content-ID: <other@x>\r\n\r\nimage\r\n--b-test--\r\n") is None
        reply = settle(request.finish())
        assert reply.status == 400 and b"InvalidArgs" in reply.body, reply.body  # type: ignore[union-attr]
    elif end == "undecodable":  # RFC 2045 section 6: refused, the rest of the body discarded
        undecodable = b"Content-Transfer-Encoding: x-unknown\r\nContent-ID: <i@x>\r\n\r\n"
        assert request.feed(undecodable) is None
    assert not service.owner.call(lambda: set(service.server.jobs.uploads))
    job = wait_for(lambda: _ended(service, token), timeout=30, what="the job's timeout (R6)")
    assert [r.value for r in job.reasons] == ["PostScanJobTimedOut"]
    if end == "undecodable":
        assert request.feed(b"image\r\n--b-test--\r\n") is None
        reply = settle(request.finish())
        assert reply.status == 400 and b"cannot be decoded" in reply.body, reply.body  # type: ignore[union-attr]


def test_a_nudge_is_heeded_only_after_heed_after() -> None:
    alarm = Alarm()
    alarm.nudge()  # given before the sleep: kept, and ends the sleep once heeded
    assert alarm.sleep(30.0, heed_after=0.2) is Wake.NUDGED
    alarm.nudge()
    alarm.clear()  # answered by the caller's read: the next sleep runs its course
    assert alarm.sleep(0.1) is Wake.DUE


def test_a_stop_ends_the_sleep_at_once() -> None:
    alarm = Alarm()
    stopper = threading.Timer(0.1, alarm.stop)
    stopper.start()
    assert alarm.sleep(60.0, heed_after=60.0) is Wake.STOPPED
    stopper.join()
    assert alarm.sleep(60.0) is Wake.STOPPED  # stopped for good


class CountedCondition(threading.Condition):
    """A condition counting how often a waiter woke (each wake-up of the ticker's thread takes
    the GIL from the event loop's thread)."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())
        self.waits = 0
        self.wakes = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        woke = super().wait(timeout)
        self.wakes += 1
        return woke


def test_nudges_before_heed_after_do_not_wake_the_sleeper_and_one_after_it_does() -> None:
    alarm = Alarm()
    condition = CountedCondition()
    alarm._condition = condition  # the sleeper's wake-ups, counted
    slept: list[Wake] = []
    sleeper = threading.Thread(target=lambda: slept.append(alarm.sleep(30.0, heed_after=0.5)))
    sleeper.start()
    wait_for(lambda: condition.waits == 1, what="the sleep to begin")
    for _ in range(50):  # a busy server's requests, before the heed time
        alarm.nudge()
    sleeper.join(timeout=10)
    # It woke once, at the heed time by itself, and found the nudges.
    assert slept == [Wake.NUDGED]
    assert condition.wakes == 1, condition.wakes

    condition.waits = condition.wakes = 0
    sleeper = threading.Thread(target=lambda: slept.append(alarm.sleep(30.0, heed_after=0.0)))
    sleeper.start()
    wait_for(lambda: condition.waits == 1, what="the second sleep to begin")
    alarm.nudge()  # past the heed time: this one wakes it at once
    sleeper.join(timeout=10)
    assert slept == [Wake.NUDGED, Wake.NUDGED]
    assert condition.wakes == 1, condition.wakes


def test_a_failed_round_is_followed_by_a_pause_that_nudges_do_not_cut_short(
    ticking: Callable[[ServerConfig], tuple[ScanService, Counted]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round of the ticker that fails (a bug, a store that does not answer) is logged, then
    the ticker pauses TICK_FAILED_PAUSE_SECONDS before the next: under load every request nudges, and a
    pause a nudge ends would repeat the failure, and its logged traceback, at each request."""
    service, _ = ticking(ServerConfig(user_directory={SID: "alice@corp.example"}))
    # The pause is its own constant, not the shared store's longest sleep nor the time a
    # nudge waits to be heeded: set apart here, it alone decides the pause.
    monkeypatch.setattr(service_module, "TICK_FAILED_PAUSE_SECONDS", 0.3)
    failures = 0

    def failing() -> datetime | None:
        nonlocal failures
        failures += 1
        raise RuntimeError("next_deadline failed (injected)")

    service.server.next_deadline = failing  # type: ignore[method-assign]
    alarm = service._alarm
    sleep = alarm.sleep
    # Each sleep's end, and whether a round had failed when it began.
    sleeps: list[tuple[bool, Wake]] = []
    #: What each sleep after a failure was asked: (seconds, heed_after).
    asked: list[tuple[float, float]] = []

    def recorded(seconds: float, heed_after: float = 0.0) -> Wake:
        failed = failures > 0
        if failed:
            asked.append((seconds, heed_after))
        woke = sleep(seconds, heed_after)
        sleeps.append((failed, woke))
        return woke

    alarm.sleep = recorded  # type: ignore[method-assign]
    busy = threading.Event()

    def requests() -> None:  # a busy server: a nudge every few milliseconds
        while not busy.wait(0.005):
            alarm.nudge()

    nudger = threading.Thread(target=requests)
    nudger.start()
    try:
        wait_for(lambda: sum(f for f, _ in sleeps) >= 2, timeout=30, what="two failed rounds")
    finally:
        busy.set()
        nudger.join()
    pauses = [woke for failed, woke in sleeps if failed]
    assert pauses[:2] == [Wake.DUE, Wake.DUE], pauses
    assert asked[:2] == [(0.3, 0.3), (0.3, 0.3)], asked


def test_the_service_s_stop_ends_the_ticker_s_idle_sleep(
    ticking: Callable[[ServerConfig], tuple[ScanService, Counted]],
) -> None:
    service, _ = ticking(ServerConfig(user_directory={SID: "alice@corp.example"}))
    ticker = next(t for t in service._threads if t.name == "dsc-ticker")
    assert ticker.is_alive()  # asleep for TICK_IDLE_SECONDS: nothing is due
    service.shutdown(5.0)  # joins the ticker for at most 2 s, then goes on without it
    assert not ticker.is_alive()
