"""The core's count of changes that may move ``ScanServer.next_deadline``
(``ScanServer.deadline_changes``, dsc_core/deadlines.py): each change of a deadline-bearing thing
moves it, in the core, whether or not the call made a command; reads leave it.  The binding
nudges its ticker when it moved (runtime/owner.py), so a change nobody remembered to announce
cannot leave the ticker asleep past a deadline."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from lxml import etree

from core_support import (
    Act,
    create_job,
    elements_body,
    end_job,
    envelope,
    job_of,
    manager_request,
    ok,
    send_image,
    send_image_exchange,
    soap,
    subscribe,
    summaries,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import FilterState, FilterStateReason, RepositoryState, names

FAILED = (FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,))


@contextmanager
def moves(t: InProcessTransport) -> Iterator[None]:
    """The block moves the count."""
    before = t.server.deadline_changes.count
    yield
    assert t.server.deadline_changes.count > before, "the count did not move"


@contextmanager
def leaves(t: InProcessTransport) -> Iterator[None]:
    """The block leaves the count as it was."""
    before = t.server.deadline_changes.count
    yield
    assert t.server.deadline_changes.count == before, "a read moved the count"


def test_reads_leave_it() -> None:
    t = InProcessTransport()
    token = create_job(t)
    ident, _ = subscribe(t, t.server.config.dsc_url)
    with leaves(t):
        ok(t.post(soap(elements_body("dsc", token, "dsc:JobStatus"), Act.DSC_ELEMENTS)))
        summaries(t, "ActiveJobs")
        ok(manager_request(t, Act.GET_STATUS, ident, "<wse:GetStatus/>"))
        t.server.next_deadline()


def test_create_post_scan_job_moves_it() -> None:
    t = InProcessTransport()
    with moves(t):
        create_job(t)


def test_a_send_image_s_reservation_and_its_release_without_a_command_move_it() -> None:
    """The DocumentId is reserved once the SOAP part is read (the job has no R6 deadline while
    an image arrives) and let go when the exchange is cut off before the image part began:
    no command (nothing was written), yet the job's deadline is back."""
    t = InProcessTransport()
    token = create_job(t)
    deadline = t.server.next_deadline()
    exchange, body = send_image_exchange(t, token, b"image")
    boundary = b"--MIME_boundary_dsc-test"
    image_part = body.index(boundary, body.index(boundary) + 1) + len(boundary) + 2
    with moves(t):
        assert list(exchange.feed(body[:image_part])) == []
    assert t.server.jobs.uploads and t.server.next_deadline() is None
    with moves(t):
        assert list(exchange.abort()) == []
    assert not t.server.jobs.uploads and t.server.next_deadline() == deadline


def test_a_job_s_end_moves_it() -> None:
    t = InProcessTransport()
    token = create_job(t)
    ok(send_image(t, token))
    with moves(t):
        ok(end_job(t, token))


def test_subscribe_renew_and_unsubscribe_each_move_it() -> None:
    t = InProcessTransport()
    with moves(t):
        ident, _ = subscribe(t, t.server.config.dsc_url, expires="PT10M")
    with moves(t):
        ok(
            manager_request(
                t, Act.RENEW, ident, "<wse:Renew><wse:Expires>PT1M</wse:Expires></wse:Renew>"
            )
        )
    with moves(t):
        reply = manager_request(t, Act.UNSUBSCRIBE, ident, "<wse:Unsubscribe/>")
        assert reply.status == 200
    assert not t.server.subscriptions.by_id


def test_a_reload_moves_it_even_without_a_command() -> None:
    t = InProcessTransport()
    with moves(t):
        assert t.server.reconfigure(t.server.config.replace(job_timeout_seconds=1.0), t.clock) == []


def test_lead_and_follow_move_it_when_the_leadership_changes() -> None:
    t = InProcessTransport()
    with moves(t):
        t.server.follow()
    with leaves(t):
        t.server.follow()  # already following: the deadline stays None
    with moves(t):
        t.server.lead(RepositoryState.IDLE, t.clock)
    with leaves(t):
        t.server.lead(RepositoryState.IDLE, t.clock)


def test_a_tick_moves_it_when_it_times_out_or_expires_something_only() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url, expires="PT10M")
    with leaves(t):
        t.advance(60)  # nothing due
    with moves(t):
        t.advance(600)  # the subscription expires (R7)
    assert not t.server.subscriptions.by_id


def test_every_change_of_the_deadline_moved_the_count() -> None:
    """Over a day of a server's life (jobs created, fed, ended, failed and kept, timed out,
    retried; subscriptions made, renewed, expired; another instance's rows absorbed; a reload),
    whenever ``next_deadline`` changed, the count had moved."""
    t = InProcessTransport()
    server = t.server
    seen: list[tuple[int, datetime | None]] = [
        (server.deadline_changes.count, server.next_deadline())
    ]

    def step(action: Callable[[], object]) -> None:
        action()
        count, deadline = server.deadline_changes.count, server.next_deadline()
        last_count, last_deadline = seen[-1]
        assert deadline == last_deadline or count != last_count, (action, deadline)
        seen.append((count, deadline))

    tokens: list[str] = []
    step(lambda: tokens.append(create_job(t)))
    step(lambda: subscribe(t, server.config.dsc_url, expires="PT5M"))
    step(lambda: ok(send_image(t, tokens[0])))
    step(lambda: ok(end_job(t, tokens[0])))
    step(lambda: t.process(tokens[0], [FAILED]))  # a failed filter: documents kept
    step(lambda: tokens.append(create_job(t)))
    step(lambda: t.advance(400))  # the subscription expires (R7)
    step(lambda: ok(t.post(envelope(names.Action.EXT_RETRY_JOB, retry(tokens[0])))))
    step(lambda: t.process(tokens[0], [FAILED]))  # kept again, from now
    step(lambda: t.advance(400))  # the second job times out (R6)
    step(lambda: tokens.append(create_job(t)))
    step(lambda: server.absorb([], uploads_elsewhere=[(tokens[2], 1)]))  # receiving elsewhere
    step(lambda: server.absorb([]))  # ... no longer: its R6 deadline is back
    step(lambda: server.reconfigure(server.config.replace(spool_retention_seconds=60.0), t.clock))
    step(lambda: server.absorb([job_of(t, tokens[0])], dropped=[tokens[1]]))
    step(lambda: t.advance(120))  # the kept documents expire
    assert len({deadline for _, deadline in seen}) > 3  # the deadline did change, often


def retry(token: str) -> etree._Element:
    """A vendor RetryPostScanJobRequest for ``token``."""
    request = etree.Element(f"{{{names.EXT}}}RetryPostScanJobRequest")
    etree.SubElement(request, f"{{{names.EXT}}}JobToken").text = token
    return request
