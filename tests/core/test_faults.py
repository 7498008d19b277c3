"""Every fault of R4, produced through the in-process transport and checked field by field:
Code, Subcode (QName resolved by namespace), exact Reason with xml:lang="en", Detail, the
addressing headers of the fault (RelatesTo, a fresh MessageID, To anonymous, the fault action) and
the HTTP status.  Also the answers R2/R3 require instead of a fault (WS-Addressing 1.0, https
spellings), and the image limits of R8/R12."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import pytest
from lxml import etree

from core_support import (
    ACTION_DIALECT,
    ANONYMOUS,
    ANONYMOUS10,
    DSC,
    DSP,
    FAULT_ACTION10,
    FS,
    PSP,
    REQUEST_ID,
    SOAP,
    SOAP11,
    WSA,
    WSA10,
    WSE,
    Act,
    cancel_job,
    check_fault,
    check_protocol_fault,
    check_reply_headers,
    create_job,
    deliveries_of,
    detail_action,
    detail_qname,
    detail_token,
    elements_body,
    end_job,
    envelope,
    job_of,
    manager_request,
    ok,
    post_token,
    repository_body,
    repository_state,
    resolve,
    send_image,
    soap,
    subscribe,
    subscribe_body,
    summaries,
    text_of,
    token_body,
    xp,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import (
    AppendDocument,
    BeginDocument,
    CreateJob,
    FilterStarted,
    FinishDocument,
    Limits,
    ProcessingStarted,
    Reply,
    RequestInfo,
    ServerConfig,
    UpdateJob,
    client,
)
from dsc_core.model import FilterState, JobState

GET_ACTIVE = "<dsc:GetActiveJobsRequest/>"
INVALID_ARGS = {
    DSC: "At least one input argument is invalid",
    DSP: "At least one input argument is invalid.",
}


def active_jobs_request(**kw: Any) -> bytes:
    return soap(GET_ACTIVE, Act.DSC_ACTIVE, **kw)


# --- R4 step 1: env:Sender without subcode, HTTP 400 ------------------------------------------


@dataclass
class Malformed:
    data: bytes
    words: str  # the Reason names the cause
    relates_to: str | None  # the request's MessageID when the message could be read
    limits: Limits = Limits()


def deep(levels: int) -> str:
    return "<x:d xmlns:x='urn:test:deep'>" * levels + "</x:d>" * levels


STEP1 = {
    "not well-formed": Malformed(active_jobs_request()[:-20], "well-formed", None),
    "not well-formed, bad byte": Malformed(
        active_jobs_request().replace(b"<s:Body>", b"<s:Body>\xff\xfe"), "well-formed", None
    ),
    "empty body": Malformed(b"", "no SOAP envelope", None),
    "DTD": Malformed(
        b'<?xml version="1.0"?>\n<!DOCTYPE s:Envelope>\n'
        + active_jobs_request().split(b"\n", 1)[1],
        "DTD",
        None,
    ),
    "DTD in UTF-16": Malformed(
        (
            '<?xml version="1.0" encoding="UTF-16"?>\n<!DOCTYPE s:Envelope>\n'
            + active_jobs_request().decode().split("\n", 1)[1]
        ).encode("utf-16"),
        "DTD",
        None,
    ),
    "entity declaration": Malformed(
        b'<?xml version="1.0"?>\n<!DOCTYPE s:Envelope [<!ENTITY x "y">]>\n'
        + soap(
            "<dsc:GetActiveJobsRequest><o:e xmlns:o='urn:o'>&x;</o:e></dsc:GetActiveJobsRequest>",
            Act.DSC_ACTIVE,
        ).split(b"\n", 1)[1],
        "entity",
        None,
    ),
    "processing instruction in the Body": Malformed(
        soap("<?php echo 1; ?>" + GET_ACTIVE, Act.DSC_ACTIVE), "processing instruction", REQUEST_ID
    ),
    "processing instruction before the Envelope": Malformed(
        active_jobs_request().replace(b"?>\n", b"?>\n<?xml-stylesheet href='x'?>", 1),
        "processing instruction",
        REQUEST_ID,
    ),
    "envelope over limit": Malformed(
        soap(
            "<dsc:GetActiveJobsRequest><o:p xmlns:o='urn:o'>"
            + "x" * 600
            + "</o:p></dsc:GetActiveJobsRequest>",
            Act.DSC_ACTIVE,
        ),
        "1024 bytes",
        None,
        Limits(max_envelope_bytes=1024),
    ),
    "depth limit": Malformed(
        soap(
            "<dsc:GetActiveJobsRequest>" + deep(8) + "</dsc:GetActiveJobsRequest>", Act.DSC_ACTIVE
        ),
        "deeper than 10",
        REQUEST_ID,
        Limits(max_xml_depth=10),
    ),
    "element-count limit": Malformed(  # 6 elements of the envelope + 15 = 21
        soap(
            "<dsc:GetActiveJobsRequest>"
            + "<o:e xmlns:o='urn:o'/>" * 15
            + "</dsc:GetActiveJobsRequest>",
            Act.DSC_ACTIVE,
        ),
        "more than 20 elements",
        REQUEST_ID,
        Limits(max_xml_elements=20),
    ),
    "no Body": Malformed(
        soap("", Act.DSC_ACTIVE).replace(b"<s:Body></s:Body>", b""), "no Body", REQUEST_ID
    ),
    "two Bodies": Malformed(
        soap(GET_ACTIVE, Act.DSC_ACTIVE).replace(b"</s:Envelope>", b"<s:Body/></s:Envelope>"),
        "unexpected element",
        REQUEST_ID,
    ),
    "not an Envelope": Malformed(
        f'<s:Letter xmlns:s="{SOAP}" xmlns:dsc="{DSC}"><s:Body>{GET_ACTIVE}</s:Body>'
        "</s:Letter>".encode(),
        "not a SOAP Envelope",
        None,
    ),
    "not XML at all": Malformed(b"GET / HTTP/1.1\r\n\r\n", "well-formed", None),
}


@pytest.mark.parametrize("case", list(STEP1), ids=list(STEP1))
def test_step1_malformed_message(case: str) -> None:
    m = STEP1[case]
    t = InProcessTransport(ServerConfig(limits=m.limits))
    reply = t.post(m.data)
    f = check_fault(reply, status=400, code="Sender", subcode=None, relates_to=m.relates_to)
    assert m.words in f.reason
    assert f.detail is None
    assert t.commands == []


@pytest.mark.parametrize("chunk_size", [None, 1, 100])
def test_step1_envelope_limit_is_exact(chunk_size: int | None) -> None:
    """R12: an envelope of exactly max_envelope_bytes is read; one byte more is refused."""
    base = active_jobs_request()
    limit = len(base) + 40
    padded = base.replace(b"<s:Body>", b"<s:Body>" + b" " * 40)
    assert len(padded) == limit
    t = InProcessTransport(ServerConfig(limits=Limits(max_envelope_bytes=limit)))
    ok(t.post(padded, chunk_size=chunk_size))
    reply = t.post(padded.replace(b"<s:Body>", b"<s:Body> "), chunk_size=chunk_size)
    check_fault(reply, status=400, code="Sender", subcode=None, relates_to=None)


def test_step1_depth_and_count_limits_are_exact() -> None:
    # Envelope(1) Body(2) GetActiveJobsRequest(3) + 7 levels = 10.
    t = InProcessTransport(ServerConfig(limits=Limits(max_xml_depth=10)))
    ok(
        t.post(
            soap(
                "<dsc:GetActiveJobsRequest>" + deep(7) + "</dsc:GetActiveJobsRequest>",
                Act.DSC_ACTIVE,
            )
        )
    )
    # Envelope, Header, Action, MessageID, Body, request = 6 elements + 14 = 20.
    t = InProcessTransport(ServerConfig(limits=Limits(max_xml_elements=20)))
    ok(
        t.post(
            soap(
                "<dsc:GetActiveJobsRequest>"
                + "<o:e xmlns:o='urn:o'/>" * 14
                + "</dsc:GetActiveJobsRequest>",
                Act.DSC_ACTIVE,
            )
        )
    )


def test_step1_mtom_root_part_over_limit() -> None:
    """R12: the MTOM root part has the envelope limit too; the image is not streamed."""
    t = InProcessTransport(ServerConfig(limits=Limits(max_envelope_bytes=4096)))
    token = create_job(t)
    reply = send_image(t, token, 1, b"IMAGE", content_id="x" * 5000)
    check_fault(reply, status=400, code="Sender", subcode=None, relates_to=None)
    assert t.store.documents == {} and t.store.open_documents == {}
    assert t.server.jobs.uploads == set()


# --- R4 steps 2 and 3 ---------------------------------------------------------------------------


def test_step2_version_mismatch_for_soap11_is_a_soap11_message() -> None:
    """SOAP 1.2 Part 1 Appendix A (R2 amended): a SOAP/1.1 sender gets a SOAP/1.1 fault
    (faultcode VersionMismatch in the 1.1 namespace) with the 1.2 Upgrade header."""
    t = InProcessTransport()
    reply = t.post(soap(GET_ACTIVE, Act.DSC_ACTIVE, envelope_ns=SOAP11))
    assert reply.status == 500
    assert reply.content_type == "text/xml; charset=utf-8"
    root = etree.fromstring(reply.body)
    assert etree.QName(root).text == f"{{{SOAP11}}}Envelope"
    (code,) = root.xpath("/e:Envelope/e:Body/e:Fault/faultcode", namespaces={"e": SOAP11})
    assert resolve(code, code.text or "") == (SOAP11, "VersionMismatch")
    (text,) = root.xpath("/e:Envelope/e:Body/e:Fault/faultstring", namespaces={"e": SOAP11})
    assert "SOAP 1.2" in (text.text or "")
    (supported,) = xp(root, "/e11:Envelope/e11:Header/s:Upgrade/s:SupportedEnvelope")
    assert resolve(supported, supported.get("qname", "")) == (SOAP, "Envelope")
    assert t.commands == []


@pytest.mark.parametrize("envelope_ns", ["urn:not-soap"])
def test_step2_version_mismatch(envelope_ns: str) -> None:
    t = InProcessTransport()
    reply = t.post(soap(GET_ACTIVE, Act.DSC_ACTIVE, envelope_ns=envelope_ns))
    f = check_fault(reply, status=500, code="VersionMismatch", subcode=None, relates_to=REQUEST_ID)
    assert f.detail is None
    # SOAP 1.2 part 1, 5.4.7: the Upgrade header lists SOAP 1.2.
    (supported,) = xp(f.header, "s:Upgrade/s:SupportedEnvelope")
    assert resolve(supported, supported.get("qname", "")) == (SOAP, "Envelope")
    assert t.commands == []


def test_step2_comes_before_must_understand() -> None:
    reply = InProcessTransport().post(
        soap(
            GET_ACTIVE,
            Act.DSC_ACTIVE,
            envelope_ns="urn:not-soap",
            headers='<x:Mystery xmlns:x="urn:test:x" s:mustUnderstand="1"/>',
        )
    )
    check_fault(reply, status=500, code="VersionMismatch", subcode=None)


@pytest.mark.parametrize("flag", ["true", "1", " true "])
def test_step3_must_understand(flag: str) -> None:
    t = InProcessTransport()
    reply = t.post(
        soap(
            GET_ACTIVE,
            Act.DSC_ACTIVE,
            headers=f'<x:Mystery xmlns:x="urn:test:x" s:mustUnderstand="{flag}"/>'
            '<y:Other xmlns:y="urn:test:y" s:mustUnderstand="true"/>',
        )
    )
    f = check_fault(reply, status=500, code="MustUnderstand", subcode=None)
    not_understood = xp(f.header, "s:NotUnderstood")
    assert sorted(resolve(n, n.get("qname", "")) for n in not_understood) == [
        ("urn:test:x", "Mystery"),
        ("urn:test:y", "Other"),
    ]
    assert t.commands == []


@pytest.mark.parametrize(
    "header",
    [
        '<x:Mystery xmlns:x="urn:test:x" s:mustUnderstand="false"/>',
        '<x:Mystery xmlns:x="urn:test:x"/>',
        '<x:Mystery xmlns:x="urn:test:x" s:mustUnderstand="true" s:role="urn:test:someone-else"/>',
        f'<a:ReplyTo s:mustUnderstand="true"><a:Address>{WSA}/role/anonymous</a:Address></a:ReplyTo>',
    ],
)
def test_step3_headers_we_need_not_understand(header: str) -> None:
    ok(InProcessTransport().post(soap(GET_ACTIVE, Act.DSC_ACTIVE, headers=header)))


def test_step3_identifier_header_with_must_understand_is_understood() -> None:
    t = InProcessTransport()
    ident, _ = subscribe(t, t.server.config.dsc_url)
    reply = t.post(
        soap(
            "<wse:GetStatus/>",
            Act.GET_STATUS,
            headers=f'<wse:Identifier s:mustUnderstand="true">{ident}</wse:Identifier>',
        )
    )
    ok(reply)


def test_step3_action_header_with_must_understand_is_understood() -> None:
    data = soap(
        GET_ACTIVE, None, headers=f'<a:Action s:mustUnderstand="true">{Act.DSC_ACTIVE}</a:Action>'
    )
    ok(InProcessTransport().post(data))


# --- R4 step 4: WS-Addressing -------------------------------------------------------------------


@pytest.mark.parametrize("wsa", [WSA, WSA10])
def test_step4_action_missing(wsa: str) -> None:
    t = InProcessTransport()
    reply = t.post(soap(GET_ACTIVE, None, wsa=wsa))
    f = check_fault(
        reply,
        status=400,
        code="Sender",
        subcode=(
            wsa,
            "MessageAddressingHeaderRequired"
            if wsa == WSA10
            else "MessageInformationHeaderRequired",
        ),
        reason="A required message information header, To, MessageID, or Action, is not present.",
        wsa=wsa,
    )
    assert detail_qname(f) == (wsa, "Action")
    assert t.commands == []


@pytest.mark.parametrize("wsa", [WSA, WSA10])
def test_step4_action_not_supported(wsa: str) -> None:
    action = DSC + "/DeleteEverything"
    t = InProcessTransport()
    reply = t.post(soap(GET_ACTIVE, action, wsa=wsa))
    f = check_fault(
        reply,
        status=400,
        code="Sender",
        subcode=(wsa, "ActionNotSupported"),
        reason="The [action] cannot be processed at the receiver",
        wsa=wsa,
    )
    assert detail_action(f, wsa) == action


def test_step4_comes_before_arguments_and_after_must_understand() -> None:
    t = InProcessTransport()
    reply = t.post(soap("<dsc:Nonsense/>", DSC + "/Nope"))
    check_fault(
        reply,
        status=400,
        code="Sender",
        subcode=(WSA, "ActionNotSupported"),
        reason="The [action] cannot be processed at the receiver",
    )
    reply = t.post(
        soap("<dsc:Nonsense/>", None, headers='<x:M xmlns:x="urn:x" s:mustUnderstand="1"/>')
    )
    check_fault(reply, status=500, code="MustUnderstand", subcode=None)


def test_fault_without_message_id_has_no_relates_to() -> None:
    reply = InProcessTransport().post(soap(GET_ACTIVE, DSC + "/Nope", message_id=None))
    check_fault(
        reply, status=400, code="Sender", subcode=(WSA, "ActionNotSupported"), relates_to=None
    )


def test_every_fault_message_id_is_fresh() -> None:
    t = InProcessTransport()
    seen = set()
    for _ in range(5):
        f = check_fault(
            t.post(soap(GET_ACTIVE, DSC + "/Nope")),
            status=400,
            code="Sender",
            subcode=(WSA, "ActionNotSupported"),
        )
        seen.add(f.headers.message_id)
    assert len(seen) == 5


# --- R4 step 5: authorization (R10) -------------------------------------------------------------

SECURE = ServerConfig(
    require_client_certificates=True, scan_admins=frozenset({"admin@corp.example"})
)
DSC_REQUESTS = {
    "GetRepositoryElements": (repository_body("dsc:RepositoryConfiguration"), Act.DSC_REPOSITORY),
    "GetActiveJobs": (GET_ACTIVE, Act.DSC_ACTIVE),
    "GetJobHistory": ("<dsc:GetJobHistoryRequest/>", Act.DSC_HISTORY),
    "GetPostScanJobElements": (elements_body("dsc", "TOKEN", "dsc:JobStatus"), Act.DSC_ELEMENTS),
    "CancelPostScanJob": (token_body("dsc", "CancelPostScanJobRequest", "TOKEN"), Act.DSC_CANCEL),
}


@pytest.mark.parametrize("operation", list(DSC_REQUESTS))
@pytest.mark.parametrize("identity", [None, "alice@corp.example"])
def test_step5_bdsrr_needs_a_scan_admin(operation: str, identity: str | None) -> None:
    t = InProcessTransport(SECURE)
    token = create_job(t, identity="alice@corp.example")
    body, action = DSC_REQUESTS[operation]
    # Even an invalid or unknown token: authorization comes first (R4 step 5 before 6, 7).
    reply = t.post(
        soap(body.replace("TOKEN", token if identity else "a" * 300), action), identity=identity
    )
    check_fault(
        reply,
        status=400,
        code="Sender",
        subcode=(DSC, "ClientErrorCurrentUserNotScanAdmin"),
        reason="The current user is not a scan administrator",
    )
    assert job_of(t, token).state is JobState.CREATING


@pytest.mark.parametrize("operation", list(DSC_REQUESTS))
def test_step5_scan_admin_is_served(operation: str) -> None:
    t = InProcessTransport(SECURE)
    token = create_job(t, identity="alice@corp.example")
    body, action = DSC_REQUESTS[operation]
    ok(t.post(soap(body.replace("TOKEN", token), action), identity="admin@corp.example"))


def test_without_client_certificates_everyone_is_an_admin() -> None:
    t = InProcessTransport(ServerConfig(scan_admins=frozenset({"admin@corp.example"})))
    token = create_job(t, identity="alice@corp.example")
    ok(
        t.post(
            soap(token_body("dsc", "CancelPostScanJobRequest", token), Act.DSC_CANCEL),
            identity="mallory@corp.example",
        )
    )


# --- R4 step 6: InvalidArgs ----------------------------------------------------------------------


@dataclass
class Bad:
    body: str
    action: str
    argument: tuple[str, str]


LONG = "t" * 256
INVALID = {
    # missing
    "dsc missing JobToken": Bad(
        "<dsc:CancelPostScanJobRequest/>", Act.DSC_CANCEL, (DSC, "JobToken")
    ),
    "dsp missing JobToken": Bad("<dsp:EndPostScanJobRequest/>", Act.DSP_END, (DSP, "JobToken")),
    "dsc missing RequestedElements": Bad(
        "<dsc:GetPostScanJobElementsRequest><dsc:JobToken>x</dsc:JobToken>"
        "</dsc:GetPostScanJobElementsRequest>",
        Act.DSC_ELEMENTS,
        (DSC, "RequestedElements"),
    ),
    "dsp missing PSP_Identifier": Bad(
        "<dsp:CreatePostScanJobRequest><dsp:UserIdentifier>S-1</dsp:UserIdentifier>"
        "<dsp:PostScanInstructions/></dsp:CreatePostScanJobRequest>",
        Act.DSP_CREATE,
        (DSP, "PSP_Identifier"),
    ),
    "dsc missing request element": Bad("", Act.DSC_HISTORY, (DSC, "GetJobHistoryRequest")),
    "dsp missing request element": Bad("", Act.DSP_CANCEL, (DSP, "CancelPostScanJobRequest")),
    "dsc missing Name": Bad(
        "<dsc:GetRepositoryElementsRequest><dsc:RequestedElements/>"
        "</dsc:GetRepositoryElementsRequest>",
        Act.DSC_REPOSITORY,
        (DSC, "Name"),
    ),
    # extra
    "dsc extra element": Bad(
        "<dsc:CancelPostScanJobRequest><dsc:JobToken>x</dsc:JobToken>"
        "<dsc:Force>true</dsc:Force></dsc:CancelPostScanJobRequest>",
        Act.DSC_CANCEL,
        (DSC, "Force"),
    ),
    "dsc second JobToken": Bad(
        "<dsc:CancelPostScanJobRequest><dsc:JobToken>x</dsc:JobToken>"
        "<dsc:JobToken>y</dsc:JobToken></dsc:CancelPostScanJobRequest>",
        Act.DSC_CANCEL,
        (DSC, "JobToken"),
    ),
    "dsp extra element": Bad(
        "<dsp:CancelPostScanJobRequest><dsp:JobToken>x</dsp:JobToken>"
        "<dsp:Force>true</dsp:Force></dsp:CancelPostScanJobRequest>",
        Act.DSP_CANCEL,
        (DSP, "Force"),
    ),
    "dsc extra in empty request": Bad(
        "<dsc:GetActiveJobsRequest><dsc:All/></dsc:GetActiveJobsRequest>",
        Act.DSC_ACTIVE,
        (DSC, "All"),
    ),
    "dsc second body element": Bad(
        GET_ACTIVE + "<dsc:GetJobHistoryRequest/>", Act.DSC_ACTIVE, (DSC, "GetJobHistoryRequest")
    ),
    "dsp wrong request element": Bad(
        "<dsp:EndPostScanJobRequest><dsp:JobToken>x</dsp:JobToken></dsp:EndPostScanJobRequest>",
        Act.DSP_CANCEL,
        (DSP, "EndPostScanJobRequest"),
    ),
    "dsc request in dsp namespace": Bad(
        "<dsp:GetActiveJobsRequest/>", Act.DSC_ACTIVE, (DSP, "GetActiveJobsRequest")
    ),
    # wrong type
    "dsp DocumentId not an int": Bad(
        "<dsp:SendImageRequest><dsp:JobToken>x</dsp:JobToken><dsp:DocumentDescription>"
        "<dsp:DocumentId>nine</dsp:DocumentId><dsp:Format>png</dsp:Format>"
        "</dsp:DocumentDescription><dsp:ImageData><xop:Include href='cid:a'/></dsp:ImageData>"
        "</dsp:SendImageRequest>",
        Act.DSP_SEND_IMAGE,
        (DSP, "DocumentId"),
    ),
    "dsp DocumentId zero": Bad(
        "<dsp:SendImageRequest><dsp:JobToken>x</dsp:JobToken><dsp:DocumentDescription>"
        "<dsp:DocumentId>0</dsp:DocumentId><dsp:Format>png</dsp:Format>"
        "</dsp:DocumentDescription><dsp:ImageData><xop:Include href='cid:a'/></dsp:ImageData>"
        "</dsp:SendImageRequest>",
        Act.DSP_SEND_IMAGE,
        (DSP, "DocumentId"),
    ),
    "dsp Format not a format": Bad(
        "<dsp:SendImageRequest><dsp:JobToken>x</dsp:JobToken><dsp:DocumentDescription>"
        "<dsp:DocumentId>1</dsp:DocumentId><dsp:Format>a b</dsp:Format>"
        "</dsp:DocumentDescription><dsp:ImageData><xop:Include href='cid:a'/></dsp:ImageData>"
        "</dsp:SendImageRequest>",
        Act.DSP_SEND_IMAGE,
        (DSP, "Format"),
    ),
    "dsp ContinueOnError not a boolean": Bad(
        "<dsp:CreatePostScanJobRequest><dsp:UserIdentifier>S-1</dsp:UserIdentifier>"
        "<dsp:PSP_Identifier>P</dsp:PSP_Identifier><dsp:PostScanInstructions>"
        "<psp:ContinueOnError>maybe</psp:ContinueOnError>"
        "<psp:DocumentRootName>Scan</psp:DocumentRootName><psp:FiltersToProcess/>"
        "</dsp:PostScanInstructions></dsp:CreatePostScanJobRequest>",
        Act.DSP_CREATE,
        (PSP, "ContinueOnError"),
    ),
    "dsc JobToken with element content": Bad(
        "<dsc:CancelPostScanJobRequest><dsc:JobToken><dsc:X/></dsc:JobToken>"
        "</dsc:CancelPostScanJobRequest>",
        Act.DSC_CANCEL,
        (DSC, "JobToken"),
    ),
    "dsc Name not a QName": Bad(
        elements_body("dsc", "x", "not a qname"), Act.DSC_ELEMENTS, (DSC, "Name")
    ),
    "dsp empty JobToken": Bad(
        token_body("dsp", "CancelPostScanJobRequest", "  "), Act.DSP_CANCEL, (DSP, "JobToken")
    ),
    # out of order
    "dsc out of order": Bad(
        "<dsc:GetPostScanJobElementsRequest><dsc:RequestedElements><dsc:Name>dsc:JobStatus"
        "</dsc:Name></dsc:RequestedElements><dsc:JobToken>x</dsc:JobToken>"
        "</dsc:GetPostScanJobElementsRequest>",
        Act.DSC_ELEMENTS,
        (DSC, "JobToken"),
    ),
    "dsp out of order": Bad(
        "<dsp:GetPostScanJobElementsRequest><dsp:RequestedElements><dsp:Name>dsp:JobStatus"
        "</dsp:Name></dsp:RequestedElements><dsp:JobToken>x</dsp:JobToken>"
        "</dsp:GetPostScanJobElementsRequest>",
        Act.DSP_ELEMENTS,
        (DSP, "JobToken"),
    ),
    # over 255 characters
    "dsc JobToken over 255": Bad(
        token_body("dsc", "CancelPostScanJobRequest", LONG), Act.DSC_CANCEL, (DSC, "JobToken")
    ),
    "dsp JobToken over 255": Bad(
        token_body("dsp", "EndPostScanJobRequest", LONG), Act.DSP_END, (DSP, "JobToken")
    ),
    "dsp PSP_Identifier over 255": Bad(
        "<dsp:CreatePostScanJobRequest><dsp:UserIdentifier>S-1</dsp:UserIdentifier>"
        f"<dsp:PSP_Identifier>{LONG}</dsp:PSP_Identifier><dsp:PostScanInstructions/>"
        "</dsp:CreatePostScanJobRequest>",
        Act.DSP_CREATE,
        (DSP, "PSP_Identifier"),
    ),
    # unbound QName prefix
    "dsc unbound prefix": Bad(
        repository_body("zz:RepositoryConfiguration"), Act.DSC_REPOSITORY, (DSC, "Name")
    ),
    "dsp unbound prefix": Bad(
        elements_body("dsp", "x", "zz:JobStatus"), Act.DSP_ELEMENTS, (DSP, "Name")
    ),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_step6_invalid_args(case: str) -> None:
    bad = INVALID[case]
    ns = DSP if bad.action.startswith(DSP) else DSC
    t = InProcessTransport()
    reply = t.post(soap(bad.body, bad.action))
    f = check_fault(
        reply, status=400, code="Sender", subcode=(ns, "InvalidArgs"), reason=INVALID_ARGS[ns]
    )
    assert detail_qname(f) == bad.argument
    assert t.commands == []


def test_step6_comes_before_step7() -> None:
    """An unknown token in a request with another invalid argument: InvalidArgs."""
    reply = InProcessTransport().post(
        soap(elements_body("dsc", "no-such-job", "zz:JobStatus"), Act.DSC_ELEMENTS)
    )
    check_fault(reply, status=400, code="Sender", subcode=(DSC, "InvalidArgs"))


def test_255_characters_are_a_valid_token() -> None:
    """The over-length boundary: 255 characters is an argument of the right type, so the answer
    is "not found", not InvalidArgs."""
    t = InProcessTransport()
    reply = t.post(soap(token_body("dsc", "CancelPostScanJobRequest", "t" * 255), Act.DSC_CANCEL))
    f = check_fault(reply, status=400, code="Sender", subcode=(DSC, "ClientErrorJobTokenNotFound"))
    assert detail_token(f, DSC) == "t" * 255


def test_too_many_requested_names() -> None:
    limit = Limits().max_requested_names
    t = InProcessTransport()
    ok(t.post(soap(repository_body(*["dsc:RepositoryStatus"] * limit), Act.DSC_REPOSITORY)))
    reply = t.post(
        soap(repository_body(*["dsc:RepositoryStatus"] * (limit + 1)), Act.DSC_REPOSITORY)
    )
    f = check_fault(reply, status=400, code="Sender", subcode=(DSC, "InvalidArgs"))
    assert detail_qname(f) == (DSC, "Name")


# --- R4 step 7: unknown job token ---------------------------------------------------------------

NOT_FOUND = {
    "dsc cancel": (DSC, token_body("dsc", "CancelPostScanJobRequest", "TOKEN"), Act.DSC_CANCEL),
    "dsc elements": (DSC, elements_body("dsc", "TOKEN", "dsc:JobStatus"), Act.DSC_ELEMENTS),
    "dsp cancel": (DSP, token_body("dsp", "CancelPostScanJobRequest", "TOKEN"), Act.DSP_CANCEL),
    "dsp end": (DSP, token_body("dsp", "EndPostScanJobRequest", "TOKEN"), Act.DSP_END),
    "dsp elements": (DSP, elements_body("dsp", "TOKEN", "dsp:JobStatus"), Act.DSP_ELEMENTS),
}


@pytest.mark.parametrize("case", list(NOT_FOUND))
def test_step7_unknown_token(case: str) -> None:
    ns, body, action = NOT_FOUND[case]
    token = "6a8d7c92-0db3-4978-8aad-180530f8de53"
    t = InProcessTransport()
    create_job(t)
    # R3: the token is trimmed; the Detail holds the trimmed value.
    reply = t.post(soap(body.replace("TOKEN", f"\n   {token}\n "), action))
    prefix = "dsp" if ns == DSP else "dsc"
    f = check_fault(
        reply,
        status=400,
        code="Sender",
        subcode=(ns, "ClientErrorJobTokenNotFound"),
        reason=f"A PostScan job identified by the specified {prefix}:JobToken "
        "argument could not be found.",
    )
    assert detail_token(f, ns) == token


def test_step7_send_image_with_unknown_token_streams_nothing() -> None:
    t = InProcessTransport()
    reply = send_image(t, "no-such-job", 1, b"IMAGE" * 100)
    f = check_protocol_fault(reply, DSP, "ClientErrorJobTokenNotFound")
    assert detail_token(f, DSP) == "no-such-job"
    assert t.commands == []


@pytest.mark.parametrize("operation", ["cancel", "end", "elements", "send"])
def test_step7_another_users_job_over_wsdsp_is_not_found(operation: str) -> None:
    """R10: with client certificates, a WS-DSP request on another user's job is answered as if
    the job did not exist; the owner is served."""
    t = InProcessTransport(SECURE)
    token = create_job(t, identity="alice@corp.example")

    def run(identity: str | None) -> Reply:
        if operation == "cancel":
            return cancel_job(t, DSP, token, identity)
        if operation == "end":
            return end_job(t, token, identity)
        if operation == "send":
            return send_image(t, token, 1, b"IMG", identity=identity)
        return t.post(
            envelope(Act.DSP_ELEMENTS, client.job_elements_request(DSP, token, ["JobStatus"])),
            identity=identity,
        )

    for intruder in ("bob@corp.example", None, "admin@corp.example"):
        f = check_protocol_fault(run(intruder), DSP, "ClientErrorJobTokenNotFound")
        assert detail_token(f, DSP) == token
    assert t.store.documents == {} and t.store.open_documents == {}
    assert job_of(t, token).state is JobState.CREATING
    ok(run("alice@corp.example"))


@pytest.mark.parametrize("ns", [DSP, DSC])
def test_step7_cancel_of_a_completed_job(ns: str) -> None:
    t = InProcessTransport()
    token = create_job(t)
    ok(cancel_job(t, DSC, token))
    f = check_protocol_fault(cancel_job(t, ns, token), ns, "ClientErrorJobTokenNotFound")
    assert detail_token(f, ns) == token


# --- R4 step 8: state forbids the operation ------------------------------------------------------


def test_step8_send_image_after_end() -> None:
    t = InProcessTransport()
    token = create_job(t)
    ok(send_image(t, token, 1, b"first"))
    ok(end_job(t, token))
    before = len(t.commands)
    reply = send_image(t, token, 2, b"second")
    f = check_protocol_fault(reply, DSP, "OperationFailed")
    assert f.detail is None and f.status == 500
    assert t.commands[before:] == []  # refused before the image was streamed
    assert t.store.documents == {(token, 1): b"first"}
    assert t.store.open_documents == {}
    assert job_of(t, token).images_received == 1


def test_step8_end_twice() -> None:
    t = InProcessTransport()
    token = create_job(t)
    ok(end_job(t, token))
    check_protocol_fault(end_job(t, token), DSP, "OperationFailed")
    assert len(t.started) == 1


def test_step8_send_image_to_a_canceled_job_during_upload() -> None:
    """The job is canceled while its image is arriving: the SendImage is refused when it ends,
    and the streamed image is dropped (no debris)."""
    t = InProcessTransport()
    token = create_job(t)
    root = envelope(Act.DSP_SEND_IMAGE, client.send_image_request(token, 1, "png", "i@x"))
    m = client.mtom(root, "i@x", [b"DATA" * 50], boundary="b0undary")
    exchange = t.server.open_exchange(RequestInfo(now=t.clock, content_type=m.content_type))
    t._run(exchange.feed(b"".join(m.chunks())))
    assert t.store.open_documents == {(token, 1): bytearray(b"DATA" * 50)}
    ok(cancel_job(t, DSC, token))
    outcome = exchange.end()
    t._run(outcome.commands)
    check_protocol_fault(outcome.reply, DSP, "OperationFailed")
    assert t.store.open_documents == {} and t.store.documents == {}


SHUTDOWN_REQUESTS: dict[str, tuple[str, Callable[[InProcessTransport, str], Reply]]] = {
    "dsp create": (
        DSP,
        lambda t, token: t.post(
            envelope(
                Act.DSP_CREATE,
                client.create_post_scan_job(
                    user_identifier="S-1", psp_identifier="P", instructions=[FS]
                ),
            )
        ),
    ),
    "dsp send": (DSP, lambda t, token: send_image(t, token, 1, b"IMG")),
    "dsp end": (DSP, lambda t, token: end_job(t, token)),
    "dsp cancel": (DSP, lambda t, token: cancel_job(t, DSP, token)),
    "dsp elements": (
        DSP,
        lambda t, token: t.post(
            soap(elements_body("dsp", token, "dsp:JobStatus"), Act.DSP_ELEMENTS)
        ),
    ),
    "dsc repository": (
        DSC,
        lambda t, token: t.post(soap(repository_body("dsc:RepositoryStatus"), Act.DSC_REPOSITORY)),
    ),
    "dsc active": (DSC, lambda t, token: t.post(active_jobs_request())),
    "dsc history": (
        DSC,
        lambda t, token: t.post(soap("<dsc:GetJobHistoryRequest/>", Act.DSC_HISTORY)),
    ),
    "dsc cancel": (DSC, lambda t, token: cancel_job(t, DSC, token)),
    "dsc elements": (
        DSC,
        lambda t, token: t.post(
            soap(elements_body("dsc", token, "dsc:JobStatus"), Act.DSC_ELEMENTS)
        ),
    ),
}


@pytest.mark.parametrize("case", list(SHUTDOWN_REQUESTS))
def test_step8_any_request_while_shut_down(case: str) -> None:
    ns, run = SHUTDOWN_REQUESTS[case]
    t = InProcessTransport()
    token = create_job(t)
    t._run(t.server.shutdown(t.clock))
    before = len(t.commands)
    f = check_protocol_fault(run(t, token), ns, "OperationFailed")
    assert f.status == 500 and f.detail is None
    assert t.commands[before:] == []  # nothing streamed, stored or announced
    assert job_of(t, token).state is JobState.CREATING


# --- R4 step 9: the store failed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "temporary,subcode", [(True, "ServerErrorTemporaryError"), (False, "ServerErrorInternalError")]
)
def test_step9_create_fails(temporary: bool, subcode: str) -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    t.store.fail_on, t.store.fail_temporary = CreateJob, temporary
    reply = t.post(
        envelope(
            Act.DSP_CREATE,
            client.create_post_scan_job(
                user_identifier="S-1", psp_identifier="P", instructions=[FS]
            ),
        )
    )
    f = check_protocol_fault(reply, DSP, subcode)
    assert f.detail is None
    assert t.server.jobs.active() == [] and t.server.jobs.history() == []
    assert t.store.jobs == {} and t.deliveries == []
    assert summaries(t, "ActiveJobs") == []
    create_job(t)  # the next attempt works


@pytest.mark.parametrize(
    "temporary,subcode", [(True, "ServerErrorTemporaryError"), (False, "ServerErrorInternalError")]
)
def test_step9_end_fails(temporary: bool, subcode: str) -> None:
    t = InProcessTransport()
    token = create_job(t)
    ok(send_image(t, token, 1, b"IMG"))
    t.store.fail_on, t.store.fail_temporary = UpdateJob, temporary
    check_protocol_fault(end_job(t, token), DSP, subcode)
    job = t.server.jobs.get(token)
    assert job is not None and job.state is JobState.CREATING and job.images_received == 1
    assert t.started == []
    ok(end_job(t, token))
    assert [j.token for j in t.started] == [token]


@pytest.mark.parametrize("chunk_size", [None, 50])
@pytest.mark.parametrize("failing", [BeginDocument, AppendDocument, FinishDocument, UpdateJob])
@pytest.mark.parametrize(
    "temporary,subcode", [(True, "ServerErrorTemporaryError"), (False, "ServerErrorInternalError")]
)
def test_step9_send_image_fails(
    failing: type, temporary: bool, subcode: str, chunk_size: int | None
) -> None:
    t = InProcessTransport()
    token = create_job(t)
    ok(send_image(t, token, 1, b"one"))
    t.store.fail_on, t.store.fail_temporary = failing, temporary
    check_protocol_fault(send_image(t, token, 2, b"two" * 100, chunk_size=chunk_size), DSP, subcode)
    job = t.server.jobs.get(token)
    assert job is not None and job.state is JobState.CREATING
    assert [d.document_id for d in job.documents] == [1]
    assert t.store.open_documents == {}
    assert t.server.jobs.uploads == set()
    # Not acknowledged, so the device sends it again, with the same DocumentId.
    ok(send_image(t, token, 2, b"two" * 100))
    assert job_of(t, token).images_received == 2
    assert t.store.documents == {(token, 1): b"one", (token, 2): b"two" * 100}


def test_step9_cancel_fails_and_the_job_keeps_processing() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url, actions=[Act.DSC_SUMMARY_EVENT])
    token = create_job(t, continue_on_error=True)
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    t.engine(FilterStarted(token, 0))
    assert repository_state(t) == "Processing"
    t.store.fail_on = UpdateJob
    f = check_protocol_fault(cancel_job(t, DSC, token), DSC, "ServerErrorTemporaryError")
    assert f.reason.startswith("The service had an unexpected error: the job store")
    job = t.server.jobs.get(token)
    assert job is not None and job.state is JobState.PROCESSING
    assert job.filters[0].state is FilterState.PROCESSING
    assert t.stopped == []
    assert repository_state(t) == "Processing"
    assert [j.token for j in summaries(t, "ActiveJobs")] == [token]
    ok(cancel_job(t, DSC, token))
    assert t.stopped == [token]
    assert repository_state(t) == "Idle"
    # The repository's announced state was rolled back too: no event was lost or doubled.
    assert [
        text_of(e, "//dsc:RepositoryState") for e in deliveries_of(t, Act.DSC_SUMMARY_EVENT)
    ] == ["Processing", "Idle"]


# --- R2, R3: what is accepted instead of faulted ----------------------------------------------


def test_ws_addressing_10_request_is_answered_in_10() -> None:
    reply = InProcessTransport().post(soap(GET_ACTIVE, Act.DSC_ACTIVE, wsa=WSA10))
    ok(reply)
    check_reply_headers(
        reply, action=DSC + "/GetActiveJobsResponse", relates_to=REQUEST_ID, wsa=WSA10
    )
    assert WSA.encode() not in reply.body


def test_ws_addressing_10_fault_uses_the_10_fault_action() -> None:
    reply = InProcessTransport().post(
        soap(token_body("dsc", "CancelPostScanJobRequest", "x"), Act.DSC_CANCEL, wsa=WSA10)
    )
    f = check_fault(
        reply, status=400, code="Sender", subcode=(DSC, "ClientErrorJobTokenNotFound"), wsa=WSA10
    )
    assert f.headers.action == FAULT_ACTION10


def https(uri: str) -> str:
    return "https://" + uri.removeprefix("http://")


def test_https_spellings_of_namespaces_and_actions_are_accepted() -> None:
    t = InProcessTransport()
    token = create_job(t)
    data = soap(elements_body("dsc", token, "dsc:JobStatus"), https(Act.DSC_ELEMENTS))
    for ns in (SOAP, WSA, DSC):
        data = data.replace(f'"{ns}"'.encode(), f'"{https(ns)}"'.encode())
        assert f'"{ns}"'.encode() not in data
    reply = t.post(data)
    body = ok(reply)
    check_reply_headers(
        reply, action=DSC + "/GetPostScanJobElementsResponse", relates_to=REQUEST_ID
    )
    (data_el,) = xp(body, "dsc:JobElements/dsc:ElementData")
    # The https-spelled QName is the dsc one; the reply uses the real namespace.
    assert resolve(data_el, data_el.get(f"{{{DSC}}}Name", "")) == (DSC, "JobStatus")
    assert data_el.get(f"{{{DSC}}}Valid") == "true"


# --- SendImage arguments and limits (R6, R8, R12) ------------------------------------------------


def test_duplicate_document_id() -> None:
    t = InProcessTransport()
    token = create_job(t)
    ok(send_image(t, token, 7, b"original"))
    f = check_protocol_fault(send_image(t, token, 7, b"replacement"), DSP, "InvalidArgs")
    assert detail_qname(f) == (DSP, "DocumentId")
    assert t.store.documents == {(token, 7): b"original"}
    assert t.store.open_documents == {}
    assert job_of(t, token).images_received == 1


@pytest.mark.parametrize("href", ["cid:somebody-else@x", "cid:", "http://example/image", ""])
def test_include_that_references_no_part(href: str) -> None:
    t = InProcessTransport()
    token = create_job(t)
    f = check_protocol_fault(send_image(t, token, 1, b"IMG", href=href), DSP, "InvalidArgs")
    assert detail_qname(f) == (DSP, "ImageData")
    assert t.store.documents == {} and t.store.open_documents == {}
    assert job_of(t, token).images_received == 0
    ok(send_image(t, token, 1, b"IMG"))  # the DocumentId was not used up


def test_send_image_without_mtom() -> None:
    t = InProcessTransport()
    token = create_job(t)
    reply = t.post(
        envelope(Act.DSP_SEND_IMAGE, client.send_image_request(token, 1, "png", "img@x"))
    )
    f = check_protocol_fault(reply, DSP, "InvalidArgs")
    assert detail_qname(f) == (DSP, "ImageData")
    ok(send_image(t, token, 1, b"IMG"))


def test_percent_encoded_cid_reference() -> None:
    """RFC 2392: cid: URLs are %-encoded Content-IDs."""
    t = InProcessTransport()
    token = create_job(t)
    ok(send_image(t, token, 1, b"IMG", content_id="a b@x", href="cid:a%20b@x"))
    assert t.store.documents == {(token, 1): b"IMG"}


@pytest.mark.parametrize("chunk_size", [None, 7, 1000])
def test_image_over_the_limit(chunk_size: int | None) -> None:
    limit = 1000
    t = InProcessTransport(ServerConfig(limits=Limits(max_image_bytes=limit)))
    token = create_job(t)
    reply = send_image(t, token, 1, b"x" * (limit + 1), chunk_size=chunk_size)
    # The root part was read: the fault relates to the request.
    f = check_fault(reply, status=413, code="Sender", subcode=None)
    assert str(limit) in f.reason
    assert t.store.open_documents == {} and t.store.documents == {}
    assert t.server.jobs.uploads == set()
    assert job_of(t, token).images_received == 0
    ok(send_image(t, token, 1, b"x" * limit, chunk_size=chunk_size))
    assert t.store.documents == {(token, 1): b"x" * limit}


def test_malformed_multipart_after_the_image_leaves_no_debris() -> None:
    t = InProcessTransport()
    token = create_job(t)
    root = envelope(Act.DSP_SEND_IMAGE, client.send_image_request(token, 1, "png", "i@x"))
    m = client.mtom(root, "i@x", [b"IMAGE"], boundary="bnd")
    body = b"".join(m.chunks())
    # The image part ends, then the body stops inside a new part's headers.
    truncated = body[: -len(b"--\r\n")] + b"\r\nContent-Type: text/plain\r\n"
    f = check_fault(
        t.post(truncated, content_type=m.content_type), status=400, code="Sender", subcode=None
    )
    assert "MIME" in f.reason
    assert t.store.open_documents == {} and t.store.documents == {}
    assert t.server.jobs.uploads == set()


@pytest.mark.parametrize("token_known", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 1, 50])
def test_mime_error_in_the_same_chunk_as_the_root_part(
    token_known: bool, chunk_size: int | None
) -> None:
    """The root part completes and the MIME body breaks within one feed: the root part still
    counts, so the answer is the one smaller chunks give (RelatesTo; the token fault first)."""
    t = InProcessTransport()
    token = create_job(t) if token_known else "no-such-job"
    root = envelope(Act.DSP_SEND_IMAGE, client.send_image_request(token, 1, "png", "i@x"))
    m = client.mtom(root, "i@x", [b"--bnd\r\nnot a header\r\n"], boundary="bnd")
    reply = t.post(b"".join(m.chunks()), content_type=m.content_type, chunk_size=chunk_size)
    if token_known:
        f = check_fault(reply, status=400, code="Sender", subcode=None)
        assert "MIME" in f.reason
    else:
        f = check_protocol_fault(reply, DSP, "ClientErrorJobTokenNotFound")
        assert detail_token(f, DSP) == "no-such-job"
    assert t.store.open_documents == {} and t.store.documents == {}
    assert t.server.jobs.uploads == set()


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/related",
        "multipart/related; boundary=" + "b" * 300,
        'multipart/related; boundary="a\r\nb"',
    ],
)
def test_unusable_multipart_boundary(content_type: str) -> None:
    t = InProcessTransport()
    f = check_fault(
        t.post(b"--x\r\n\r\n", content_type=content_type),
        status=400,
        code="Sender",
        subcode=None,
        relates_to=None,
    )
    assert "boundary" in f.reason
    assert t.commands == []


# --- eventing faults (R7) ------------------------------------------------------------------------


def test_unknown_filter_action() -> None:
    t = InProcessTransport()
    action = DSP + "/PostScanJobEndStateEvent"
    reply = t.post(
        soap(subscribe_body(actions=[action]), Act.SUBSCRIBE, to=t.server.config.dsc_url)
    )
    f = check_fault(
        reply,
        status=400,
        code="Sender",
        subcode=("http://schemas.xmlsoap.org/ws/2006/02/devprof", "FilterActionNotSupported"),
    )
    assert f.detail is not None and not (f.detail.text or "").strip()
    (named,) = list(f.detail)
    assert etree.QName(named).text == f"{{{WSA}}}Action" and named.text == action
    assert t.server.subscriptions.by_id == {}


def test_unknown_filter_dialect() -> None:
    t = InProcessTransport()
    body = subscribe_body(actions=[Act.DSC_END_EVENT]).replace(
        "http://schemas.xmlsoap.org/ws/2006/02/devprof/Action", "urn:test:xpath"
    )
    reply = t.post(soap(body, Act.SUBSCRIBE, to=t.server.config.dsc_url))
    check_fault(
        reply,
        status=400,
        code="Sender",
        subcode=(WSE, "FilteringRequestedUnavailable"),
        reason="The requested filter dialect is not supported.",
    )
    assert t.server.subscriptions.by_id == {}


@pytest.mark.parametrize("expires", ["PT0S", "-P1D", "P", "soon", "2026-11-21T08:00:00+01:00"])
def test_invalid_expiration(expires: str) -> None:
    t = InProcessTransport()
    reply = t.post(soap(subscribe_body(expires=expires), Act.SUBSCRIBE))
    check_fault(
        reply,
        status=400,
        code="Sender",
        subcode=(WSE, "InvalidExpirationTime"),
        reason="The expiration time requested is invalid.",
    )
    assert t.server.subscriptions.by_id == {}


@pytest.mark.parametrize("expires", ["P99999999999D", "PT99999999999999999999S"])
def test_huge_expiration_is_capped(expires: str) -> None:
    """A valid xs:duration beyond what the server can represent gets the cap (R7)."""
    t = InProcessTransport()
    _, granted = subscribe(t, t.server.config.dsc_url, expires=expires)
    assert granted == "PT86400S"


def test_unknown_subscription_identifier() -> None:
    t = InProcessTransport()
    reply = manager_request(t, Act.RENEW, "urn:uuid:nobody", "<wse:Renew/>")
    check_fault(reply, status=500, code="Receiver", subcode=(WSE, "UnableToRenew"))
    for action, body in (
        (Act.GET_STATUS, "<wse:GetStatus/>"),
        (Act.UNSUBSCRIBE, "<wse:Unsubscribe/>"),
    ):
        check_fault(
            manager_request(t, action, "urn:uuid:nobody", body),
            status=400,
            code="Sender",
            subcode=(WSE, "InvalidMessage"),
        )


def test_post_token_helper_names_the_right_actions() -> None:
    """Guard for the helpers above: each request reaches the operation it names."""
    t = InProcessTransport()
    token = create_job(t)
    reply = post_token(t, DSP, "EndPostScanJobRequest", token)
    check_reply_headers(reply, action=DSP + "/EndPostScanJobResponse", relates_to=REQUEST_ID)
    reply = post_token(t, DSC, "CancelPostScanJobRequest", token)
    check_reply_headers(reply, action=DSC + "/CancelPostScanJobResponse", relates_to=REQUEST_ID)


def test_detail_prefix_is_bound_in_the_fault() -> None:
    """The Detail QName prefixes used by faults are bound in the fault envelope itself."""
    reply = InProcessTransport().post(
        soap(token_body("dsp", "CancelPostScanJobRequest", ""), Act.DSP_CANCEL)
    )
    root = etree.fromstring(reply.body)
    (named,) = list(xp(root, "//s:Detail")[0])
    assert etree.QName(named).text == f"{{{DSP}}}JobToken"
    assert DSP in root.nsmap.values()  # declared once, at the envelope


def test_fault_outcome_carries_a_log_line_for_the_binding() -> None:
    """R12: a limit exceeded is logged; the core gives the binding one readable line."""
    from datetime import datetime

    from dsc_core import Limits, RequestInfo, ScanServer, ServerConfig

    server = ScanServer(ServerConfig(limits=Limits(max_envelope_bytes=100)), new_id=lambda: "1")
    outcome = server.handle(b"<a>" + b" " * 200 + b"</a>", RequestInfo(now=datetime.now(UTC)))
    assert outcome.fault == "Sender/-: The SOAP envelope exceeds the limit of 100 bytes."


# --- issue 16: addressing rules the R4 steps did not check -------------------------------------


@pytest.mark.parametrize("wsa", [WSA, WSA10])
def test_non_anonymous_reply_to_is_refused(wsa: str) -> None:
    """DPWS R0031: the [reply endpoint] of an HTTP request must be anonymous."""
    t = InProcessTransport()
    reply_to = "<a:ReplyTo><a:Address>http://elsewhere.example/replies</a:Address></a:ReplyTo>"
    reply = t.post(soap(GET_ACTIVE, Act.DSC_ACTIVE, wsa=wsa, headers=reply_to))
    local = "InvalidAddressingHeader" if wsa == WSA10 else "InvalidMessageInformationHeader"
    f = check_fault(reply, status=400, code="Sender", subcode=(wsa, local), wsa=wsa)
    assert detail_qname(f) == (wsa, "ReplyTo")
    assert "elsewhere.example" in f.reason


@pytest.mark.parametrize("wsa", [WSA, WSA10])
def test_anonymous_reply_to_is_answered(wsa: str) -> None:
    anonymous = ANONYMOUS10 if wsa == WSA10 else ANONYMOUS
    reply_to = f"<a:ReplyTo><a:Address> {anonymous} </a:Address></a:ReplyTo>"
    ok(InProcessTransport().post(soap(GET_ACTIVE, Act.DSC_ACTIVE, wsa=wsa, headers=reply_to)))


@pytest.mark.parametrize("header", ["Action", "MessageID"])
def test_duplicated_addressing_header_is_refused(header: str) -> None:
    """docs/rulings.md "Duplicated addressing headers": neither the first nor the last wins."""
    extra = {
        "Action": f"<a:Action>{Act.DSC_CANCEL}</a:Action>",
        "MessageID": "<a:MessageID>urn:uuid:00000000-0000-0000-0000-00000000beef</a:MessageID>",
    }[header]
    reply = InProcessTransport().post(soap(GET_ACTIVE, Act.DSC_ACTIVE, headers=extra))
    f = check_fault(
        reply, status=400, code="Sender", subcode=(WSA, "InvalidMessageInformationHeader")
    )
    assert detail_qname(f) == (WSA, header)


def test_filter_without_dialect_is_xpath_and_not_offered() -> None:
    """WS-Eventing 2004/08 §3.1: the implied dialect is XPath 1.0, which is not offered."""
    t = InProcessTransport()
    body = subscribe_body(actions=[Act.DSC_END_EVENT]).replace(f' Dialect="{ACTION_DIALECT}"', "")
    reply = t.post(soap(body, Act.SUBSCRIBE, to=t.server.config.dsc_url))
    f = check_fault(
        reply,
        status=400,
        code="Sender",
        subcode=(WSE, "FilteringRequestedUnavailable"),
        reason="The requested filter dialect is not supported.",
    )
    assert "REC-xpath-19991116" in f.reason
    assert f.detail is not None
    assert [(el.tag, el.text) for el in f.detail] == [
        (f"{{{WSE}}}SupportedDialect", ACTION_DIALECT)
    ]
    assert t.server.subscriptions.by_id == {}
