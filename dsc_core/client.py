"""The client role: request builders for both protocols, MTOM bodies streamed from chunks, and
response/fault parsers.  Used by the ``dsc`` client commands, the tests and the examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from lxml import etree

from . import names
from .config import Limits
from .model import EmailInstructions, FileShareInstructions, Instructions
from .outcomes import JobOutcome, job_outcome
from .xmlread import Element, children, parse_document, split, trimmed
from .xmlwrite import sub

A = names.Action
SOAP_XML = "application/soap+xml; charset=utf-8"
_CLIENT_LIMITS = Limits(max_envelope_bytes=64 * 1024 * 1024, max_xml_elements=10_000_000)


def envelope(
    action: str, payload: Element, *, message_id: str, to: str = "", headers: Sequence[Element] = ()
) -> bytes:
    """A request: To, Action, MessageID and an anonymous ReplyTo (dsm-and-stack §1.5)."""
    root = etree.Element(
        f"{{{names.SOAP}}}Envelope",
        nsmap={
            "soap": names.SOAP,
            "wsa": names.WSA,
            "dsp": names.DSP,
            "dsc": names.DSC,
            "psp": names.PSP,
        },
    )
    header = sub(root, names.SOAP, "Header")
    sub(header, names.WSA, "To", to or names.ANONYMOUS)
    sub(header, names.WSA, "Action", action)
    sub(header, names.WSA, "MessageID", message_id)
    sub(sub(header, names.WSA, "ReplyTo"), names.WSA, "Address", names.ANONYMOUS)
    for extra in headers:
        header.append(extra)
    sub(root, names.SOAP, "Body").append(payload)
    return etree.tostring(root, xml_declaration=True, encoding="utf-8")


# --- WS-DSP (the scanner's side) ------------------------------------------------------------


def create_post_scan_job(
    *,
    user_identifier: str,
    psp_identifier: str,
    instructions: Iterable[Instructions],
    document_root_name: str = "Scan",
    continue_on_error: bool | None = None,
    process_name: str | None = None,
) -> Element:
    req = etree.Element(f"{{{names.DSP}}}CreatePostScanJobRequest")
    sub(req, names.DSP, "UserIdentifier", user_identifier)
    sub(req, names.DSP, "PSP_Identifier", psp_identifier)
    psi = sub(req, names.DSP, "PostScanInstructions")
    if continue_on_error is not None:
        sub(psi, names.PSP, "ContinueOnError", "true" if continue_on_error else "false")
    sub(psi, names.PSP, "DocumentRootName", document_root_name)
    filters = sub(psi, names.PSP, "FiltersToProcess")
    for item in instructions:
        f = sub(filters, names.PSP, "Filter")
        dialect, config = filter_instructions(item)
        sub(f, names.PSP, "Dialect", dialect)
        sub(f, names.PSP, "Instructions").append(config)
    if process_name:
        sub(req, names.EXT, "ProcessName", process_name)
    return req


def filter_instructions(item: Instructions) -> tuple[str, Element]:
    """(dialect URI, configuration element) of one filter (R9 schemas)."""
    if isinstance(item, FileShareInstructions):
        config = etree.Element(f"{{{names.FSF}}}FileShareConfig", nsmap={"fsf": names.FSF})
        shares = sub(config, names.FSF, "FileShares")
        for unc in item.shares:
            sub(shares, names.FSF, "ShareUNC", unc)
        return names.FSF, config
    if isinstance(item, EmailInstructions):
        config = etree.Element(f"{{{names.EMLF}}}EmailConfig", nsmap={"emlf": names.EMLF})
        sub(config, names.EMLF, "SendToScanUser", "true" if item.send_to_scan_user else "false")
        if item.addresses:
            box = sub(config, names.EMLF, "SendToAddresses")
            box.set(
                f"{{{names.EMLF}}}CanAddAddresses", "true" if item.can_add_addresses else "false"
            )
            for address in item.addresses:
                sub(box, names.EMLF, "EmailAddress", address)
        return names.EMLF, config
    config = etree.Element(f"{{{names.SPF}}}SharePointConfig", nsmap={"spf": names.SPF})
    sub(config, names.SPF, "SaveToMySite", "true" if item.save_to_my_site else "false")
    sites = sub(config, names.SPF, "SaveToSharePointSites")
    for url in item.site_urls:
        sub(sites, names.SPF, "SaveToSharePointSiteURL", url)
    return names.SPF, config


def token_request(ns: str, local: str, token: str) -> Element:
    req = etree.Element(f"{{{ns}}}{local}")
    sub(req, ns, "JobToken", token)
    return req


def send_image_request(token: str, document_id: int, fmt: str, content_id: str) -> Element:
    req = etree.Element(f"{{{names.DSP}}}SendImageRequest")
    sub(req, names.DSP, "JobToken", token)
    description = sub(req, names.DSP, "DocumentDescription")
    sub(description, names.DSP, "DocumentId", str(document_id))
    sub(description, names.DSP, "Format", fmt)
    image = sub(req, names.DSP, "ImageData")
    include = etree.SubElement(image, f"{{{names.XOP}}}Include", nsmap={"xop": names.XOP})
    include.set("href", f"cid:{content_id}")
    return req


def job_elements_request(ns: str, token: str, requested: Sequence[str]) -> Element:
    """GetPostScanJobElementsRequest; ``requested`` are local names in ``ns``."""
    prefix = "dsp" if ns == names.DSP else "dsc"
    req = etree.Element(f"{{{ns}}}GetPostScanJobElementsRequest", nsmap={prefix: ns})
    sub(req, ns, "JobToken", token)
    box = sub(req, ns, "RequestedElements")
    for local in requested:
        sub(box, ns, "Name", f"{prefix}:{local}")
    return req


# --- MS-BDSRR (the management client's side) -------------------------------------------------


def repository_elements_request(requested: Sequence[str]) -> Element:
    req = etree.Element(f"{{{names.DSC}}}GetRepositoryElementsRequest", nsmap={"dsc": names.DSC})
    box = sub(req, names.DSC, "RequestedElements")
    for local in requested:
        sub(box, names.DSC, "Name", f"dsc:{local}")
    return req


def empty_request(local: str) -> Element:
    return etree.Element(f"{{{names.DSC}}}{local}")


# --- MTOM ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mtom:
    """A SendImage body: the HTTP content type and the body as a stream of chunks (R8)."""

    content_type: str
    head: bytes
    tail: bytes
    image_chunks: Iterable[bytes] = field(default=())

    def chunks(self) -> Iterator[bytes]:
        yield self.head
        yield from self.image_chunks
        yield self.tail

    def length(self, image_size: int) -> int:
        return len(self.head) + image_size + len(self.tail)


def mtom(
    root_envelope: bytes, content_id: str, image_chunks: Iterable[bytes], *, boundary: str
) -> Mtom:
    """multipart/related; type="application/xop+xml", root part first (R8, DPWS R0039)."""
    start = "<root@dsc-server>"
    ctype = (
        f'multipart/related; boundary="{boundary}"; type="application/xop+xml"; '
        f'start="{start}"; start-info="application/soap+xml"'
    )
    head = (
        (
            f"--{boundary}\r\n"
            'Content-Type: application/xop+xml; charset=utf-8; type="application/soap+xml"\r\n'
            "Content-Transfer-Encoding: binary\r\n"
            f"Content-ID: {start}\r\n\r\n"
        ).encode()
        + root_envelope
        + (
            f"\r\n--{boundary}\r\n"
            "Content-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: binary\r\n"
            f"Content-ID: <{content_id}>\r\n\r\n"
        ).encode()
    )
    tail = f"\r\n--{boundary}--\r\n".encode()
    return Mtom(ctype, head, tail, image_chunks)


# --- Responses -------------------------------------------------------------------------------


class ClientFault(Exception):
    """A SOAP fault answer, readable in one line: ``subcode: reason``."""

    def __init__(
        self, code: str, subcode: str | None, reason: str, detail: str, status: int
    ) -> None:
        self.code = code
        self.subcode = subcode
        self.reason = reason
        self.detail = detail
        self.status = status
        super().__init__(self.line())

    def line(self) -> str:
        what = self.subcode or self.code
        extra = f" ({self.detail})" if self.detail else ""
        return f"{what}: {self.reason}{extra}"


@dataclass(frozen=True, slots=True)
class Response:
    action: str
    relates_to: str | None
    payload: Element | None


def parse_response(body: bytes, status: int = 200) -> Response:
    """Parse a reply; a SOAP fault raises :class:`ClientFault`, other trouble ValueError."""
    try:
        root = parse_document(body, _CLIENT_LIMITS)
    except Exception as exc:  # the core's fault type: the reply is not SOAP at all
        raise ValueError(f"the server answered HTTP {status} with a body that is not SOAP") from exc
    if split(root.tag) != (names.SOAP, "Envelope"):
        raise ValueError("the reply is not a SOAP 1.2 envelope")
    action = relates = None
    body_el = None
    for child in children(root):
        if split(child.tag) == (names.SOAP, "Header"):
            for h in children(child):
                ns, local = split(h.tag)
                if ns in (names.WSA, names.WSA10) and local == "Action":
                    action = trimmed(h.text)
                elif ns in (names.WSA, names.WSA10) and local == "RelatesTo":
                    relates = trimmed(h.text)
        elif split(child.tag) == (names.SOAP, "Body"):
            body_el = child
    payload = next(children(body_el), None) if body_el is not None else None
    if payload is not None and split(payload.tag) == (names.SOAP, "Fault"):
        raise _fault(payload, status)
    return Response(action or "", relates, payload)


def _fault(fault: Element, status: int) -> ClientFault:
    def find(el: Element | None, *path: str) -> Element | None:
        for local in path:
            if el is None:
                return None
            el = next((c for c in children(el) if split(c.tag) == (names.SOAP, local)), None)
        return el

    code = find(fault, "Code", "Value")
    subcode = find(fault, "Code", "Subcode", "Value")
    text = find(fault, "Reason", "Text")
    detail = find(fault, "Detail")
    detail_text = ""
    if detail is not None:
        detail_text = " ".join(str(t).strip() for t in detail.itertext() if str(t).strip())

    def local(el: Element | None) -> str:
        value = trimmed(el.text) if el is not None else ""
        return value

    return ClientFault(local(code), local(subcode) or None, local(text), detail_text, status)


def find_path(el: Element | None, ns: str, *path: str) -> Element | None:
    for local in path:
        if el is None:
            return None
        el = next((c for c in children(el) if split(c.tag) == (ns, local)), None)
    return el


def text_of(el: Element | None, ns: str, *path: str) -> str:
    found = find_path(el, ns, *path)
    return trimmed(found.text) if found is not None else ""


def all_of(el: Element | None, ns: str, local: str) -> list[Element]:
    if el is None:
        return []
    return [c for c in children(el) if split(c.tag) == (ns, local)]


@dataclass(frozen=True, slots=True)
class FilterView:
    dialect: str
    state: str
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as a client reads it (JobStatus, JobSummary or PostScanJobEndState)."""

    token: str
    state: str
    reasons: tuple[str, ...]
    filters: tuple[FilterView, ...]
    images_received: int
    psp_identifier: str = ""
    psp_display_name: str = ""
    user_name: str = ""
    created: str = ""
    completed: str = ""

    @property
    def ended(self) -> bool:
        """In a completed state (R6: Completed, Aborted or Canceled)."""
        return self.state in ("Completed", "Aborted", "Canceled")

    @property
    def outcome(self) -> JobOutcome:
        """The same outcome the server shows for the job (outcomes.py)."""
        return job_outcome(self.state, self.reasons, (f.state for f in self.filters))

    @property
    def succeeded(self) -> bool:
        """Completed, successfully or with warnings (R6); errors or an abort are failures."""
        return self.outcome is JobOutcome.SUCCEEDED

    def as_dict(self) -> dict[str, object]:
        return {
            "token": self.token,
            "state": self.state,
            "outcome": self.outcome.value,
            "reasons": list(self.reasons),
            "filters": [
                {"dialect": f.dialect, "state": f.state, "reasons": list(f.reasons)}
                for f in self.filters
            ],
            "images_received": self.images_received,
            "psp_identifier": self.psp_identifier,
            "psp_display_name": self.psp_display_name,
            "user_name": self.user_name,
            "created": self.created,
            "completed": self.completed,
        }


