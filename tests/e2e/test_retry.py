"""ext:RetryPostScanJob (``dsc retry TOKEN``): the failed filters of a completed job whose
documents are still kept run again; the ones that succeeded do not.  In process (the core's
rules, a store failure undone) and end to end (a share that failed, then works)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from lxml import etree

from core_support import (
    DSC,
    cancel_job,
    check_protocol_fault,
    create_job,
    end_job,
    envelope,
    payload_of,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import (
    FilterFinished,
    JobInput,
    ProcessingFinished,
    ProcessingStarted,
    StartProcessing,
    UpdateJob,
    names,
)
from dsc_core.model import FileShareInstructions, FilterState, FilterStateReason, JobState
from e2e_support import ServerProcess, dsc
from engines_support import BACKENDS, Backend, with_backend

A = names.Action
SHARE = FileShareInstructions((r"\\host\share",))
OTHER = FileShareInstructions((r"\\host\other",))


def retry_request(token: str) -> etree._Element:
    request = etree.Element(f"{{{names.EXT}}}RetryPostScanJobRequest")
    etree.SubElement(request, f"{{{names.EXT}}}JobToken").text = token
    return request


def retry(t: InProcessTransport, token: str) -> object:
    return t.post(envelope(A.EXT_RETRY_JOB, retry_request(token)))


def failed_job(t: InProcessTransport) -> str:
    """A job whose first filter succeeded and second failed (ContinueOnError)."""
    token = create_job(t, SHARE, OTHER, continue_on_error=True)
    assert end_job(t, token).status == 200
    t.engine(ProcessingStarted(token))
    t.engine(FilterFinished(token, 0, FilterState.COMPLETED_SUCCESSFULLY))
    t.engine(
        FilterFinished(
            token, 1, FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,)
        )
    )
    t.engine(ProcessingFinished(token))
    job = t.server.jobs.get(token)
    assert job is not None and job.state is JobState.COMPLETED
    return token


def test_retry_runs_only_the_failed_filters_again() -> None:
    t = InProcessTransport()
    token = failed_job(t)
    reply = t.post(envelope(A.EXT_RETRY_JOB, retry_request(token)))
    assert reply.status == 200, reply.body.decode()
    assert payload_of(reply).findtext(f"{{{names.EXT}}}FiltersToRun") == "1"
    job = t.server.jobs.get(token)
    assert job is not None and job.state is JobState.PENDING and job.completed is None
    assert [f.state for f in job.filters] == [
        FilterState.COMPLETED_SUCCESSFULLY,
        FilterState.PENDING,
    ]
    assert StartProcessing(job) in t.commands and UpdateJob(job, JobInput.RETRY) in t.commands
    t.engine(ProcessingStarted(token))
    t.engine(FilterFinished(token, 1, FilterState.COMPLETED_SUCCESSFULLY))
    t.engine(ProcessingFinished(token))
    done = t.server.jobs.get(token)
    assert done is not None and done.state is JobState.COMPLETED
    assert done.reasons[0].value == "PostScanJobCompletedSuccessfully"
    # Nothing failed any more: nothing to retry.
    check_protocol_fault(
        t.post(envelope(A.EXT_RETRY_JOB, retry_request(token))), DSC, "OperationFailed"
    )


def test_what_cannot_be_retried() -> None:
    t = InProcessTransport()
    active = create_job(t, SHARE)
    check_protocol_fault(
        t.post(envelope(A.EXT_RETRY_JOB, retry_request(active))), DSC, "OperationFailed"
    )
    cancel_job(t, DSC, active)  # canceled: its documents are gone
    check_protocol_fault(
        t.post(envelope(A.EXT_RETRY_JOB, retry_request(active))), DSC, "OperationFailed"
    )
    unknown = t.post(envelope(A.EXT_RETRY_JOB, retry_request("no-such-job")))
    check_protocol_fault(unknown, DSC, "ClientErrorJobTokenNotFound")


def test_a_store_failure_undoes_the_retry() -> None:
    t = InProcessTransport()
    token = failed_job(t)
    t.store.fail_on = UpdateJob
    reply = t.post(envelope(A.EXT_RETRY_JOB, retry_request(token)))
    check_protocol_fault(reply, DSC, "ServerErrorTemporaryError")
    job = t.server.jobs.get(token)
    assert job is not None and job.state is JobState.COMPLETED
    # Still retryable: its documents are still kept.
    assert t.post(envelope(A.EXT_RETRY_JOB, retry_request(token))).status == 200


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dsc_retry_delivers_after_the_share_is_fixed(tmp_path: Path, backend: Backend) -> None:
    """On either store (issue 17): the failed job's documents are kept in the spool and read
    again by the retry; purged, its record is gone for good (also after kill -9)."""
    config = with_backend(backend, None, tmp_path)
    server = ServerProcess(tmp_path / "data", config=config).start()
    try:
        page = tmp_path / "page.png"
        page.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(20_000))
        # A file where the share's folder should be: the file share filter fails.
        blocker = tmp_path / "data" / "shares" / "localhost"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_bytes(b"not a folder")
        first = dsc("scan", "--server", server.url, "--quiet", "--json", str(page))
        assert first.code == 1, first
        token = first.json()["token"]
        assert first.json()["filters"][0]["state"] != "CompletedSuccessfully"
        [failed_run] = dsc("job", token, "--server", server.url, "--json").json()["filters"]
        assert set(backend.documents(server.data, token)) == {"1"}  # kept for a retry
        blocker.unlink()
        run = dsc("retry", token[:8], "--server", server.url)
        assert run.code == 0, run
        assert f"job {token}: 1 filter(s) run again" in run.err
        assert "Filter fileshare  CompletedSuccessfully" in run.out, run.out
        delivered = list(blocker.rglob("page_0001.png"))
        assert len(delivered) == 1 and delivered[0].read_bytes() == page.read_bytes()
        # The job record names the file the re-run wrote (issue 19); the failed run wrote none.
        assert failed_run["delivered"] == []
        [fileshare] = dsc("job", token, "--server", server.url, "--json").json()["filters"]
        assert fileshare["delivered"] == [str(delivered[0])]
        assert ["delivered", str(delivered[0])] in [
            line.split() for line in run.out.splitlines()
        ], run.out
        again = dsc("retry", token, "--server", server.url)
        assert again.code == 1 and "cannot be retried" in again.err, again
        assert f"job {token} retried: fileshare run again" in server.log

        tomorrow = (datetime.now() + timedelta(days=1)).date().isoformat()
        purge = dsc("purge", "--server", server.url, "--before", tomorrow, "--yes")
        assert purge.code == 0 and purge.out.startswith("1 job(s)"), purge
        assert not backend.has_documents(server.data, token)
        server.kill9()
        server.start()
        assert dsc("history", "--server", server.url, "--json").json() == []
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()
