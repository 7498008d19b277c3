"""What the client commands ask the server about jobs: summaries with their times, a token
from its first characters, where each filter delivered, waiting for the end state."""

from __future__ import annotations

import time
from typing import Any

from dsc_bindings.console.client import ConnectionFailed
from dsc_bindings.console.remote import Client
from dsc_bindings.console.support import CliError
from dsc_core import client as dc
from dsc_core import names

A = names.Action

UUID_LENGTH = 36


def summaries(client: Client, action: str, request: str, container: str) -> list[dc.JobView]:
    return dc.read_summaries(client.call(action, dc.empty_request(request)).payload, container)


def with_times(client: Client, job: dc.JobView) -> dc.JobView:
    """A JobSummary has no times (bdsrr 2.2.4.x); the JobStatus of the same job has them."""
    try:
        status = dc.read_job_elements(
            client.call(
                A.DSC_GET_JOB_ELEMENTS,
                dc.job_elements_request(names.DSC, job.token, ["JobStatus"]),
            ).payload,
            names.DSC,
        )
    except dc.ClientFault:
        return job  # gone from the history in between: list it without times
    return dc.JobView(
        job.token,
        job.state,
        job.reasons,
        job.filters,
        job.images_received,
        job.psp_identifier,
        job.psp_display_name,
        job.user_name,
        status.created,
        status.completed,
    )


def resolve_token(client: Client, token: str) -> str:
    """A TOKEN argument may be the first characters of a token, as listings show it."""
    if len(token) >= UUID_LENGTH:
        return token
    found = {
        j.token
        for action, request, container in (
            (A.DSC_GET_ACTIVE_JOBS, "GetActiveJobsRequest", "ActiveJobs"),
            (A.DSC_GET_JOB_HISTORY, "GetJobHistoryRequest", "JobHistory"),
        )
        for j in summaries(client, action, request, container)
        if j.token.lower().startswith(token.lower())
    }
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        raise CliError(f"{token!r} matches {len(found)} jobs; give more of the token")
    return token  # let the server say it is not found


def filter_destinations(client: Client, token: str) -> dict[int, dict[str, Any]]:
    """Where each filter was told to deliver and what it delivered there, from the server's
    status endpoint (MS-BDSRR has no element for either); empty when the server has no such
    endpoint or refuses it."""
    try:
        detail = client.status_json(f"job={token}")
    except (CliError, ConnectionFailed, ValueError):
        return {}
    job = detail.get("job") if isinstance(detail, dict) else None
    if not isinstance(job, dict):
        return {}
    return {i: f for i, f in enumerate(job.get("filters", [])) if isinstance(f, dict)}


def wait_for_end(client: Client, token: str, ns: str, *, wait: float, poll: float) -> dc.JobView:
    """Poll GetPostScanJobElements (WS-DSP or MS-BDSRR, by ``ns``) until the job ended (R6)."""
    action = A.DSP_GET_JOB_ELEMENTS if ns == names.DSP else A.DSC_GET_JOB_ELEMENTS
    deadline = time.monotonic() + wait
    while True:
        view = dc.read_job_elements(
            client.call(
                action, dc.job_elements_request(ns, token, ["JobStatus", "JobDescription"])
            ).payload,
            ns,
        )
        if view.ended:
            return view
        if time.monotonic() > deadline:
            raise CliError(f"job {token} still {view.state} after {wait:.0f} s")
        time.sleep(poll)
