"""The core's directory seam (dsc_core.directory, Exchange.lookups/end(directory=...); R10, R14),
the encodings of dsc_bindings.directory.ldap, and PSPString building/validation — none needs LDAP."""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lxml import etree

from dsc_bindings.directory.ldap import (
    RETRY_SECONDS,
    Directory,
    DirectorySettings,
    decode_guid,
    escape_bytes,
    guid_filter_values,
    sid_to_bytes,
    sid_to_text,
)
from dsc_bindings.directory.scan_processes import (
    READ,
    ScanProcess,
    ScanSettings,
    ValidationError,
    build_dacl_descriptor,
    dacl_aces,
    parse_psp_string,
    post_scan_instructions,
    validate_psp_string,
)
from dsc_core import DirectoryAnswers, Lookups, RequestInfo, ScanServer, ServerConfig, client, names
from dsc_core.model import FileShareInstructions
from waiting import wait_for

A = names.Action
NOW = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)
SID = "S-1-5-21-1-2-3-1104"
PSP_ID = "0878BB2B-CC7D-4E18-8478-3DB1E98C06A2"


def create_body(user: str = SID, psp: str = PSP_ID, process_name: str | None = None) -> bytes:
    return client.envelope(
        A.DSP_CREATE,
        client.create_post_scan_job(
            user_identifier=user,
            psp_identifier=psp,
            instructions=[FileShareInstructions((r"\\h\s",))],
            process_name=process_name,
        ),
        message_id=f"urn:uuid:{uuid.uuid4()}",
    )


def jobs_body() -> bytes:
    return client.envelope(
        A.DSC_GET_ACTIVE_JOBS,
        client.empty_request("GetActiveJobsRequest"),
        message_id=f"urn:uuid:{uuid.uuid4()}",
    )


def run(
    server: ScanServer,
    body: bytes,
    answers: DirectoryAnswers | None,
    *,
    identity: str | None = None,
) -> tuple[Lookups, int, bytes]:
    exchange = server.open_exchange(
        RequestInfo(now=NOW, content_type="application/soap+xml", identity=identity)
    )
    exchange.feed(body)
    needs = exchange.lookups()
    outcome = exchange.end(NOW, directory=answers)
    return needs, outcome.reply.status, outcome.reply.body


def job_of(server: ScanServer) -> tuple[str, str]:
    (job,) = server.jobs.active()
    return job.user_name, job.psp_display_name


def test_create_needs_the_sid_and_the_process_and_uses_the_answers() -> None:
    server = ScanServer(ServerConfig(directory=True), new_id=lambda: str(uuid.uuid4()))
    answers = DirectoryAnswers(
        users={SID: "alice@samdom.example.com"}, process_names={PSP_ID: "To share"}
    )
    needs, status, _ = run(server, create_body(), answers)
    assert needs == Lookups(sids=(SID,), processes=(PSP_ID,))
    assert status == 200
    assert job_of(server) == ("alice@samdom.example.com", "To share")


def test_unknown_answers_fall_back_to_the_tables() -> None:
    config = ServerConfig(
        directory=True, user_directory={SID: "table@x"}, process_names={PSP_ID: "Table name"}
    )
    server = ScanServer(config, new_id=lambda: str(uuid.uuid4()))
    _, status, _ = run(server, create_body(), DirectoryAnswers())
    assert status == 200
    assert job_of(server) == ("table@x", "Table name")
    # ext:ProcessName (our vendor extension) still comes first.
    server2 = ScanServer(config, new_id=lambda: str(uuid.uuid4()))
    run(server2, create_body(process_name="Own"), DirectoryAnswers(process_names={PSP_ID: "Dir"}))
    assert job_of(server2)[1] == "Own"


def test_directory_down_gives_the_temporary_fault_and_no_job() -> None:
    server = ScanServer(ServerConfig(directory=True), new_id=lambda: str(uuid.uuid4()))
    _, status, body = run(server, create_body(), DirectoryAnswers(unavailable=True))
    assert status == 500
    assert b"ServerErrorTemporaryError" in body and names.DSP.encode() in body
    assert server.jobs.active() == []
    # A request that needs nothing from the directory is answered as usual.
    _, status, _ = run(server, jobs_body(), DirectoryAnswers(unavailable=True))
    assert status == 200


def test_admins_come_from_the_directory_with_client_certificates() -> None:
    config = ServerConfig(
        directory=True, require_client_certificates=True, scan_admins=frozenset({"root"})
    )
    server = ScanServer(config, new_id=lambda: str(uuid.uuid4()))
    needs, status, _ = run(
        server, jobs_body(), DirectoryAnswers(admins=frozenset({"alice"})), identity="alice"
    )
    assert needs == Lookups(admin="alice") and status == 200
    needs, status, body = run(server, jobs_body(), DirectoryAnswers(), identity="bob")
    assert status == 400 and b"ClientErrorCurrentUserNotScanAdmin" in body
    _, status, body = run(server, jobs_body(), DirectoryAnswers(unavailable=True), identity="bob")
    assert status == 500 and b"ServerErrorTemporaryError" in body and names.DSC.encode() in body
    # A configured administrator needs no directory at all, even when it is down.
    needs, status, _ = run(server, jobs_body(), DirectoryAnswers(unavailable=True), identity="root")
    assert needs == Lookups() and status == 200


