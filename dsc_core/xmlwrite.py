"""Writing the XML of responses and events, in schema element order: job data (bdsrr.xsd
JobStatusType, JobSummaryType, JobDescriptionType, DocumentsType, PostScanJobEndStateType), the
repository's configuration and status, and requested-element answers (R5).

WS-DSP uses the same job types in its own namespace (dsm-and-stack §1.4), so every job writer
takes the namespace to write in.  SOAP envelopes themselves are written by ``soap.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from lxml import etree

from . import names
from .config import ServerConfig
from .model import FilterStatus, Job, JobStateReason, RepositoryState
from .xmlread import Element


def timestamp(value: datetime) -> str:
    """R6: xs:dateTime, local time with an explicit UTC offset, millisecond precision."""
    return value.isoformat(timespec="milliseconds")


def sub(parent: Element, ns: str, local: str, text: str | None = None) -> Element:
    """A new child ``{ns}local`` of ``parent``, with ``text`` when given."""
    el = etree.SubElement(parent, f"{{{ns}}}{local}")
    if text is not None:
        el.text = text
    return el


def _reasons(parent: Element, ns: str, container: str, reasons: tuple[JobStateReason, ...]) -> None:
    box = sub(parent, ns, container)
    for reason in reasons or (JobStateReason.NONE,):
        sub(box, ns, "JobStateReason", reason.value)


def _filter_statuses(
    parent: Element, ns: str, container: str, filters: tuple[FilterStatus, ...]
) -> None:
    box = sub(parent, ns, container)
    for status in filters:
        el = sub(box, ns, "FilterStatus")
        sub(el, ns, "Dialect", status.dialect)
        sub(el, ns, "FilterState", status.state.value)
        if status.reasons:
            reasons = sub(el, ns, "FilterStateReasons")
            for reason in status.reasons:
                sub(reasons, ns, "FilterStateReason", reason.value)


def job_status(parent: Element, ns: str, job: Job) -> Element:
    el = sub(parent, ns, "JobStatus")
    sub(el, ns, "JobToken", job.token)
    sub(el, ns, "JobState", job.state.value)
    _reasons(el, ns, "JobStateReasons", job.reasons)
    _filter_statuses(el, ns, "FilterStatuses", job.filters)
    sub(el, ns, "ImagesReceived", str(job.images_received))
    sub(el, ns, "JobCreatedTime", timestamp(job.created))
    if job.completed is not None:
        sub(el, ns, "JobCompletedTime", timestamp(job.completed))
    return el


def job_description(parent: Element, ns: str, job: Job) -> Element:
    el = sub(parent, ns, "JobDescription")
    sub(el, ns, "PSP_Identifier", job.psp_identifier)
    sub(el, ns, "PSP_DisplayName", job.psp_display_name)
    sub(el, ns, "JobOriginatingUserName", job.user_name)
    return el


def documents(parent: Element, ns: str, job: Job) -> Element:
    el = sub(parent, ns, "Documents")
    for doc in job.documents:
        description = sub(sub(el, ns, "Document"), ns, "DocumentDescription")
        sub(description, ns, "DocumentId", str(doc.document_id))
        sub(description, ns, "Format", doc.format)
    return el


def job_summary(parent: Element, ns: str, job: Job) -> Element:
    el = sub(parent, ns, "JobSummary")
    sub(el, ns, "JobToken", job.token)
    sub(el, ns, "PSP_Identifier", job.psp_identifier)
    sub(el, ns, "PSP_DisplayName", job.psp_display_name)
    sub(el, ns, "JobOriginatingUserName", job.user_name)
    sub(el, ns, "JobState", job.state.value)
    _reasons(el, ns, "JobStateReasons", job.reasons)
    _filter_statuses(el, ns, "FilterStatuses", job.filters)
    sub(el, ns, "ImagesReceived", str(job.images_received))
    return el


#: Where pre-serialized children go in a reply (``splice_point``); replaced, never sent.
SPLICE_NS = "urn:dsc-server:splice"
SPLICE_MARKER = f'<splice:here xmlns:splice="{SPLICE_NS}"/>'.encode()


def splice_point(parent: Element) -> None:
    """Mark where ``OpResult.splice`` (serialized elements) goes inside ``parent``."""
    etree.SubElement(parent, f"{{{SPLICE_NS}}}here", nsmap={"splice": SPLICE_NS})


def splice_payload() -> Element:
    """A payload that is only a splice point (the whole Body child comes from the splice)."""
    return etree.Element(f"{{{SPLICE_NS}}}here", nsmap={"splice": SPLICE_NS})


#: The payload of an operation whose whole Body child is its splice (a cached answer): one
#: shared element, never put into a tree (``Exchange.end`` answers from a template, or puts a
#: fresh ``splice_payload()`` in its place); making one per request was ~3 us of each.
SPLICE_ONLY = splice_payload()


class AnswerCache:
    """Serialized answers that depend only on a small key and the configuration (the
    GetRepositoryElements payload); bounded, emptied when the configuration object changes."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self.config: object = None
        self.answers: dict[object, bytes] = {}

    def reset(self, config: object) -> None:
        self.config = config
        self.answers.clear()

    def put(self, key: object, answer: bytes) -> None:
        if len(self.answers) >= self.max_entries:
            self.answers.clear()
        self.answers[key] = answer


