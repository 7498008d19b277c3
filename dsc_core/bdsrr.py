"""MS-BDSRR (WS-DSC): the operations management clients use (bdsrr-behavior §6; R3, R5, R10)."""

from __future__ import annotations

from lxml import etree

from . import names
from .args import Item
from .config import ServerConfig
from .dsp import job_elements
from .jobstate import JobInput
from .jobxml import job_summary
from .operations import (
    change,
    element_data,
    find_job,
    request_element,
    requested_names,
    require_scan_admin,
    result,
)
from .server import Call, Handler, OpResult

NS = names.DSC
A = names.Action


def _sub(parent: etree._Element, local: str, text: str | None = None) -> etree._Element:
    el = etree.SubElement(parent, f"{{{NS}}}{local}")
    if text is not None:
        el.text = text
    return el


def repository_configuration(parent: etree._Element, config: ServerConfig) -> etree._Element:
    """dsc:RepositoryConfiguration: the filters offered (bdsrr 3.2.1).  The ``ftr`` prefix must
    be bound by the document it goes into (FilterType/Dialect is an xs:QName; example 02)."""
    configuration = _sub(parent, "RepositoryConfiguration")
    filters = _sub(configuration, "Filters")
    for local in config.filters:
        filter_el = _sub(filters, "Filter")
        _sub(filter_el, "Dialect", f"ftr:{local}")
        _sub(filter_el, "FilterConfig")
    return configuration


def get_repository_elements(call: Call) -> OpResult:
    require_scan_admin(call)
    payload, args = request_element(call, NS, "GetRepositoryElementsRequest")
    found = args.sequence(payload, NS, (Item("RequestedElements"),), allow_other=False)
    wanted = requested_names(call, args, found["RequestedElements"][0], NS)
    nsmap = {"dsc": NS, "ftr": names.FILTER}
    response = etree.Element(f"{{{NS}}}GetRepositoryElementsResponse")
    container = _sub(response, "RepositoryElements")
    for qname in wanted:
        known = qname[0] == NS and qname[1] in ("RepositoryConfiguration", "RepositoryStatus")
        data = element_data(container, NS, qname, known, nsmap)
        if known and qname[1] == "RepositoryConfiguration":
            repository_configuration(data, call.config)
        elif known:
            status = _sub(data, "RepositoryStatus")
            _sub(status, "RepositoryState", call.server.repository_state.value)
            _sub(_sub(status, "RepositoryStateReasons"), "RepositoryStateReason", "None")
    return result(A.DSC_GET_REPOSITORY_ELEMENTS + "Response", response, nsmap)


def cancel_post_scan_job(call: Call) -> OpResult:
    require_scan_admin(call)
    payload, args = request_element(call, NS, "CancelPostScanJobRequest")
    found = args.sequence(payload, NS, (Item("JobToken"),), allow_other=False)
    token = args.token(found["JobToken"][0])
    job = find_job(call, NS, token, own_only=False)
    _, commands, undo = change(call, NS, job, JobInput.CANCEL)
    return result(
        A.DSC_CANCEL + "Response",
        etree.Element(f"{{{NS}}}CancelPostScanJobResponse"),
        {"dsc": NS},
        commands,
        undo,
    )


def get_post_scan_job_elements(call: Call) -> OpResult:
    require_scan_admin(call)
    return job_elements(call, NS, own_only=False)


def get_active_jobs(call: Call) -> OpResult:
    require_scan_admin(call)
    payload, args = request_element(call, NS, "GetActiveJobsRequest")
    args.empty(payload, NS)
    response = etree.Element(f"{{{NS}}}GetActiveJobsResponse")
    container = _sub(response, "ActiveJobs")
    for job in call.server.jobs.active():
        job_summary(container, NS, job)
    return result(A.DSC_GET_ACTIVE_JOBS + "Response", response, {"dsc": NS})


def get_job_history(call: Call) -> OpResult:
    require_scan_admin(call)
    # R3 quirk: the published example (captured from a Windows client) says GetJobsHistoryRequest.
    payload, args = request_element(call, NS, "GetJobHistoryRequest", "GetJobsHistoryRequest")
    args.empty(payload, NS)
    response = etree.Element(f"{{{NS}}}GetJobHistoryResponse")
    container = _sub(response, "JobHistory")
    for job in call.server.jobs.history():
        job_summary(container, NS, job)
    return result(A.DSC_GET_JOB_HISTORY + "Response", response, {"dsc": NS})


HANDLERS: dict[str, tuple[str, Handler]] = {
    A.DSC_GET_REPOSITORY_ELEMENTS: (NS, get_repository_elements),
    A.DSC_CANCEL: (NS, cancel_post_scan_job),
    A.DSC_GET_JOB_ELEMENTS: (NS, get_post_scan_job_elements),
    A.DSC_GET_ACTIVE_JOBS: (NS, get_active_jobs),
    A.DSC_GET_JOB_HISTORY: (NS, get_job_history),
}
