"""MS-BDSRR (WS-DSC): the operations management clients use (bdsrr-behavior §6; R3, R5, R10).

Every one of them needs a scan administrator (``admin_only``, R4 step 5)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from lxml import etree

from . import faults, names
from .args import Item, request_element
from .commands import Command, JobInput
from .dsp import job_elements, read_job_elements
from .lifecycle import Refused
from .model import Job
from .operation import Operation, OpResult, Request, change, find_job, reply_budget
from .xmlwrite import (
    SPLICE_ONLY,
    element_data,
    repository_configuration,
    repository_status,
    splice_point,
    sub,
)

NS = names.DSC
A = names.Action
#: Content models read on every request of their kind, built once.
_REQUESTED = (Item("RequestedElements"),)
_TOKEN = (Item("JobToken"),)


def read_repository_elements(request: Request) -> list[tuple[str, str]]:
    payload, args = request_element(request.envelope.body, NS, "GetRepositoryElementsRequest")
    found = args.sequence(payload, NS, _REQUESTED, allow_other=False)
    limit = request.config.limits.max_requested_names
    return args.requested_names(found["RequestedElements"][0], NS, limit)


def get_repository_elements(request: Request, wanted: list[tuple[str, str]]) -> OpResult:
    """The answer depends only on the names asked for, the configuration and the repository
    state, so it is serialized once per combination (issue 7: the most frequent management
    request) and spliced into each reply's envelope."""
    action = A.DSC_GET_REPOSITORY_ELEMENTS + "Response"
    cache = request.state.repository_answers
    key = (tuple(wanted), request.state.repository_state)
    if cache.config is not request.config:
        cache.reset(request.config)
    answer = cache.answers.get(key)
    if answer is None:
        result = _repository_elements(request, wanted)
        assert result.payload is not None
        # Self-contained: the prefixes its QName values use are declared on it (R3).
        payload = etree.Element(result.payload.tag, nsmap=result.nsmap)
        payload.extend(list(result.payload))
        answer = etree.tostring(payload)
        cache.put(key, answer)
    return OpResult(action, SPLICE_ONLY, {}, splice=(answer,))


def _repository_elements(request: Request, wanted: list[tuple[str, str]]) -> OpResult:
    nsmap = {"dsc": NS, "ftr": names.FILTER}
    response = etree.Element(f"{{{NS}}}GetRepositoryElementsResponse")
    container = sub(response, NS, "RepositoryElements")
    for qname in wanted:
        known = qname[0] == NS and qname[1] in ("RepositoryConfiguration", "RepositoryStatus")
        data = element_data(container, NS, qname, known, nsmap)
        if known and qname[1] == "RepositoryConfiguration":
            repository_configuration(data, request.config)
        elif known:
            repository_status(data, "RepositoryStatus", request.state.repository_state)
    return OpResult(A.DSC_GET_REPOSITORY_ELEMENTS + "Response", response, nsmap)


def read_cancel(request: Request) -> str:
    payload, args = request_element(request.envelope.body, NS, "CancelPostScanJobRequest")
    found = args.sequence(payload, NS, _TOKEN, allow_other=False)
    return args.token(found["JobToken"][0])


def cancel_post_scan_job(request: Request, token: str) -> OpResult:
    job = find_job(request, NS, token, own_only=False)
    _, commands, undo = change(request, NS, job, JobInput.CANCEL)
    return OpResult(
        A.DSC_CANCEL + "Response",
        etree.Element(f"{{{NS}}}CancelPostScanJobResponse"),
        {"dsc": NS},
        commands,
        undo,
    )


def read_get_active_jobs(request: Request) -> None:
    payload, args = request_element(request.envelope.body, NS, "GetActiveJobsRequest")
    args.empty(payload, NS)


def get_active_jobs(request: Request, _args: None) -> OpResult:
    jobs = request.state.jobs.active()
    return _listing(request, A.DSC_GET_ACTIVE_JOBS, "GetActiveJobsResponse", "ActiveJobs", jobs)


def _listing(
    request: Request, action: str, response_local: str, container: str, jobs: Iterable[Job]
) -> OpResult:
    """GetActiveJobs and GetJobHistory: the job summaries, serialized once per job version
    (JobXmlCache), spliced into the container, as many as fit in ``Limits.max_reply_bytes``
    (R15; [MS-BDSRR] 3.2.4.4/3.2.4.5 leave the number of jobs to the server).  ``jobs`` come
    in the order they are kept: the history newest first, active jobs oldest first (docs/rulings.md,
    "Replies within 32,767 octets")."""
    response = etree.Element(f"{{{NS}}}{response_local}")
    splice_point(sub(response, NS, container))
    nsmap = {"dsc": NS}
    budget = reply_budget(request, action + "Response", response, nsmap)
    cache = request.state.job_xml
    summaries: list[bytes] = []
    for job in jobs:
        summary = cache.job_summary(NS, "dsc", job)
        budget -= len(summary)
        if budget < 0:
            break
        summaries.append(summary)
    return OpResult(action + "Response", response, nsmap, splice=tuple(summaries))


