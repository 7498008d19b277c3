"""Helpers for the core's tests (no tests here): hand-written request envelopes, job scripts over
the in-process transport, and readers that check replies field by field.

The expected strings in the tests come from the specifications (fault tables, action URIs), not
from ``dsc_core`` constants, so that a wrong constant in the core makes a test fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lxml import etree

from dsc_bindings.inprocess import InProcessTransport
from dsc_core import Exchange, Reply, RequestInfo, client
from dsc_core.model import (
    EmailInstructions,
    FileShareInstructions,
    Instructions,
    Job,
    SharePointInstructions,
)

# --- spec strings ------------------------------------------------------------------------------

SOAP = "http://www.w3.org/2003/05/soap-envelope"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
WSA = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
WSA10 = "http://www.w3.org/2005/08/addressing"
WSE = "http://schemas.xmlsoap.org/ws/2004/08/eventing"
WSDP = "http://schemas.xmlsoap.org/ws/2006/02/devprof"
DSP = "http://schemas.microsoft.com/windows/2008/12/wdp/distributedscan/processing"
DSC = "http://schemas.microsoft.com/windows/2008/12/wdp/distributedscan/configuration"
PSP = "http://schemas.microsoft.com/windows/2008/02/imaging/postscan/psp"
XOP = "http://www.w3.org/2004/08/xop/include"
XML_NS = "http://www.w3.org/XML/1998/namespace"
FILTER = "http://schemas.microsoft.com/windows/2007/10/imaging/postscan/filter"
ANONYMOUS = WSA + "/role/anonymous"
ANONYMOUS10 = WSA10 + "/anonymous"
FAULT_ACTION = WSA + "/fault"
FAULT_ACTION10 = WSA10 + "/fault"
ACTION_DIALECT = WSDP + "/Action"
SOAP_CONTENT_TYPE = "application/soap+xml; charset=utf-8"

#: Reason texts, exactly as the fault tables give them (bdsrr-messages 3.1.4.1 for dsc: without a
#: final period except JobTokenNotFound; dsm-and-stack 2.2 for dsp: with one; R4 step 7).
REASONS = {
    DSC: {
        "InvalidArgs": "At least one input argument is invalid",
        "OperationFailed": "Scan repository service cannot perform the requested operation",
        "ServerErrorTemporaryError": "The service had an unexpected error",
        "ServerErrorInternalError": "The service had an unexpected error",
        "ClientErrorJobTokenNotFound": "A PostScan job identified by the specified dsc:JobToken argument could not be found.",
    },
    DSP: {
        "InvalidArgs": "At least one input argument is invalid.",
        "OperationFailed": "The service cannot perform the requested operation.",
        "ServerErrorTemporaryError": "The service had an unexpected error.",
        "ServerErrorInternalError": "The service had an unexpected error.",
        "ClientErrorJobTokenNotFound": "A PostScan job identified by the specified dsp:JobToken argument could not be found.",
    },
}
CODES = {
    "InvalidArgs": "Sender",
    "OperationFailed": "Receiver",
    "ServerErrorTemporaryError": "Receiver",
    "ServerErrorInternalError": "Receiver",
    "ClientErrorJobTokenNotFound": "Sender",
}

REQUEST_ID = "urn:uuid:11111111-2222-3333-4444-555555555555"


class Act:
    """Action URIs, spelled out from the spec tables (bdsrr section 1, dsm-and-stack 1.3)."""

    DSP_CREATE = DSP + "/CreatePostScanJob"
    DSP_SEND_IMAGE = DSP + "/SendImage"
    DSP_END = DSP + "/EndPostScanJob"
    DSP_CANCEL = DSP + "/CancelPostScanJob"
    DSP_ELEMENTS = DSP + "/GetPostScanJobElements"
    DSC_REPOSITORY = DSC + "/GetRepositoryElements"
    DSC_CANCEL = DSC + "/CancelPostScanJob"
    DSC_ELEMENTS = DSC + "/GetPostScanJobElements"
    DSC_ACTIVE = DSC + "/GetActiveJobs"
    DSC_HISTORY = DSC + "/GetJobHistory"
    DSP_STATUS_EVENT = DSP + "/PostScanJobStatusEvent"
    DSP_END_EVENT = DSP + "/PostScanJobEndStateEvent"
    DSC_STATUS_EVENT = DSC + "/PostScanJobStatusEvent"
    DSC_END_EVENT = DSC + "/PostScanJobEndStateEvent"
    DSC_SUMMARY_EVENT = DSC + "/RepositoryStatusSummaryEvent"
    DSC_CHANGE_EVENT = DSC + "/RepositoryElementsChangeEvent"
    SUBSCRIBE = WSE + "/Subscribe"
    RENEW = WSE + "/Renew"
    GET_STATUS = WSE + "/GetStatus"
    UNSUBSCRIBE = WSE + "/Unsubscribe"
    SUBSCRIPTION_END = WSE + "/SubscriptionEnd"


FS = FileShareInstructions((r"\\files.example\scans",))
SP = SharePointInstructions(False, ("http://sharepoint.example/site/scans",))
MAIL = EmailInstructions(False, ("user@example.com",))

NSMAP = {
    "s": SOAP,
    "e11": SOAP11,
    "a": WSA,
    "a10": WSA10,
    "dsc": DSC,
    "dsp": DSP,
    "wse": WSE,
    "wsdp": WSDP,
    "wsx": "http://schemas.xmlsoap.org/ws/2004/09/mex",
}


# --- building requests ---------------------------------------------------------------------------


def soap(
    body: str,
    action: str | None,
    *,
    message_id: str | None = REQUEST_ID,
    headers: str = "",
    wsa: str = WSA,
    envelope_ns: str = SOAP,
    to: str | None = None,
    declarations: str = "",
) -> bytes:
    """A request written by hand.  Prefixes: s (envelope), a (addressing), dsc, dsp, psp, xop,
    wse."""
    parts = []
    if to is not None:
        parts.append(f"<a:To>{to}</a:To>")
    if action is not None:
        parts.append(f"<a:Action>{action}</a:Action>")
    if message_id is not None:
        parts.append(f"<a:MessageID>{message_id}</a:MessageID>")
    parts.append(headers)
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n'
        f'<s:Envelope xmlns:s="{envelope_ns}" xmlns:a="{wsa}" xmlns:dsc="{DSC}" '
        f'xmlns:dsp="{DSP}" xmlns:psp="{PSP}" xmlns:xop="{XOP}" xmlns:wse="{WSE}"'
        f"{declarations}>"
        f"<s:Header>{''.join(parts)}</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def token_body(ns_prefix: str, local: str, token: str) -> str:
    return (
        f"<{ns_prefix}:{local}><{ns_prefix}:JobToken>{token}</{ns_prefix}:JobToken>"
        f"</{ns_prefix}:{local}>"
    )


def elements_body(ns_prefix: str, token: str, *requested: str) -> str:
    items = "".join(f"<{ns_prefix}:Name>{n}</{ns_prefix}:Name>" for n in requested)
    return (
        f"<{ns_prefix}:GetPostScanJobElementsRequest><{ns_prefix}:JobToken>{token}"
        f"</{ns_prefix}:JobToken><{ns_prefix}:RequestedElements>{items}"
        f"</{ns_prefix}:RequestedElements></{ns_prefix}:GetPostScanJobElementsRequest>"
    )


def repository_body(*requested: str) -> str:
    items = "".join(f"<dsc:Name>{n}</dsc:Name>" for n in requested)
    return (
        f"<dsc:GetRepositoryElementsRequest><dsc:RequestedElements>{items}"
        f"</dsc:RequestedElements></dsc:GetRepositoryElementsRequest>"
    )


def create_request(
    *instructions: Instructions,
    continue_on_error: bool | None = None,
    user: str = "S-1-5-21-1000",
    psp_identifier: str = "PSP-1",
) -> etree._Element:
    return client.create_post_scan_job(
        user_identifier=user,
        psp_identifier=psp_identifier,
        instructions=instructions or (FS,),
        continue_on_error=continue_on_error,
    )


def envelope(action: str, payload: etree._Element, message_id: str = REQUEST_ID) -> bytes:
    """A request built by the client role, with a known MessageID (for RelatesTo checks)."""
    return client.envelope(action, payload, message_id=message_id)


def create_job(
    t: InProcessTransport,
    *instructions: Instructions,
    continue_on_error: bool | None = None,
    identity: str | None = None,
    user: str = "S-1-5-21-1000",
    psp_identifier: str = "PSP-1",
) -> str:
    """CreatePostScanJob over WS-DSP; returns the token (the reply must be a success)."""
    reply = t.post(
        envelope(
            Act.DSP_CREATE,
            create_request(
                *instructions,
                continue_on_error=continue_on_error,
                user=user,
                psp_identifier=psp_identifier,
            ),
        ),
        identity=identity,
    )
    assert reply.status == 200, reply.body.decode()
    return text_of(payload_of(reply), "dsp:JobToken")


def mtom_body(
    envelope: bytes, content_id: str, data: bytes, boundary: str = "MIME_boundary_dsc-test"
) -> tuple[str, bytes]:
    m = client.mtom(envelope, content_id, [data], boundary=boundary)
    return m.content_type, b"".join(m.chunks())


def send_image_exchange(
    t: InProcessTransport, token: str, image: bytes, document_id: int = 1
) -> tuple[Exchange, bytes]:
    """An opened SendImage exchange for ``image`` and the whole MTOM body to feed it."""
    cid = f"p{document_id}@x"
    ctype, body = mtom_body(
        envelope(Act.DSP_SEND_IMAGE, client.send_image_request(token, document_id, "png", cid)),
        cid,
        image,
    )
    return t.server.open_exchange(RequestInfo(now=t.clock, content_type=ctype)), body


def send_image(
    t: InProcessTransport,
    token: str,
    document_id: int = 1,
    data: bytes = b"IMG",
    *,
    fmt: str = "png",
    chunk_size: int | None = None,
    identity: str | None = None,
    content_id: str = "image-1@dsc-test",
    href: str | None = None,
) -> Reply:
    """SendImage as MTOM; ``href`` overrides the xop:Include reference."""
    root = envelope(
        Act.DSP_SEND_IMAGE, client.send_image_request(token, document_id, fmt, content_id)
    )
    if href is not None:
        root = root.replace(f'href="cid:{content_id}"'.encode(), f'href="{href}"'.encode())
    ctype, body = mtom_body(root, content_id, data)
    return t.post(body, content_type=ctype, chunk_size=chunk_size, identity=identity)


def post_token(
    t: InProcessTransport, ns: str, local: str, token: str, identity: str | None = None
) -> Reply:
    action = (DSP if ns == DSP else DSC) + "/" + local.removesuffix("Request")
    return t.post(envelope(action, client.token_request(ns, local, token)), identity=identity)


def end_job(t: InProcessTransport, token: str, identity: str | None = None) -> Reply:
    return post_token(t, DSP, "EndPostScanJobRequest", token, identity)


def cancel_job(t: InProcessTransport, ns: str, token: str, identity: str | None = None) -> Reply:
    return post_token(t, ns, "CancelPostScanJobRequest", token, identity)


def job_of(t: InProcessTransport, token: str) -> Job:
    """The core's record of a job (it must exist)."""
    job = t.server.jobs.get(token)
    assert job is not None, token
    return job


