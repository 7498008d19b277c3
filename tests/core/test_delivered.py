"""What each filter delivered is kept with the job (issue 19 point 1, issue 14 §3): the engine's
FilterFinished names the files, document URLs and Message-IDs, the core keeps them on the job's
filter record (what the store persists and the views read), a retry appends what the re-run
delivered, the record keeps at most ``max_documents_per_job`` names per filter, and none of it
reaches the MS-BDSRR wire (dsc:FilterStatus has no element for it)."""

from __future__ import annotations

from lxml import etree

from core_support import (
    DSC,
    FS,
    create_job,
    elements_body,
    end_job,
    envelope,
    job_of,
    ok,
    soap,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import (
    FilterFinished,
    FilterStarted,
    Limits,
    ProcessingFinished,
    ProcessingStarted,
    ServerConfig,
    UpdateJob,
    names,
)
from dsc_core.model import EmailInstructions, FilterState, FilterStateReason, JobState

MAIL = EmailInstructions(False, ("someone@example.com",))
FIRST = (r"\\files.example\scans\u@x\Scan_0001.tif", r"\\files.example\scans\u@x\Scan_0002.tif")
MESSAGE = "Message-ID <dsc.1@example.com> to someone@example.com"
FAILED = (FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.FILE_SHARE_OUT_OF_DISK_SPACE,))


def _run(t: InProcessTransport, token: str, *finished: FilterFinished) -> None:
    t.engine(ProcessingStarted(token))
    for event in finished:
        t.engine(FilterStarted(token, event.index))
        t.engine(event)
    t.engine(ProcessingFinished(token))


def _retry(t: InProcessTransport, token: str) -> None:
    request = etree.Element(f"{{{names.EXT}}}RetryPostScanJobRequest")
    etree.SubElement(request, f"{{{names.EXT}}}JobToken").text = token
    ok(t.post(envelope(names.Action.EXT_RETRY_JOB, request)))


def test_each_filter_record_keeps_what_its_run_delivered() -> None:
    t = InProcessTransport()
    token = create_job(t, FS, MAIL)
    ok(end_job(t, token))
    _run(
        t,
        token,
        FilterFinished(token, 0, FilterState.COMPLETED_SUCCESSFULLY, (), FIRST),
        FilterFinished(token, 1, FilterState.COMPLETED_SUCCESSFULLY, (), (MESSAGE,)),
    )
    job = job_of(t, token)
    assert job.state is JobState.COMPLETED
    assert [f.delivered for f in job.filters] == [FIRST, (MESSAGE,)]
    assert not any(f.delivered_truncated for f in job.filters)
    # The record the store persists when the filter ends carries them already.
    ended = [c for c in t.commands if isinstance(c, UpdateJob) and c.filters_ended == (0,)]
    assert ended[-1].job.filters[0].delivered == FIRST


def test_a_failed_filter_keeps_what_it_delivered_before_it_failed() -> None:
    t = InProcessTransport()
    token = create_job(t, FS)
    ok(end_job(t, token))
    _run(t, token, FilterFinished(token, 0, *FAILED, FIRST[:1]))
    job = job_of(t, token)
    assert job.state is JobState.ABORTED
    assert job.filters[0].delivered == FIRST[:1]


def test_a_retry_appends_what_the_rerun_delivered_once() -> None:
    t = InProcessTransport()
    token = create_job(t, FS)
    ok(end_job(t, token))
    _run(t, token, FilterFinished(token, 0, *FAILED, FIRST[:1]))
    _retry(t, token)
    # Set back to Pending for the re-run, the filter still shows what it delivered before.
    assert job_of(t, token).filters[0].state is FilterState.PENDING
    assert job_of(t, token).filters[0].delivered == FIRST[:1]
    # The file share re-run names its journaled first file again: not kept twice.
    _run(t, token, FilterFinished(token, 0, FilterState.COMPLETED_SUCCESSFULLY, (), FIRST))
    job = job_of(t, token)
    assert job.state is JobState.COMPLETED
    assert job.filters[0].delivered == FIRST


def test_at_most_max_documents_per_job_names_are_kept_and_the_record_says_so() -> None:
    t = InProcessTransport(ServerConfig(limits=Limits(max_documents_per_job=2)))
    token = create_job(t, FS)
    ok(end_job(t, token))
    many = (*FIRST, r"\\other\scans\u@x\Scan_0001.tif", r"\\other\scans\u@x\Scan_0002.tif")
    _run(t, token, FilterFinished(token, 0, *FAILED, many))
    assert job_of(t, token).filters[0].delivered == FIRST
    assert job_of(t, token).filters[0].delivered_truncated
    _retry(t, token)
    _run(t, token, FilterFinished(token, 0, FilterState.COMPLETED_SUCCESSFULLY, (), many))
    kept = job_of(t, token).filters[0]
    assert kept.delivered == FIRST and kept.delivered_truncated


def test_the_names_are_not_on_the_ms_bdsrr_wire() -> None:
    t = InProcessTransport()
    token = create_job(t, FS)
    ok(end_job(t, token))
    _run(t, token, FilterFinished(token, 0, FilterState.COMPLETED_SUCCESSFULLY, (), FIRST))
    assert job_of(t, token).filters[0].delivered == FIRST
    reply = t.post(
        soap(
            elements_body("dsc", token, "dsc:JobStatus", "dsc:JobDescription"),
            DSC + "/GetPostScanJobElements",
        )
    )
    ok(reply)
    assert b"Scan_0001" not in reply.body and b"Scan_0002" not in reply.body