def _either(el: Element, ns: str, first: str, second: str) -> Element | None:
    found = find_path(el, ns, first)
    return found if found is not None else find_path(el, ns, second)


def read_job(el: Element, ns: str) -> JobView:
    """Read a JobStatus, JobSummary or PostScanJobEndState element."""
    state_el = _either(el, ns, "JobState", "JobCompletedState")
    reasons_el = _either(el, ns, "JobStateReasons", "JobCompletedStateReasons")
    filters_el = _either(el, ns, "FilterStatuses", "FilterCompletedStatuses")
    filters = tuple(
        FilterView(
            text_of(f, ns, "Dialect"),
            text_of(f, ns, "FilterState"),
            tuple(
                trimmed(r.text)
                for r in all_of(find_path(f, ns, "FilterStateReasons"), ns, "FilterStateReason")
            ),
        )
        for f in all_of(filters_el, ns, "FilterStatus")
    )
    images = text_of(el, ns, "ImagesReceived")
    return JobView(
        token=text_of(el, ns, "JobToken"),
        state=trimmed(state_el.text) if state_el is not None else "",
        reasons=tuple(trimmed(r.text) for r in all_of(reasons_el, ns, "JobStateReason")),
        filters=filters,
        images_received=int(images) if images.isdigit() else 0,
        psp_identifier=text_of(el, ns, "PSP_Identifier"),
        psp_display_name=text_of(el, ns, "PSP_DisplayName"),
        user_name=text_of(el, ns, "JobOriginatingUserName"),
        created=text_of(el, ns, "JobCreatedTime"),
        completed=text_of(el, ns, "JobCompletedTime"),
    )


def read_job_elements(payload: Element | None, ns: str) -> JobView:
    """Merge JobStatus and JobDescription of a GetPostScanJobElementsResponse."""
    status = description = None
    for data in all_of(find_path(payload, ns, "JobElements"), ns, "ElementData"):
        if status is None:
            status = find_path(data, ns, "JobStatus")
        if description is None:
            description = find_path(data, ns, "JobDescription")
    if status is None:
        raise ValueError("the reply has no JobStatus")
    view = read_job(status, ns)
    if description is not None:
        view = JobView(
            view.token,
            view.state,
            view.reasons,
            view.filters,
            view.images_received,
            text_of(description, ns, "PSP_Identifier"),
            text_of(description, ns, "PSP_DisplayName"),
            text_of(description, ns, "JobOriginatingUserName"),
            view.created,
            view.completed,
        )
    return view


def read_summaries(payload: Element | None, container: str) -> list[JobView]:
    return [
        read_job(s, names.DSC)
        for s in all_of(find_path(payload, names.DSC, container), names.DSC, "JobSummary")
    ]
