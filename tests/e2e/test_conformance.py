"""Conformance (issue 16): every reply, fault and notification of a full scenario, over both
HTTP bindings of a real ``dsc serve``, validates against the published schemas and stays within
DPWS MAX_ENVELOPE_SIZE (R15).

The schemas are the shared MS-BDSRR schema (``../shared/spec/bdsrr.xsd``) and the W3C/OASIS
ones in ``tests/schemas`` (SOAP 1.2 envelope, WS-Addressing 2004/08, WS-Eventing 2004/08,
WS-Discovery 2005/04, DPWS 2006/02; see tests/schemas/README.md for their origin).  Body
elements of a namespace without a schema here (WS-DSP, WS-Transfer) are checked by the SOAP
schema's lax wildcard only.
"""

from __future__ import annotations

import functools
import http.server
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from conftest import spec_dir
from dsc_core import client as dc
from dsc_core import names
from dsc_core.model import FileShareInstructions
from e2e_support import ServerProcess, Soap, started_servers
from waiting import wait_for

A = names.Action
SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
#: DPWS R0003/R0026, [MS-DPWSSN] 1.3.
MAX_ENVELOPE_SIZE = 32_767
#: The history's size in the full scenario ([jobs] history_size; R6's default is 1,000): its
#: summaries are several times what fits in one reply, which is what R15 is about.
HISTORY_JOBS = 300
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@functools.cache
def load_schema() -> etree.XMLSchema:
    """The W3C/OASIS schemas of tests/schemas with the shared MS-BDSRR schema; a test that
    needs it skips, saying why, where the specification folder is absent."""
    spec = spec_dir()
    if spec is None:
        pytest.skip(
            "specification folder not found: set DSC_SPEC_DIR or place shared/spec beside the project"
        )
    text = (SCHEMAS / "all.xsd").read_text().replace("BDSRR_XSD", str(spec / "bdsrr.xsd"))
    return etree.XMLSchema(etree.fromstring(text.encode(), base_url=str(SCHEMAS / "all.xsd")))


def check_message(what: str, body: bytes) -> etree._Element:
    """One message on the wire: within MAX_ENVELOPE_SIZE and valid."""
    assert len(body) <= MAX_ENVELOPE_SIZE, f"{what}: {len(body)} octets"
    root = etree.fromstring(body)
    schema = load_schema()
    if not schema.validate(root):
        raise AssertionError(f"{what} is not valid: {schema.error_log}\n{body.decode()[:3000]}")
    return root


def check_fault_detail(what: str, root: etree._Element) -> None:
    """SOAP 1.2 Part 1 §5.4.5 (the schema's lax ``xs:any`` lets text through): no text."""
    for detail in root.iter(f"{{{names.SOAP}}}Detail"):
        assert not (detail.text or "").strip(), f"{what}: text in soap:Detail"
        assert all(not (c.tail or "").strip() for c in detail), f"{what}: text in soap:Detail"


class Sink:
    """An HTTP endpoint that keeps every notification posted to it."""

    def __init__(self) -> None:
        bodies: list[bytes] = []
        self.bodies = bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                bodies.append(self.rfile.read(length))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def raw(client: Soap, body: str, action: str | None, headers: str = "") -> tuple[int, bytes]:
    addressing = f"<a:Action>{action}</a:Action>" if action else ""
    envelope = (
        f'<s:Envelope xmlns:s="{names.SOAP}" xmlns:a="{names.WSA}" xmlns:dsc="{names.DSC}" '
        f'xmlns:dsp="{names.DSP}" xmlns:wse="{names.WSE}" xmlns:wsd="{names.WSD}">'
        f"<s:Header>{addressing}<a:MessageID>urn:uuid:{uuid.uuid4()}</a:MessageID>"
        f"<a:To>{client.url}</a:To>{headers}</s:Header><s:Body>{body}</s:Body></s:Envelope>"
    )
    status, _ctype, reply = client.post(envelope.encode())
    return status, reply


def subscribe(client: Soap, notify_to: str, filter_xml: str = "") -> str:
    body = (
        f"<wse:Subscribe><wse:Delivery><wse:NotifyTo><a:Address>{notify_to}</a:Address>"
        f"</wse:NotifyTo></wse:Delivery><wse:Expires>PT1H</wse:Expires>{filter_xml}"
        f"</wse:Subscribe>"
    )
    status, reply = raw(client, body, A.SUBSCRIBE)
    assert status == 200, reply
    check_message("SubscribeResponse", reply)
    (ident,) = etree.fromstring(reply).iter(f"{{{names.WSE}}}Identifier")
    return (ident.text or "").strip()