def ok(reply: Reply) -> etree._Element:
    """The payload of a successful reply (fails the test with the fault otherwise)."""
    assert reply.status == 200, reply.body.decode()
    assert reply.content_type == SOAP_CONTENT_TYPE
    body = payload_of(reply)
    assert etree.QName(body).localname != "Fault", reply.body.decode()
    return body


def summaries(t: InProcessTransport, which: str) -> list[client.JobView]:
    """GetActiveJobs ("ActiveJobs") or GetJobHistory ("JobHistory") as job views."""
    action, request = (
        (Act.DSC_ACTIVE, "GetActiveJobsRequest")
        if which == "ActiveJobs"
        else (Act.DSC_HISTORY, "GetJobHistoryRequest")
    )
    body = ok(t.post(envelope(action, client.empty_request(request))))
    return client.read_summaries(body, which)


def job_view(t: InProcessTransport, token: str, ns: str = DSC) -> client.JobView:
    prefix = "dsp" if ns == DSP else "dsc"
    reply = t.post(
        soap(
            elements_body(prefix, token, f"{prefix}:JobStatus", f"{prefix}:JobDescription"),
            (DSP if ns == DSP else DSC) + "/GetPostScanJobElements",
        )
    )
    return client.read_job_elements(ok(reply), ns)


