"""End-to-end scenarios through the in-process transport: whole scans, processing outcomes,
cancel, timeouts, history retention, repository status, eventing, metadata and discovery, and
the R5 rules for requested element names.  Every MS-BDSRR body that has a schema is validated."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from lxml import etree

from core_support import (
    ANONYMOUS,
    DSC,
    DSP,
    FILTER,
    FS,
    MAIL,
    REQUEST_ID,
    SOAP,
    SP,
    WSA,
    WSA10,
    WSDP,
    WSE,
    Act,
    cancel_job,
    check_fault,
    check_protocol_fault,
    check_reply_headers,
    create_job,
    create_request,
    deliveries_of,
    detail_action,
    detail_token,
    elements_body,
    end_job,
    envelope,
    job_view,
    manager_request,
    ok,
    parse,
    payload_of,
    read_fault,
    reply_headers,
    repository_body,
    repository_state,
    resolve,
    send_image,
    send_image_exchange,
    soap,
    subscribe,
    subscribe_body,
    summaries,
    tags,
    text_of,
    xp,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import (
    Deliver,
    DiscardDocuments,
    DropJob,
    EndSubscription,
    FilterFinished,
    FilterStarted,
    Limits,
    ProcessingFinished,
    ProcessingStarted,
    RecordDeliveryFailures,
    Removal,
    RequestInfo,
    ServerConfig,
    StopProcessing,
    UsageError,
    client,
)
from dsc_core.model import FilterState, FilterStateReason, JobState
from helpers import dsp_as_dsc, validate

CS, CWE, CWW = (
    FilterState.COMPLETED_SUCCESSFULLY,
    FilterState.COMPLETED_WITH_ERRORS,
    FilterState.COMPLETED_WITH_WARNINGS,
)
DATETIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def history_body(t: InProcessTransport) -> etree._Element:
    return ok(t.post(soap("<dsc:GetJobHistoryRequest/>", Act.DSC_HISTORY)))


def elements(t: InProcessTransport, ns: str, token: str, *requested: str) -> etree._Element:
    prefix = "dsp" if ns == DSP else "dsc"
    action = (DSP if ns == DSP else DSC) + "/GetPostScanJobElements"
    return ok(t.post(soap(elements_body(prefix, token, *requested), action)))


# --- a whole scan ------------------------------------------------------------------------------


def test_multi_page_scan_to_completion(bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport()
    token = create_job(t, FS, MAIL)
    assert GUID.match(token)
    pages = [
        (1, b"%PDF-1.4 page one " + bytes(range(256)) * 40, "pdf-a", 1),
        (2, b"\x89PNG\r\n\x1a\n" + b"\r\n--" * 500, "png", 7),
        (3, bytes(reversed(range(256))) * 100, "tiff-multi-g4", None),
    ]
    for document_id, data, fmt, chunk in pages:
        ok(
            send_image(
                t,
                token,
                document_id,
                data,
                fmt=fmt,
                chunk_size=chunk,
                content_id=f"page{document_id}@scanner",
            )
        )
    assert t.store.documents == {(token, n): data for n, data, _, _ in pages}
    assert t.store.open_documents == {}
    body = elements(t, DSC, token, "dsc:JobStatus", "dsc:Documents", "dsc:JobDescription")
    validate(bdsrr_schema, body)
    assert text_of(body, "//dsc:JobStatus/dsc:ImagesReceived") == "3"
    assert [
        (text_of(d, "dsc:DocumentId"), text_of(d, "dsc:Format"))
        for d in xp(body, "//dsc:Documents/dsc:Document/dsc:DocumentDescription")
    ] == [("1", "pdf-a"), ("2", "png"), ("3", "tiff-multi-g4")]
    assert DATETIME.match(text_of(body, "//dsc:JobStatus/dsc:JobCreatedTime"))
    assert not xp(body, "//dsc:JobCompletedTime")

    ok(end_job(t, token))
    (started,) = t.started
    assert started.token == token and started.state is JobState.PENDING
    assert [d.document_id for d in started.documents] == [1, 2, 3]
    assert [d.size for d in started.documents] == [len(p[1]) for p in pages]
    assert [s.token for s in summaries(t, "ActiveJobs")] == [token]

    t.process(token)
    assert summaries(t, "ActiveJobs") == []
    history = history_body(t)
    validate(bdsrr_schema, history)
    (view,) = summaries(t, "JobHistory")
    assert (view.token, view.state, view.reasons) == (
        token,
        "Completed",
        ("PostScanJobCompletedSuccessfully",),
    )
    assert [(f.dialect, f.state) for f in view.filters] == [
        (FILTER + "/fileshare", "CompletedSuccessfully"),
        (FILTER + "/email", "CompletedSuccessfully"),
    ]
    assert view.images_received == 3
    body = elements(t, DSC, token, "dsc:JobStatus")
    validate(bdsrr_schema, body)
    assert DATETIME.match(text_of(body, "//dsc:JobCompletedTime"))
    # Every filter succeeded: the spool copy is gone (issue 8), the record keeps the list.
    assert [k for k in t.store.documents if k[0] == token] == []


def test_job_description_names(bdsrr_schema: etree.XMLSchema) -> None:
    """R10: the SID mapped by the user directory; the process name from the configuration."""
    config = ServerConfig(
        user_directory={"S-1-5-21-7": "alice@corp.example"}, process_names={"PSP-7": "Invoices"}
    )
    t = InProcessTransport(config)
    token = create_job(t, FS, user="S-1-5-21-7", psp_identifier="PSP-7")
    view = job_view(t, token)
    assert (view.user_name, view.psp_identifier, view.psp_display_name) == (
        "alice@corp.example",
        "PSP-7",
        "Invoices",
    )
    validate(bdsrr_schema, elements(t, DSC, token, "dsc:JobDescription"))


@pytest.mark.parametrize(
    "outcomes,state,reason,filter_states",
    [
        (
            [(CS, ()), (CWE, (FilterStateReason.UNABLE_TO_SEND_EMAIL,))],
            "Completed",
            "PostScanJobCompletedWithErrors",
            ["CompletedSuccessfully", "CompletedWithErrors"],
        ),
        (
            [(CWW, ()), (CS, ())],
            "Completed",
            "PostScanJobCompletedWithWarnings",
            ["CompletedWithWarnings", "CompletedSuccessfully"],
        ),
        (
            [(FilterState.CANCELED, ()), (CS, ())],
            "Completed",
            "PostScanJobCompletedWithErrors",
            ["Canceled", "CompletedSuccessfully"],
        ),
    ],
)
def test_continue_on_error_true(
    bdsrr_schema: etree.XMLSchema,
    outcomes: list[tuple[FilterState, tuple[FilterStateReason, ...]]],
    state: str,
    reason: str,
    filter_states: list[str],
) -> None:
    t = InProcessTransport()
    token = create_job(t, FS, MAIL, continue_on_error=True)
    ok(end_job(t, token))
    t.process(token, outcomes)
    (view,) = summaries(t, "JobHistory")
    assert (view.state, view.reasons) == (state, (reason,))
    assert [f.state for f in view.filters] == filter_states
    validate(bdsrr_schema, history_body(t))
    assert t.stopped == []


@pytest.mark.parametrize("continue_on_error", [False, None])
def test_continue_on_error_false_aborts(
    bdsrr_schema: etree.XMLSchema, continue_on_error: bool | None
) -> None:
    """R6: a failed filter with ContinueOnError false or absent: Aborted, the filters not yet
    run Canceled."""
    t = InProcessTransport()
    token = create_job(t, FS, MAIL, SP, continue_on_error=continue_on_error)
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    t.engine(FilterStarted(token, 0))
    t.engine(FilterFinished(token, 0, CWE, (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)))
    (view,) = summaries(t, "JobHistory")
    assert (view.state, view.reasons) == ("Aborted", ("PostScanJobProcessingFailed",))
    assert [(f.state, f.reasons) for f in view.filters] == [
        ("CompletedWithErrors", ("FileShareAccessDenied",)),
        ("Canceled", ()),
        ("Canceled", ()),
    ]
    validate(bdsrr_schema, history_body(t))
    assert t.stopped == [token]
    # The engine's late report changes nothing.
    t.engine(FilterStarted(token, 1))
    t.engine(ProcessingFinished(token))
    assert summaries(t, "JobHistory") == [view]


def test_engine_that_never_finishes_a_filter() -> None:
    """ProcessingFinished with a filter still Processing: it counts as failed (UnknownError)."""
    t = InProcessTransport()
    token = create_job(t, FS, MAIL, continue_on_error=True)
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    t.engine(FilterStarted(token, 0))
    t.engine(FilterFinished(token, 0, CS))
    t.engine(FilterStarted(token, 1))
    t.engine(ProcessingFinished(token))
    (view,) = summaries(t, "JobHistory")
    assert (view.state, view.reasons) == ("Completed", ("PostScanJobCompletedWithErrors",))
    assert [(f.state, f.reasons) for f in view.filters] == [
        ("CompletedSuccessfully", ()),
        ("CompletedWithErrors", ("UnknownError",)),
    ]


# --- cancel ---------------------------------------------------------------------------------------


def _second_filter_running(t: InProcessTransport) -> str:
    """A scanned job (file share, mail, SharePoint) whose first filter succeeded and whose
    second is running."""
    token = create_job(t, FS, MAIL, SP, continue_on_error=True)
    ok(send_image(t, token, 1, b"page"))
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    t.engine(FilterStarted(token, 0))
    t.engine(FilterFinished(token, 0, CS))
    t.engine(FilterStarted(token, 1))
    return token


def test_cancel_from_bdsrr_while_processing(bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport()
    token = _second_filter_running(t)
    assert repository_state(t) == "Processing"
    reply = cancel_job(t, DSC, token)
    ok(reply)
    check_reply_headers(reply, action=DSC + "/CancelPostScanJobResponse", relates_to=REQUEST_ID)
    # At once: Canceled with the single reason; the running filter told to stop.
    (view,) = summaries(t, "JobHistory")
    assert (view.state, view.reasons) == ("Canceled", ("PostScanJobCanceled",))
    assert [f.state for f in view.filters] == ["CompletedSuccessfully", "Canceled", "Canceled"]
    assert t.stopped == [token]
    assert [c for c in t.commands if isinstance(c, StopProcessing)] == [StopProcessing(token)]
    assert repository_state(t) == "Idle"
    validate(bdsrr_schema, history_body(t))
    # Documents already delivered stay delivered; the spool copy goes (issue 8), after the
    # running filter was told to stop.
    assert t.store.documents == {}
    names = [type(c).__name__ for c in t.commands]
    assert names.index("StopProcessing") < names.index("DiscardDocuments")
    # Later engine events are stale and ignored: nothing changes, nothing is emitted.
    record = t.server.jobs.get(token)
    count = len(t.commands)
    t.engine(FilterFinished(token, 1, CS))
    t.engine(FilterStarted(token, 2))
    t.engine(FilterFinished(token, 2, CWE))
    t.engine(ProcessingFinished(token))
    assert t.server.jobs.get(token) is record
    assert len(t.commands) == count


@pytest.mark.parametrize("ns", [DSP, DSC])
def test_cancel_while_creating_and_pending(ns: str) -> None:
    t = InProcessTransport()
    creating, pending = create_job(t), create_job(t)
    ok(end_job(t, pending))
    for token in (creating, pending):
        ok(cancel_job(t, ns, token))
    assert {(v.token, v.state) for v in summaries(t, "JobHistory")} == {
        (creating, "Canceled"),
        (pending, "Canceled"),
    }
    assert t.stopped == []  # nothing was running
    # A canceled Pending job that the engine then picks up stays canceled.
    t.engine(ProcessingStarted(pending))
    assert job_view(t, pending).state == "Canceled"


@pytest.mark.parametrize("ns", [DSP, DSC])
def test_cancel_of_a_completed_job_is_not_found(ns: str) -> None:
    t = InProcessTransport()
    token = create_job(t)
    ok(end_job(t, token))
    t.process(token)
    f = check_protocol_fault(cancel_job(t, ns, token), ns, "ClientErrorJobTokenNotFound")
    assert detail_token(f, ns) == token
    # ... yet GetPostScanJobElements still finds it (bdsrr 3.2.4.3: any job the server has).
    assert job_view(t, token, ns).state == "Completed"


# --- creation outcomes ----------------------------------------------------------------------------


def raw_create(filters: str, continue_on_error: str = "") -> bytes:
    return soap(
        f"<dsp:CreatePostScanJobRequest><dsp:UserIdentifier>S-1-5-21-9"
        f"</dsp:UserIdentifier><dsp:PSP_Identifier>PSP-9</dsp:PSP_Identifier>"
        f"<dsp:PostScanInstructions>{continue_on_error}"
        f"<psp:DocumentRootName>Scan</psp:DocumentRootName><psp:FiltersToProcess>"
        f"{filters}</psp:FiltersToProcess></dsp:PostScanInstructions>"
        f"</dsp:CreatePostScanJobRequest>",
        Act.DSP_CREATE,
    )


def filter_xml(dialect: str, instructions: str) -> str:
    return (
        f"<psp:Filter><psp:Dialect>{dialect}</psp:Dialect><psp:Instructions>"
        f"{instructions}</psp:Instructions></psp:Filter>"
    )


FILESHARE = (
    f'<f:FileShareConfig xmlns:f="{FILTER}/fileshare"><f:FileShares>'
    r"<f:ShareUNC>\\files\scans</f:ShareUNC></f:FileShares></f:FileShareConfig>"
)
EMAIL = (
    f'<e:EmailConfig xmlns:e="{FILTER}/email"><e:SendToScanUser>true</e:SendToScanUser>'
    f"</e:EmailConfig>"
)


@pytest.mark.parametrize(
    "bad",
    [
        filter_xml(FILTER + "/fax", FILESHARE),  # a dialect nobody offers
        filter_xml(FILTER + "/fileshare", EMAIL),  # instructions of another dialect
        filter_xml(FILTER + "/email", "<e:EmailConfig xmlns:e='urn:wrong'/>"),
        filter_xml(FILTER + "/fileshare", FILESHARE + FILESHARE),  # two configurations
        filter_xml(
            FILTER + "/fileshare",
            f'<f:FileShareConfig xmlns:f="{FILTER}/fileshare"><f:FileShares/></f:FileShareConfig>',
        ),  # no share
        filter_xml(
            FILTER + "/email",
            f'<e:EmailConfig xmlns:e="{FILTER}/email">'
            "<e:SendToScanUser>perhaps</e:SendToScanUser></e:EmailConfig>",
        ),
    ],
)
def test_unusable_filter_is_canceled_with_invalid_args(
    bdsrr_schema: etree.XMLSchema, bad: str
) -> None:
    t = InProcessTransport()
    body = ok(t.post(raw_create(bad + filter_xml(FILTER + "/fileshare", FILESHARE))))
    token = text_of(body, "dsp:JobToken")
    status = elements(t, DSC, token, "dsc:JobStatus")
    validate(bdsrr_schema, status)
    view = job_view(t, token)
    assert view.state == "Creating"
    assert [(f.state, f.reasons) for f in view.filters] == [
        ("Canceled", ("InvalidArgs",)),
        ("Pending", ()),
    ]


def test_dialect_the_repository_does_not_offer() -> None:
    t = InProcessTransport(ServerConfig(filters=("fileshare",)))
    token = create_job(t, SP, FS)
    view = job_view(t, token)
    assert [(f.dialect, f.state, f.reasons) for f in view.filters] == [
        (FILTER + "/sharepoint", "Canceled", ("InvalidArgs",)),
        (FILTER + "/fileshare", "Pending", ()),
    ]


def test_no_usable_filter(bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    reply = t.post(
        raw_create(
            filter_xml(FILTER + "/fax", FILESHARE) + filter_xml(FILTER + "/email", FILESHARE)
        )
    )
    token = text_of(ok(reply), "dsp:JobToken")  # the response still carries the token
    assert GUID.match(token)
    (view,) = summaries(t, "JobHistory")
    assert (view.token, view.state, view.reasons) == (
        token,
        "Aborted",
        ("NoValidPostScanInstructionsFound",),
    )
    assert [f.state for f in view.filters] == ["Canceled", "Canceled"]
    assert summaries(t, "ActiveJobs") == [] and t.started == []
    validate(bdsrr_schema, history_body(t))
    (end_event,) = deliveries_of(t, Act.DSC_END_EVENT)
    assert text_of(end_event, "//dsc:JobCompletedState") == "Aborted"
    check_protocol_fault(send_image(t, token, 1, b"x"), DSP, "OperationFailed")


# --- timeout --------------------------------------------------------------------------------------


def test_timeout_ten_minutes_after_creation(bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsp_url)
    token = create_job(t)
    t.advance(600)
    view = job_view(t, token)
    assert (view.state, view.reasons) == ("Aborted", ("PostScanJobTimedOut",))
    (end,) = deliveries_of(t, Act.DSP_END_EVENT)
    body = payload_of(etree.tostring(end))
    validate(bdsrr_schema, dsp_as_dsc(body))
    assert (
        text_of(body, "dsp:PostScanJobEndState/dsp:JobCompletedStateReasons/dsp:JobStateReason")
        == "PostScanJobTimedOut"
    )


def test_timeout_aborts_and_discards(bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport()
    start = t.clock
    token = create_job(t)
    assert t.server.next_deadline() == start + timedelta(seconds=600)
    t.advance(300)
    ok(send_image(t, token, 1, b"page one"))
    ok(send_image(t, token, 2, b"page two"))
    # R6: each SendImage restarts the 10 minutes.
    assert t.server.next_deadline() == start + timedelta(seconds=900)
    t.advance(599)
    assert job_view(t, token).state == "Creating"
    assert t.store.documents
    t.advance(1)
    view = job_view(t, token)
    assert (view.state, view.reasons, view.images_received) == (
        "Aborted",
        ("PostScanJobTimedOut",),
        2,
    )
    assert [f.state for f in view.filters] == ["Canceled"]
    assert t.store.documents == {}
    assert DiscardDocuments(token) in t.commands
    assert t.server.next_deadline() is None
    validate(bdsrr_schema, history_body(t))
    check_protocol_fault(send_image(t, token, 3, b"late"), DSP, "OperationFailed")


def test_no_timeout_while_an_image_is_arriving() -> None:
    """A slow upload is activity: the job does not time out under it."""
    t = InProcessTransport()
    token = create_job(t)
    exchange, body = send_image_exchange(t, token, b"slow image " * 100)
    t._run(exchange.feed(body[:-200]))
    t.advance(700)
    assert job_view(t, token).state == "Creating"
    t._run(exchange.feed(body[-200:]))
    outcome = exchange.end(t.clock)  # the image arrived now: the timeout starts again here
    t._run(outcome.commands)
    ok(outcome.reply)
    assert t.store.documents == {(token, 1): b"slow image " * 100}
    t.advance(599)
    assert job_view(t, token).state == "Creating"
    t.advance(1)
    assert job_view(t, token).state == "Aborted"


def test_timeout_only_while_creating_and_deadline_with_subscriptions() -> None:
    t = InProcessTransport(ServerConfig(job_timeout_seconds=60))
    start = t.clock
    subscribe(t, t.server.config.dsc_url, expires="PT30S")
    pending, creating = create_job(t), create_job(t)
    ok(end_job(t, pending))
    # The subscription expires before the job times out.
    assert t.server.next_deadline() == start + timedelta(seconds=30)
    t.advance(30)
    assert t.server.next_deadline() == start + timedelta(seconds=60)
    t.advance(31)
    assert job_view(t, creating).state == "Aborted"
    assert job_view(t, pending).state == "Pending"
    assert t.server.next_deadline() is None


# --- history retention ----------------------------------------------------------------------------


def test_history_keeps_the_newest(bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport(ServerConfig(history_size=3))
    tokens = []
    for n in range(5):
        token = create_job(t)
        ok(send_image(t, token, 1, f"page of job {n}".encode()))
        ok(cancel_job(t, DSC, token))
        tokens.append(token)
    assert [v.token for v in summaries(t, "JobHistory")] == tokens[:1:-1]  # newest first
    validate(bdsrr_schema, history_body(t))
    assert [c for c in t.commands if isinstance(c, DropJob)] == [
        DropJob(tokens[0], Removal.HISTORY_FULL),
        DropJob(tokens[1], Removal.HISTORY_FULL),
    ]
    assert set(t.store.jobs) == set(tokens[2:])
    assert t.store.documents == {}  # canceled jobs keep no spool copy (issue 8)
    for dropped in tokens[:2]:
        f = check_protocol_fault(
            t.post(soap(elements_body("dsc", dropped, "dsc:JobStatus"), Act.DSC_ELEMENTS)),
            DSC,
            "ClientErrorJobTokenNotFound",
        )
        assert detail_token(f, DSC) == dropped


# --- repository status and eventing --------------------------------------------------------------


def test_repository_idle_processing_idle(bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url)
    assert repository_state(t) == "Idle"
    first, second = create_job(t), create_job(t)
    for token in (first, second):
        ok(end_job(t, token))
    assert deliveries_of(t, Act.DSC_SUMMARY_EVENT) == []  # Pending is not processing
    t.engine(ProcessingStarted(first))
    assert repository_state(t) == "Processing"
    t.engine(ProcessingStarted(second))
    t.process(first)
    assert repository_state(t) == "Processing"  # the second is still Started
    ok(cancel_job(t, DSC, second))
    assert repository_state(t) == "Idle"
    events = deliveries_of(t, Act.DSC_SUMMARY_EVENT)
    assert [text_of(e, "//dsc:RepositoryState") for e in events] == ["Processing", "Idle"]
    for e in events:
        validate(bdsrr_schema, payload_of(etree.tostring(e)))
        assert text_of(e, "//dsc:RepositoryStateReason") == "None"


def notification_check(t: InProcessTransport, address: str, *, wsa: str = WSA) -> None:
    """R7: a one-way message to NotifyTo: To = the address, the action, a fresh MessageID, no
    RelatesTo, the reference parameters as header blocks."""
    ids = set()
    for d in t.deliveries:
        if d.final:
            continue
        assert d.address == address
        assert d.content_type == "application/soap+xml; charset=utf-8"
        h = reply_headers(d.body)
        assert h.wsa == wsa and h.to == address and h.relates_to is None
        assert h.message_id and h.message_id not in ids
        ids.add(h.message_id)
        root = etree.fromstring(d.body)
        (ref,) = root.xpath(
            "/s:Envelope/s:Header/x:Ref", namespaces={"s": SOAP, "x": "urn:test:sink"}
        )
        assert ref.text == "N-1"


def test_bdsrr_events_of_a_job(bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport()
    ident, expires = subscribe(t, t.server.config.dsc_url, notify_to="http://mgmt.example/sink")
    assert expires == "PT3600S"  # absent Expires: the default hour
    token = create_job(t, FS, MAIL, continue_on_error=True)
    ok(send_image(t, token, 1, b"page"))
    ok(end_job(t, token))
    t.process(token, [(CS, ()), (CWW, ())])
    notification_check(t, "http://mgmt.example/sink")
    assert {d.subscription_id for d in t.deliveries} == {ident}
    actions = [reply_headers(d.body).action for d in t.deliveries]
    assert set(actions) == {Act.DSC_STATUS_EVENT, Act.DSC_END_EVENT, Act.DSC_SUMMARY_EVENT}
    statuses = deliveries_of(t, Act.DSC_STATUS_EVENT)
    seen = [(text_of(e, "//dsc:JobState"), text_of(e, "//dsc:ImagesReceived")) for e in statuses]
    # Every change of state, reasons, a filter or ImagesReceived raises one (R6).
    assert seen == [
        ("Creating", "0"),
        ("Creating", "1"),
        ("Pending", "1"),
        ("Started", "1"),
        ("Processing", "1"),
        ("Processing", "1"),
        ("Processing", "1"),
        ("Processing", "1"),
        ("Completed", "1"),
    ]
    for e in statuses:
        validate(bdsrr_schema, payload_of(etree.tostring(e)))
    (end,) = deliveries_of(t, Act.DSC_END_EVENT)
    validate(bdsrr_schema, payload_of(etree.tostring(end)))
    assert text_of(end, "//dsc:PostScanJobEndState/dsc:JobToken") == token
    assert (
        text_of(end, "//dsc:JobCompletedStateReasons/dsc:JobStateReason")
        == "PostScanJobCompletedWithWarnings"
    )
    assert DATETIME.match(text_of(end, "//dsc:PostScanJobEndState/dsc:JobCompletedTime"))
    assert actions.index(Act.DSC_END_EVENT) > actions.index(Act.DSC_STATUS_EVENT)


def test_wsdsp_events_with_an_action_filter(bdsrr_schema: etree.XMLSchema) -> None:
    """A device subscribes at the WS-DSP service for the end state only."""
    t = InProcessTransport()
    ident, _ = subscribe(
        t,
        t.server.config.dsp_url,
        actions=[Act.DSP_END_EVENT],
        notify_to="http://device.example/events",
    )
    token = create_job(t)
    ok(end_job(t, token))
    assert t.deliveries == []
    t.process(token)
    (delivery,) = t.deliveries
    assert delivery.subscription_id == ident
    notification_check(t, "http://device.example/events")
    (event,) = deliveries_of(t, Act.DSP_END_EVENT)
    body = payload_of(etree.tostring(event))
    assert etree.QName(body).text == f"{{{DSP}}}PostScanJobEndStateEvent"
    validate(bdsrr_schema, dsp_as_dsc(body))


def test_unfiltered_wsdsp_subscription_gets_both_dsp_events(bdsrr_schema: etree.XMLSchema) -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsp_url)
    token = create_job(t)
    ok(end_job(t, token))
    t.process(token)
    actions = {reply_headers(d.body).action for d in t.deliveries}
    assert actions == {Act.DSP_STATUS_EVENT, Act.DSP_END_EVENT}
    for event in deliveries_of(t, Act.DSP_STATUS_EVENT):
        body = payload_of(etree.tostring(event))
        assert etree.QName(body).namespace == DSP
        validate(bdsrr_schema, dsp_as_dsc(body))


def test_subscription_at_the_device_address_gets_every_event() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.device_url)
    token = create_job(t)
    ok(end_job(t, token))
    t.process(token)
    actions = {reply_headers(d.body).action for d in t.deliveries}
    assert actions == {
        Act.DSP_STATUS_EVENT,
        Act.DSP_END_EVENT,
        Act.DSC_STATUS_EVENT,
        Act.DSC_END_EVENT,
        Act.DSC_SUMMARY_EVENT,
    }


def test_filter_with_several_actions_and_https_spelling() -> None:
    t = InProcessTransport()
    https_end = "https://" + Act.DSC_END_EVENT.removeprefix("http://")
    subscribe(t, t.server.config.dsc_url, actions=[Act.DSC_SUMMARY_EVENT, https_end])
    token = create_job(t)
    ok(end_job(t, token))
    t.process(token)
    assert [reply_headers(d.body).action for d in t.deliveries] == [
        Act.DSC_SUMMARY_EVENT,
        Act.DSC_END_EVENT,
        Act.DSC_SUMMARY_EVENT,
    ]


def test_unknown_filter_action_is_refused() -> None:
    t = InProcessTransport()
    reply = t.post(
        soap(
            subscribe_body(actions=[Act.DSC_END_EVENT, DSC + "/CoffeeReadyEvent"]),
            Act.SUBSCRIBE,
            to=t.server.config.dsc_url,
        )
    )
    f = check_fault(reply, status=400, code="Sender", subcode=(WSDP, "FilterActionNotSupported"))
    assert f.detail is not None and [(el.tag, el.text) for el in f.detail] == [
        (f"{{{WSA}}}Action", DSC + "/CoffeeReadyEvent")
    ]
    assert t.server.subscriptions.by_id == {}


@pytest.mark.parametrize(
    "expires,granted",
    [
        ("PT10M", "PT600S"),
        ("P1DT2H", "PT86400S"),
        ("PT1H30M", "PT5400S"),
        ("2026-11-21T09:30:00+01:00", "PT1800S"),
        ("2026-11-21T08:15:00Z", "PT900S"),
        ("  PT5S\n", "PT5S"),
        ("P3D", "PT86400S"),
    ],
)
def test_subscribe_expires(expires: str, granted: str) -> None:
    t = InProcessTransport()  # the clock starts at 2026-11-21T09:00+01:00
    _, got = subscribe(t, t.server.config.dsc_url, expires=expires)
    assert got == granted


def test_subscribe_response_names_the_manager() -> None:
    t = InProcessTransport()
    reply = t.post(soap(subscribe_body(), Act.SUBSCRIBE, to=t.server.config.dsp_url))
    body = ok(reply)
    check_reply_headers(reply, action=WSE + "/SubscribeResponse", relates_to=REQUEST_ID)
    assert text_of(body, "wse:SubscriptionManager/a:Address") == t.server.config.dsp_url
    ident = text_of(body, "wse:SubscriptionManager/a:ReferenceParameters/wse:Identifier")
    assert ident.startswith("urn:uuid:")


def test_renew_get_status_unsubscribe() -> None:
    t = InProcessTransport()
    ident, _ = subscribe(t, t.server.config.dsc_url, expires="PT10M")
    reply = manager_request(
        t, Act.RENEW, ident, "<wse:Renew><wse:Expires>PT2H</wse:Expires></wse:Renew>"
    )
    body = ok(reply)
    check_reply_headers(reply, action=WSE + "/RenewResponse", relates_to=REQUEST_ID)
    assert text_of(body, "wse:Expires") == "PT7200S"
    t.advance(60)
    reply = manager_request(t, Act.GET_STATUS, ident, "<wse:GetStatus/>")
    check_reply_headers(reply, action=WSE + "/GetStatusResponse", relates_to=REQUEST_ID)
    assert text_of(ok(reply), "wse:Expires") == "PT7140S"
    # Still subscribed after the original 10 minutes.
    t.advance(600)
    create_job(t)
    assert len(t.deliveries) == 1
    reply = manager_request(t, Act.UNSUBSCRIBE, ident, "<wse:Unsubscribe/>")
    check_reply_headers(reply, action=WSE + "/UnsubscribeResponse", relates_to=REQUEST_ID)
    # R13: the 2004/08 UnsubscribeResponse is an empty Body; the Action says what it is.
    assert reply.status == 200
    assert xp(parse(reply.body), "/s:Envelope/s:Body/node()") == []
    create_job(t)
    assert len(t.deliveries) == 1
    check_fault(
        manager_request(t, Act.GET_STATUS, ident, "<wse:GetStatus/>"),
        status=400,
        code="Sender",
        subcode=(WSE, "InvalidMessage"),
    )
    assert not any(d.final for d in t.deliveries)  # Unsubscribe sends no SubscriptionEnd


def test_expired_subscription_is_dropped_silently() -> None:
    t = InProcessTransport()
    ident, _ = subscribe(t, t.server.config.dsc_url, expires="PT5M")
    t.advance(299)
    create_job(t)
    assert len(t.deliveries) == 1
    t.advance(1)
    assert t.server.subscriptions.by_id == {}
    create_job(t)
    assert len(t.deliveries) == 1  # no SubscriptionEnd, no notification
    check_fault(
        manager_request(t, Act.RENEW, ident, "<wse:Renew/>"),
        status=500,
        code="Receiver",
        subcode=(WSE, "UnableToRenew"),
    )


def test_expired_but_not_yet_ticked_subscription_gets_nothing() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url, expires="PT5M")
    t.clock += timedelta(minutes=6)  # no tick: the core still knows the subscription
    create_job(t)
    assert t.deliveries == []


def test_delivery_failures_end_the_subscription() -> None:
    t = InProcessTransport()
    ident, _ = subscribe(
        t,
        t.server.config.dsc_url,
        notify_to="http://sink.example/notify",
        end_to="http://sink.example/ended",
    )
    create_job(t)
    # Two failures, then a success: the count starts again.  Each change of the count is
    # recorded (a shared store keeps it for the next delivery owner, issue 18); a success
    # after a success records nothing.
    assert t.server.delivery_result(ident, False) == [RecordDeliveryFailures(ident, 1)]
    assert t.server.delivery_result(ident, False) == [RecordDeliveryFailures(ident, 2)]
    assert t.server.delivery_result(ident, True) == [RecordDeliveryFailures(ident, 0)]
    assert t.server.delivery_result(ident, True) == []
    assert t.server.delivery_result(ident, False) == [RecordDeliveryFailures(ident, 1)]
    assert t.server.delivery_result(ident, False) == [RecordDeliveryFailures(ident, 2)]
    assert ident in t.server.subscriptions.by_id
    ended, end = t.server.delivery_result(ident, False)
    assert ended == EndSubscription(ident)  # a shared store forgets it (issue 18)
    assert isinstance(end, Deliver)
    assert end.final and end.address == "http://sink.example/ended"
    assert end.subscription_id == ident
    root = etree.fromstring(end.body)
    h = reply_headers(end.body)
    assert (h.to, h.action, h.relates_to) == (
        "http://sink.example/ended",
        Act.SUBSCRIPTION_END,
        None,
    )
    (ref,) = root.xpath("/s:Envelope/s:Header/x:Ref", namespaces={"s": SOAP, "x": "urn:test:sink"})
    assert ref.text == "E-1"
    body = payload_of(end.body)
    assert text_of(body, "wse:Status") == WSE + "/DeliveryFailure"
    assert text_of(body, "wse:SubscriptionManager/a:ReferenceParameters/wse:Identifier") == ident
    (reason,) = xp(body, "wse:Reason")
    assert reason.get("{http://www.w3.org/XML/1998/namespace}lang") == "en"
    assert ident not in t.server.subscriptions.by_id
    assert t.server.delivery_result(ident, False) == []
    count = len(t.deliveries)
    create_job(t)
    assert len(t.deliveries) == count


def test_shutdown_ends_subscriptions_and_stops_the_repository() -> None:
    t = InProcessTransport()
    with_end, _ = subscribe(t, t.server.config.dsc_url, end_to="http://sink.example/ended")
    subscribe(t, t.server.config.dsc_url, end_to=None)
    t._run(t.server.shutdown(t.clock))
    summary_events = deliveries_of(t, Act.DSC_SUMMARY_EVENT)
    assert [text_of(e, "//dsc:RepositoryState") for e in summary_events] == ["Stopped"] * 2
    ends = [d for d in t.deliveries if d.final]
    assert [(d.subscription_id, d.address) for d in ends] == [
        (with_end, "http://sink.example/ended")
    ]
    assert text_of(payload_of(ends[0].body), "wse:Status") == WSE + "/SourceShuttingDown"
    assert t.deliveries.index(ends[0]) > max(
        t.deliveries.index(d) for d in t.deliveries if not d.final
    )
    assert t.server.subscriptions.by_id == {}
    assert t.server.repository_state.value == "Stopped"


def test_notifications_in_ws_addressing_10() -> None:
    t = InProcessTransport()
    reply = t.post(
        soap(
            subscribe_body(notify_to="http://sink.example/n"),
            Act.SUBSCRIBE,
            wsa=WSA10,
            to=t.server.config.dsc_url,
        )
    )
    body = ok(reply)
    assert xp(body, "wse:SubscriptionManager/a10:ReferenceParameters/wse:Identifier")
    create_job(t)
    (d,) = t.deliveries
    assert reply_headers(d.body).wsa == WSA10


# --- metadata and discovery (R11) -----------------------------------------------------------------


def test_transfer_get_metadata() -> None:
    t = InProcessTransport()
    config = t.server.config
    reply = t.post(
        soap("", "http://schemas.xmlsoap.org/ws/2004/09/transfer/Get", to=config.device_address)
    )
    body = ok(reply)
    check_reply_headers(
        reply,
        action="http://schemas.xmlsoap.org/ws/2004/09/transfer/GetResponse",
        relates_to=REQUEST_ID,
    )
    assert etree.QName(body).text == "{http://schemas.xmlsoap.org/ws/2004/09/mex}Metadata"
    dialects = [s.get("Dialect") for s in xp(body, "wsx:MetadataSection")]
    assert dialects == [WSDP + "/ThisDevice", WSDP + "/ThisModel", WSDP + "/Relationship"]
    assert (
        text_of(body, "wsx:MetadataSection/wsdp:ThisDevice/wsdp:FriendlyName")
        == config.friendly_name
    )
    assert (
        text_of(body, "wsx:MetadataSection/wsdp:ThisModel/wsdp:Manufacturer") == config.manufacturer
    )
    (relationship,) = xp(body, "wsx:MetadataSection/wsdp:Relationship")
    assert relationship.get("Type") == WSDP + "/host"
    assert text_of(relationship, "wsdp:Host/a:EndpointReference/a:Address") == config.device_address
    hosted = xp(relationship, "wsdp:Hosted")
    found = {}
    for h in hosted:
        types = xp(h, "wsdp:Types")[0]
        found[resolve(types, types.text or "")] = (
            text_of(h, "a:EndpointReference/a:Address"),
            text_of(h, "wsdp:ServiceId"),
        )
    assert found == {
        (DSP, "DistributedScanProcessingServiceType"): (
            config.dsp_url,
            f"urn:uuid:{config.dsp_service_uuid}",
        ),
        (DSC, "RepositoryConfigurationServiceType"): (
            config.dsc_url,
            f"urn:uuid:{config.dsc_service_uuid}",
        ),
    }
    assert config.dsp_url.endswith(f"/ScanServer/{config.dsp_service_uuid}")


WSD = "http://schemas.xmlsoap.org/ws/2005/04/discovery"


@pytest.mark.parametrize(
    "types,matches",
    [
        ("", True),
        ("wsdp:Device", True),
        ("dsc:RepositoryConfigurationServiceType", True),
        ("wsdp:Device dsp:DistributedScanProcessingServiceType", True),
        ("wscn:ScannerServiceType", False),
    ],
)
def test_directed_probe(types: str, matches: bool) -> None:
    t = InProcessTransport()
    config = t.server.config
    types_el = f"<d:Types>{types}</d:Types>" if types else ""
    body = (
        f'<d:Probe xmlns:d="{WSD}" xmlns:wsdp="{WSDP}" '
        f'xmlns:wscn="http://schemas.microsoft.com/windows/2006/08/wdp/scan">{types_el}'
        f"</d:Probe>"
    )
    reply = t.post(soap(body, WSD + "/Probe", to="urn:schemas-xmlsoap-org:ws:2005:04:discovery"))
    payload = ok(reply)
    check_reply_headers(reply, action=WSD + "/ProbeMatches", relates_to=REQUEST_ID)
    assert etree.QName(payload).text == f"{{{WSD}}}ProbeMatches"
    found = payload.findall(f"{{{WSD}}}ProbeMatch")
    assert len(found) == (1 if matches else 0)
    if matches:
        (match,) = found
        assert match.findtext(f"{{{WSD}}}XAddrs") == config.device_url
        assert (
            match.findtext(f"{{{WSA}}}EndpointReference/{{{WSA}}}Address") == config.device_address
        )
        types_el_ = match.find(f"{{{WSD}}}Types")
        assert types_el_ is not None
        assert resolve(types_el_, types_el_.text or "") == (WSDP, "Device")


def test_get_metadata_is_not_supported() -> None:
    action = "http://schemas.xmlsoap.org/ws/2004/09/mex/GetMetadata/Request"
    reply = InProcessTransport().post(
        soap("<x:GetMetadata xmlns:x='http://schemas.xmlsoap.org/ws/2004/09/mex'/>", action)
    )
    f = check_fault(reply, status=400, code="Sender", subcode=(WSA, "ActionNotSupported"))
    assert detail_action(f) == action


# --- R5: requested element names ----------------------------------------------------------------

ODD_PREFIXES = f' xmlns:Q="{DSC}" xmlns:P="{DSP}" xmlns:o="urn:vendor:other"'


def test_repository_elements_unknown_names_order_and_duplicates(
    bdsrr_schema: etree.XMLSchema,
) -> None:
    t = InProcessTransport()
    requested = [
        "Q:RepositoryStatus",
        "o:Toner",
        "Q:Nope",
        "Q:RepositoryConfiguration",
        "P:RepositoryStatus",
        "Q:RepositoryStatus",
        "Unprefixed",
    ]
    reply = t.post(soap(repository_body(*requested), Act.DSC_REPOSITORY, declarations=ODD_PREFIXES))
    body = ok(reply)
    validate(bdsrr_schema, body)
    data = xp(body, "dsc:RepositoryElements/dsc:ElementData")
    assert [resolve(d, d.get(f"{{{DSC}}}Name", "")) for d in data] == [
        (DSC, "RepositoryStatus"),
        ("urn:vendor:other", "Toner"),
        (DSC, "Nope"),
        (DSC, "RepositoryConfiguration"),
        (DSP, "RepositoryStatus"),
        (DSC, "RepositoryStatus"),
        ("", "Unprefixed"),
    ]
    assert [d.get(f"{{{DSC}}}Valid") for d in data] == [
        "true",
        "false",
        "false",
        "true",
        "false",
        "true",
        "false",
    ]
    for d in data:
        if d.get(f"{{{DSC}}}Valid") == "false":
            assert len(d) == 0 and not (d.text or "").strip()
    assert tags(data[0]) == [f"{{{DSC}}}RepositoryStatus"]
    assert tags(data[3]) == [f"{{{DSC}}}RepositoryConfiguration"]


@pytest.mark.parametrize("ns", [DSC, DSP])
def test_job_elements_unknown_names_order_and_duplicates(
    bdsrr_schema: etree.XMLSchema, ns: str
) -> None:
    t = InProcessTransport()
    token = create_job(t)
    ok(send_image(t, token, 4, b"page", fmt="jfif"))
    own, other = ("Q", "P") if ns == DSC else ("P", "Q")
    prefix = "dsc" if ns == DSC else "dsp"
    requested = [
        f"{own}:Documents",
        f"{other}:JobStatus",
        "o:JobStatus",
        f"{own}:JobStatus",
        f"{own}:Bogus",
        f"{own}:Documents",
        f"{own}:JobDescription",
    ]
    action = (DSC if ns == DSC else DSP) + "/GetPostScanJobElements"
    body = ok(
        t.post(soap(elements_body(prefix, token, *requested), action, declarations=ODD_PREFIXES))
    )
    validate(bdsrr_schema, body if ns == DSC else dsp_as_dsc(body))
    data = body.findall(f"{{{ns}}}JobElements/{{{ns}}}ElementData")
    other_ns = DSP if ns == DSC else DSC
    assert [resolve(d, d.get(f"{{{ns}}}Name", "")) for d in data] == [
        (ns, "Documents"),
        (other_ns, "JobStatus"),
        ("urn:vendor:other", "JobStatus"),
        (ns, "JobStatus"),
        (ns, "Bogus"),
        (ns, "Documents"),
        (ns, "JobDescription"),
    ]
    assert [d.get(f"{{{ns}}}Valid") for d in data] == [
        "true",
        "false",
        "false",
        "true",
        "false",
        "true",
        "true",
    ]
    assert [tags(d) for d in data] == [
        [f"{{{ns}}}Documents"],
        [],
        [],
        [f"{{{ns}}}JobStatus"],
        [],
        [f"{{{ns}}}Documents"],
        [f"{{{ns}}}JobDescription"],
    ]
    document = data[0].find(f"{{{ns}}}Documents/{{{ns}}}Document/{{{ns}}}DocumentDescription")
    assert document is not None
    assert [(c.text or "") for c in document] == ["4", "jfif"]


def test_default_namespace_qnames_resolve() -> None:
    """An unprefixed QName takes the default namespace in scope (XML Schema QName rules)."""
    t = InProcessTransport()
    body = (
        f"<dsc:GetRepositoryElementsRequest><dsc:RequestedElements>"
        f'<Name xmlns="{DSC}">RepositoryStatus</Name></dsc:RequestedElements>'
        f"</dsc:GetRepositoryElementsRequest>"
    )
    reply = ok(t.post(soap(body, Act.DSC_REPOSITORY)))
    (data,) = xp(reply, "dsc:RepositoryElements/dsc:ElementData")
    assert data.get(f"{{{DSC}}}Valid") == "true"
    assert resolve(data, data.get(f"{{{DSC}}}Name", "")) == (DSC, "RepositoryStatus")


def test_reply_headers_of_a_success() -> None:
    reply = InProcessTransport().post(soap("<dsc:GetActiveJobsRequest/>", Act.DSC_ACTIVE))
    h = check_reply_headers(reply, action=DSC + "/GetActiveJobsResponse", relates_to=REQUEST_ID)
    assert h.to == ANONYMOUS
    assert reply.content_type == "application/soap+xml; charset=utf-8"


# --- the exchange's contract ------------------------------------------------------------------


def test_exchange_misuse_raises_usage_error() -> None:
    t = InProcessTransport()
    exchange = t.server.open_exchange(RequestInfo(now=t.clock, content_type=None))
    exchange.feed(soap("<dsc:GetActiveJobsRequest/>", Act.DSC_ACTIVE))
    with pytest.raises(UsageError):
        exchange.end(t.clock.replace(tzinfo=None))  # R6: times carry their UTC offset
    ok(exchange.end().reply)
    with pytest.raises(UsageError):
        exchange.end()
    with pytest.raises(UsageError):
        exchange.feed(b"more")
    assert exchange.abort() == []
    with pytest.raises(UsageError):
        RequestInfo(now=t.clock.replace(tzinfo=None))


def test_end_time_is_when_the_operation_takes_effect() -> None:
    t = InProcessTransport()
    exchange = t.server.open_exchange(RequestInfo(now=t.clock, content_type=None))
    exchange.feed(
        envelope(
            Act.DSP_CREATE,
            client.create_post_scan_job(
                user_identifier="S-1", psp_identifier="P", instructions=[FS]
            ),
        )
    )
    later = t.clock + timedelta(seconds=42)
    token = text_of(ok(exchange.end(later).reply), "dsp:JobToken")
    job = t.server.jobs.get(token)
    assert job is not None and job.created == later == job.last_activity


# --- issue 8: spool hygiene ------------------------------------------------------------------


def test_failed_job_keeps_documents_for_the_retention_only() -> None:
    t = InProcessTransport(ServerConfig(spool_retention_seconds=3600))
    good, bad = create_job(t, FS), create_job(t, FS, MAIL, continue_on_error=True)
    for token in (good, bad):
        ok(send_image(t, token, 1, b"page"))
        ok(end_job(t, token))
    t.process(good)
    t.process(bad, [(CS, ()), (CWE, (FilterStateReason.UNABLE_TO_SEND_EMAIL,))])
    assert summaries(t, "JobHistory")[0].state == "Completed"
    # Every filter of `good` succeeded: its spool copy is gone at once; `bad` may be re-run.
    assert set(t.store.documents) == {(bad, 1)}
    assert t.server.next_deadline() == t.clock + timedelta(seconds=3600)
    t.advance(3599)
    assert set(t.store.documents) == {(bad, 1)}
    t.advance(1)
    assert t.store.documents == {}
    assert DiscardDocuments(bad) in t.commands
    assert t.server.next_deadline() is None
    # The records stay in the history, with their document lists.
    assert {v.token: v.images_received for v in summaries(t, "JobHistory")} == {good: 1, bad: 1}


def test_restart_discards_what_a_crash_left_and_keeps_counting_retention() -> None:
    t = InProcessTransport(ServerConfig(spool_retention_seconds=3600))
    good, bad = create_job(t, FS), create_job(t, FS, continue_on_error=False)
    for token in (good, bad):
        ok(send_image(t, token, 1, b"page"))
        ok(end_job(t, token))
    t.process(good)
    t.process(bad, [(CWE, (FilterStateReason.FILE_SHARE_ACCESS_DENIED,))])
    jobs = list(t.server.jobs.history())
    # A new server over a store that still holds both spool folders (a crash right after the
    # job records were written, or a spool from before this rule).
    later = InProcessTransport(ServerConfig(spool_retention_seconds=3600), start=t.clock)
    later.store.documents.update({(good, 1): b"page", (bad, 1): b"page"})
    later._run(later.server.restore(reversed(jobs), later.clock))
    assert set(later.store.documents) == {(bad, 1)}
    later.advance(3600)
    assert later.store.documents == {}


# --- R13: a job interrupted by a crash resumes ------------------------------------------------


def test_restart_resumes_a_job_that_was_processing() -> None:
    t = InProcessTransport()
    token = _second_filter_running(t)  # and the server dies here
    started = InProcessTransport(start=t.clock)
    jobs = [*t.server.jobs.active(), *t.server.jobs.history()]
    started.store.documents.update(t.store.documents)
    started._run(started.server.restore(jobs, started.clock))
    # Pending again, the completed filter kept, the interrupted one Pending: only 1 and 2 run.
    (job,) = started.started
    assert job.state is JobState.PENDING
    assert [f.state for f in job.filters] == [CS, FilterState.PENDING, FilterState.PENDING]
    assert (token, 1) in started.store.documents  # the documents are still there
    # The engine runs the filters still Pending (filters/engine.py skips settled ones).
    started.engine(ProcessingStarted(token))
    for index in (1, 2):
        started.engine(FilterStarted(token, index))
        started.engine(FilterFinished(token, index, CS))
    started.engine(ProcessingFinished(token))
    (view,) = summaries(started, "JobHistory")
    assert (view.state, view.reasons) == ("Completed", ("PostScanJobCompletedSuccessfully",))
    assert [f.state for f in view.filters] == ["CompletedSuccessfully"] * 3


def test_restart_resumes_a_job_that_had_only_started() -> None:
    t = InProcessTransport()
    token = create_job(t, FS)
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    later = InProcessTransport(start=t.clock)
    later._run(later.server.restore(t.server.jobs.active(), later.clock))
    (job,) = later.started
    assert job.token == token and job.state is JobState.PENDING


# --- R13: R10 applies to eventing --------------------------------------------------------------


def test_non_administrators_get_only_their_own_job_events() -> None:
    config = ServerConfig(require_client_certificates=True, scan_admins=frozenset({"admin"}))
    t = InProcessTransport(config)

    def subscribe_as(who: str, to: str, **kw: Any) -> Any:
        return t.post(soap(subscribe_body(**kw), Act.SUBSCRIBE, to=to), identity=who)

    # MS-BDSRR events: administrators only, by address or by filter.
    for to, kw in (
        (config.dsc_url, {}),
        (config.device_url, {"actions": [Act.DSC_STATUS_EVENT]}),
    ):
        reply = subscribe_as("alice", to, **kw)
        assert reply.status == 400 and b"ClientErrorCurrentUserNotScanAdmin" in reply.body
    ok(subscribe_as("alice", config.dsp_url, notify_to="http://alice.example/e"))
    ok(subscribe_as("admin", config.dsc_url, notify_to="http://admin.example/e"))
    mine = create_job(t, FS, identity="alice")
    theirs = create_job(t, FS, identity="bob")
    to_alice = [d for d in t.deliveries if d.address == "http://alice.example/e"]
    to_admin = [d for d in t.deliveries if d.address == "http://admin.example/e"]
    assert to_alice and all(mine.encode() in d.body for d in to_alice)
    assert not any(theirs.encode() in d.body for d in to_alice)
    assert any(theirs.encode() in d.body for d in to_admin)


# --- R13: per-user limit on Creating jobs ---------------------------------------------------


@pytest.mark.parametrize("certificates", [False, True])
def test_creating_jobs_per_user(certificates: bool) -> None:
    config = ServerConfig(
        limits=Limits(max_creating_jobs_per_user=2), require_client_certificates=certificates
    )
    t = InProcessTransport(config)
    # With certificates the user is the identity (whatever the address); without, the address.
    first = {"identity": "alice", "client_address": "10.0.0.1"}
    second = {"identity": "bob", "client_address": "10.0.0.1" if certificates else "10.0.0.2"}

    def create(who: dict[str, str]) -> Any:
        return t.post(envelope(Act.DSP_CREATE, create_request(FS)), **who)

    tokens = [text_of(ok(create(first)), "dsp:JobToken") for _ in range(2)]
    refused = create(first)
    assert refused.status == 500 and b"ServerErrorTemporaryError" in refused.body
    # The reason names what was wrong, the limit and its setting (issues 14 and 16).
    reason = read_fault(refused).reason
    assert "max_creating_jobs_per_user" in reason and "limit is 2" in reason, reason
    assert "unexpected" not in reason
    ok(create(second))  # another user (or scanner) still works
    ok(end_job(t, tokens[0], identity="alice"))  # no longer Creating: a slot is free again
    ok(create(first))


def test_the_last_job_slots_are_kept_for_new_clients() -> None:
    """Issue 14 (lockouts): clients each under their quota fill the slots only up to the
    reserve (Limits.new_client_share); a client holding no Creating job still gets one."""
    config = ServerConfig(limits=Limits(max_active_jobs=10, new_client_share=0.2))  # 2 kept
    t = InProcessTransport(config)

    def create(address: str) -> Any:
        return t.post(envelope(Act.DSP_CREATE, create_request(FS)), client_address=address)

    hostile = [f"10.0.0.{n}" for n in range(1, 5)]
    answers = [create(address) for _ in range(3) for address in hostile]  # 12 asked
    assert [a.status for a in answers].count(200) == 8  # 10 slots less the 2 kept
    refused = answers[-1]
    assert refused.status == 500 and b"ServerErrorTemporaryError" in refused.body
    reason = read_fault(refused).reason
    assert "new_client_share" in reason and "10.0.0.4 has 2" in reason, reason
    # Two newcomers get the two kept slots; then every slot is taken, for anyone.
    scanner = text_of(ok(create("10.0.0.100")), "dsp:JobToken")
    ok(create("10.0.0.101"))
    full = read_fault(create("10.0.0.102")).reason
    assert "max_active_jobs" in full, full
    # The newcomer's job runs to its end as usual.
    ok(end_job(t, scanner))
