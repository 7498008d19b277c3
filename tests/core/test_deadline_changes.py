"""The core's count of changes that may move ``ScanServer.next_deadline``
(``ScanServer.deadline_changes``, dsc_core/deadlines.py): each change of a deadline-bearing thing
moves it, in the core, whether or not the call made a command; reads leave it.  The binding
nudges its ticker when it moved (runtime/owner.py), so a change nobody remembered to announce
cannot leave the ticker asleep past a deadline."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta

from lxml import etree

from core_support import (
    DSC,
    FS,
    MAIL,
    Act,
    cancel_job,
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
    subscribe_body,
    summaries,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import (
    Exchange,
    FilterState,
    FilterStateReason,
    JobState,
    RepositoryState,
    RequestInfo,
    ServerConfig,
    names,
)
from dsc_core import client as dsc_client

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


def test_a_processing_job_s_progress_leaves_it() -> None:
    """The engine's reports (started, each filter started and finished, the end of a job whose
    filters all succeeded) change no deadline: the R6 timeout reads only Creating jobs, and a
    job whose documents are not kept has no retention deadline."""
    t = InProcessTransport()
    token = create_job(t, FS, MAIL)
    ok(send_image(t, token))
    ok(end_job(t, token))
    t.clock += timedelta(seconds=5)  # each report is a new record with the same deadline
    with leaves(t):
        t.process(token)
    assert job_of(t, token).state is JobState.COMPLETED
    assert [f.state for f in job_of(t, token).filters] == [FilterState.COMPLETED_SUCCESSFULLY] * 2


def test_each_change_of_what_the_r6_timeout_reads_of_a_record_moves_it_only() -> None:
    """``JobTable`` counts a new record when the Creating job's last activity (the R6
    timeout's one input of it) changed, or the job began or stopped being Creating; a record
    that changed anything else, or a job that was not Creating leaving the table, leaves it."""
    t = InProcessTransport()
    table = t.server.jobs
    token = create_job(t)
    creating = job_of(t, token)
    later = creating.last_activity + timedelta(seconds=1)
    with leaves(t):
        table.put(creating)  # the same record
        table.put(replace(creating, document_root_name="Other"))
    with moves(t):
        table.put(replace(creating, last_activity=later))
    pending = replace(creating, state=JobState.PENDING, last_activity=later)
    with moves(t):
        table.put(pending)
    processing = replace(pending, state=JobState.PROCESSING)
    with leaves(t):
        table.put(processing)
        table.put(replace(processing, last_activity=later + timedelta(seconds=1)))
        table.remove(token)  # a Processing job's row deleted
        table.put(processing)
        table.absorb(replace(processing, state=JobState.ABORTED, completed=later))  # its end
    with moves(t):
        table.put(creating)  # an undone end: Creating again
    with moves(t):
        table.remove(token)  # a Creating job's row deleted
    table.put(creating)
    with moves(t):
        table.absorb(replace(creating, state=JobState.ABORTED, completed=later))  # canceled


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


def test_a_renew_or_unsubscribe_undone_by_a_failed_store_moves_it_in_the_undo() -> None:
    """R4 step 9: the store command of an Unsubscribe (or a Renew) fails and the subscription
    is put back with its old expiry, in a call of its own (``store_failed``) that makes no
    command of that kind: the expiry comes back, sooner than what the failed call left."""
    t = InProcessTransport()
    ident, _ = subscribe(t, t.server.config.dsc_url, expires="PT10M")
    expiry = t.server.next_deadline()
    assert expiry is not None
    unsubscribe = manager_exchange(t, Act.UNSUBSCRIBE, ident, "<wse:Unsubscribe/>")
    assert unsubscribe.end().reply.status == 200
    assert t.server.next_deadline() is None
    with moves(t):
        unsubscribe.store_failed(temporary=True)
    assert t.server.next_deadline() == expiry
    renew = manager_exchange(
        t, Act.RENEW, ident, "<wse:Renew><wse:Expires>PT1H</wse:Expires></wse:Renew>"
    )
    assert renew.end().reply.status == 200
    assert t.server.next_deadline() == t.clock + timedelta(hours=1)
    with moves(t):
        renew.store_failed(temporary=True)
    assert t.server.next_deadline() == expiry


def test_a_subscribe_undone_by_a_failed_store_moves_it_in_the_undo() -> None:
    t = InProcessTransport()
    subscribe_ = t.server.open_exchange(
        RequestInfo(now=t.clock, content_type=dsc_client.SOAP_XML, path="/ScanServer")
    )
    subscribe_.feed(
        soap(subscribe_body(expires="PT10M"), Act.SUBSCRIBE, to=t.server.config.dsc_url)
    )
    assert subscribe_.end().reply.status == 200
    assert t.server.next_deadline() == t.clock + timedelta(minutes=10)
    with moves(t):
        subscribe_.store_failed(temporary=True)
    assert t.server.next_deadline() is None and not t.server.subscriptions.by_id


def test_a_purge_undone_by_a_failed_store_keeps_the_documents_again_and_moves_it() -> None:
    """The purged job's kept documents (a filter failed) are kept again by the undo, which
    puts the job back in the history without counting: the retention's deadline comes back
    through ``JobLifecycle._keep`` alone."""
    t = InProcessTransport()
    token = create_job(t)
    ok(send_image(t, token))
    ok(end_job(t, token))
    t.process(token, [FAILED])
    kept = t.server.next_deadline()
    assert kept is not None and token in t.server.lifecycle.kept
    t.clock += timedelta(minutes=1)
    request = etree.Element(f"{{{names.EXT}}}PurgeJobHistoryRequest")
    etree.SubElement(request, f"{{{names.EXT}}}Before").text = t.clock.isoformat()
    purge = t.server.open_exchange(
        RequestInfo(now=t.clock, content_type=dsc_client.SOAP_XML, path="/ScanServer")
    )
    purge.feed(envelope(names.Action.EXT_PURGE_JOB_HISTORY, request))
    assert purge.end().reply.status == 200
    assert t.server.next_deadline() is None
    with moves(t):
        purge.store_failed(temporary=True)
    assert t.server.next_deadline() == kept and t.server.jobs.get(token) is not None


def test_another_instance_s_job_records_absorbed_move_it() -> None:
    """Records another instance wrote (issue 18): a Creating job (an R6 deadline), the same
    job ended there (it leaves the active jobs), a job whose row was deleted there, and a job
    that ended there keeping its documents (its retention's deadline, the only change here:
    the job was never active in this table)."""
    t, elsewhere = InProcessTransport(), InProcessTransport()
    first = create_job(elsewhere)
    with moves(t):
        t.server.absorb([job_of(elsewhere, first)])
    assert t.server.next_deadline() is not None
    ok(cancel_job(elsewhere, DSC, first))
    with moves(t):
        t.server.absorb([job_of(elsewhere, first)])
    assert t.server.next_deadline() is None
    second = create_job(elsewhere)
    t.server.absorb([job_of(elsewhere, second)])
    assert t.server.next_deadline() is not None
    with moves(t):
        t.server.absorb([], dropped=[second])
    assert t.server.next_deadline() is None
    third = create_job(elsewhere)
    ok(send_image(elsewhere, third))
    ok(end_job(elsewhere, third))
    elsewhere.process(third, [FAILED])
    ended = job_of(elsewhere, third)
    assert ended.completed is not None
    with moves(t):
        t.server.absorb([ended])
    retention = timedelta(seconds=t.server.config.spool_retention_seconds)
    assert t.server.next_deadline() == ended.completed + retention
    with leaves(t):
        t.server.absorb([ended])  # read again: the same time kept


def test_another_instance_s_subscriptions_absorbed_move_it() -> None:
    """Made, renewed (an earlier expiry) and ended on another instance (issue 18); the same
    rows read again leave it."""
    t, elsewhere = InProcessTransport(), InProcessTransport()
    ident, _ = subscribe(elsewhere, elsewhere.server.config.dsc_url, expires="PT10M")
    sub = elsewhere.server.subscriptions.by_id[ident]
    with moves(t):
        t.server.absorb_subscriptions([sub], [])
    assert t.server.next_deadline() == sub.expires
    with leaves(t):
        t.server.absorb_subscriptions([sub], [])
    sooner = replace(sub, expires=sub.expires - timedelta(minutes=5))
    with moves(t):
        t.server.absorb_subscriptions([sooner], [])
    assert t.server.next_deadline() == sooner.expires
    with moves(t):
        t.server.absorb_subscriptions([], [ident])
    assert t.server.next_deadline() is None


def test_subscriptions_ended_by_their_deliveries_or_a_shutdown_move_it() -> None:
    config = ServerConfig(delivery_failures_before_end=2)
    t = InProcessTransport(config)
    failing, _ = subscribe(t, config.dsc_url, expires="PT5M")
    given_up, _ = subscribe(t, config.dsc_url, expires="PT10M")
    last, _ = subscribe(t, config.dsc_url, expires="PT15M")
    with leaves(t):
        t.server.delivery_result(failing, ok=False)  # counted, not ended
    with moves(t):
        t.server.delivery_result(failing, ok=False)
    assert t.server.next_deadline() == t.clock + timedelta(minutes=10)
    with moves(t):
        t.server.end_subscription(given_up)
    assert t.server.next_deadline() == t.clock + timedelta(minutes=15)
    with moves(t):
        t.server.shutdown(t.clock)
    assert t.server.next_deadline() is None and last not in t.server.subscriptions.by_id


def manager_exchange(t: InProcessTransport, action: str, identifier: str, body: str) -> Exchange:
    """A subscription manager request fed and not ended: its ``end`` and ``store_failed`` are
    separate calls, as the binding makes them (the owner compares the count after each)."""
    exchange = t.server.open_exchange(
        RequestInfo(now=t.clock, content_type=dsc_client.SOAP_XML, path="/ScanServer")
    )
    exchange.feed(soap(body, action, headers=f"<wse:Identifier>{identifier}</wse:Identifier>"))
    return exchange


def retry(token: str) -> etree._Element:
    """A vendor RetryPostScanJobRequest for ``token``."""
    request = etree.Element(f"{{{names.EXT}}}RetryPostScanJobRequest")
    etree.SubElement(request, f"{{{names.EXT}}}JobToken").text = token
    return request