def repository_state(t: InProcessTransport) -> str:
    body = ok(t.post(soap(repository_body("dsc:RepositoryStatus"), Act.DSC_REPOSITORY)))
    return text_of(
        body, "dsc:RepositoryElements/dsc:ElementData/dsc:RepositoryStatus/dsc:RepositoryState"
    )


# --- reading replies ------------------------------------------------------------------------------


def parse(body: bytes) -> etree._Element:
    return etree.fromstring(body)


def xp(el: etree._Element, path: str) -> list[etree._Element]:
    return el.xpath(path, namespaces=NSMAP)  # type: ignore[no-any-return]


def text_of(el: etree._Element, path: str) -> str:
    found = xp(el, path)
    assert len(found) == 1, f"{path}: {len(found)} matches in {etree.tostring(el)!r}"
    return (found[0].text or "").strip(" \t\r\n")


def payload_of(reply: Reply | bytes) -> etree._Element:
    body = reply.body if isinstance(reply, Reply) else reply
    root = parse(body)
    assert etree.QName(root).namespace == SOAP and etree.QName(root).localname == "Envelope"
    found = xp(root, "/s:Envelope/s:Body/*")
    assert len(found) == 1, body.decode()
    return found[0]


def resolve(el: etree._Element, value: str) -> tuple[str, str]:
    """A QName value in the scope of ``el`` as (namespace, local); the prefix must be bound."""
    value = value.strip(" \t\r\n")
    prefix, sep, local = value.partition(":")
    if not sep:
        return (el.nsmap.get(None, "") or "", value)
    assert prefix in el.nsmap, f"prefix {prefix!r} of {value!r} is not bound"
    return (el.nsmap[prefix] or "", local)


