"""The client role's reading of a job's outcome (what `dsc scan` turns into its exit status)."""

from __future__ import annotations

import pytest

from dsc_core.client import JobView
from dsc_core.model import JobState, JobStateReason
from test_store import make_job


def view(state: str, *reasons: str) -> JobView:
    return JobView("t", state, reasons, (), 1)


#: (job, ended, succeeded): what a client, and the server's own Job record, read from a state.
OUTCOMES = [
    (view("Completed", "PostScanJobCompletedSuccessfully"), True, True),
    (view("Completed", "PostScanJobCompletedWithWarnings"), True, True),
    (view("Completed", "PostScanJobCompletedWithErrors"), True, False),
    (view("Aborted", "PostScanJobProcessingFailed"), True, False),
    (view("Canceled", "PostScanJobCanceled"), True, False),
    (view("Processing", "None"), False, False),
    (view("Creating", "None"), False, False),
]


@pytest.mark.parametrize("job, ended, succeeded", OUTCOMES)
def test_outcome(job: JobView, ended: bool, succeeded: bool) -> None:
    assert (job.ended, job.succeeded) == (ended, succeeded)


@pytest.mark.parametrize("job, ended, succeeded", OUTCOMES)
def test_server_side_job_reads_the_same_outcome(job: JobView, ended: bool, succeeded: bool) -> None:
    """model.Job.succeeded (the job log, the device book) agrees with the client's reading."""
    record = make_job("t").evolve(
        state=JobState(job.state), reasons=tuple(JobStateReason(r) for r in job.reasons)
    )
    assert (not record.is_active, record.succeeded) == (ended, succeeded)