def test_certificate_identity_is_matched_to_an_account() -> None:
    config = ServerConfig(directory=True, require_client_certificates=True)
    server = ScanServer(config, new_id=lambda: str(uuid.uuid4()))
    needs, status, _ = run(
        server,
        create_body(),
        DirectoryAnswers(users={"bob@corp": "bob@samdom.example.com"}),
        identity="bob@corp",
    )
    assert needs == Lookups(identity="bob@corp", processes=(PSP_ID,))  # the SID is not used
    assert status == 200 and job_of(server)[0] == "bob@samdom.example.com"
    assert server.jobs.active()[0].owner == "bob@corp"  # R10: ownership stays the identity


def test_without_a_directory_nothing_is_asked() -> None:
    server = ScanServer(ServerConfig(user_directory={SID: "t@x"}), new_id=lambda: "t1")
    needs, status, _ = run(server, create_body(), None)
    assert needs == Lookups() and not needs
    assert status == 200 and job_of(server)[0] == "t@x"


def test_malformed_requests_need_nothing_and_get_their_fault() -> None:
    server = ScanServer(ServerConfig(directory=True), new_id=lambda: "t1")
    for body in (b"<not xml", b""):
        needs, status, reply = run(server, body, DirectoryAnswers())
        assert not needs and status == 400 and b"Sender" in reply


# --- encodings ---------------------------------------------------------------------------------


def test_sid_encoding_round_trips() -> None:
    raw = sid_to_bytes(SID)
    assert raw[:8] == bytes([1, 5, 0, 0, 0, 0, 0, 5]) and len(raw) == 8 + 5 * 4
    assert sid_to_text(raw) == SID
    assert escape_bytes(b"\x01\xff") == "\\01\\ff"
    for bad in ("S-1", "X-1-5-21", "S-1-5-21-x", "S-2-5-1", "S-1-5-" + "-".join(["1"] * 16)):
        with pytest.raises(ValueError):
            sid_to_bytes(bad)


def test_psp_identifier_is_read_in_both_encodings() -> None:
    guid = uuid.UUID(PSP_ID)
    assert decode_guid(guid.bytes_le) == PSP_ID  # 16 bytes, Windows order (what we write)
    assert decode_guid(PSP_ID.lower().encode()) == PSP_ID  # GUID text
    assert decode_guid("{" + PSP_ID + "}") == PSP_ID
    assert decode_guid(b"not a guid") == "not a guid"
    values = guid_filter_values(PSP_ID.lower())
    assert escape_bytes(guid.bytes_le) in values and PSP_ID in values
    assert guid_filter_values("plain") == ["plain"]


def test_directory_settings_are_checked() -> None:
    good = DirectorySettings("ldaps://dc.example.com", "u", "p", "DC=example,DC=com")
    assert good.domain == "example.com" and good.psp_dn == "CN=PSPs,CN=System,DC=example,DC=com"
    for url in ("http://dc", "ldap://", "dc.example.com"):
        with pytest.raises(ValueError):
            DirectorySettings(url, "u", "p", "DC=x")
    with pytest.raises(ValueError):
        DirectorySettings("ldap://dc", "u", "p", "example.com")
    with pytest.raises(ValueError):
        DirectorySettings("ldap://dc", "u", "p", "DC=x", timeout=0)


# --- PSPString ------------------------------------------------------------------------------------


def process() -> ScanProcess:
    return ScanProcess(
        "Scan to share",
        PSP_ID,
        "scan.example.com",
        shares=(r"\\srv\scans",),
        sharepoint_sites=("https://sp.example.com/sites/a",),
        emails=("a@example.com",),
        email_scan_user=True,
        continue_on_error=True,
        document_root_name="doc",
        settings=ScanSettings("png", 600, "Grayscale8", True),
    )


def test_psp_string_round_trips_and_carries_the_instructions() -> None:
    text = process().psp_string()
    assert validate_psp_string(text) in ("structure", "schema")
    back = parse_psp_string("Scan to share", PSP_ID, text)
    assert back == process()
    instructions = post_scan_instructions(text)
    assert instructions.tag == f"{{{names.PSP}}}PostScanInstructions"
    dialects = [d.text for d in instructions.iter(f"{{{names.PSP}}}Dialect")]
    assert dialects == [names.FSF, names.EMLF, names.SPF]