@dataclass
class Headers:
    to: str | None
    action: str | None
    message_id: str | None
    relates_to: str | None
    wsa: str


def reply_headers(body: bytes) -> Headers:
    root = parse(body)
    header = xp(root, "/s:Envelope/s:Header")
    assert len(header) == 1
    found: dict[str, str] = {}
    wsa_ns = None
    for child in header[0]:
        q = etree.QName(child)
        if q.namespace in (WSA, WSA10):
            assert q.localname not in found, f"duplicate wsa:{q.localname}"
            found[q.localname] = (child.text or "").strip()
            wsa_ns = q.namespace
    return Headers(
        found.get("To"),
        found.get("Action"),
        found.get("MessageID"),
        found.get("RelatesTo"),
        wsa_ns or "",
    )


_SEEN_IDS: set[str] = set()


def check_reply_headers(
    reply: Reply, *, action: str, relates_to: str | None, wsa: str = WSA
) -> Headers:
    """R4: To anonymous, the action, a fresh urn:uuid MessageID, RelatesTo the request's."""
    h = reply_headers(reply.body)
    assert h.wsa == wsa
    assert h.to == (ANONYMOUS10 if wsa == WSA10 else ANONYMOUS)
    assert h.action == action
    assert h.relates_to == relates_to
    assert h.message_id is not None
    assert re.fullmatch(
        r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", h.message_id
    ), h.message_id
    assert h.message_id != relates_to
    return h