#: Requests each answered with a fault: (name, body, action, extra headers).  Every fault the
#: server sends for a request it could read (R4 steps 4-8 and the WS-Eventing ones); store
#: failures (step 9) are covered by the core's tests (tests/test_faults.py).
UNKNOWN = "00000000-0000-0000-0000-000000000000"
FAULTS = [
    ("ActionNotSupported", "<dsc:Nothing/>", names.DSC + "/Nothing", ""),
    ("MessageInformationHeaderRequired", "<dsc:GetActiveJobsRequest/>", None, ""),
    (
        "InvalidMessageInformationHeader (ReplyTo)",
        "<dsc:GetActiveJobsRequest/>",
        A.DSC_GET_ACTIVE_JOBS,
        "<a:ReplyTo><a:Address>http://elsewhere.example/</a:Address></a:ReplyTo>",
    ),
    (
        "InvalidMessageInformationHeader (duplicated)",
        "<dsc:GetActiveJobsRequest/>",
        A.DSC_GET_ACTIVE_JOBS,
        f"<a:Action>{A.DSC_GET_ACTIVE_JOBS}</a:Action>",
    ),
    (
        "MustUnderstand",
        "<dsc:GetActiveJobsRequest/>",
        A.DSC_GET_ACTIVE_JOBS,
        '<x:Mystery xmlns:x="urn:test" s:mustUnderstand="true"/>',
    ),
    ("dsc:InvalidArgs", "<dsc:CancelPostScanJobRequest/>", A.DSC_CANCEL, ""),
    ("dsp:InvalidArgs", "<dsp:CancelPostScanJobRequest/>", A.DSP_CANCEL, ""),
    (
        "dsc:ClientErrorJobTokenNotFound",
        f"<dsc:CancelPostScanJobRequest><dsc:JobToken>{UNKNOWN}</dsc:JobToken>"
        "</dsc:CancelPostScanJobRequest>",
        A.DSC_CANCEL,
        "",
    ),
    (
        "dsp:ClientErrorJobTokenNotFound",
        f"<dsp:EndPostScanJobRequest><dsp:JobToken>{UNKNOWN}</dsp:JobToken>"
        "</dsp:EndPostScanJobRequest>",
        A.DSP_END,
        "",
    ),
    (
        "wse:FilteringRequestedUnavailable (no Dialect)",
        "<wse:Subscribe><wse:Delivery><wse:NotifyTo><a:Address>http://127.0.0.1:9/</a:Address>"
        "</wse:NotifyTo></wse:Delivery><wse:Filter>/x</wse:Filter></wse:Subscribe>",
        A.SUBSCRIBE,
        "",
    ),
    (
        "wsdp:FilterActionNotSupported",
        "<wse:Subscribe><wse:Delivery><wse:NotifyTo><a:Address>http://127.0.0.1:9/</a:Address>"
        f'</wse:NotifyTo></wse:Delivery><wse:Filter Dialect="{names.DEVPROF_ACTION_DIALECT}">'
        "urn:no-such-event</wse:Filter></wse:Subscribe>",
        A.SUBSCRIBE,
        "",
    ),
    (
        "wse:InvalidMessage",
        "<wse:Subscribe><wse:Delivery/></wse:Subscribe>",
        A.SUBSCRIBE,
        "",
    ),
    (
        "wse:InvalidExpirationTime",
        "<wse:Subscribe><wse:Delivery><wse:NotifyTo><a:Address>http://127.0.0.1:9/</a:Address>"
        "</wse:NotifyTo></wse:Delivery><wse:Expires>-PT1H</wse:Expires></wse:Subscribe>",
        A.SUBSCRIBE,
        "",
    ),
    (
        "wse:DeliveryModeRequestedUnavailable",
        '<wse:Subscribe><wse:Delivery Mode="urn:pull"><wse:NotifyTo><a:Address>'
        "http://127.0.0.1:9/</a:Address></wse:NotifyTo></wse:Delivery></wse:Subscribe>",
        A.SUBSCRIBE,
        "",
    ),
    (
        "wse:UnableToRenew",
        "<wse:Renew/>",
        A.RENEW,
        f"<wse:Identifier>urn:uuid:{UNKNOWN}</wse:Identifier>",
    ),
    (
        "wse:InvalidMessage (GetStatus)",
        "<wse:GetStatus/>",
        A.GET_STATUS,
        f"<wse:Identifier>urn:uuid:{UNKNOWN}</wse:Identifier>",
    ),
]


