"""The published example messages through the core: MS-BDSRR section 4 (spec/examples, as
published and the wellformed/ variants) and the hardware-docs WS-DSP examples (dsm-and-stack 1.5).
Every MS-BDSRR response body is validated against bdsrr.xsd."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lxml import etree

from core_support import (
    ANONYMOUS,
    DSC,
    DSP,
    FILTER,
    SOAP,
    SOAP_CONTENT_TYPE,
    WSA,
    cancel_job,
    check_fault,
    check_protocol_fault,
    check_reply_headers,
    create_job,
    detail_token,
    end_job,
    ok,
    parse,
    payload_of,
    resolve,
    structure,
    summaries,
    tags,
    text_of,
    xp,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core.model import EmailInstructions, FilterState, SharePointInstructions
from helpers import dsp_as_dsc, hardware_examples, validate

EXAMPLE_01_ID = "urn:uuid:5e00a5c1-29e7-4361-a42e-1f00013e973c"
EXAMPLE_03_05_ID = "urn:uuid:0eb870ee-f703-492a-8347-ba73a54e132d"


def example(spec: Path, name: str) -> bytes:
    return (spec / "examples" / name).read_bytes()


def request_id(xml: bytes | str) -> str:
    data = xml.encode() if isinstance(xml, str) else xml
    return text_of(parse(data), "/s:Envelope/s:Header/a:MessageID")


# --- MS-BDSRR section 4 -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 100])
def test_01_get_repository_elements_as_published(
    spec: Path, bdsrr_schema: etree.XMLSchema, chunk_size: int | None
) -> None:
    t = InProcessTransport()
    reply = t.post(example(spec, "01-GetRepositoryElements-request.xml"), chunk_size=chunk_size)
    assert reply.status == 200
    assert reply.content_type == SOAP_CONTENT_TYPE
    check_reply_headers(
        reply, action=DSC + "/GetRepositoryElementsResponse", relates_to=EXAMPLE_01_ID
    )
    body = payload_of(reply)
    validate(bdsrr_schema, body)
    assert etree.QName(body).text == f"{{{DSC}}}GetRepositoryElementsResponse"
    (elements,) = list(body)
    assert etree.QName(elements).text == f"{{{DSC}}}RepositoryElements"
    (data,) = list(elements)
    # R3: the echoed QName uses a prefix the response binds (the request said "DSC:").
    name = data.get(f"{{{DSC}}}Name")
    assert name is not None
    assert resolve(data, name) == (DSC, "RepositoryConfiguration")
    assert data.get(f"{{{DSC}}}Valid") == "true"
    dialects = [
        resolve(d, d.text or "")
        for d in xp(data, "dsc:RepositoryConfiguration/dsc:Filters/dsc:Filter/dsc:Dialect")
    ]
    assert dialects == [(FILTER, "fileshare"), (FILTER, "sharepoint"), (FILTER, "email")]
    assert len(xp(data, "dsc:RepositoryConfiguration/dsc:Filters/dsc:Filter/dsc:FilterConfig")) == 3


def test_01_answer_has_the_structure_of_published_02(spec: Path) -> None:
    """Same elements, attributes and (namespace-resolved) values as example 02, whatever the
    prefixes; only the header ids differ."""
    reply = InProcessTransport().post(example(spec, "01-GetRepositoryElements-request.xml"))
    published = parse(example(spec, "wellformed/02-GetRepositoryElements-response.xml"))
    expected = xp(published, "/s:Envelope/s:Body/*")[0]
    assert structure(payload_of(reply)) == structure(expected)
    ours = check_reply_headers(
        reply, action=DSC + "/GetRepositoryElementsResponse", relates_to=EXAMPLE_01_ID
    )
    assert ours.action == text_of(published, "/s:Envelope/s:Header/a:Action")
    assert ours.relates_to == text_of(published, "/s:Envelope/s:Header/a:RelatesTo")


@pytest.mark.parametrize("name", ["03-GetActiveJobs-request.xml", "05-GetJobHistory-request.xml"])
def test_published_03_05_are_not_well_formed(spec: Path, name: str) -> None:
    """Unquoted namespace declarations (README defect): R4 step 1, env:Sender without subcode.
    Nothing of the request can be read, so the fault has no RelatesTo."""
    data = example(spec, name)
    with pytest.raises(etree.XMLSyntaxError):
        etree.fromstring(data)
    t = InProcessTransport()
    reply = t.post(data)
    check_fault(reply, status=400, code="Sender", subcode=None, relates_to=None)
    assert t.commands == []


def test_wellformed_03_get_active_jobs(spec: Path, bdsrr_schema: etree.XMLSchema) -> None:
    reply = InProcessTransport().post(example(spec, "wellformed/03-GetActiveJobs-request.xml"))
    check_reply_headers(reply, action=DSC + "/GetActiveJobsResponse", relates_to=EXAMPLE_03_05_ID)
    body = ok(reply)
    validate(bdsrr_schema, body)
    # Example 04 shows an empty response (README defect); the schema wants one ActiveJobs.
    assert tags(body) == [f"{{{DSC}}}ActiveJobs"]
    assert len(body[0]) == 0


def test_wellformed_03_lists_an_active_job(spec: Path, bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport()
    token = create_job(t)
    body = ok(t.post(example(spec, "wellformed/03-GetActiveJobs-request.xml")))
    validate(bdsrr_schema, body)
    assert [text_of(s, "dsc:JobToken") for s in xp(body, "dsc:ActiveJobs/dsc:JobSummary")] == [
        token
    ]


def test_wellformed_05_get_jobs_history_quirk(spec: Path, bdsrr_schema: etree.XMLSchema) -> None:
    """R3: the body element dsc:GetJobsHistoryRequest is GetJobHistory."""
    data = example(spec, "wellformed/05-GetJobHistory-request.xml")
    assert b"GetJobsHistoryRequest" in data
    reply = InProcessTransport().post(data)
    check_reply_headers(reply, action=DSC + "/GetJobHistoryResponse", relates_to=EXAMPLE_03_05_ID)
    body = ok(reply)
    validate(bdsrr_schema, body)
    assert etree.QName(body).text == f"{{{DSC}}}GetJobHistoryResponse"
    assert tags(body) == [f"{{{DSC}}}JobHistory"]


def _summary_shape(summary: etree._Element) -> tuple[object, ...]:
    ns = etree.QName(summary).namespace
    q = {"n": ns}

    def texts(path: str) -> tuple[str, ...]:
        return tuple((e.text or "").strip() for e in summary.xpath(path, namespaces=q))

    return (
        texts("n:JobState"),
        texts("n:JobStateReasons/n:JobStateReason"),
        texts("n:FilterStatuses/n:FilterStatus/n:Dialect"),
        texts("n:FilterStatuses/n:FilterStatus/n:FilterState"),
        texts("n:ImagesReceived"),
    )


def test_wellformed_05_reproduces_the_history_of_published_06(
    spec: Path, bdsrr_schema: etree.XMLSchema
) -> None:
    """Example 06: one job Aborted/NoValidPostScanInstructionsFound whose e-mail filter is
    Canceled, one Completed/PostScanJobCompletedSuccessfully with its SharePoint filter done."""
    t = InProcessTransport()
    create_job(t, EmailInstructions(False, ()))  # no recipient: the filter cannot run
    good = create_job(t, SharePointInstructions(False, ("http://sp.example/scans",)))
    ok(end_job(t, good))
    t.process(good)
    body = ok(t.post(example(spec, "wellformed/05-GetJobHistory-request.xml")))
    validate(bdsrr_schema, body)
    ours = [_summary_shape(s) for s in xp(body, "dsc:JobHistory/dsc:JobSummary")]
    published = parse(example(spec, "wellformed/06-GetJobHistory-response.xml"))
    theirs = [_summary_shape(s) for s in published.xpath("//c:JobSummary", namespaces={"c": DSC})]
    assert sorted(ours) == sorted(theirs)
    assert ours[0][0] == ("Completed",)  # newest first (R6)


# --- hardware-docs WS-DSP examples ----------------------------------------------------------------

EXAMPLE_TOKENS = (
    "264a19bf-3604-4603-b59d-b47e0f669a1e",
    "0c349cb0-59ed-4d02-b6d5-ebc729c73830",
    "1ba72b60-c873-4d9d-b523-66616fe03ea9",
)


def with_token(text: str, token: str) -> str:
    for placeholder in EXAMPLE_TOKENS:
        text = text.replace(placeholder, token)
    return text


def split_mtom(example_text: str) -> tuple[str, bytes]:
    """The SendImage example: its outer Content-Type header (folded over lines) and the body
    after the header block (ended by the line holding one space)."""
    head, body = example_text.split("\n \n", 1)
    match = re.search(r"^Content-Type:(.*?)(?=^\S|\Z)", head, re.S | re.M | re.I)
    assert match is not None
    return match.group(1).strip(), body.encode("utf-8")


def compare_with_published(reply_body: bytes, request: str, response: str) -> None:
    """Action, RelatesTo (where the published pair is consistent) and the body element name."""
    ours, theirs = parse(reply_body), parse(response.encode())
    assert text_of(ours, "/s:Envelope/s:Header/a:Action") == text_of(
        theirs, "/s:Envelope/s:Header/a:Action"
    )
    their_relates = text_of(theirs, "/s:Envelope/s:Header/a:RelatesTo")
    if their_relates == request_id(request):
        assert text_of(ours, "/s:Envelope/s:Header/a:RelatesTo") == their_relates
    assert text_of(ours, "/s:Envelope/s:Header/a:To") == ANONYMOUS
    (our_body,) = xp(ours, "/s:Envelope/s:Body/*")
    (their_body,) = xp(theirs, "/s:Envelope/s:Body/*")
    assert etree.QName(our_body).text == etree.QName(their_body).text
    assert tags(our_body) == tags(their_body)


@pytest.fixture(scope="module")
def hw(spec: Path) -> dict[str, str]:
    found = hardware_examples(spec)
    for name in (
        "CreatePostScanJob",
        "SendImage",
        "EndPostScanJob",
        "GetPostScanJobElements",
        "CancelPostScanJob",
    ):
        assert name + "Request" in found and name + "Response" in found
    return found


def test_hardware_examples_run_a_whole_job(
    hw: dict[str, str], bdsrr_schema: etree.XMLSchema
) -> None:
    t = InProcessTransport()
    # CreatePostScanJob: three filters, ContinueOnError true.
    reply = t.post(hw["CreatePostScanJobRequest"].encode())
    ok(reply)
    compare_with_published(
        reply.body, hw["CreatePostScanJobRequest"], hw["CreatePostScanJobResponse"]
    )
    token = text_of(payload_of(reply), "dsp:JobToken")
    assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", token)  # R6: a GUID
    job = t.server.jobs.get(token)
    assert job is not None and job.continue_on_error
    assert job.document_root_name == "SampleScanJob"
    assert [f.state for f in job.filters] == [FilterState.PENDING] * 3

    # SendImage (MTOM, the example's own outer Content-Type).
    ctype, body = split_mtom(with_token(hw["SendImageRequest"], token))
    assert ctype.lower().startswith("multipart/related")
    reply = t.post(body, content_type=ctype)
    ok(reply)
    compare_with_published(
        reply.body, root_envelope(hw["SendImageRequest"]), hw["SendImageResponse"]
    )
    assert reply_relates(reply.body) == "uuid:UniqueMsgId"
    assert t.store.documents == {(token, 9): b"Document PDL Data"}

    # GetPostScanJobElements: JobStatus and JobDescription, as in the published response.
    request = with_token(hw["GetPostScanJobElementsRequest"], token)
    reply = t.post(request.encode())
    response = ok(reply)
    compare_with_published(reply.body, request, hw["GetPostScanJobElementsResponse"])
    validate(bdsrr_schema, dsp_as_dsc(response))
    published = xp(
        parse(hw["GetPostScanJobElementsResponse"].encode()),
        "/s:Envelope/s:Body/dsp:GetPostScanJobElementsResponse",
    )[0]
    for ours, theirs in zip(
        xp(response, "dsp:JobElements/dsp:ElementData"),
        xp(published, "dsp:JobElements/dsp:ElementData"),
        strict=True,
    ):
        assert resolve(ours, ours.get(f"{{{DSP}}}Name", "")) == resolve(
            theirs, theirs.get(f"{{{DSP}}}Name", "")
        )
        assert ours.get(f"{{{DSP}}}Valid") == theirs.get(f"{{{DSP}}}Valid") == "true"
        assert tags(ours) == tags(theirs)
    status = xp(response, "dsp:JobElements/dsp:ElementData/dsp:JobStatus")[0]
    assert text_of(status, "dsp:JobToken") == token
    assert text_of(status, "dsp:JobState") == "Creating"
    assert text_of(status, "dsp:ImagesReceived") == "1"
    assert [d.text for d in xp(status, "dsp:FilterStatuses/dsp:FilterStatus/dsp:Dialect")] == [
        FILTER + "/fileshare",
        FILTER + "/sharepoint",
        FILTER + "/email",
    ]
    description = xp(response, "dsp:JobElements/dsp:ElementData/dsp:JobDescription")[0]
    assert tags(description) == [
        f"{{{DSP}}}PSP_Identifier",
        f"{{{DSP}}}PSP_DisplayName",
        f"{{{DSP}}}JobOriginatingUserName",
    ]
    assert text_of(description, "dsp:PSP_Identifier") == "C4F199C7-6876-4549-A86E-A85035952448"
    # R10: no user directory entry, so the SID itself.
    assert (
        text_of(description, "dsp:JobOriginatingUserName")
        == "S-1-5-21-917267712-1342860078-1792151419-500"
    )

    # EndPostScanJob: Pending, handed to the engine.
    request = with_token(hw["EndPostScanJobRequest"], token)
    reply = t.post(request.encode())
    ok(reply)
    compare_with_published(reply.body, request, hw["EndPostScanJobResponse"])
    assert [j.token for j in t.started] == [token]

    # CancelPostScanJob: Canceled at once.
    request = with_token(hw["CancelPostScanJobRequest"], token)
    reply = t.post(request.encode())
    ok(reply)
    compare_with_published(reply.body, request, hw["CancelPostScanJobResponse"])
    (summary,) = summaries(t, "JobHistory")
    assert (summary.token, summary.state, summary.reasons) == (
        token,
        "Canceled",
        ("PostScanJobCanceled",),
    )


def root_envelope(mtom_text: str) -> str:
    """The SOAP envelope inside the SendImage example's root part."""
    start = mtom_text.index("<?xml")
    end = mtom_text.index("</soap:Envelope>") + len("</soap:Envelope>")
    return mtom_text[start:end]