@dataclass
class Fault:
    status: int
    code: tuple[str, str]
    subcode: tuple[str, str] | None
    reason: str
    detail: etree._Element | None
    headers: Headers
    header: etree._Element


def read_fault(reply: Reply) -> Fault:
    """A fault reply, with every QName resolved by namespace."""
    assert reply.content_type == SOAP_CONTENT_TYPE
    root = parse(reply.body)
    fault = payload_of(reply)
    assert etree.QName(fault).text == f"{{{SOAP}}}Fault", reply.body.decode()
    children = [etree.QName(c).localname for c in fault]
    assert children[:2] == ["Code", "Reason"] and set(children[2:]) <= {"Detail"}, children
    values = xp(fault, "s:Code/s:Value")
    assert len(values) == 1
    code = resolve(values[0], values[0].text or "")
    subs = xp(fault, "s:Code/s:Subcode/s:Value")
    assert len(subs) <= 1
    subcode = resolve(subs[0], subs[0].text or "") if subs else None
    assert not xp(fault, "s:Code/s:Subcode/s:Subcode")
    texts = xp(fault, "s:Reason/s:Text")
    assert len(texts) == 1
    assert texts[0].get(f"{{{XML_NS}}}lang") == "en"
    details = xp(fault, "s:Detail")
    return Fault(
        reply.status,
        code,
        subcode,
        texts[0].text or "",
        details[0] if details else None,
        reply_headers(reply.body),
        xp(root, "/s:Envelope/s:Header")[0],
    )


def check_fault(
    reply: Reply,
    *,
    status: int,
    code: str,
    subcode: tuple[str, str] | None,
    reason: str | None = None,
    relates_to: str | None = REQUEST_ID,
    wsa: str = WSA,
) -> Fault:
    """Every field of R4: HTTP status, Code, Subcode, exact Reason, headers of the fault."""
    f = read_fault(reply)
    assert f.status == status
    assert f.code == (SOAP, code)
    assert f.subcode == subcode
    if reason is not None:
        # The table's text, or the table's text and what exactly was wrong (docs/rulings.md
        # "Fault reason texts").
        assert f.reason == reason or f.reason.startswith(reason.rstrip(".") + ": "), f.reason
    else:
        assert f.reason.strip()
    check_reply_headers(
        reply,
        action=FAULT_ACTION10 if wsa == WSA10 else FAULT_ACTION,
        relates_to=relates_to,
        wsa=wsa,
    )
    return f


def check_protocol_fault(
    reply: Reply, ns: str, subcode: str, *, relates_to: str | None = REQUEST_ID
) -> Fault:
    """A dsc:/dsp: fault of the tables, every field (the Detail is the caller's)."""
    return check_fault(
        reply,
        status=400 if CODES[subcode] == "Sender" else 500,
        code=CODES[subcode],
        subcode=(ns, subcode),
        reason=REASONS[ns][subcode],
        relates_to=relates_to,
    )


def detail_qname(f: Fault) -> tuple[str, str]:
    """The Detail of an InvalidArgs or addressing fault names the argument or header: the
    argument's element itself, empty, or a ``wsa:ProblemHeaderQName`` holding the header's
    QName.  Elements only (SOAP 1.2 Part 1 §5.4.5)."""
    assert f.detail is not None
    assert not (f.detail.text or "").strip()
    (el,) = list(f.detail)
    assert len(el) == 0
    if etree.QName(el).localname == "ProblemHeaderQName":
        return resolve(el, el.text or "")
    assert not (el.text or "").strip()
    qname = etree.QName(el)
    return (qname.namespace or "", qname.localname)


