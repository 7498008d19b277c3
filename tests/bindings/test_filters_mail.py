"""E-mail filter (R9) against a real SMTP server (aiosmtpd on 127.0.0.1)."""

from __future__ import annotations

import email
import email.policy
import os
import ssl
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from dsc_bindings.filters import FilterSettings, mail
from dsc_bindings.filters.interruption import Interrupted
from dsc_core.model import EmailInstructions, FilterState, FilterStateReason
from test_filters_support import (
    make_documents,
    make_job,
    random_bytes,
    refused_port,
    second_away,
)


class Inbox:
    def __init__(self, reject_rcpt: set[str] | None = None) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.reject_rcpt = reject_rcpt or set()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.reject_rcpt or "*" in self.reject_rcpt:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted"


def _controller(handler: Inbox, **kwargs: Any) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=refused_port(), **kwargs)
    controller.start()
    return controller


@pytest.fixture
def inbox() -> Iterator[tuple[Inbox, int]]:
    handler = Inbox()
    controller = _controller(handler)
    try:
        yield handler, controller.port
    finally:
        controller.stop()


def _settings(port: int, **kw: Any) -> FilterSettings:
    return FilterSettings(
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_timeout=5,
        mail_from="scanner@corp.example",
        **kw,
    )


def _run(job: Any, docs: Any, settings: FilterSettings) -> Any:
    return mail.run(job, 0, docs, settings, threading.Event())


