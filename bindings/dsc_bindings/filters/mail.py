"""The e-mail filter (R9): one message per job with every document attached, sent through the
configured SMTP relay.

The message is streamed: MAIL/RCPT go through smtplib as usual, then after ``DATA`` the MIME
structure is written by hand, each attachment base64-encoded from disk chunk by chunk, so a
200 MB scan costs a few hundred KiB of memory, not the size of the message (R8's rule for
images, applied to the way out)."""

from __future__ import annotations

import base64
import logging
import re
import secrets
import smtplib
import ssl
import threading
from collections.abc import Callable, Iterable
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate
from pathlib import Path

from dsc_bindings.filters.common import (
    Deliveries,
    FilterFailure,
    FilterOutcome,
    SourceError,
    check_cancel,
    content_type_for,
    document_file_name,
    never_raises,
    read_full,
)
from dsc_bindings.filters.settings import FilterSettings
from dsc_core.model import Document, EmailInstructions, FilterStateReason, Job

log = logging.getLogger(__name__)

# An address we are willing to put in a RCPT command: ASCII, no spaces, no brackets or control
# characters (which would let instruction text inject SMTP commands), one local@domain.
_ADDRESS = re.compile(r"^[!#-'*+\-/-9=?A-Z^-~.]+@[A-Za-z0-9.\-\[\]:]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
#: 57 input bytes make one 76-character base64 line.
_LINE_BYTES = 57
_FLUSH_AT = 64 * 1024
_TEXT_POLICY = SMTP_POLICY.clone(cte_type="7bit")


@never_raises
def run(
    job: Job,
    filter_index: int,
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event,
    delivered: Deliveries,
) -> FilterOutcome:
    instructions = job.filters[filter_index].instructions
    if not isinstance(instructions, EmailInstructions):
        return FilterOutcome.errors(FilterStateReason.INVALID_ARGS)

    recipients, complete = _recipients(job, instructions, settings)
    # R13: with [smtp] allowed_domains, documents go only to those domains; the others are
    # refused here and never reach the relay.
    outside = [a for a in recipients if not settings.mail_allows(a)]
    if outside:
        log.warning(
            "job %s: e-mail recipient(s) outside the configured domains refused: %s",
            job.token,
            ", ".join(outside),
        )
        recipients = [a for a in recipients if settings.mail_allows(a)]
        if not recipients:
            return FilterOutcome.errors(FilterStateReason.UNABLE_TO_SEND_EMAIL)
    if not recipients:
        log.warning("job %s: e-mail filter has no usable recipient", job.token)
        return FilterOutcome.errors(FilterStateReason.INVALID_ARGS)
    check_cancel(cancelled)
    try:
        rejected = _send(job, filter_index, recipients, documents, settings, cancelled)
    except FilterFailure as exc:
        log.warning("job %s: e-mail not sent (%s): %s", job.token, exc.reason.value, exc)
        return FilterOutcome.errors(exc.reason)
    except SourceError as exc:
        log.error("job %s: cannot read a stored document: %s", job.token, exc)
        return FilterOutcome.errors(FilterStateReason.UNKNOWN_ERROR)
    accepted = [a for a in recipients if a not in rejected]
    domain = _domain(settings)
    delivered.add(
        "email",
        f"Message-ID {message_id(job, filter_index, domain)} to {', '.join(accepted)}",
    )
    if rejected or outside:
        # Delivered to the others; the job still learns that someone did not get it.
        log.warning("job %s: recipients refused: %s", job.token, ", ".join([*rejected, *outside]))
        return FilterOutcome.errors(FilterStateReason.UNABLE_TO_SEND_EMAIL)
    if not complete:
        return FilterOutcome.warnings(FilterStateReason.INVALID_ARGS)
    return FilterOutcome.success()


def _recipients(
    job: Job, instructions: EmailInstructions, settings: FilterSettings
) -> tuple[list[str], bool]:
    """The addresses to send to, and False if one asked for was unusable (a warning)."""
    wanted = list(instructions.addresses)
    complete = True
    if instructions.send_to_scan_user:
        own = settings.address_of(job.user_name)
        if own is None:
            log.warning("job %s: no e-mail address for user %r", job.token, job.user_name)
            complete = False
        else:
            wanted.append(own)
    result: dict[str, str] = {}
    for address in wanted:
        address = address.strip()
        if not _ADDRESS.match(address):
            log.warning("job %s: unusable e-mail address %r", job.token, address)
            complete = False
            continue
        result.setdefault(address.casefold(), address)
    return list(result.values()), complete


def _send(
    job: Job,
    filter_index: int,
    recipients: list[str],
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event,
) -> list[str]:
    """Send the message; return the recipients the relay refused (others accepted)."""
    # Reaching a relay that speaks SMTP (and TLS if asked): failures are InvalidSMTPServer.
    # (Host given to the constructor: STARTTLS checks the certificate against it.)
    smtp: smtplib.SMTP | None = None
    try:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout)
        smtp.ehlo_or_helo_if_needed()
        if settings.smtp_starttls:
            context = settings.smtp_ssl_context or ssl.create_default_context()
            smtp.starttls(context=context)
            smtp.ehlo()
    except (OSError, smtplib.SMTPException) as exc:  # refused, DNS, timeout, TLS, greeting
        if smtp is not None:
            smtp.close()
        raise FilterFailure(FilterStateReason.INVALID_SMTP_SERVER, repr(exc)) from exc

    assert smtp is not None
    finished = False
    try:
        # The relay answered: from here on a failure means it would not take the message.
        unable = FilterStateReason.UNABLE_TO_SEND_EMAIL
        try:
            if settings.smtp_username:
                smtp.login(settings.smtp_username, settings.smtp_password or "")
            code, reply = smtp.mail(settings.mail_from)
            if code != 250:
                raise FilterFailure(unable, f"MAIL FROM: {code} {reply!r}")
            rejected = []
            for address in recipients:
                code, reply = smtp.rcpt(address)
                if code not in (250, 251):
                    rejected.append(address)
            if len(rejected) == len(recipients):
                raise FilterFailure(unable, f"every recipient refused, last: {code} {reply!r}")
            code, reply = smtp.docmd("DATA")
            if code != 354:
                raise FilterFailure(unable, f"DATA: {code} {reply!r}")
            writer = _DataWriter(smtp.send)
            _write_message(writer, job, filter_index, recipients, documents, settings, cancelled)
            writer.end()
            code, reply = smtp.getreply()
            if code != 250:
                raise FilterFailure(unable, f"end of data: {code} {reply!r}")
            finished = True
        except (OSError, smtplib.SMTPException) as exc:  # auth, refusals, drops mid-message
            raise FilterFailure(unable, repr(exc)) from exc
        return rejected
    finally:
        if finished:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                pass
        # On cancel or failure mid-DATA, closing without the final "." makes the relay drop
        # the message (RFC 5321 §4.1.1.4): nothing half-written is delivered.
        smtp.close()