def reply_relates(body: bytes) -> str:
    return text_of(parse(body), "/s:Envelope/s:Header/a:RelatesTo")


@pytest.mark.parametrize("chunk_size", [1, 3, 71, 72])
def test_hardware_send_image_fed_in_small_chunks(hw: dict[str, str], chunk_size: int) -> None:
    """One byte at a time (and sizes around the boundary length): the same answer and the same
    document as whole."""
    replies = []
    for size in (None, chunk_size):
        t = InProcessTransport()
        token = text_of(payload_of(t.post(hw["CreatePostScanJobRequest"].encode())), "dsp:JobToken")
        ctype, body = split_mtom(with_token(hw["SendImageRequest"], token))
        reply = t.post(body, content_type=ctype, chunk_size=size)
        ok(reply)
        assert t.store.documents == {(token, 9): b"Document PDL Data"}
        assert t.store.open_documents == {}
        replies.append(reply)
    assert replies[0] == replies[1]


def test_hardware_send_image_with_an_unknown_token(hw: dict[str, str]) -> None:
    """The example as published names a job this server never made: dsp JobTokenNotFound, and
    the image is not streamed anywhere."""
    t = InProcessTransport()
    ctype, body = split_mtom(hw["SendImageRequest"])
    reply = t.post(body, content_type=ctype)
    f = check_protocol_fault(
        reply, DSP, "ClientErrorJobTokenNotFound", relates_to="uuid:UniqueMsgId"
    )
    assert detail_token(f, DSP) == EXAMPLE_TOKENS[0]
    assert t.commands == []


def test_fault_example_07_matches_our_fault_but_for_its_defects(spec: Path) -> None:
    """Example 07 says soap:Receiver and has no Detail (README defects); R4 step 7 gives
    soap:Sender and the token in Detail; the Reason text is the same."""
    published = parse(example(spec, "07-SOAPFault-ClientErrorJobTokenNotFound.xml"))
    t = InProcessTransport()
    reply = cancel_job(t, DSC, "no-such-job")
    f = check_protocol_fault(reply, DSC, "ClientErrorJobTokenNotFound")
    their_sub = xp(published, "//s:Subcode/s:Value")[0]
    assert resolve(their_sub, their_sub.text or "") == f.subcode
    assert text_of(published, "//s:Reason/s:Text") == f.reason
    assert text_of(published, "/s:Envelope/s:Header/a:Action") == f.headers.action
    assert detail_token(f, DSC) == "no-such-job"
    their_code = xp(published, "//s:Code/s:Value")[0]
    assert resolve(their_code, their_code.text or "") == (SOAP, "Receiver") != f.code
    assert f.headers.wsa == WSA
