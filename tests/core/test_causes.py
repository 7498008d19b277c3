"""The core says what happened (issue 15): every job record it asks the binding to persist
carries the input that moved the job and the filters that change ended, every removal says why,
and a fault reply carries its subcode, so that the job log, the metrics and the status page
never compare records or parse text to find out.  Each path through R6 is played here with the
requests, engine reports and clock steps that cause it."""

from __future__ import annotations

from datetime import timedelta

from lxml import etree

from core_support import (
    DSC,
    DSP,
    FS,
    Act,
    cancel_job,
    create_job,
    end_job,
    envelope,
    job_of,
    ok,
    send_image,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import (
    CreateJob,
    DropJob,
    FilterFinished,
    FilterStarted,
    JobInput,
    Outcome,
    ProcessingFinished,
    ProcessingStarted,
    Removal,
    RequestInfo,
    ServerConfig,
    UpdateJob,
    client,
    names,
)
from dsc_core.model import FileShareInstructions, FilterState, FilterStateReason, JobState
from test_scenarios import FILESHARE, FILTER, filter_xml, raw_create

I = JobInput
OTHER = FileShareInstructions((r"\\host\other",))
FAILED = (FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,))


def updates(t: InProcessTransport, token: str) -> list[tuple[JobInput, tuple[int, ...]]]:
    """The (cause, filters ended) of every UpdateJob of ``token`` so far, in order."""
    return [
        (c.cause, c.filters_ended)
        for c in t.commands
        if isinstance(c, UpdateJob) and c.job.token == token
    ]


def test_a_scan_from_creation_to_success_says_each_step() -> None:
    t = InProcessTransport()
    token = create_job(t, FS, OTHER)
    assert [c for c in t.commands if isinstance(c, CreateJob)] == [CreateJob(job_of(t, token))]
    ok(send_image(t, token))
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    t.engine(FilterStarted(token, 0))
    t.engine(FilterFinished(token, 0, FilterState.COMPLETED_SUCCESSFULLY))
    t.engine(FilterStarted(token, 1))
    t.engine(FilterFinished(token, 1, FilterState.COMPLETED_WITH_WARNINGS))
    assert updates(t, token) == [
        (I.IMAGE, ()),
        (I.END, ()),
        (I.ENGINE_STARTED, ()),
        (I.FILTER_STARTED, ()),
        (I.FILTER_FINISHED, (0,)),
        (I.FILTER_STARTED, ()),
        (I.FILTER_FINISHED, (1,)),
        # The last filter's end completes the job at once, in its own record.
        (I.COMPLETE_WITH_WARNINGS, ()),
    ]
    last = [c for c in t.commands if isinstance(c, UpdateJob)][-1]
    assert last.ends_job and last.job.state is JobState.COMPLETED
    t.engine(ProcessingFinished(token))  # stale: the job has ended
    assert len(updates(t, token)) == 8


def test_a_filter_finished_without_filter_started_moves_the_job_to_processing_first() -> None:
    t = InProcessTransport()
    token = create_job(t, FS, OTHER)
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    t.engine(FilterFinished(token, 0, FilterState.COMPLETED_SUCCESSFULLY))
    assert updates(t, token)[-2:] == [(I.FILTER_STARTED, ()), (I.FILTER_FINISHED, (0,))]


def test_the_first_failure_aborts_the_job_and_ends_the_failed_and_the_unrun_filters() -> None:
    t = InProcessTransport()
    token = create_job(t, FS, OTHER)
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    t.engine(FilterStarted(token, 0))
    t.engine(FilterFinished(token, 0, *FAILED))
    # R6: one record ends the failed filter, cancels the one never run, and aborts the job.
    assert updates(t, token)[-1] == (I.FAIL, (0, 1))
    assert job_of(t, token).state is JobState.ABORTED


def test_filters_the_engine_never_finished_end_with_the_job() -> None:
    t = InProcessTransport()
    token = create_job(t, FS, OTHER, continue_on_error=True)
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    t.engine(FilterFinished(token, 0, *FAILED))
    t.engine(ProcessingFinished(token))
    assert updates(t, token)[-2:] == [
        (I.FILTER_FINISHED, (0,)),
        (I.COMPLETE_WITH_ERRORS, (1,)),  # counted as failed (UnknownError) by the job's end
    ]


