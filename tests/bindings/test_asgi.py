"""The ASGI app (issue 20) under a real uvicorn: identity from a trusted proxy only, mounted
inside a Starlette application, and several workers on one SQLite data folder.

The scan scenarios under uvicorn and hypercorn are in tests/e2e/test_e2e_serve.py (binding
"uvicorn"/"hypercorn"); the app's HTTP rules are the h11 driver's (http/request_rules.py).
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from dsc_bindings.asgi import create_app
from dsc_bindings.http.asgi_identity import ClientIdentity, certificate_der
from e2e_support import ServerProcess, child_env, free_port
from waiting import wait_for

HEADER = "X-SSL-Client-Cert"


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def escaped_certificate(ca: trustme.CA, user: str) -> str:
    """The client certificate as nginx's $ssl_client_escaped_cert passes it."""
    pem = ca.issue_cert("client.example", common_name=user).cert_chain_pems[0].bytes()
    return urllib.parse.quote(pem.decode("ascii"))


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[ServerProcess, trustme.CA]]:
    """uvicorn with the app; its proxy is 127.0.0.1 (where the test's requests come from)."""
    config = tmp_path / "dsc.toml"
    config.write_text(
        f'[server]\ntrusted_proxies = ["127.0.0.1"]\nclient_cert_header = "{HEADER}"\n'
        '[users]\nscan_admins = ["alice"]\n'
    )
    server = ServerProcess(
        tmp_path / "data", binding="uvicorn", config=config, extra=["--no-proxy-headers"]
    ).start()
    try:
        yield server, trustme.CA()
    finally:
        server.stop_cleanly()


def test_a_trusted_proxy_names_the_user(proxied: tuple[ServerProcess, trustme.CA]) -> None:
    server, ca = proxied
    status, _ = get(server.port, "/status.json", {HEADER: escaped_certificate(ca, "alice")})
    assert status == 200
    status, _ = get(server.port, "/status.json", {HEADER: escaped_certificate(ca, "bob")})
    assert status == 403
    status, _ = get(server.port, "/status.json")
    assert status == 403


def test_the_header_of_an_untrusted_peer_is_ignored(tmp_path: Path) -> None:
    config = tmp_path / "dsc.toml"
    config.write_text(
        f'[server]\ntrusted_proxies = ["10.9.9.9"]\nclient_cert_header = "{HEADER}"\n'
        '[users]\nscan_admins = ["alice"]\n'
    )
    server = ServerProcess(tmp_path / "data", binding="uvicorn", config=config).start()
    try:
        ca = trustme.CA()
        status, _ = get(server.port, "/status.json", {HEADER: escaped_certificate(ca, "alice")})
        assert status == 403
        assert "header from a peer that is not in [server] trusted_proxies: ignored" in server.log
    finally:
        server.stop_cleanly()


def test_identity_rules_without_a_server() -> None:
    """The ASGI TLS extension wins; a garbled header is refused, never anonymous."""
    ca = trustme.CA()
    pem = (
        ca.issue_cert("client.example", common_name="carol")
        .cert_chain_pems[0]
        .bytes()
        .decode("ascii")
    )
    identity = ClientIdentity.of(["127.0.0.1"], HEADER)
    tls_scope = {"extensions": {"tls": {"client_cert_chain": [pem]}}, "headers": []}
    assert identity.identify(tls_scope) == ("carol", None)
    garbled = {"client": ("127.0.0.1", 1), "headers": [(HEADER.lower().encode(), b"%%%not")]}
    user, why = identity.identify(garbled)
    assert user is None and why is not None and "cannot be read" in why
    assert certificate_der(b"(null)") is None
    # PEM with its line breaks as spaces (Apache's form) is the same certificate.
    assert certificate_der(pem.replace("\n", " ").encode()) == certificate_der(pem.encode())


def test_what_the_start_built_is_frozen_once_the_app_runs(tmp_path: Path) -> None:
    """The lifespan's start (modules, the store, the restored jobs) ends with ``settle_heap``
    as ``dsc serve``'s does: a full collection would otherwise walk all of it with the loop
    stopped (docs/performance.md, "Tails").  The start runs on a worker thread; the freeze is
    the process's."""
    import asyncio
    import gc

    app = create_app(data_dir=tmp_path / "data", port=5362)

    async def frozen_while_running() -> int:
        async with app.running():
            return gc.get_freeze_count()

    gc.unfreeze()
    try:
        frozen = asyncio.run(frozen_while_running())
    finally:
        gc.unfreeze()
    assert frozen > 1000, frozen  # the service's start-up, not a handful of objects


