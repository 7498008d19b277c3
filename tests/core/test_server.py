"""ScanServer's clock contract: ``next_deadline()`` is exact (aioquic's ``get_timer``): a tick
just before it does nothing, a tick at it does something, and a job whose image is still
arriving has no deadline until the image has arrived."""

from __future__ import annotations

from datetime import datetime, timedelta

from core_support import Act, create_job, envelope, job_view, mtom_body, ok, subscribe
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import Exchange, RequestInfo, ServerConfig
from dsc_core import client as dsc_client

EPSILON = timedelta(microseconds=1)


def _tick_changes_something(t: InProcessTransport, now: datetime) -> bool:
    """Whether tick(now) times out a job or expires a subscription."""
    jobs = [(j.token, j.state) for j in t.server.jobs.active()]
    subscriptions = set(t.server.subscriptions.by_id)
    commands = t.server.tick(now)
    t._run(commands)
    changed = [(j.token, j.state) for j in t.server.jobs.active()] != jobs
    return changed or set(t.server.subscriptions.by_id) != subscriptions or bool(commands)


def _start_upload(t: InProcessTransport, token: str) -> tuple[Exchange, bytes]:
    """A SendImage whose attachment has begun but not ended; returns the exchange and the rest
    of the body."""
    ctype, body = mtom_body(
        envelope(Act.DSP_SEND_IMAGE, dsc_client.send_image_request(token, 1, "png", "p@x")),
        "p@x",
        b"slow image " * 100,
    )
    exchange = t.server.open_exchange(RequestInfo(now=t.clock, content_type=ctype))
    t._run(exchange.feed(body[:-200]))
    assert t.server.jobs.uploads == {(token, 1)}
    return exchange, body[-200:]


def test_tick_before_the_deadline_does_nothing_and_at_it_something() -> None:
    t = InProcessTransport(ServerConfig(job_timeout_seconds=60))
    subscribe(t, t.server.config.dsc_url, expires="PT30S")
    create_job(t)
    for _ in range(2):  # the subscription expires first, then the job times out
        deadline = t.server.next_deadline()
        assert deadline is not None
        assert not _tick_changes_something(t, deadline - EPSILON)
        assert _tick_changes_something(t, deadline)
    assert t.server.next_deadline() is None


def test_no_deadline_for_a_job_receiving_an_image() -> None:
    t = InProcessTransport(ServerConfig(job_timeout_seconds=60))
    token = create_job(t)
    exchange, rest = _start_upload(t, token)
    assert t.server.next_deadline() is None  # only this job, and it is receiving an image
    t.clock += timedelta(hours=1)
    assert not _tick_changes_something(t, t.clock)  # the job would be long overdue otherwise
    # The upload ends: its end is the job's last activity, and the deadline is visible again.
    t._run(exchange.feed(rest))
    outcome = exchange.end(t.clock)
    t._run(outcome.commands)
    ok(outcome.reply)
    deadline = t.server.next_deadline()
    assert deadline == t.clock + timedelta(seconds=60)
    assert not _tick_changes_something(t, deadline - EPSILON)
    assert _tick_changes_something(t, deadline)
    assert job_view(t, token).state == "Aborted"


def test_other_jobs_keep_their_deadline_during_an_upload() -> None:
    t = InProcessTransport(ServerConfig(job_timeout_seconds=60))
    uploading = create_job(t)
    t.clock += timedelta(seconds=10)
    idle = create_job(t)
    _start_upload(t, uploading)
    deadline = t.server.next_deadline()
    assert deadline == t.clock + timedelta(seconds=60)  # the idle job's, not the uploading one's
    assert not _tick_changes_something(t, deadline - EPSILON)
    assert _tick_changes_something(t, deadline)
    assert job_view(t, idle).state == "Aborted"
    assert job_view(t, uploading).state == "Creating"


def test_an_aborted_upload_brings_the_old_deadline_back() -> None:
    """A connection lost mid-image: the image never arrived, so the job's clock still runs from
    its last activity; the deadline, overdue now, is reported at once."""
    t = InProcessTransport(ServerConfig(job_timeout_seconds=60))
    created = t.clock
    token = create_job(t)
    exchange, _rest = _start_upload(t, token)
    t.clock += timedelta(seconds=90)
    assert t.server.next_deadline() is None
    t._run(exchange.abort())
    assert t.server.next_deadline() == created + timedelta(seconds=60)
    assert _tick_changes_something(t, t.clock)
    assert job_view(t, token).state == "Aborted"