@pytest.mark.parametrize("binding", ["async", "blocking"])
def test_full_scenario_is_valid_and_within_max_envelope_size(
    binding: str, tmp_path: Path, sink: Sink
) -> None:
    with started_servers() as start:
        config = tmp_path / "dsc.toml"
        config.write_text(f"[jobs]\nhistory_size = {HISTORY_JOBS}\n")
        server = start(ServerProcess(tmp_path / "data", binding=binding, config=config))
        client = Soap(server.url)
        replies: list[tuple[str, bytes]] = []

        def call(what: str, action: str, payload: etree._Element) -> dc.Response:
            status, _ctype, body = client.post(client.envelope(action, payload))
            replies.append((what, body))
            return dc.parse_response(body, status)

        ident = subscribe(client, sink.url)
        share = FileShareInstructions((r"\\FileSrv\Scans",))

        # A job that is processed: create, images, end, processing, end state.
        token = client.create([share])
        client.send_image(token, 1, PNG)
        client.send_image(token, 2, PNG)
        call(
            "EndPostScanJob", A.DSP_END, dc.token_request(names.DSP, "EndPostScanJobRequest", token)
        )
        client.wait_ended(token)
        every = ["JobStatus", "JobDescription", "Documents", "JobEndState"]
        call(
            "GetPostScanJobElements (dsc)",
            A.DSC_GET_JOB_ELEMENTS,
            dc.job_elements_request(names.DSC, token, every),
        )
        call(
            "GetPostScanJobElements (dsp)",
            A.DSP_GET_JOB_ELEMENTS,
            dc.job_elements_request(names.DSP, token, every),
        )
        # A job canceled over each protocol, one while Creating and one after its images.
        for cancel in (A.DSC_CANCEL, A.DSP_CANCEL):
            job = client.create([share])
            client.send_image(job, 1, PNG)
            ns = names.DSC if cancel == A.DSC_CANCEL else names.DSP
            call("CancelPostScanJob", cancel, dc.token_request(ns, "CancelPostScanJobRequest", job))
        active = [client.create([share]) for _ in range(3)]
        call("GetActiveJobs", A.DSC_GET_ACTIVE_JOBS, dc.empty_request("GetActiveJobsRequest"))
        for job in active:
            client.dsp_cancel(job)
        call(
            "GetRepositoryElements",
            A.DSC_GET_REPOSITORY_ELEMENTS,
            dc.repository_elements_request(["RepositoryConfiguration", "RepositoryStatus"]),
        )
        for what, body, action in (
            ("Probe", "<wsd:Probe/>", A.PROBE),
            ("Get (metadata)", "", A.TRANSFER_GET),
            ("GetStatus", "<wse:GetStatus/>", A.GET_STATUS),
            ("Renew", "<wse:Renew><wse:Expires>PT1H</wse:Expires></wse:Renew>", A.RENEW),
        ):
            headers = f"<wse:Identifier>{ident}</wse:Identifier>" if "wse" in body else ""
            status, reply = raw(client, body, action, headers)
            assert status == 200, reply
            replies.append((what, reply))

        for what, body in replies:
            root = check_message(what, body)
            assert root.find(f".//{{{names.SOAP}}}Fault") is None, (what, body[:500])

        status, reply = raw(
            client, "<wse:Unsubscribe/>", A.UNSUBSCRIBE, f"<wse:Identifier>{ident}</wse:Identifier>"
        )
        assert status == 200
        check_message("UnsubscribeResponse", reply)

        # Every event (before the jobs below, whose events overflow the delivery queue
        # and end the subscription, R13): job status and end state of both services, and the
        # repository's status summary.
        def actions() -> set[str]:
            found = set()
            for body in list(sink.bodies):
                for el in etree.fromstring(body).iter(f"{{{names.WSA}}}Action"):
                    found.add((el.text or "").strip())
            return found

        wanted = {
            A.DSP_JOB_STATUS_EVENT,
            A.DSP_JOB_END_STATE_EVENT,
            A.DSC_JOB_STATUS_EVENT,
            A.DSC_JOB_END_STATE_EVENT,
            A.DSC_STATUS_SUMMARY_EVENT,
        }
        wait_for(lambda: wanted <= actions(), 30, f"events {wanted - actions()}")
        for body in list(sink.bodies):
            check_message("notification", body)
        # The history fills to its size (HISTORY_JOBS).
        for _ in range(HISTORY_JOBS):
            client.dsp_cancel(client.create([share]))
        history = call(
            "GetJobHistory", A.DSC_GET_JOB_HISTORY, dc.empty_request("GetJobHistoryRequest")
        )
        listed = dc.read_summaries(history.payload, "JobHistory")
        # R15: the most recent jobs that fit, newest first; the reply is within the limit.
        assert 20 <= len(listed) < HISTORY_JOBS
        check_message(f"GetJobHistory ({HISTORY_JOBS} jobs kept)", replies[-1][1])
        assert [j.token for j in listed] == [j.token for j in client.history()]

        faults_seen = []
        for what, body, action, headers in FAULTS:
            status, reply = raw(client, body, action, headers)
            assert status in (400, 500), (what, reply)
            root = check_message(what, reply)
            check_fault_detail(what, root)
            assert root.find(f".//{{{names.SOAP}}}Fault") is not None, what
            faults_seen.append(what)

        assert len(faults_seen) == len(FAULTS)

        # The quota fault (R4 step 9, docs/rulings.md "Fault reason texts"): one client holds
        # at most [limits] max_creating_jobs_per_user (32) jobs in Creating.
        creating = []
        while True:
            status, reply = raw(
                client,
                etree.tostring(
                    dc.create_post_scan_job(
                        user_identifier="S-1-5-21-7",
                        psp_identifier="PSP",
                        instructions=[share],
                    )
                ).decode(),
                A.DSP_CREATE,
            )
            if status != 200:
                break
            creating.append(dc.text_of(dc.parse_response(reply).payload, names.DSP, "JobToken"))
            assert len(creating) <= 32, "no quota fault"
        assert status == 500, reply
        root = check_message("ServerErrorTemporaryError (quota)", reply)
        check_fault_detail("ServerErrorTemporaryError (quota)", root)
        reason = root.findtext(f".//{{{names.SOAP}}}Reason/{{{names.SOAP}}}Text") or ""
        assert "max_creating_jobs_per_user" in reason, reason
        for job in creating:
            client.dsp_cancel(job)