def detail_action(f: Fault, wsa: str = WSA) -> str:
    """The Detail of wsa:ActionNotSupported: ``wsa:ProblemAction/wsa:Action``."""
    assert f.detail is not None
    assert not (f.detail.text or "").strip()
    (problem,) = list(f.detail)
    assert etree.QName(problem).text == f"{{{wsa}}}ProblemAction"
    (action,) = list(problem)
    assert etree.QName(action).text == f"{{{wsa}}}Action"
    return (action.text or "").strip()


def detail_token(f: Fault, ns: str) -> str:
    """R4 step 7: ``<ns:JobToken>TOKEN</ns:JobToken>`` and nothing else."""
    assert f.detail is not None
    assert not (f.detail.text or "").strip()
    (el,) = list(f.detail)
    assert etree.QName(el).text == f"{{{ns}}}JobToken"
    assert len(el) == 0
    return el.text or ""


def structure(el: etree._Element) -> tuple[object, ...]:
    """A prefix-free view of an element: tag, attributes and texts with QName-looking values
    resolved by namespace, children in order.  Used to compare with published examples."""

    def value(v: str) -> str:
        v = v.strip(" \t\r\n")
        prefix, sep, local = v.partition(":")
        if sep and prefix in el.nsmap and "/" not in v:
            return f"{{{el.nsmap[prefix]}}}{local}"
        return v

    attrs = tuple(sorted((k, value(v)) for k, v in el.attrib.items()))
    return (
        etree.QName(el).text,
        attrs,
        value(el.text or ""),
        tuple(structure(c) for c in el if isinstance(c.tag, str)),
    )


def tags(el: etree._Element) -> list[str]:
    return [etree.QName(c).text for c in el if isinstance(c.tag, str)]


def deliveries_of(t: InProcessTransport, action: str) -> list[etree._Element]:
    """Parsed envelopes of the notifications with that action, in order."""
    out = []
    for d in t.deliveries:
        root = parse(d.body)
        if reply_headers(d.body).action == action:
            out.append(root)
    return out


def subscribe_body(
    notify_to: str = "http://sink.example/notify",
    *,
    end_to: str | None = "http://sink.example/end",
    expires: str | None = None,
    actions: Iterable[str] | None = None,
    notify_params: str = '<x:Ref xmlns:x="urn:test:sink">N-1</x:Ref>',
    end_params: str = '<x:Ref xmlns:x="urn:test:sink">E-1</x:Ref>',
) -> str:
    end = (
        f"<wse:EndTo><a:Address>{end_to}</a:Address><a:ReferenceParameters>{end_params}"
        f"</a:ReferenceParameters></wse:EndTo>"
        if end_to
        else ""
    )
    exp = f"<wse:Expires>{expires}</wse:Expires>" if expires is not None else ""
    filt = (
        f'<wse:Filter Dialect="{ACTION_DIALECT}">{" ".join(actions)}</wse:Filter>'
        if actions is not None
        else ""
    )
    return (
        f"<wse:Subscribe>{end}<wse:Delivery><wse:NotifyTo><a:Address>{notify_to}"
        f"</a:Address><a:ReferenceParameters>{notify_params}</a:ReferenceParameters>"
        f"</wse:NotifyTo></wse:Delivery>{exp}{filt}</wse:Subscribe>"
    )


def subscribe(t: InProcessTransport, service_url: str, **kw: Any) -> tuple[str, str]:
    """Subscribe at a hosted service; returns (identifier, granted Expires)."""
    reply = t.post(soap(subscribe_body(**kw), Act.SUBSCRIBE, to=service_url))
    body = ok(reply)
    assert etree.QName(body).text == f"{{{WSE}}}SubscribeResponse"
    ident = text_of(body, "wse:SubscriptionManager/a:ReferenceParameters/wse:Identifier")
    return ident, text_of(body, "wse:Expires")


def manager_request(t: InProcessTransport, action: str, identifier: str, body: str) -> Reply:
    return t.post(soap(body, action, headers=f"<wse:Identifier>{identifier}</wse:Identifier>"))