def test_mounted_inside_starlette(tmp_path: Path) -> None:
    dsc = create_app(data_dir=tmp_path / "data")

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("host application")

    host = Starlette(
        routes=[Route("/", home), Mount("/scan", app=dsc)],
        lifespan=lambda app: dsc.running(),
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(host, host="127.0.0.1", port=port, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20, "uvicorn to start")
        assert get(port, "/") == (200, b"host application")
        assert get(port, "/scan/healthz") == (200, b"ok\n")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request(
            "POST", "/scan/ScanServer", body=b"x", headers={"Content-Type": "text/plain"}
        )
        response = connection.getresponse()
        assert response.status == 415, response.read()
        connection.close()
    finally:
        server.should_exit = True
        thread.join(20)
    assert not thread.is_alive()


def test_a_second_worker_on_one_sqlite_folder_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**child_env(), "DSC_DATA": str(data)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "dsc_bindings.asgi:create_app",
            "--port",
            str(free_port()),
            "--workers",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = run.stdout + run.stderr
    reasons = [line for line in log.splitlines() if line.startswith("ERROR:    cannot start")]
    assert len(reasons) == 1, log
    assert "is in use by another job store" in reasons[0], log
    assert "One process serves a data folder with the SQLite store: run one worker" in reasons[0]
    assert 'use [store] kind = "postgresql"' in reasons[0], log
    assert "failed to start, stopping the parent process" in log, log
    # Nothing was corrupted: the store the first worker opened is intact and opens again.
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]);"
            "print(c.execute('pragma integrity_check').fetchone()[0])",
            str(data / "jobs.sqlite3"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.stdout.strip() == "ok", check


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_stalled_body_is_answered_408(tmp_path: Path, backend: str) -> None:
    """R12's body timeout in the app (asyncio.timeout on asyncio, a cancel scope on trio): a
    body that stops arriving is answered 408, and its exchange is aborted (a new request on
    the same app is still answered)."""
    import anyio

    config = tmp_path / "dsc.toml"
    config.write_text("[limits]\nbody_timeout = 0.2\n")
    app = create_app(config, data_dir=tmp_path / "data", port=5362)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/ScanServer",
        "raw_path": b"/ScanServer",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/soap+xml; charset=utf-8"),
            (b"content-length", b"1000"),
        ],
        "client": ("127.0.0.1", 40000),
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }

    async def main() -> list[int]:
        statuses: list[int] = []
        stalled = anyio.Event()

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(int(str(message["status"])))

        async def stall_after_one_piece() -> dict[str, object]:
            if not stalled.is_set():
                stalled.set()
                return {"type": "http.request", "body": b"<s:Envelope", "more_body": True}
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        async def nothing() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async with app.running():
            await app(scope, stall_after_one_piece, send)  # type: ignore[arg-type]
            get = {**scope, "method": "GET", "path": "/healthz", "raw_path": b"/healthz"}
            await app(get, nothing, send)  # type: ignore[arg-type]
        return statuses

    assert anyio.run(main, backend=backend) == [408, 200]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_body_whose_pieces_wait_is_answered(tmp_path: Path, backend: str) -> None:
    """A body at once (no timer: ``receive`` is stepped by hand) and a body whose pieces each
    come after the app waited for them (the rest of ``receive`` runs under the body timeout)
    get the same answer: the operation's response."""
    import anyio

    from dsc_core import client as dc
    from dsc_core import names

    body = dc.envelope(
        names.Action.DSC_GET_REPOSITORY_ELEMENTS,
        dc.repository_elements_request(["RepositoryStatus"]),
        message_id="urn:uuid:6f1e1c9e-1d55-4c5e-9a52-8d1b1a1f6a01",
    )
    app = create_app(data_dir=tmp_path / "data", port=5362)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/ScanServer",
        "raw_path": b"/ScanServer",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/soap+xml; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }

    async def answer(pieces: list[bytes], wait: bool) -> tuple[int, bytes]:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        async def receive() -> dict[str, object]:
            if wait:
                await anyio.sleep(0.01)  # the app waits for this piece
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

        await app(scope, receive, send)  # type: ignore[arg-type]
        return int(str(sent[0]["status"])), bytes(sent[1]["body"])  # type: ignore[arg-type]

    async def main() -> list[tuple[int, bytes]]:
        async with app.running():
            return [
                await answer([body], wait=False),
                await answer([body[:100], body[100:300], body[300:]], wait=True),
            ]

    for status, reply in anyio.run(main, backend=backend):
        assert status == 200, reply
        assert dc.parse_response(reply).action.endswith("GetRepositoryElementsResponse"), reply
