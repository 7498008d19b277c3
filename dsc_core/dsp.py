"""WS-DSP: the operations scanners use (dsm-and-stack §1.3-1.5; R6, R8, R10)."""

from __future__ import annotations

import re
from urllib.parse import unquote

from lxml import etree

from . import faults, names
from .args import Args, Item
from .commands import Command, FinishDocument
from .instructions import read_post_scan_instructions
from .jobstate import JobInput
from .jobxml import documents, job_description, job_status
from .model import DOCUMENT_FORMATS, Document, Job, JobState, JobStateReason
from .operations import (
    change,
    element_data,
    find_job,
    identity,
    request_element,
    requested_names,
    result,
    user_name,
)
from .server import Attachment, Call, Handler, OpResult
from .xmlread import children, split, trimmed

NS = names.DSP
A = names.Action
_NSMAP = {"dsp": NS}
#: dsc:MimeExtensionPatternType, for vendor formats beyond the well-known values.
_FORMAT_EXTENSION = re.compile(r"^\w+[\w:/;_\-\\+.]*$")


def _el(local: str) -> etree._Element:
    return etree.Element(f"{{{NS}}}{local}")


def create_post_scan_job(call: Call) -> OpResult:
    payload, args = request_element(call, NS, "CreatePostScanJobRequest")
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
        found["PostScanInstructions"][0], args, call.config.filter_dialect_uris()
    )
    display_name = _process_name(call, payload, psp_identifier)
    if len(call.server.jobs.active()) >= call.config.limits.max_active_jobs:
        raise faults.store_failed(NS, temporary=True)
    token = call.server.new_id()
    job = Job(
        token=token,
        state=JobState.CREATING,
        reasons=(JobStateReason.NONE,),
        filters=instructions.filters,
        psp_identifier=psp_identifier,
        psp_display_name=display_name,
        user_name=user_name(call, user_identifier),
        owner=identity(call),
        created=call.now,
        last_activity=call.now,
        continue_on_error=instructions.continue_on_error,
        document_root_name=instructions.document_root_name,
    )
    if not instructions.any_usable:
        # R6: no filter left -> Aborted at once; the response still carries the token.
        job = job.evolve(
            state=JobState.ABORTED,
            reasons=(JobStateReason.NO_VALID_INSTRUCTIONS,),
            completed=call.now,
        )
    commands = call.server.record(None, job, call.now)
    response = _el("CreatePostScanJobResponse")
    etree.SubElement(response, f"{{{NS}}}JobToken").text = token
    return result(
        A.DSP_CREATE + "Response",
        response,
        dict(_NSMAP),
        commands,
        lambda: call.server.restore_job(None, job, call.now),
    )


def _process_name(call: Call, payload: etree._Element, psp_identifier: str) -> str:
    """PSP_DisplayName: our vendor extension ``ext:ProcessName`` (a ##other element), else the
    configured directory of processes, else the identifier itself."""
    for child in children(payload):
        if split(child.tag) == (names.EXT, "ProcessName"):
            value = trimmed(child.text)
            if value:
                return value[:255]
    return call.config.process_names.get(psp_identifier, psp_identifier)


def prepare_send_image(call: Call) -> Attachment:
    """Check a SendImage before its attachment arrives (R4 steps 6-8) and reserve its
    DocumentId, so that the image streams straight to the store (R8)."""
    payload, args = request_element(call, NS, "SendImageRequest")
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
    job = find_job(call, NS, token, own_only=True)
    table = call.server.jobs
    if (
        any(d.document_id == document_id for d in job.documents)
        or (token, document_id) in table.uploads
    ):
        raise args.invalid(NS, "DocumentId")  # R6: a DocumentId already used in the job
    if job.images_received >= call.config.limits.max_documents_per_job:
        raise args.invalid(NS, "DocumentId")
    if job.state is not JobState.CREATING:
        raise faults.operation_failed(NS)  # R4 step 8: SendImage after EndPostScanJob
    table.uploads.add((token, document_id))
    return Attachment(token, document_id, fmt, href)


