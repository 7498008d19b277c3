"""``dsc handle``: answer one request with a fresh core, no network, as the server would."""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dsc_bindings.console.support import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError
from dsc_bindings.http.driver import error_reply
from dsc_core import RequestInfo, ScanServer, ServerConfig
from dsc_core.content_type import soap_media_type_refusal

_MIME_HEAD = re.compile(rb"^(?:mime-version|content-type)\s*:", re.I)


def split_mime_head(data: bytes) -> tuple[str | None, bytes]:
    """A request saved with its MIME headers (as the hardware-docs SendImage example is): take
    the Content-Type from them and return the body after the first blank line."""
    if not _MIME_HEAD.match(data):
        return None, data
    lines = data.split(b"\n")
    headers: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():  # a blank (or whitespace-only) line ends the head
            body = b"\n".join(lines[i + 1 :])
            break
        text = line.decode("latin-1").rstrip("\r")
        if text[:1] in (" ", "\t") and headers:
            headers[-1] += " " + text.strip()
        else:
            headers.append(text)
    else:
        return None, data
    for header in headers:
        name, _, value = header.partition(":")
        if name.strip().lower() == "content-type":
            return value.strip(), body
    return None, body


def cmd_handle(args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.file in (None, "-") else _read_file(args.file)
    content_type = args.content_type
    if content_type is None:
        content_type, data = split_mime_head(data)
    content_type = content_type or "application/soap+xml; charset=utf-8"
    server = ScanServer(ServerConfig(), new_id=lambda: str(uuid.uuid4()))
    info = RequestInfo(
        now=datetime.now().astimezone(),
        content_type=content_type,
        identity=args.identity,
    )
    # The server's HTTP driver refuses a request that is not SOAP before the core sees it
    # (issue 14); `dsc handle` answers as the server would.
    unsupported = soap_media_type_refusal(content_type)
    commands: Sequence[object] = ()
    if unsupported is not None:
        reply = error_reply(415, unsupported)
    else:
        outcome = server.handle(data, info)
        reply, commands = outcome.reply, outcome.commands
    body = reply.body
    if args.pretty and reply.content_type.startswith("application/soap+xml"):
        from lxml import etree

        body = etree.tostring(
            etree.fromstring(body), pretty_print=True, xml_declaration=True, encoding="utf-8"
        )
    out = sys.stdout.buffer
    out.write(f"HTTP/1.1 {reply.status} {_reason(reply.status)}\r\n".encode())
    out.write(f"Content-Type: {reply.content_type}\r\n\r\n".encode())
    out.write(body)
    if not body.endswith(b"\n"):
        out.write(b"\n")
    if args.commands:
        for command in commands:
            sys.stderr.write(f"command: {_describe(command)}\n")
    return EXIT_OK if reply.status < 300 else EXIT_FAILED


def _describe(command: object) -> str:
    fields = getattr(command, "__dataclass_fields__", {})
    parts = []
    for name in fields:
        value = getattr(command, name)
        if isinstance(value, bytes):
            value = f"<{len(value)} bytes>"
        elif hasattr(value, "token") and hasattr(value, "state"):
            value = f"<job {value.token} {value.state.value}>"
        parts.append(f"{name}={value}")
    return f"{type(command).__name__}({', '.join(parts)})"


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _read_file(name: str) -> bytes:
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror}", EXIT_USAGE) from exc


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "handle",
        help="answer one request with a fresh core (no network)",
        description="Run one SOAP request (FILE or standard input) through a "
        "fresh core and print the HTTP status line, the content type and the "
        "reply body. A file that starts with MIME headers (Content-Type: "
        "multipart/related ...) is read as such.",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="request body (default: stdin)")
    p.add_argument(
        "--content-type",
        metavar="TYPE",
        help="HTTP Content-Type of the request (default: application/soap+xml, or "
        "the file's own MIME headers)",
    )
    p.add_argument("--identity", help="act as this authenticated TLS identity")
    p.add_argument("--pretty", action="store_true", help="indent the reply XML")
    p.add_argument(
        "--commands",
        action="store_true",
        help="also list the commands the core emitted (on stderr)",
    )
    p.set_defaults(func=cmd_handle)
