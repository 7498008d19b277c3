"""WS-DSP: the operations scanners use (dsm-and-stack §1.3-1.5; R6, R8, R10)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from lxml import etree

from . import faults, names
from .args import Args, Item, request_element
from .commands import Command, FinishDocument, JobInput
from .config import Limits, reserved_slots
from .directory import Lookups
from .fast_init import fast_init
from .instructions import PostScanInstructions, read_post_scan_instructions
from .model import DOCUMENT_FORMATS, Document, Job, JobState, JobStateReason
from .operation import Operation, OpResult, Request, Upload, change, find_job, reply_budget
from .users import directory_answers, identity, user_name
from .xmlread import Element, children, split, trimmed
from .xmlwrite import (
    SPLICE_ONLY,
    documents,
    element_data,
    job_description,
    job_status,
)

NS = names.DSP
A = names.Action
_NSMAP = {"dsp": NS}
#: dsc:MimeExtensionPatternType, for vendor formats beyond the well-known values.
_FORMAT_EXTENSION = re.compile(r"^\w+[\w:/;_\-\\+.]*$")


def _el(local: str) -> Element:
    return etree.Element(f"{{{NS}}}{local}")


# --- CreatePostScanJob ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateArgs:
    user_identifier: str
    psp_identifier: str
    instructions: PostScanInstructions
    display_name: str


def read_create(request: Request) -> CreateArgs:
    payload, args = request_element(request.envelope.body, NS, "CreatePostScanJobRequest")
    found = args.sequence(
        payload,
        NS,
        (
            Item("UserIdentifier"),
            Item("PSP_Identifier"),
            Item("PostScanInstructions"),
        ),
        allow_other=True,
    )
    user_identifier = args.text(found["UserIdentifier"][0])
    psp_identifier = args.text(found["PSP_Identifier"][0])
    if not psp_identifier:
        raise args.invalid(NS, "PSP_Identifier")
    instructions = read_post_scan_instructions(
        found["PostScanInstructions"][0], args, request.config.filter_dialect_uris()
    )
    display_name = _process_name(request, payload, psp_identifier)
    return CreateArgs(user_identifier, psp_identifier, instructions, display_name)


def _process_name(request: Request, payload: Element, psp_identifier: str) -> str:
    """PSP_DisplayName: our vendor extension ``ext:ProcessName`` (a ##other element), else the
    directory's name for the identifier (R14), else the configured table of processes, else the
    identifier itself."""
    for child in children(payload):
        if split(child.tag) == (names.EXT, "ProcessName"):
            value = trimmed(child.text)
            if value:
                return value[:255]
    answers = directory_answers(request.info, NS)
    if answers is not None and answers.process_names.get(psp_identifier):
        return answers.process_names[psp_identifier][:255]
    return request.config.process_names.get(psp_identifier, psp_identifier)


def create_lookups(request: Request) -> Lookups:
    """What CreatePostScanJob needs from a directory (R14): the account of its user (the SID,
    or the certificate identity) and the name of its process.  Read leniently: the reader
    checks the arguments afterwards, and a malformed one just needs nothing."""
    sid = psp = ""
    body = list(children(request.envelope.body))
    if len(body) == 1:
        for child in children(body[0]):
            if split(child.tag) == (NS, "UserIdentifier"):
                sid = trimmed(child.text)
            elif split(child.tag) == (NS, "PSP_Identifier"):
                psp = trimmed(child.text)
    who = identity(request.config, request.info) or None
    return Lookups(
        sids=(sid,) if sid and who is None else (),
        identity=who,
        processes=(psp,) if psp else (),
    )


def creation_refused(
    limits: Limits, active: int, origin: str, held: int
) -> faults.SoapFault | None:
    """The one place of the rules that refuse a new job, from the counts: ``active`` jobs,
    ``held`` of them in Creating for ``origin``; the fault to answer, or None.  The core
    decides from its table; a shared store decides again from the same counts taken in SQL
    under a lock, so that creations at the same moment on several instances cannot pass a
    limit by one job per instance (issue 18 point 1; store/postgresql.py).  A request with no
    ``origin`` (no identity, no address) holds nothing against the quota, whatever ``held``
    says."""
    if not origin:
        held = 0
    if active >= limits.max_active_jobs:
        return faults.limit_reached(
            NS, "Every job slot of the server is taken", "max_active_jobs", limits.max_active_jobs
        )
    # R13 quota: per user (certificate identity), else per client address, so one scanner
    # holding Creating jobs cannot lock out the others; a retry after its jobs end succeeds.
    # Reason text: docs/rulings.md, "Fault reason texts".
    if held >= limits.max_creating_jobs_per_user:
        return faults.limit_reached(
            NS,
            f"The client {origin} already has as many jobs in Creating as it may",
            "max_creating_jobs_per_user",
            limits.max_creating_jobs_per_user,
        )
    # Issue 14 (lockouts): many clients, each under its quota, can still fill every slot; the
    # last ones are kept for clients holding no Creating job (config.reserved_slots), so a
    # scanner that arrives then is served.
    reserved = reserved_slots(limits.max_active_jobs, limits)
    if held and active >= limits.max_active_jobs - reserved:
        return faults.limit_reached(
            NS,
            f"The last {reserved} of the {limits.max_active_jobs} job slots are kept for "
            f"clients with no job in Creating, and the client {origin} has {held}",
            "new_client_share",
            limits.new_client_share,
        )
    return None


def create_post_scan_job(request: Request, args: CreateArgs) -> OpResult:
    state, now = request.state, request.now
    active = state.jobs.active()
    origin = identity(request.config, request.info) or request.info.client_address or ""
    held = sum(1 for j in active if j.state is JobState.CREATING and j.origin == origin)
    refused = creation_refused(request.config.limits, len(active), origin, held)
    if refused is not None:
        raise refused
    token = state.new_id()
    instructions = args.instructions
    job = Job(
        token=token,
        state=JobState.CREATING,
        reasons=(JobStateReason.NONE,),
        filters=instructions.filters,
        psp_identifier=args.psp_identifier,
        psp_display_name=args.display_name,
        user_name=user_name(request.config, request.info, args.user_identifier),
        owner=identity(request.config, request.info),
        created=now,
        last_activity=now,
        continue_on_error=instructions.continue_on_error,
        document_root_name=instructions.document_root_name,
        origin=origin,
    )
    if not instructions.any_usable:
        # R6: no filter left -> Aborted at once; the response still carries the token.
        job = job.evolve(
            state=JobState.ABORTED,
            reasons=(JobStateReason.NO_VALID_INSTRUCTIONS,),
            completed=now,
        )
    commands = state.lifecycle.record(None, job, now)
    response = _el("CreatePostScanJobResponse")
    etree.SubElement(response, f"{{{NS}}}JobToken").text = token
    return OpResult(
        A.DSP_CREATE + "Response",
        response,
        dict(_NSMAP),
        commands,
        lambda: state.lifecycle.undo(None, job),
    )


# --- SendImage (R8: the attachment streams to the store) --------------------------------------


@dataclass(frozen=True, slots=True)
class SendImageArgs:
    token: str
    document_id: int
    format: str
    #: The Content-ID of the attachment (the xop:Include href without ``cid:``).
    href: str


def read_send_image(request: Request) -> SendImageArgs:
    payload, args = request_element(request.envelope.body, NS, "SendImageRequest")
    found = args.sequence(
        payload,
        NS,
        (
            Item("JobToken"),
            Item("DocumentDescription"),
            Item("ImageData"),
        ),
        allow_other=True,
    )
    token = args.token(found["JobToken"][0])
    description = args.sequence(
        found["DocumentDescription"][0],
        NS,
        (
            Item("DocumentId"),
            Item("Format"),
        ),
        allow_other=True,
    )
    document_id = args.integer(description["DocumentId"][0], minimum=1)
    fmt = args.text(description["Format"][0])
    if fmt not in DOCUMENT_FORMATS and not _FORMAT_EXTENSION.match(fmt):
        raise args.invalid(NS, "Format")
    href = _include_href(args, found["ImageData"][0])
    return SendImageArgs(token, document_id, fmt, href)


def _include_href(args: Args, image_data: Element) -> str:
    includes = [c for c in children(image_data)]
    if len(includes) != 1 or split(includes[0].tag) != (names.XOP, "Include"):
        raise args.invalid(NS, "ImageData")
    href = trimmed(includes[0].get("href"))
    if not href.lower().startswith("cid:") or len(href) <= 4:
        raise args.invalid(NS, "ImageData")
    # RFC 2392: a cid URL is the Content-ID, %-encoded.
    return unquote(href[4:])


def begin_send_image(request: Request, args: SendImageArgs) -> Upload:
    """Check a SendImage before its attachment arrives (R4 steps 7-8) and reserve its
    DocumentId, so that the image streams straight to the store (R8)."""
    job = find_job(request, NS, args.token, own_only=True)
    table = request.state.jobs
    key = (args.token, args.document_id)
    if any(d.document_id == args.document_id for d in job.documents) or key in table.uploads:
        raise Args(NS).invalid(NS, "DocumentId")  # R6: a DocumentId already used in the job
    if job.images_received >= request.config.limits.max_documents_per_job:
        raise Args(NS).invalid(NS, "DocumentId")
    if job.state is not JobState.CREATING:
        # R4 step 8: SendImage after EndPostScanJob
        raise faults.operation_failed(
            NS, f"the job is {job.state.value}; it takes images only while Creating"
        )
    if key in table.uploads_elsewhere:
        # Received by another instance (issue 18): maybe a dead one whose lease has not lapsed
        # yet, and this is the scanner's retry.  Temporary (R4 step 9, last), not InvalidArgs,
        # which a scanner takes as final (docs/rulings.md, "A duplicate in flight on another
        # instance").
        raise faults.upload_elsewhere(NS, args.document_id)
    upload = Upload(args.token, args.document_id, args.format, args.href)
    table.reserve(upload.key)
    return upload


def send_image(request: Request, args: SendImageArgs) -> OpResult:
    upload = request.upload
    if upload is None:
        # Not MTOM: check the request as usual, then refuse the missing attachment (R8).
        upload = begin_send_image(request, args)
        request.state.jobs.let_go(upload.key)
        raise Args(NS).invalid(NS, "ImageData")
    if not upload.complete:
        raise Args(NS).invalid(NS, "ImageData")  # attachment missing or not referenced
    job = find_job(request, NS, upload.token, own_only=True)
    document = Document(upload.document_id, upload.format, upload.size)
    _new, commands, undo = change(
        request,
        NS,
        job,
        JobInput.IMAGE,
        documents=job.documents + (document,),
        last_activity=request.now,
    )
    request.state.jobs.let_go(upload.key)
    finish: list[Command] = [FinishDocument(upload.token, upload.document_id, upload.size)]
    return OpResult(
        A.DSP_SEND_IMAGE + "Response",
        _el("SendImageResponse"),
        dict(_NSMAP),
        finish + commands,
        undo,
    )


# --- EndPostScanJob, CancelPostScanJob ----------------------------------------------------------


def read_job_token(local: str) -> Callable[[Request], str]:
    """The reader of a request whose only argument is a JobToken (then ##other elements)."""

    def read(request: Request) -> str:
        payload, args = request_element(request.envelope.body, NS, local)
        found = args.sequence(payload, NS, (Item("JobToken"),), allow_other=True)
        return args.token(found["JobToken"][0])

    return read


def end_post_scan_job(request: Request, token: str) -> OpResult:
    job = find_job(request, NS, token, own_only=True)
    _, commands, undo = change(request, NS, job, JobInput.END)
    return OpResult(
        A.DSP_END + "Response", _el("EndPostScanJobResponse"), dict(_NSMAP), commands, undo
    )


def cancel_post_scan_job(request: Request, token: str) -> OpResult:
    job = find_job(request, NS, token, own_only=True)
    _, commands, undo = change(request, NS, job, JobInput.CANCEL)
    return OpResult(
        A.DSP_CANCEL + "Response", _el("CancelPostScanJobResponse"), dict(_NSMAP), commands, undo
    )


# --- GetPostScanJobElements (both protocols) ----------------------------------------------------


_JOB_ELEMENTS = (Item("JobToken"), Item("RequestedElements"))


@fast_init
@dataclass(frozen=True, slots=True)
class JobElementsArgs:
    token: str
    wanted: list[tuple[str, str]]


def read_job_elements(ns: str) -> Callable[[Request], JobElementsArgs]:
    """The reader of GetPostScanJobElements in namespace ``ns`` (dsp or dsc)."""

    def read(request: Request) -> JobElementsArgs:
        payload, args = request_element(request.envelope.body, ns, "GetPostScanJobElementsRequest")
        found = args.sequence(payload, ns, _JOB_ELEMENTS, allow_other=False)
        token = args.token(found["JobToken"][0])
        limit = request.config.limits.max_requested_names
        return JobElementsArgs(
            token, args.requested_names(found["RequestedElements"][0], ns, limit)
        )

    return read


def job_elements(ns: str, *, own_only: bool) -> Callable[[Request, JobElementsArgs], OpResult]:
    """GetPostScanJobElements of either protocol (bdsrr 3.2.4.3; dsm-and-stack §1.4)."""
    prefix = "dsp" if ns == NS else "dsc"
    action = (A.DSP_GET_JOB_ELEMENTS if ns == NS else A.DSC_GET_JOB_ELEMENTS) + "Response"
    writers = {"JobStatus": job_status, "JobDescription": job_description, "Documents": documents}

    def handle(request: Request, args: JobElementsArgs) -> OpResult:
        job = find_job(request, ns, args.token, own_only=own_only)
        budget = reply_budget(request, action, SPLICE_ONLY, {})

        def build() -> bytes:
            nsmap = {prefix: ns}
            response = etree.Element(f"{{{ns}}}GetPostScanJobElementsResponse")
            container = etree.SubElement(response, f"{{{ns}}}JobElements")
            for qname in args.wanted:
                writer = writers.get(qname[1]) if qname[0] == ns else None
                data = element_data(container, ns, qname, writer is not None, nsmap)
                if writer is not None:
                    writer(data, ns, job)
            # Self-contained: the prefixes its QName values use are declared on it (R3).
            payload = etree.Element(response.tag, nsmap=nsmap)
            payload.extend(list(response))
            return _fit_documents(payload, ns, budget)

        # Devices poll this while their job is processed: the answer is built once per job
        # version and asked-for names (and the room the reply has), and spliced into each
        # reply's envelope (issue 7).
        answer = request.state.job_xml.answer((ns, budget, *args.wanted), job, build)
        return OpResult(action, SPLICE_ONLY, {}, splice=(answer,))

    return handle


def _fit_documents(payload: Element, ns: str, budget: int) -> bytes:
    """R15 for GetPostScanJobElements (docs/rulings.md "Replies within 32,767 octets"): a job's
    Documents can hold up to ``max_documents_per_job`` entries (about 130 octets each), far
    more than fit.  The oldest documents are left out of the Documents elements until the
    answer fits in ``budget``; the most recent stay, in the order received, and
    JobStatus/ImagesReceived still counts them all.  The other elements are small and bounded,
    never cut."""
    lists = list(payload.iter(f"{{{ns}}}Documents"))
    answer = etree.tostring(payload)
    while len(answer) > budget and any(len(listing) for listing in lists):
        excess = len(answer) - budget
        for listing in lists:
            if excess <= 0 or not len(listing):
                continue
            # Per document, rounded up and with the list's own tags: no less than the oldest
            # (shortest DocumentIds) take, so this drops no more than needed; the loop then
            # measures again.
            each = -(-len(etree.tostring(listing)) // len(listing))
            drop = min(len(listing), -(-excess // each))
            del listing[:drop]
            excess -= drop * each
        answer = etree.tostring(payload)
    return answer


OPERATIONS: tuple[Operation[Any], ...] = (
    Operation(A.DSP_CREATE, NS, read_create, create_post_scan_job, lookups=create_lookups),
    Operation(A.DSP_SEND_IMAGE, NS, read_send_image, send_image, begin_upload=begin_send_image),
    Operation(A.DSP_END, NS, read_job_token("EndPostScanJobRequest"), end_post_scan_job),
    Operation(A.DSP_CANCEL, NS, read_job_token("CancelPostScanJobRequest"), cancel_post_scan_job),
    Operation(A.DSP_GET_JOB_ELEMENTS, NS, read_job_elements(NS), job_elements(NS, own_only=True)),
)
