"""ScanServer.absorb (issue 18 point 1): the records, deletions and uploads of other instances of a
shared store go into the job table, which stays a cache the core decides from: history order by
end time, trimming, quotas, R6 duplicates and idle timeouts count them; no events."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from core_support import (
    DSP,
    Act,
    check_protocol_fault,
    create_job,
    create_request,
    envelope,
    send_image,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import (
    Deliver,
    Reply,
    RequestInfo,
    ScanServer,
    ServerConfig,
    StopProcessing,
    client,
    names,
)
from dsc_core.config import Limits
from dsc_core.model import (
    FileShareInstructions,
    FilterStatus,
    Job,
    JobState,
    JobStateReason,
)

T0 = datetime.fromisoformat("2026-11-21T09:00:00+01:00")


def job(token: str, state: JobState = JobState.CREATING, ended: int | None = None) -> Job:
    completed = None if ended is None else T0 + timedelta(seconds=ended)
    return Job(
        token=token,
        state=state,
        reasons=(JobStateReason.NONE,),
        filters=(FilterStatus("urn:fs", instructions=FileShareInstructions(("\\\\s\\x",))),),
        psp_identifier="psp",
        psp_display_name="PSP",
        user_name="alice",
        owner="",
        created=T0,
        last_activity=T0,
        completed=completed,
        origin="10.0.0.7",
    )


def server(**config: object) -> ScanServer:
    return ScanServer(ServerConfig(**config), new_id=lambda: str(uuid.uuid4()))  # type: ignore[arg-type]


def test_completed_jobs_take_their_place_in_the_history_by_end_time() -> None:
    s = server(history_size=2)
    for token, ended in (("late", 30), ("early", 10), ("middle", 20)):
        assert s.absorb([job(token, JobState.COMPLETED, ended)]) == []
    # R6: newest first; the oldest fell out although it arrived second.
    assert [j.token for j in s.jobs.history()] == ["late", "middle"]
    assert s.jobs.get("early") is None


def test_a_record_replaces_the_one_in_the_table_and_dropped_rows_go() -> None:
    s = server()
    s.absorb([job("a"), job("b")])
    assert [j.token for j in s.jobs.active()] == ["a", "b"]
    s.absorb([job("a", JobState.CANCELED, 5)], dropped=["b"])
    assert s.jobs.active() == []
    assert [j.token for j in s.jobs.history()] == ["a"]
    assert s.jobs.get("b") is None


def test_a_cancel_elsewhere_stops_this_engine_and_emits_no_event() -> None:
    t = InProcessTransport()
    token = create_job(t, FileShareInstructions(("\\\\s\\x",)))
    send_image(t, token)
    running = t.server.jobs.get(token)
    assert running is not None
    started = running.evolve(state=JobState.PROCESSING)
    assert t.server.absorb([started]) == []  # another instance's engine report: nothing here
    canceled = started.evolve(
        state=JobState.CANCELED, reasons=(JobStateReason.CANCELED,), completed=T0
    )
    commands = t.server.absorb([canceled])
    assert commands == [StopProcessing(token)]
    assert not any(isinstance(c, Deliver) for c in commands)
    # A completed job elsewhere is no reason to stop anything.
    assert t.server.absorb([job("x", JobState.PROCESSING)]) == []
    done = job("x", JobState.COMPLETED, 3).evolve(reasons=(JobStateReason.COMPLETED_SUCCESSFULLY,))
    assert t.server.absorb([done]) == []


def test_a_job_gone_while_this_engine_runs_it_stops_here_and_emits_no_event() -> None:
    """A row deleted elsewhere (``dsc db quarantine``), or one the binding can no longer read
    (a newer server's, a rolling upgrade): the run here stops; nothing else does.  The ordinary
    deletions of a cluster stop nothing: history trimmed (a job ended before), nor a job read
    ended and deleted in one catch-up (its end and its tombstone both since the last read)."""
    s = server()
    completed = (JobStateReason.COMPLETED_SUCCESSFULLY,)
    s.absorb(
        [
            job("run", JobState.PROCESSING),
            job("queued", JobState.PENDING),
            job("new"),
            job("trimmed", JobState.COMPLETED, 3).evolve(reasons=completed),
            job("ended", JobState.PROCESSING),
        ]
    )
    assert s.absorb([], dropped=["trimmed"]) == []
    ended = job("ended", JobState.COMPLETED, 5).evolve(reasons=completed)
    commands = s.absorb([ended], dropped=["run", "queued", "new", "unknown", "ended"])
    assert commands == [StopProcessing("run"), StopProcessing("queued")]
    assert s.jobs.active() == [] and s.jobs.history() == []


def test_quotas_count_jobs_created_elsewhere() -> None:
    """max_active_jobs counts the cluster's jobs (the e2e test does the per-user quota)."""
    t = InProcessTransport(ServerConfig(limits=Limits(max_active_jobs=2)))
    create_job(t, FileShareInstructions(("\\\\s\\x",)))
    t.server.absorb([job("elsewhere")])
    reply = _create_reply(t)
    assert reply.status == 500 and b"ServerErrorTemporaryError" in reply.body
    assert b"[limits] max_active_jobs" in reply.body
    t.server.absorb([job("elsewhere", JobState.CANCELED, 1)])
    assert _create_reply(t).status == 200


def test_an_upload_elsewhere_is_retried_later_and_keeps_the_job_from_timing_out() -> None:
    """docs/rulings.md, "A duplicate in flight on another instance": the same DocumentId in
    flight on another instance is ServerErrorTemporaryError (that upload may die with its
    instance: the scanner's retry is taken once it no longer counts), not InvalidArgs."""
    t = InProcessTransport(ServerConfig(job_timeout_seconds=60))
    token = create_job(t, FileShareInstructions(("\\\\s\\x",)))
    t.server.absorb([], uploads_elsewhere=[(token, 1)])
    assert t.server.jobs.uploading((token, 1))
    elsewhere = send_image(t, token, 1)
    check_protocol_fault(elsewhere, DSP, "ServerErrorTemporaryError")
    assert b"another instance is receiving document 1" in elsewhere.body
    # R6: not idle while an image arrives anywhere: no deadline, no timeout however late.
    assert t.server.next_deadline() is None
    later = t.clock + timedelta(seconds=600)
    assert t.server.tick(later) == []
    assert t.server.jobs.get(token).state is JobState.CREATING  # type: ignore[union-attr]
    t.server.absorb([], uploads_elsewhere=[])  # the upload ended there (or its instance died)
    assert send_image(t, token, 1).status == 200
    # Received here, the same DocumentId again is a duplicate: final (R6).
    check_protocol_fault(send_image(t, token, 1), DSP, "InvalidArgs")


def _create_reply(t: InProcessTransport) -> Reply:
    return t.post(envelope(Act.DSP_CREATE, create_request(FileShareInstructions(("\\\\s\\x",)))))


def test_which_requests_need_current_job_rows() -> None:
    """Exchange.current_jobs_needed (Operation.listing): a binding that caches shared rows may
    answer listings from its cache; a job-addressed request, an unknown action and a streamed
    body need the rows first; a request refused anyway needs nothing (and keeps its fault)."""
    server = ScanServer(ServerConfig(), new_id=lambda: str(uuid.uuid4()))

    def needed(body: bytes, content_type: str = "application/soap+xml") -> bool:
        exchange = server.open_exchange(RequestInfo(now=T0, content_type=content_type))
        exchange.feed(body)
        answer = exchange.current_jobs_needed()
        exchange.end(T0)
        return answer

    def plain(action: str, payload: Any) -> bytes:
        return client.envelope(action, payload, message_id=f"urn:uuid:{uuid.uuid4()}")

    a = names.Action
    assert not needed(plain(a.DSC_GET_ACTIVE_JOBS, client.empty_request("GetActiveJobsRequest")))
    assert not needed(plain(a.TRANSFER_GET, client.empty_request("Get")))
    cancel = client.token_request(names.DSP, "CancelPostScanJobRequest", "t")
    assert needed(plain(a.DSP_CANCEL, cancel))
    assert needed(plain("urn:unknown", cancel))
    assert not needed(b"<not-xml")
    assert needed(b"--b--", 'multipart/related; boundary="b"; type="application/xop+xml"')


def test_a_job_unknown_while_the_shared_rows_are_unread_is_a_temporary_fault() -> None:
    """Exchange.rows_unread (issue 18): the binding could not read the shared rows (the
    database away): a token this instance does not know may be another instance's job, so it
    is ServerErrorTemporaryError (the scanner retries), not the final JobTokenNotFound; a job
    it knows is answered as always."""
    t = InProcessTransport(ServerConfig())
    known = create_job(t, FileShareInstructions(("\\\\s\\x",)))

    def cancel(token: str, *, unread: bool) -> Reply:
        body = envelope(
            Act.DSP_CANCEL, client.token_request(names.DSP, "CancelPostScanJobRequest", token)
        )
        exchange = t.server.open_exchange(RequestInfo(now=T0, content_type=client.SOAP_XML))
        exchange.feed(body)
        if unread:
            exchange.rows_unread()
        return exchange.end(T0).reply

    unknown = str(uuid.uuid4())
    check_protocol_fault(cancel(unknown, unread=True), DSP, "ServerErrorTemporaryError")
    check_protocol_fault(cancel(unknown, unread=False), DSP, "ClientErrorJobTokenNotFound")
    assert cancel(known, unread=True).status == 200


def test_a_job_whose_row_cannot_be_read_is_a_temporary_fault() -> None:
    """Exchange.rows_unreadable (issue 18, a rolling upgrade): the binding read the shared rows
    but cannot decode those of some jobs (a newer server's): a request for one of them is
    ServerErrorTemporaryError, not the final JobTokenNotFound; any other token is answered as
    always.  A row no server reads (corrupt) is ServerErrorInternalError (R4 step 9: a retry
    cannot succeed until an operator moves it aside), so that a scanner does not ask forever."""
    t = InProcessTransport(ServerConfig())
    known = create_job(t, FileShareInstructions(("\\\\s\\x",)))
    newer, corrupt, nowhere = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())

    def cancel(token: str) -> Reply:
        body = envelope(
            Act.DSP_CANCEL, client.token_request(names.DSP, "CancelPostScanJobRequest", token)
        )
        exchange = t.server.open_exchange(RequestInfo(now=T0, content_type=client.SOAP_XML))
        exchange.rows_unreadable(frozenset({newer}), frozenset({corrupt}))
        exchange.feed(body)
        return exchange.end(T0).reply

    check_protocol_fault(cancel(newer), DSP, "ServerErrorTemporaryError")
    check_protocol_fault(cancel(corrupt), DSP, "ServerErrorInternalError")
    check_protocol_fault(cancel(nowhere), DSP, "ClientErrorJobTokenNotFound")
    assert cancel(known).status == 200