def test_one_message_with_all_documents(tmp_path: Path, inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    pdf = random_bytes(300_001)  # not a multiple of 57: the last base64 line is short
    png = b"\x89PNG\r\n\x1a\n" + random_bytes(57 * 100)
    docs = make_documents(tmp_path, ("pdf-a", pdf), ("png", png))
    job = make_job(
        EmailInstructions(True, ("bob@corp.example", "BOB@corp.example")),
        psp_display_name=".",
        document_root_name="Rapport é",
    )
    settings = _settings(port, user_email={"Alice@Corp.Example": "alice.smith@corp.example"})

    outcome = _run(job, docs, settings)

    assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY, outcome
    [(sender, rcpts, raw)] = handler.messages
    assert sender == "scanner@corp.example"
    assert rcpts == ["bob@corp.example", "alice.smith@corp.example"]
    message = email.message_from_bytes(raw, policy=email.policy.default)
    # The outcome names the message and who got it (issue 19), for the job record.
    assert outcome.delivered == (
        f"Message-ID {message['Message-ID']} to bob@corp.example, alice.smith@corp.example",
    )
    assert message["Subject"] == "Scanned documents: ."
    assert message.get_content_type() == "multipart/mixed"
    text, *attachments = list(message.iter_parts())
    # The display name "." is a line of its own: without dot-stuffing it would have ended DATA.
    assert "\n.\n" in text.get_content().replace("\r\n", "\n")
    assert [(a.get_content_type(), a.get_filename()) for a in attachments] == [
        ("application/pdf", "Rapport é_0001.pdf"),
        ("image/png", "Rapport é_0002.png"),
    ]
    assert attachments[0].get_content() == pdf
    assert attachments[1].get_content() == png
    assert all(len(line) <= 78 for line in raw.split(b"\r\n"))


def test_refused_port_is_invalid_smtp_server(tmp_path: Path) -> None:
    docs = make_documents(tmp_path, ("png", b"x"))
    outcome = _run(
        make_job(EmailInstructions(False, ("bob@corp.example",))), docs, _settings(refused_port())
    )
    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (FilterStateReason.INVALID_SMTP_SERVER,)


def test_unknown_host_is_invalid_smtp_server(tmp_path: Path) -> None:
    docs = make_documents(tmp_path, ("png", b"x"))
    settings = FilterSettings(smtp_host="no-such-host.invalid", smtp_timeout=5)
    outcome = _run(make_job(EmailInstructions(False, ("bob@corp.example",))), docs, settings)
    assert outcome.reasons == (FilterStateReason.INVALID_SMTP_SERVER,)


def test_rejected_recipient_is_unable_to_send(tmp_path: Path) -> None:
    handler = Inbox(reject_rcpt={"*"})
    controller = _controller(handler)
    try:
        docs = make_documents(tmp_path, ("png", b"x"))
        outcome = _run(
            make_job(EmailInstructions(False, ("bob@corp.example",))),
            docs,
            _settings(controller.port),
        )
    finally:
        controller.stop()
    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (FilterStateReason.UNABLE_TO_SEND_EMAIL,)
    assert handler.messages == []


def test_partly_rejected_recipients_still_get_the_message(tmp_path: Path) -> None:
    handler = Inbox(reject_rcpt={"gone@corp.example"})
    controller = _controller(handler)
    try:
        docs = make_documents(tmp_path, ("png", b"x"))
        outcome = _run(
            make_job(EmailInstructions(False, ("gone@corp.example", "bob@corp.example"))),
            docs,
            _settings(controller.port),
        )
    finally:
        controller.stop()
    assert outcome.reasons == (FilterStateReason.UNABLE_TO_SEND_EMAIL,)
    assert [m[1] for m in handler.messages] == [["bob@corp.example"]]


def test_no_recipients_is_invalid_args(tmp_path: Path, inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    docs = make_documents(tmp_path, ("png", b"x"))
    # A SID user has no address; an address with a line break is refused, not sent.
    job = make_job(
        EmailInstructions(True, ("bob@corp.example\r\nRCPT TO:<x@y>",)),
        user_name="S-1-5-21-1-2-3-1001",
    )
    outcome = _run(job, docs, _settings(port))
    assert outcome.state is FilterState.COMPLETED_WITH_ERRORS
    assert outcome.reasons == (FilterStateReason.INVALID_ARGS,)
    assert handler.messages == []


def test_unknown_scan_user_address_is_a_warning(tmp_path: Path, inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    docs = make_documents(tmp_path, ("png", b"x"))
    job = make_job(EmailInstructions(True, ("bob@corp.example",)), user_name="S-1-5-21-9")
    outcome = _run(job, docs, _settings(port))
    assert outcome.state is FilterState.COMPLETED_WITH_WARNINGS
    assert outcome.reasons == (FilterStateReason.INVALID_ARGS,)
    assert len(handler.messages) == 1


def test_starttls_and_login(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    def authenticator(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and auth_data.password == b"s3cret"
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 535

    handler = Inbox()
    controller = _controller(
        handler,
        tls_context=server_ctx,
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
    )
    try:
        docs = make_documents(tmp_path, ("jfif", b"\xff\xd8jpeg"))
        job = make_job(EmailInstructions(False, ("bob@corp.example",)))
        common = dict(smtp_starttls=True, smtp_ssl_context=client_ctx, smtp_username="scanner")
        good = _run(job, docs, _settings(controller.port, smtp_password="s3cret", **common))
        bad = _run(job, docs, _settings(controller.port, smtp_password="wrong", **common))
        # A client that does not trust the server's certificate: a TLS failure.
        untrusting = _run(
            job,
            docs,
            _settings(
                controller.port, smtp_starttls=True, smtp_ssl_context=ssl.create_default_context()
            ),
        )
    finally:
        controller.stop()
    assert good.state is FilterState.COMPLETED_SUCCESSFULLY, good
    assert bad.reasons == (FilterStateReason.UNABLE_TO_SEND_EMAIL,)
    assert untrusting.reasons == (FilterStateReason.INVALID_SMTP_SERVER,)
    [(_, _, raw)] = handler.messages
    [attachment] = list(
        email.message_from_bytes(raw, policy=email.policy.default).iter_attachments()
    )
    assert attachment.get_content() == b"\xff\xd8jpeg"


def test_starttls_without_server_support_is_invalid_smtp_server(
    tmp_path: Path, inbox: tuple[Inbox, int]
) -> None:
    _, port = inbox
    docs = make_documents(tmp_path, ("png", b"x"))
    outcome = _run(
        make_job(EmailInstructions(False, ("bob@corp.example",))),
        docs,
        _settings(port, smtp_starttls=True),
    )
    assert outcome.reasons == (FilterStateReason.INVALID_SMTP_SERVER,)


def test_message_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    """A 16 MB attachment is encoded chunk by chunk: the peak is far below its size."""
    size = 16 * 1024 * 1024
    source = tmp_path / "big.bin"
    with open(source, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(random_bytes(1 << 20))
    from dsc_core.model import Document

    sent = [0]

    def sink(data: bytes) -> None:
        sent[0] += len(data)

    writer = mail._DataWriter(sink)
    job = make_job(EmailInstructions(False, ("bob@corp.example",)))
    tracemalloc.start()
    try:
        mail._write_message(
            writer,
            job,
            0,
            ["bob@corp.example"],
            [(Document(1, "pdf-a"), source)],
            FilterSettings(),
            threading.Event(),
        )
        writer.end()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent[0] > size * 4 // 3
    assert peak < 4 * 1024 * 1024, peak


def test_dot_stuffing() -> None:
    out: list[bytes] = []
    writer = mail._DataWriter(out.append)
    writer.lines(b"a\r\n.\r\n..b\r\n")
    writer.end()
    assert b"".join(out) == b"a\r\n..\r\n...b\r\n.\r\n"


def test_cancel_before_sending_sends_nothing(tmp_path: Path, inbox: tuple[Inbox, int]) -> None:
    handler, port = inbox
    docs = make_documents(tmp_path, ("png", b"x"))
    cancelled = threading.Event()
    cancelled.set()
    outcome = mail.run(
        make_job(EmailInstructions(False, ("bob@corp.example",))),
        0,
        docs,
        _settings(port),
        cancelled,
    )
    assert outcome.state is FilterState.CANCELED and outcome.reasons == ()
    time.sleep(0.05)
    assert handler.messages == []


def test_cancel_mid_data_delivers_nothing(tmp_path: Path, inbox: tuple[Inbox, int]) -> None:
    """The attachment is a FIFO fed by the test: once the filter opens it, DATA has begun.
    On cancel the connection is dropped without the final ".", so the relay keeps nothing."""
    from dsc_core.model import Document

    handler, port = inbox
    fifo = tmp_path / "doc.fifo"
    os.mkfifo(fifo)
    cancelled = threading.Event()
    result: list[Any] = []
    job = make_job(EmailInstructions(False, ("bob@corp.example",)))
    settings = _settings(port, chunk_size=16 * 1024)
    worker = threading.Thread(
        target=lambda: result.append(
            mail.run(job, 0, [(Document(1, "png"), fifo)], settings, cancelled)
        )
    )
    worker.start()
    with open(fifo, "wb", buffering=0) as feed:  # returns once the filter reads: mid-DATA
        feed.write(random_bytes(40_000))
        cancelled.set()
        try:
            feed.write(random_bytes(40_000))
        except BrokenPipeError:
            pass
        worker.join(30)
    assert not worker.is_alive()
    assert result[0].state is FilterState.CANCELED
    time.sleep(0.1)
    assert handler.messages == []


def test_a_document_the_store_cannot_give_mid_data_sends_nothing(
    tmp_path: Path, inbox: tuple[Inbox, int]
) -> None:
    """The store stops answering as the filter reads the second attachment, DATA begun and
    the first attachment sent: the run ends in Interrupted, no outcome (filters/
    interruption.py), and the connection is dropped without the final ".", so the relay keeps
    nothing (a message without its end is never taken).  The resumed run (R13) sends the
    one message."""
    handler, port = inbox
    docs = make_documents(tmp_path, ("png", random_bytes(100_000)), ("pdf-a", b"%PDF two"))
    job = make_job(EmailInstructions(False, ("bob@corp.example",)))
    settings = _settings(port, chunk_size=16 * 1024)
    with pytest.raises(Interrupted):
        _run(job, second_away(docs), settings)
    assert _run(job, docs, settings).state is FilterState.COMPLETED_SUCCESSFULLY
    [(_sender, recipients, content)] = handler.messages
    assert recipients == ["bob@corp.example"]
    attachments = email.message_from_bytes(content, policy=email.policy.default)
    assert [part.get_filename() for part in attachments.iter_attachments()] == [
        "Scan_0001.png",
        "Scan_0002.pdf",
    ]


def test_message_id_is_stable_across_runs(tmp_path: Path, inbox: tuple[Inbox, int]) -> None:
    """R13: after a crash the filter runs again; the second copy carries the same Message-ID,
    so a mail client or the recipient recognises it as a duplicate."""
    handler, port = inbox
    docs = make_documents(tmp_path, ("png", b"x"))
    job = make_job(EmailInstructions(False, ("bob@corp.example",)))
    for _ in range(2):
        assert _run(job, docs, _settings(port)).state is FilterState.COMPLETED_SUCCESSFULLY
    ids = [
        email.message_from_bytes(content, policy=email.policy.default)["Message-ID"]
        for _, _, content in handler.messages
    ]
    assert ids == [f"<dsc.{job.token}.0@corp.example>"] * 2
    other = make_job(EmailInstructions(False, ("bob@corp.example",)))
    _run(other, docs, _settings(port))
    last = email.message_from_bytes(handler.messages[-1][2], policy=email.policy.default)
    assert last["Message-ID"] != ids[0]