def read_get_job_history(request: Request) -> None:
    # R3 quirk: the published example (captured from a Windows client) says GetJobsHistoryRequest.
    payload, args = request_element(
        request.envelope.body, NS, "GetJobHistoryRequest", "GetJobsHistoryRequest"
    )
    args.empty(payload, NS)


def get_job_history(request: Request, _args: None) -> OpResult:
    jobs = request.state.jobs.history()
    return _listing(request, A.DSC_GET_JOB_HISTORY, "GetJobHistoryResponse", "JobHistory", jobs)


def read_retry(request: Request) -> str:
    """ext:RetryPostScanJobRequest: ext:JobToken."""
    payload, args = request_element(
        request.envelope.body, names.EXT, "RetryPostScanJobRequest", fault_ns=NS
    )
    found = args.sequence(payload, names.EXT, (Item("JobToken"),), allow_other=False)
    return args.token(found["JobToken"][0])


def retry_post_scan_job(request: Request, token: str) -> OpResult:
    """Unknown token: JobTokenNotFound; a job that cannot be retried (active, canceled, all
    filters succeeded, documents expired): OperationFailed."""
    job = find_job(request, NS, token, own_only=False)
    lifecycle = request.state.lifecycle
    try:
        new, commands = lifecycle.retry(job, request.now)
    except Refused:
        raise faults.operation_failed(
            NS,
            f"the job is {job.state.value}; only an ended job with a failed filter whose "
            "documents are still kept ([jobs] spool_retention_seconds) can be retried",
        ) from None

    def undo() -> list[Command]:
        return lifecycle.undo(job, new)

    response = etree.Element(f"{{{names.EXT}}}RetryPostScanJobResponse")
    rerun = sum(
        1 for before, after in zip(job.filters, new.filters, strict=True) if before != after
    )
    sub(response, names.EXT, "FiltersToRun", str(rerun))
    return OpResult(A.EXT_RETRY_JOB + "Response", response, {"ext": names.EXT}, commands, undo)


def read_purge_job_history(request: Request) -> datetime:
    """ext:PurgeJobHistoryRequest: ext:Before, an xs:dateTime with a UTC offset (R6)."""
    payload, args = request_element(
        request.envelope.body, names.EXT, "PurgeJobHistoryRequest", fault_ns=NS
    )
    found = args.sequence(payload, names.EXT, (Item("Before"),), allow_other=False)
    text = args.text(found["Before"][0], max_length=64)
    try:
        before = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise args.invalid(names.EXT, "Before") from None
    if before.tzinfo is None:
        raise args.invalid(names.EXT, "Before")
    return before


def purge_job_history(request: Request, before: datetime) -> OpResult:
    gone, commands, undo = request.state.lifecycle.purge(before)

    def undone() -> list[Command]:
        undo()
        return []

    response = etree.Element(f"{{{names.EXT}}}PurgeJobHistoryResponse")
    sub(response, names.EXT, "Purged", str(len(gone)))
    return OpResult(
        A.EXT_PURGE_JOB_HISTORY + "Response", response, {"ext": names.EXT}, commands, undone
    )


OPERATIONS: tuple[Operation[Any], ...] = (
    Operation(
        A.DSC_GET_REPOSITORY_ELEMENTS,
        NS,
        read_repository_elements,
        get_repository_elements,
        admin_only=True,
        listing=True,
    ),
    Operation(A.DSC_CANCEL, NS, read_cancel, cancel_post_scan_job, admin_only=True),
    Operation(
        A.DSC_GET_JOB_ELEMENTS,
        NS,
        read_job_elements(NS),
        job_elements(NS, own_only=False),
        admin_only=True,
    ),
    Operation(
        A.DSC_GET_ACTIVE_JOBS,
        NS,
        read_get_active_jobs,
        get_active_jobs,
        admin_only=True,
        listing=True,
    ),
    Operation(
        A.DSC_GET_JOB_HISTORY,
        NS,
        read_get_job_history,
        get_job_history,
        admin_only=True,
        listing=True,
    ),
    Operation(
        A.EXT_PURGE_JOB_HISTORY, NS, read_purge_job_history, purge_job_history, admin_only=True
    ),
    Operation(A.EXT_RETRY_JOB, NS, read_retry, retry_post_scan_job, admin_only=True),
)