def _domain(settings: FilterSettings) -> str:
    """The Message-ID's domain: the sender's."""
    return settings.mail_from.rpartition("@")[2] or "localhost"


def message_id(job: Job, filter_index: int, domain: str) -> str:
    """The same for every run of one job's e-mail filter: sent again after a crash (R13: at least
    once), the copy is recognisable as a duplicate by its Message-ID (RFC 5322 3.6.4)."""
    return f"<dsc.{job.token}.{filter_index}@{domain}>"


class _DataWriter:
    """Writes the DATA section line by line with dot-stuffing (RFC 5321 §4.5.2), in batches."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self._buffer = bytearray()

    def line(self, data: bytes = b"") -> None:
        if data.startswith(b"."):
            self._buffer += b"."
        self._buffer += data
        self._buffer += b"\r\n"
        if len(self._buffer) >= _FLUSH_AT:
            self.flush()

    def lines(self, block: bytes) -> None:
        """A block of CRLF-terminated lines (folded headers, a small MIME part)."""
        for text in block.split(b"\r\n")[:-1] if block.endswith(b"\r\n") else block.split(b"\r\n"):
            self.line(text)

    def flush(self) -> None:
        if self._buffer:
            self._send(bytes(self._buffer))
            self._buffer.clear()

    def end(self) -> None:
        self._buffer += b".\r\n"  # every line already ends with CRLF, so this is CRLF.CRLF
        self.flush()


def _header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    # The email package folds and RFC 2047/2231-encodes (non-ASCII names, long address lists);
    # control characters are removed first so instruction text cannot add header lines.
    out = bytearray()
    for name, value in headers:
        header = SMTP_POLICY.header_factory(name, _CONTROL.sub(" ", value))
        out += header.fold(policy=SMTP_POLICY).encode("ascii")
    return bytes(out)


def _write_message(
    writer: _DataWriter,
    job: Job,
    filter_index: int,
    recipients: list[str],
    documents: list[tuple[Document, Path]],
    settings: FilterSettings,
    cancelled: threading.Event,
) -> None:
    # "=_" never occurs in base64 or in our text part, so the boundary cannot clash.
    boundary = "=_dsc_" + secrets.token_hex(16)
    domain = _domain(settings)
    display = job.psp_display_name or job.psp_identifier
    writer.lines(
        _header_block(
            [
                ("From", settings.mail_from),
                ("To", ", ".join(recipients)),
                ("Subject", f"Scanned documents: {display}"),
                ("Date", formatdate(localtime=True)),
                ("Message-ID", message_id(job, filter_index, domain)),
                ("MIME-Version", "1.0"),
                ("Content-Type", f'multipart/mixed; boundary="{boundary}"'),
            ]
        )
    )
    writer.line()
    writer.line(b"This is a multi-part message in MIME format.")

    names = [
        document_file_name(job.document_root_name, i, doc.format)
        for i, (doc, _) in enumerate(documents, start=1)
    ]
    # 7bit: we do not ask the relay for 8BITMIME, so non-ASCII text gets quoted-printable.
    text = EmailMessage(policy=_TEXT_POLICY)
    text.set_content(
        "Scanned documents from the scan process:\n"
        f"{_CONTROL.sub(' ', display)}\n\n"
        f"User: {_CONTROL.sub(' ', job.user_name)}\n"
        f"Documents ({len(names)}):\n" + "".join(f"  {name}\n" for name in names)
    )
    del text["MIME-Version"]
    writer.line(b"--" + boundary.encode())
    writer.lines(text.as_bytes())

    for (document, source), name in zip(documents, names, strict=False):
        check_cancel(cancelled)
        part = EmailMessage(policy=SMTP_POLICY)
        part["Content-Type"] = content_type_for(document.format)
        part.add_header("Content-Disposition", "attachment", filename=name)
        part["Content-Transfer-Encoding"] = "base64"
        writer.line(b"--" + boundary.encode())
        writer.lines(_header_block(part.items()))
        writer.line()
        _write_base64(writer, source, settings.chunk_size, cancelled)
    writer.line(b"--" + boundary.encode() + b"--")


def _write_base64(
    writer: _DataWriter, source: Path, chunk_size: int, cancelled: threading.Event
) -> None:
    # Read whole multiples of 57 bytes so every chunk encodes to complete 76-character lines.
    step = max(1, chunk_size // _LINE_BYTES) * _LINE_BYTES
    try:
        f = open(source, "rb", buffering=0)
    except OSError as exc:
        raise SourceError(f"{source}: {exc}") from exc
    with f:
        while True:
            check_cancel(cancelled)
            data = read_full(f, step)
            if not data:
                return
            encoded = base64.b64encode(data)
            for start in range(0, len(encoded), 76):
                writer.line(encoded[start : start + 76])
            if len(data) < step:
                return


__all__ = ["run"]
