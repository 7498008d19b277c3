"""Job data written as XML, in schema element order (bdsrr.xsd JobStatusType, JobSummaryType,
JobDescriptionType, DocumentsType, PostScanJobEndStateType).

WS-DSP uses the same types in its own namespace (dsm-and-stack §1.4), so every writer takes the
namespace to write in.
"""

from __future__ import annotations

from datetime import datetime

from lxml import etree

from .model import FilterStatus, Job, JobStateReason
from .xmlread import Element


def timestamp(value: datetime) -> str:
    """R6: xs:dateTime, local time with an explicit UTC offset, millisecond precision."""
    return value.isoformat(timespec="milliseconds")


def _sub(parent: Element, ns: str, local: str, text: str | None = None) -> Element:
    el = etree.SubElement(parent, f"{{{ns}}}{local}")
    if text is not None:
        el.text = text
    return el


def _reasons(parent: Element, ns: str, container: str, reasons: tuple[JobStateReason, ...]) -> None:
    box = _sub(parent, ns, container)
    for reason in reasons or (JobStateReason.NONE,):
        _sub(box, ns, "JobStateReason", reason.value)


def _filter_statuses(
    parent: Element, ns: str, container: str, filters: tuple[FilterStatus, ...]
) -> None:
    box = _sub(parent, ns, container)
    for status in filters:
        el = _sub(box, ns, "FilterStatus")
        _sub(el, ns, "Dialect", status.dialect)
        _sub(el, ns, "FilterState", status.state.value)
        if status.reasons:
            reasons = _sub(el, ns, "FilterStateReasons")
            for reason in status.reasons:
                _sub(reasons, ns, "FilterStateReason", reason.value)


def job_status(parent: Element, ns: str, job: Job) -> Element:
    el = _sub(parent, ns, "JobStatus")
    _sub(el, ns, "JobToken", job.token)
    _sub(el, ns, "JobState", job.state.value)
    _reasons(el, ns, "JobStateReasons", job.reasons)
    _filter_statuses(el, ns, "FilterStatuses", job.filters)
    _sub(el, ns, "ImagesReceived", str(job.images_received))
    _sub(el, ns, "JobCreatedTime", timestamp(job.created))
    if job.completed is not None:
        _sub(el, ns, "JobCompletedTime", timestamp(job.completed))
    return el


def job_description(parent: Element, ns: str, job: Job) -> Element:
    el = _sub(parent, ns, "JobDescription")
    _sub(el, ns, "PSP_Identifier", job.psp_identifier)
    _sub(el, ns, "PSP_DisplayName", job.psp_display_name)
    _sub(el, ns, "JobOriginatingUserName", job.user_name)
    return el


def documents(parent: Element, ns: str, job: Job) -> Element:
    el = _sub(parent, ns, "Documents")
    for doc in job.documents:
        description = _sub(_sub(el, ns, "Document"), ns, "DocumentDescription")
        _sub(description, ns, "DocumentId", str(doc.document_id))
        _sub(description, ns, "Format", doc.format)
    return el


def job_summary(parent: Element, ns: str, job: Job) -> Element:
    el = _sub(parent, ns, "JobSummary")
    _sub(el, ns, "JobToken", job.token)
    _sub(el, ns, "PSP_Identifier", job.psp_identifier)
    _sub(el, ns, "PSP_DisplayName", job.psp_display_name)
    _sub(el, ns, "JobOriginatingUserName", job.user_name)
    _sub(el, ns, "JobState", job.state.value)
    _reasons(el, ns, "JobStateReasons", job.reasons)
    _filter_statuses(el, ns, "FilterStatuses", job.filters)
    _sub(el, ns, "ImagesReceived", str(job.images_received))
    return el


def end_state(parent: Element, ns: str, job: Job) -> Element:
    el = _sub(parent, ns, "PostScanJobEndState")
    _sub(el, ns, "JobToken", job.token)
    _sub(el, ns, "PSP_Identifier", job.psp_identifier)
    _sub(el, ns, "PSP_DisplayName", job.psp_display_name)
    _sub(el, ns, "JobOriginatingUserName", job.user_name)
    _sub(el, ns, "JobCompletedState", job.state.value)
    _reasons(el, ns, "JobCompletedStateReasons", job.reasons)
    _filter_statuses(el, ns, "FilterCompletedStatuses", job.filters)
    _sub(el, ns, "ImagesReceived", str(job.images_received))
    if job.completed is not None:
        _sub(el, ns, "JobCompletedTime", timestamp(job.completed))
    return el