class JobXmlCache:
    """A job's XML, serialized once per job version (issue 7): a GetActiveJobs or
    GetJobHistory reply with 1,000 jobs joins 1,000 cached byte strings instead of building
    13 elements per job per request, and a device polling GetPostScanJobElements gets the
    bytes built at the job's last change.  A job record is immutable and replaced on every
    change (``Job.evolve``), so cached bytes belong to exactly one record object.

    Summaries use ``prefix`` for ``ns`` without declaring it (the reply envelope declares it:
    the operation's nsmap); job-elements answers are whole, self-contained payloads."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[object, ...], tuple[Job, bytes]] = {}
        self._answers: dict[tuple[object, ...], tuple[Job, bytes]] = {}

    def job_summary(self, ns: str, prefix: str, job: Job) -> bytes:
        def build() -> bytes:
            wrapper = etree.Element(f"{{{ns}}}wrapper", nsmap={prefix: ns})
            data = etree.tostring(job_summary(wrapper, ns, job))
            return data.replace(f' xmlns:{prefix}="{ns}"'.encode(), b"", 1)

        return self._cached(self._entries, (job.token, ns), job, build)

    def answer(self, key: tuple[object, ...], job: Job, build: Callable[[], bytes]) -> bytes:
        """The payload ``build()`` gives for ``job`` and ``key`` (what was asked), from the
        cache while the job has not changed."""
        return self._cached(self._answers, (job.token, *key), job, build)

    def _cached(
        self,
        table: dict[Any, tuple[Job, bytes]],
        key: tuple[object, ...],
        job: Job,
        build: Callable[[], bytes],
    ) -> bytes:
        hit = table.get(key)
        if hit is not None and hit[0] is job:
            return hit[1]
        data = build()
        if len(table) >= self.max_entries:
            table.clear()  # jobs that left the table: rebuilt on demand
        table[key] = (job, data)
        return data


def end_state(parent: Element, ns: str, job: Job) -> Element:
    el = sub(parent, ns, "PostScanJobEndState")
    sub(el, ns, "JobToken", job.token)
    sub(el, ns, "PSP_Identifier", job.psp_identifier)
    sub(el, ns, "PSP_DisplayName", job.psp_display_name)
    sub(el, ns, "JobOriginatingUserName", job.user_name)
    sub(el, ns, "JobCompletedState", job.state.value)
    _reasons(el, ns, "JobCompletedStateReasons", job.reasons)
    _filter_statuses(el, ns, "FilterCompletedStatuses", job.filters)
    sub(el, ns, "ImagesReceived", str(job.images_received))
    if job.completed is not None:
        sub(el, ns, "JobCompletedTime", timestamp(job.completed))
    return el


# --- The repository (bdsrr 3.2.1) -------------------------------------------------------------


def repository_configuration(parent: Element, config: ServerConfig) -> Element:
    """dsc:RepositoryConfiguration: the filters offered (bdsrr 3.2.1).  The ``ftr`` prefix must
    be bound by the document it goes into (FilterType/Dialect is an xs:QName; example 02)."""
    ns = names.DSC
    configuration = sub(parent, ns, "RepositoryConfiguration")
    filters = sub(configuration, ns, "Filters")
    for local in config.filters:
        filter_el = sub(filters, ns, "Filter")
        sub(filter_el, ns, "Dialect", f"ftr:{local}")
        sub(filter_el, ns, "FilterConfig")
    return configuration


def repository_status(parent: Element, container: str, state: RepositoryState) -> Element:
    """dsc:RepositoryStatus (in GetRepositoryElements) or dsc:StatusSummary (in the
    RepositoryStatusSummaryEvent): the state, and the one reason this server gives, None."""
    ns = names.DSC
    el = sub(parent, ns, container)
    sub(el, ns, "RepositoryState", state.value)
    sub(sub(el, ns, "RepositoryStateReasons"), ns, "RepositoryStateReason", "None")
    return el


# --- Requested elements (R5) ------------------------------------------------------------------


def element_data(
    parent: Element, ns: str, qname: tuple[str, str], valid: bool, nsmap: dict[str, str]
) -> Element:
    """One ``ElementData`` echoing the requested QName with a prefix the response binds (R3)."""
    el = etree.SubElement(parent, f"{{{ns}}}ElementData")
    el.set(f"{{{ns}}}Name", qname_text(qname, nsmap))
    el.set(f"{{{ns}}}Valid", "true" if valid else "false")
    return el


def qname_text(qname: tuple[str, str], nsmap: dict[str, str]) -> str:
    """``prefix:local`` for ``qname``, binding a new prefix in ``nsmap`` when none is bound."""
    ns, local = qname
    if not ns:
        return local
    for prefix, uri in nsmap.items():
        if uri == ns:
            return f"{prefix}:{local}"
    for prefix, uri in names.PREFIXES.items():
        if uri == ns and prefix not in nsmap:
            nsmap[prefix] = ns
            return f"{prefix}:{local}"
    prefix = f"n{len(nsmap)}"
    nsmap[prefix] = ns
    return f"{prefix}:{local}"
