"""The client commands' connection: :class:`Client` sends requests of both protocols
(WS-DSP, MS-BDSRR) to one server URL and reads its status endpoint."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lxml import etree

from dsc_bindings.console.client import client_ssl_context, get, post
from dsc_bindings.console.output import (
    printable,
)
from dsc_bindings.console.progress import Progress
from dsc_bindings.console.support import EXIT_USAGE, CliError
from dsc_core import client as dc
from dsc_core import names

A = names.Action


class Client:
    """Sends requests of both protocols to one server URL."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.url = args.server
        self.timeout = args.timeout
        self.context = None
        if self.url.startswith("https:"):
            try:
                self.context = client_ssl_context(args.ca, args.cert, args.key)
            except (OSError, ValueError) as exc:
                raise CliError(f"cannot load TLS files: {exc}", EXIT_USAGE) from exc

    def message_id(self) -> str:
        return f"urn:uuid:{uuid.uuid4()}"

    def call(
        self,
        action: str,
        payload: Any,
        *,
        to: str | None = None,
        headers: Sequence[etree._Element] = (),
    ) -> dc.Response:
        body = dc.envelope(
            action, payload, message_id=self.message_id(), to=to or self.url, headers=headers
        )
        return self._send(body, dc.SOAP_XML)

    def status_json(self, query: str = "") -> Any:
        """The server's status endpoint (``GET /status.json``, served beside the SOAP services
        on the same listener): what MS-BDSRR does not carry (devices, destinations)."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        url = f"{parts.scheme}://{parts.netloc}/status.json" + (f"?{query}" if query else "")
        reply = get(url, ssl_context=self.context, timeout=self.timeout)
        if reply.status == 403:
            raise CliError(
                "the server shows its status to scan administrators only (R10); "
                "give --cert/--key of an administrator"
            )
        if reply.status != 200 or not reply.content_type.startswith("application/json"):
            raise CliError(
                f"the server has no status endpoint (GET {url} answered HTTP {reply.status}); "
                "is it a dsc-server of this version?"
            )
        return json.loads(reply.body)

    def _send(
        self, body: bytes | Iterable[bytes], content_type: str, length: int | None = None
    ) -> dc.Response:
        reply = post(
            self.url,
            body,
            content_type=content_type,
            length=length,
            ssl_context=self.context,
            timeout=self.timeout,
        )
        if not reply.content_type.startswith("application/soap+xml"):
            text = printable(reply.body[:300].decode("utf-8", "replace").strip())
            if not text.startswith(str(reply.status)):
                text = f"HTTP {reply.status}: {text}"
            before = " before the upload ended" if reply.early else ""
            raise CliError(f"the server answered{before}: {text}")
        return dc.parse_response(reply.body, reply.status)

    def send_image(
        self, token: str, document_id: int, fmt: str, path: Path, progress: Progress
    ) -> None:
        content_id = f"{uuid.uuid4()}@dsc-scan"
        root = dc.envelope(
            A.DSP_SEND_IMAGE,
            dc.send_image_request(token, document_id, fmt, content_id),
            message_id=self.message_id(),
            to=self.url,
        )
        size = path.stat().st_size
        body = dc.mtom(
            root, content_id, _file_chunks(path, progress), boundary=f"dsc-{uuid.uuid4().hex}"
        )
        self._send(body.chunks(), body.content_type, body.length(size))


def _file_chunks(path: Path, progress: Progress, size: int = 256 * 1024) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            progress.advance(len(chunk))
            yield chunk