def test_a_cancel_says_canceled_and_ends_the_unfinished_filters() -> None:
    t = InProcessTransport()
    token = create_job(t, FS, OTHER)
    ok(cancel_job(t, DSC, token))
    assert updates(t, token) == [(I.CANCEL, (0, 1))]


def test_the_clock_says_timed_out() -> None:
    t = InProcessTransport(ServerConfig(job_timeout_seconds=60))
    token = create_job(t, FS)
    t.advance(61)
    assert updates(t, token) == [(I.TIMEOUT, (0,))]
    assert job_of(t, token).state is JobState.ABORTED


def test_a_retry_says_retried_and_the_filters_run_again_are_the_pending_ones() -> None:
    t = InProcessTransport()
    token = create_job(t, FS, OTHER, continue_on_error=True)
    ok(end_job(t, token))
    t.process(token, [(FilterState.COMPLETED_SUCCESSFULLY, ()), FAILED])
    request = etree.Element(f"{{{names.EXT}}}RetryPostScanJobRequest")
    etree.SubElement(request, f"{{{names.EXT}}}JobToken").text = token
    ok(t.post(envelope(names.Action.EXT_RETRY_JOB, request)))
    retried = [c for c in t.commands if isinstance(c, UpdateJob)][-1]
    assert (retried.cause, retried.filters_ended) == (I.RETRY, ())
    assert [f.state for f in retried.job.filters] == [
        FilterState.COMPLETED_SUCCESSFULLY,
        FilterState.PENDING,
    ]


def test_a_restart_says_resumed() -> None:
    t = InProcessTransport()
    token = create_job(t, FS)
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    t.engine(FilterStarted(token, 0))
    running = job_of(t, token)
    again = InProcessTransport()
    commands = again.server.restore([running], again.clock)
    resumed = [c for c in commands if isinstance(c, UpdateJob)]
    assert [(c.cause, c.filters_ended) for c in resumed] == [(I.RESUMED, ())]
    assert resumed[0].job.state is JobState.PENDING


def test_a_job_born_aborted_is_created_ended() -> None:
    t = InProcessTransport()
    reply = t.post(raw_create(filter_xml(FILTER + "/fax", FILESHARE)))  # no usable filter
    (created,) = [c for c in t.commands if isinstance(c, CreateJob)]
    assert created.job.state is JobState.ABORTED  # R6: no UpdateJob follows, the record ends it
    assert updates(t, created.job.token) == [] and reply.status == 200


def test_a_full_history_and_a_purge_say_why_a_job_left() -> None:
    t = InProcessTransport(ServerConfig(history_size=1))
    first = create_job(t, FS)
    ok(cancel_job(t, DSC, first))
    second = create_job(t, FS)
    ok(cancel_job(t, DSC, second))
    assert DropJob(first, Removal.HISTORY_FULL) in t.commands
    t.clock += timedelta(hours=1)
    request = etree.Element(f"{{{names.EXT}}}PurgeJobHistoryRequest")
    etree.SubElement(request, f"{{{names.EXT}}}Before").text = t.clock.isoformat()
    ok(t.post(envelope(names.Action.EXT_PURGE_JOB_HISTORY, request)))
    assert t.commands[-1] == DropJob(second, Removal.PURGED)


def end_exchange(t: InProcessTransport, token: str) -> Outcome:
    exchange = t.server.open_exchange(RequestInfo(now=t.clock))
    exchange.feed(envelope(Act.DSP_END, client.token_request(DSP, "EndPostScanJobRequest", token)))
    return exchange.end()


def test_a_fault_reply_carries_its_subcode_and_a_success_none() -> None:
    t = InProcessTransport()
    token = create_job(t, FS)
    refused = end_exchange(t, "no-such-job")
    assert refused.reply.status == 400
    assert refused.fault_subcode == "ClientErrorJobTokenNotFound"
    # The log line names the same subcode: one source for both.
    assert refused.fault is not None and "/ClientErrorJobTokenNotFound: " in refused.fault
    answered = end_exchange(t, token)
    assert answered.reply.status == 200
    assert answered.fault is None and answered.fault_subcode is None


def test_a_fault_without_a_subcode_says_so() -> None:
    t = InProcessTransport()
    exchange = t.server.open_exchange(RequestInfo(now=t.clock))
    exchange.feed(b"not xml at all")
    refused = exchange.end()
    assert refused.fault is not None and refused.fault_subcode is not None
    assert refused.fault.startswith(f"Sender/{refused.fault_subcode}: ")