def test_psp_string_validated_against_the_schemas(spec: Path) -> None:
    assert validate_psp_string(process().psp_string(), schema_dir=spec) == "schema"
    text = process().psp_string()
    # Caught only by the schema (WS-Scan ColorConfigBaseType), not by the built-in check.
    purple = text.replace(">Grayscale8<", ">Purple<")
    assert validate_psp_string(purple) == "structure"
    with pytest.raises(ValidationError, match="ColorConfigBaseType"):
        validate_psp_string(purple, schema_dir=spec)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.replace("ShareUNC", "ShareUNX"), "do not match its schema"),
        (lambda t: t.replace("<psp:ScanTicket>", "<psp:Bogus/><psp:ScanTicket>"), "in this order"),
        (lambda t: t.replace(">png<", ">pngx<"), "unknown scan format"),
        (lambda t: t.replace(">scan.example.com<", "><"), "ScanRepository"),
        (
            lambda t: t.replace("<psp:DocumentRootName>doc", "<psp:DocumentRootName>" + "d" * 300),
            "PostScanInstructions is invalid",
        ),
        (lambda t: t[:-10], "not well-formed"),
        (lambda t: "<x/>", "root element"),
        (lambda t: t + " " * 524_288, "524,288"),
    ],
)
def test_structural_check_refuses(change: object, message: str) -> None:
    text = change(process().psp_string())  # type: ignore[operator]
    with pytest.raises(ValidationError, match=message):
        validate_psp_string(text)


def test_security_descriptor_round_trips() -> None:
    descriptor = build_dacl_descriptor([(0x000F01FF, "S-1-5-18"), (READ, SID)])
    assert descriptor[:2] == b"\x01\x00"
    assert int.from_bytes(descriptor[2:4], "little") & 0x1000  # protected: no inheritance
    assert dacl_aces(descriptor) == [(0, 0x000F01FF, "S-1-5-18"), (0, READ, SID)]
    assert dacl_aces(b"") == [] and dacl_aces(descriptor[:19]) == []
    etree.fromstring(process().psp_string().encode())  # well-formed for any XML reader


# --- a directory that hangs ------------------------------------------------------------------------


class SilentServer:
    """Accepts TCP connections and never says a word (a hung DC, a black-holing firewall)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("scheme", ["ldap", "ldaps"])
def test_a_silent_directory_times_out_into_the_temporary_fault(
    scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    silent = SilentServer()
    try:
        directory = Directory(
            DirectorySettings(
                f"{scheme}://127.0.0.1:{silent.port}",
                "u@x",
                "p",
                "DC=x",
                connect_timeout=1.0,
                timeout=1.0,
            )
        )
        with caplog.at_level(logging.ERROR, logger="dsc.directory"):
            answers = directory.answer(Lookups(sids=(SID,), processes=(PSP_ID,)))
        assert answers.unavailable
        assert f"directory {scheme}://127.0.0.1:{silent.port} unavailable" in caplog.text
        assert "answering ServerErrorTemporaryError" in caplog.text
        # The seam turns that into the R4 step 9 fault.
        server = ScanServer(ServerConfig(directory=True), new_id=lambda: "t1")
        _, status, body = run(server, create_body(), answers)
        assert status == 500 and b"ServerErrorTemporaryError" in body
        assert directory.mail_of("alice@x") is None  # the e-mail filter: logged, no address
    finally:
        silent.close()


def test_after_a_failure_the_directory_is_not_asked_again_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    silent = SilentServer()
    now = [100.0]
    try:
        directory = Directory(
            DirectorySettings(
                f"ldap://127.0.0.1:{silent.port}", "u@x", "p", "DC=x", connect_timeout=1, timeout=1
            ),
            clock=lambda: now[0],
        )
        assert directory.answer(Lookups(sids=(SID,))).unavailable
        wait_for(lambda: len(silent.held) == 1, what="the first attempt's connection")
        attempts = 1
        with caplog.at_level(logging.ERROR, logger="dsc.directory"):
            assert directory.answer(Lookups(processes=(PSP_ID,))).unavailable
        assert len(silent.held) == attempts  # queued requests fail at once, no new connection
        assert f"next attempt within {RETRY_SECONDS:.0f} s" in caplog.text
        now[0] += RETRY_SECONDS + 0.1
        assert directory.answer(Lookups(sids=(SID,))).unavailable
        wait_for(lambda: len(silent.held) == attempts + 1, what="a new attempt after the pause")
    finally:
        silent.close()


def test_eventing_asks_for_the_administrator_status_too() -> None:
    """R13: subscriptions to MS-BDSRR events need an administrator, so a Subscribe with a
    certificate identity asks the directory (the answer is used where the rule is applied)."""
    config = ServerConfig(directory=True, require_client_certificates=True)
    server = ScanServer(config, new_id=lambda: str(uuid.uuid4()))
    subscribe = client.envelope(
        A.SUBSCRIBE,
        etree.Element(f"{{{names.WSE}}}Subscribe"),  # its content is read later, if at all
        message_id=f"urn:uuid:{uuid.uuid4()}",
    )
    exchange = server.open_exchange(
        RequestInfo(now=NOW, content_type="application/soap+xml", identity="carol")
    )
    exchange.feed(subscribe)
    assert exchange.lookups() == Lookups(admin="carol")
    # Without an identity (no client certificates) nothing is asked.
    plain = ScanServer(ServerConfig(directory=True), new_id=lambda: "x").open_exchange(
        RequestInfo(now=NOW, content_type="application/soap+xml")
    )
    plain.feed(subscribe)
    assert not plain.lookups()