def _include_href(args: Args, image_data: etree._Element) -> str:
    includes = [c for c in children(image_data)]
    if len(includes) != 1 or split(includes[0].tag) != (names.XOP, "Include"):
        raise args.invalid(NS, "ImageData")
    href = trimmed(includes[0].get("href"))
    if not href.lower().startswith("cid:") or len(href) <= 4:
        raise args.invalid(NS, "ImageData")
    # RFC 2392: a cid URL is the Content-ID, %-encoded.
    return unquote(href[4:])


def send_image(call: Call) -> OpResult:
    attachment = call.attachment
    if attachment is None:
        # Not MTOM: check the request as usual, then refuse the missing attachment (R8).
        attachment = prepare_send_image(call)
        call.server.jobs.uploads.discard((attachment.token, attachment.document_id))
        raise Args(NS).invalid(NS, "ImageData")
    if not attachment.complete:
        raise Args(NS).invalid(NS, "ImageData")  # attachment missing or not referenced
    job = find_job(call, NS, attachment.token, own_only=True)
    document = Document(attachment.document_id, attachment.format, attachment.size)
    _new, commands, undo = change(
        call, NS, job, JobInput.IMAGE, documents=job.documents + (document,), last_activity=call.now
    )
    call.server.jobs.uploads.discard((attachment.token, attachment.document_id))
    finish: list[Command] = [
        FinishDocument(attachment.token, attachment.document_id, attachment.size)
    ]
    return result(
        A.DSP_SEND_IMAGE + "Response",
        _el("SendImageResponse"),
        dict(_NSMAP),
        finish + commands,
        undo,
    )


def _token_request(call: Call, local: str) -> tuple[str, Job]:
    payload, args = request_element(call, NS, local)
    found = args.sequence(payload, NS, (Item("JobToken"),), allow_other=True)
    token = args.token(found["JobToken"][0])
    return token, find_job(call, NS, token, own_only=True)


def end_post_scan_job(call: Call) -> OpResult:
    _, job = _token_request(call, "EndPostScanJobRequest")
    _, commands, undo = change(call, NS, job, JobInput.END)
    return result(
        A.DSP_END + "Response", _el("EndPostScanJobResponse"), dict(_NSMAP), commands, undo
    )


def cancel_post_scan_job(call: Call) -> OpResult:
    _, job = _token_request(call, "CancelPostScanJobRequest")
    _, commands, undo = change(call, NS, job, JobInput.CANCEL)
    return result(
        A.DSP_CANCEL + "Response", _el("CancelPostScanJobResponse"), dict(_NSMAP), commands, undo
    )


def get_post_scan_job_elements(call: Call) -> OpResult:
    return job_elements(call, NS, own_only=True)


def job_elements(call: Call, ns: str, *, own_only: bool) -> OpResult:
    """GetPostScanJobElements of either protocol (bdsrr 3.2.4.3; dsm-and-stack §1.4)."""
    prefix = "dsp" if ns == NS else "dsc"
    payload, args = request_element(call, ns, "GetPostScanJobElementsRequest")
    found = args.sequence(
        payload, ns, (Item("JobToken"), Item("RequestedElements")), allow_other=False
    )
    token = args.token(found["JobToken"][0])
    wanted = requested_names(call, args, found["RequestedElements"][0], ns)
    job = find_job(call, ns, token, own_only=own_only)
    nsmap = {prefix: ns}
    response = etree.Element(f"{{{ns}}}GetPostScanJobElementsResponse")
    container = etree.SubElement(response, f"{{{ns}}}JobElements")
    writers = {"JobStatus": job_status, "JobDescription": job_description, "Documents": documents}
    for qname in wanted:
        writer = writers.get(qname[1]) if qname[0] == ns else None
        data = element_data(container, ns, qname, writer is not None, nsmap)
        if writer is not None:
            writer(data, ns, job)
    action = (A.DSP_GET_JOB_ELEMENTS if ns == NS else A.DSC_GET_JOB_ELEMENTS) + "Response"
    return result(action, response, nsmap)


HANDLERS: dict[str, tuple[str, Handler]] = {
    A.DSP_CREATE: (NS, create_post_scan_job),
    A.DSP_SEND_IMAGE: (NS, send_image),
    A.DSP_END: (NS, end_post_scan_job),
    A.DSP_CANCEL: (NS, cancel_post_scan_job),
    A.DSP_GET_JOB_ELEMENTS: (NS, get_post_scan_job_elements),
}