def test_job_elements_with_every_document_stay_within_max_envelope_size() -> None:
    """R15 for GetPostScanJobElements: a job with ``max_documents_per_job`` documents (here
    1,000, about 130 KB of Documents, four times what fits; the default 10,000 only takes ten
    times longer to send) is answered within 32,767 octets with the most recent documents that
    fit, in the order received; ImagesReceived still counts them all (docs/rulings.md)."""
    from core_support import create_job, send_image
    from dsc_bindings.inprocess import InProcessTransport
    from dsc_core import Limits, ServerConfig

    t = InProcessTransport(ServerConfig(limits=Limits(max_documents_per_job=1_000)))
    token = create_job(t)
    most = t.server.config.limits.max_documents_per_job
    for document_id in range(1, most + 1):
        assert send_image(t, token, document_id, b"I").status == 200
    refused = send_image(t, token, most + 1, b"I")  # the limit itself: InvalidArgs
    assert refused.status == 400
    check_message("SendImage beyond max_documents_per_job", refused.body)
    every = ["JobStatus", "JobDescription", "Documents"]
    for ns, action in ((names.DSP, A.DSP_GET_JOB_ELEMENTS), (names.DSC, A.DSC_GET_JOB_ELEMENTS)):
        for _ in range(2):  # built, then from the cache
            body = t.post(t.envelope(action, dc.job_elements_request(ns, token, every))).body
            root = check_message(f"GetPostScanJobElements ({ns})", body)
            ids = [int(e.text or "") for e in root.iter(f"{{{ns}}}DocumentId")]
            assert 100 < len(ids) < most
            assert ids == list(range(most - len(ids) + 1, most + 1))
            assert root.findtext(f".//{{{ns}}}ImagesReceived") == str(most)
            assert len(body) > MAX_ENVELOPE_SIZE - 200  # as many as fit, not a few


@pytest.mark.parametrize("ns", [names.DSP, names.DSC])
def test_the_repository_stopped_fault_is_valid(ns: str) -> None:
    """R4 step 8 while the server shuts down (the only time the repository is Stopped, so it
    is checked in-process: over the wire it races the listener closing)."""
    from core_support import create_job
    from dsc_bindings.inprocess import InProcessTransport

    t = InProcessTransport()
    token = create_job(t)
    t._run(t.server.shutdown(t.clock))
    action = A.DSP_CANCEL if ns == names.DSP else A.DSC_CANCEL
    reply = t.post(t.envelope(action, dc.token_request(ns, "CancelPostScanJobRequest", token)))
    assert reply.status == 500
    root = check_message("OperationFailed (Stopped)", reply.body)
    check_fault_detail("OperationFailed (Stopped)", root)
    assert (root.findtext(f".//{{{names.SOAP}}}Subcode/{{{names.SOAP}}}Value") or "").endswith(
        ":OperationFailed"
    )
