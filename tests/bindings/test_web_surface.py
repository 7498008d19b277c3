"""The HTTP surface of issue 14 over real sockets, on both bindings: requests that are not SOAP
get 415, requests a browser marks as cross-site get 403 (and change nothing), the web
endpoints send their security headers, and HEAD works on every GET endpoint."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import pytest

from dsc_core import client as C
from dsc_core import names
from test_http_bindings import (
    Raw,
    create_job,
    repository_request,
    running,
    soap,
    subscribe_request,
)

A = names.Action
GET_PATHS = [
    "/",
    "/status",
    "/status.json",
    "/metrics",
    "/healthz",
    "/console.js",
    "/console.css",
    "/dom.js",
]


@pytest.fixture(params=["async", "blocking"])
def binding(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- 415: only SOAP and MTOM ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain;charset=UTF-8",  # fetch(..., {mode: "no-cors", body: "..."})
        "application/x-www-form-urlencoded",  # an HTML form
        "multipart/form-data; boundary=x",  # an HTML form with a file
        "multipart/related; boundary=x",  # MTOM without its XOP type
        None,
    ],
)
def test_415_for_a_request_that_is_not_soap(
    binding: str, tmp_path: Path, content_type: str | None
) -> None:
    body = repository_request()
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        headers = [("Content-Length", str(len(body)))]
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        client.send(client.head(headers=headers) + body)
        reply = client.read_response()
        assert reply.status == 415, reply
        assert reply.headers["content-type"].startswith("text/plain")
        assert b"application/" in reply.body  # says what to send
        assert reply.headers["connection"] == "close"  # its body was not read
        assert client.closed_by_server(30)
        client.close()
        # The same request as SOAP is answered (and the refusals were counted).
        assert Raw(srv.port).post(body).status == 200
        refused = srv.service.observer.metrics.registry.get_sample_value(
            "dsc_http_refusals_total", {"status": "415"}
        )
        assert refused == 1


def test_soap_and_mtom_media_types_are_accepted(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        for content_type in (
            "application/soap+xml",
            'Application/SOAP+XML; charset="utf-8"; action="x"',
        ):
            assert client.post(repository_request(), content_type).status == 200
        token = create_job(client)
        root = soap(A.DSP_SEND_IMAGE, C.send_image_request(token, 1, "jfif", "img@x"))
        mtom = C.mtom(root, "img@x", [b"\xff\xd8" + b"x" * 1000], boundary="b0und")
        folded = mtom.content_type.replace("; ", ";\r\n ").replace('"application/xop+xml"', "A")
        # The hardware-docs example folds the header and writes the type unquoted (R8).
        folded = folded.replace("A", "Application/XOP+xml")
        reply = client.post(b"".join(mtom.chunks()), folded)
        assert reply.status == 200, reply.body
        client.close()


def test_a_soap11_request_gets_the_soap11_version_mismatch(binding: str, tmp_path: Path) -> None:
    """text/xml is SOAP 1.1's type: it is not refused with 415 but reaches the core, which
    answers with the SOAP/1.1 VersionMismatch and the 1.2 Upgrade header (SOAP 1.2 Part 1
    Appendix A), the answer that tells a SOAP 1.1 client what to do."""
    envelope = (
        b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        b"<s:Body><x/></s:Body></s:Envelope>"
    )
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        reply = client.post(envelope, "text/xml; charset=utf-8")
        assert reply.status == 500, reply
        assert reply.headers["content-type"].startswith("text/xml")
        assert b"VersionMismatch" in reply.body and b"Upgrade" in reply.body
        client.close()


# --- 403: what a browser marks as cross-site ----------------------------------------------------


@pytest.mark.parametrize(
    "marks",
    [
        [("Sec-Fetch-Site", "cross-site")],
        [("Sec-Fetch-Site", "same-site")],
        [("Origin", "http://127.0.0.2:8000")],
        [("Origin", "null")],
        # A DNS-rebinding page: its name points at the server, Host and Origin agree.
        [("Origin", "http://attacker.example:5362"), ("Sec-Fetch-Site", "same-origin")],
    ],
)
def test_403_for_a_request_a_browser_marks_cross_site(
    binding: str, tmp_path: Path, marks: list[tuple[str, str]]
) -> None:
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        body = soap(A.SUBSCRIBE, subscribe_request("http://127.0.0.2:9"), to=srv.config.dsc_url)
        reply = client.post(body, extra=marks)
        assert reply.status == 403, reply
        assert b"not accept" in reply.body
        assert srv.service.server.subscriptions.by_id == {}  # nothing subscribed
        client.close()
        for path in GET_PATHS:  # the web endpoints too
            client = Raw(srv.port)
            client.send(client.head("GET", path, marks))
            assert client.read_response().status == 403
            client.close()


def test_requests_of_the_servers_own_pages_and_of_clients_pass(
    binding: str, tmp_path: Path
) -> None:
    with running(binding, tmp_path) as srv:
        own = srv.config.base_url
        client = Raw(srv.port)
        for marks in (
            [],  # scanners and management clients send none of these
            [("Sec-Fetch-Site", "same-origin"), ("Origin", own)],
            [("Sec-Fetch-Site", "none")],  # typed into the address bar
            [("Origin", own.upper().replace("HTTP://", "http://"))],
        ):
            assert client.post(repository_request(), extra=marks).status == 200, marks
        client.close()


# --- headers of the web endpoints, and HEAD ------------------------------------------------------


def test_web_endpoints_send_security_headers(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        for path in GET_PATHS:
            client.send(client.head("GET", path))
            reply = client.read_response()
            assert reply.status == 200, path
            assert reply.headers["x-frame-options"] == "DENY"
            assert reply.headers["x-content-type-options"] == "nosniff"
            assert reply.headers["referrer-policy"] == "no-referrer"
            policy = reply.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
            assert "unsafe-inline" not in policy
            if path == "/status":
                page = reply.body.decode()
        # The page's one inline script is allowed by its hash, and nothing else is but the
        # web console's own files ('self': .webconsole.page).
        scripts = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
        assert len(scripts) == 1
        digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
        script_src = re.search(r"script-src ([^;]*)", policy)
        assert script_src is not None and script_src.group(1) == f"'self' 'sha256-{digest}'"
        client.close()


def test_head_on_every_get_endpoint(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        client = Raw(srv.port)
        for path in GET_PATHS:
            client.send(client.head("GET", path))
            got = client.read_response()
            client.send(client.head("HEAD", path))
            # A HEAD answer has the GET answer's head and no body: read only the head.
            while b"\r\n\r\n" not in client.buffer:
                assert client._fill(), "closed before the HEAD answer"
            head, client.buffer = client.buffer.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200 "), head
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (line.partition(":") for line in head.decode().split("\r\n")[1:])
            )
            assert fields["content-type"] == got.headers["content-type"]
            assert fields["x-frame-options"] == "DENY"
            if path != "/status.json":  # its body holds the time: its length may change
                assert fields["content-length"] == got.headers["content-length"]
            assert client.buffer == b""
        # The connection is still in step: the next request is answered.
        assert client.post(repository_request()).status == 200
        # HEAD elsewhere is refused like any method but POST, also without a body.
        client.send(client.head("HEAD", "/ScanServer"))
        while b"\r\n\r\n" not in client.buffer:
            assert client._fill()
        head, client.buffer = client.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 405 ")
        assert client.post(repository_request()).status == 200
        client.close()
