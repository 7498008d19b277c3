"""Attack tests of issue 8 against the real ``dsc serve`` over real sockets.

Each test plays an attacker and, at the same time, a legitimate client, and asserts both the
answer the attacker gets and that the legitimate client was served as usual.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from lxml import etree

from core_support import subscribe_body
from dsc_core import client as dc
from dsc_core import names
from dsc_core.model import EmailInstructions, FileShareInstructions, SharePointInstructions
from e2e_support import Relay, ServerProcess, Soap, free_port, started_servers
from test_filters_support import Listener, UploadServer
from waiting import wait_for

BINDINGS = ["async", "blocking"]
A = names.Action


@pytest.fixture
def servers() -> Iterator[Callable[..., ServerProcess]]:
    with started_servers() as keep:
        yield lambda data, **kwargs: keep(ServerProcess(data, **kwargs))


def concurrently(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads at the same time; re-raise the first failure."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def scan(client: Soap, instructions: list[Any], image: bytes, user: str | None = None) -> Any:
    token = client.create(instructions, **({"user": user} if user else {}))
    client.send_image(token, 1, image)
    client.end(token)
    return client.wait_ended(token, 30)


def scan_as_device(client: Soap, instructions: list[Any], image: bytes) -> Any:
    """Like :func:`scan`, watching the job over WS-DSP only (a non-administrator's view)."""
    token = client.create(instructions)
    client.send_image(token, 1, image)
    client.end(token)
    return client.wait_state(token, "Completed", 30)


# --- 1. SharePoint credentials and e-mail recipients (R13) -------------------------------------


@pytest.mark.parametrize("binding", BINDINGS)
def test_credentials_only_go_to_configured_sites(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    ca = trustme.CA()
    site_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(site_tls)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    evil = Listener()
    relay = Relay()
    smtp = Controller(relay, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        with UploadServer(tls=site_tls) as site:
            config = tmp_path / "dsc.toml"
            config.write_text(
                "[sharepoint]\n"
                'username = "svc-scan"\npassword = "s3cret"\n'
                f'ca_file = "{ca_file}"\n'
                f'sites = ["{site.url("/sites/scans")}"]\n'
                "[smtp]\n"
                f'host = "127.0.0.1"\nport = {smtp.port}\nfrom = "scans@corp.example"\n'
                'allowed_domains = ["corp.example"]\n'
            )
            server = servers(tmp_path / "data", binding=binding, config=config)
            client = Soap(server.url)
            legit_image, stolen = os.urandom(40_000), os.urandom(40_000)
            downgrade = site.url("/sites/scans").replace("https://", "http://")
            legit, to_evil, to_http, by_mail, legit_mail = concurrently(
                lambda: scan(
                    client,
                    [SharePointInstructions(False, (site.url("/sites/scans/Team"),))],
                    legit_image,
                ),
                lambda: scan(
                    client, [SharePointInstructions(False, (evil.url("/sites/scans"),))], stolen
                ),
                # The configured host and port, but plain http: the password would be readable.
                lambda: scan(client, [SharePointInstructions(False, (downgrade,))], stolen),
                lambda: scan(client, [EmailInstructions(False, ("thief@evil.example",))], stolen),
                lambda: scan(
                    client, [EmailInstructions(False, ("ann@corp.example",))], legit_image
                ),
            )
            server.stop_cleanly()
        # The attacker's jobs: refused with the R9 reasons, nothing sent anywhere.
        for refused in (to_evil, to_http):
            assert refused.state == "Aborted", refused
            assert [(f.state, f.reasons) for f in refused.filters] == [
                ("Canceled", ("SharePointAccessDenied",))
            ]
        assert evil.connections == 0 and evil.received == b""
        assert [(f.state, f.reasons) for f in by_mail.filters] == [
            ("CompletedWithErrors", ("UnableToSendEmail",))
        ]
        assert "SharePoint site http://127.0.0.1" in server.log and "refused" in server.log
        # The legitimate jobs at the same time: delivered, with the credentials, over https.
        assert legit.state == "Completed", legit
        assert site.stored == {"/sites/scans/Team/scan_0001.png": legit_image}
        auth = site.headers["/sites/scans/Team/scan_0001.png"]["Authorization"]
        assert auth == "Basic c3ZjLXNjYW46czNjcmV0"  # svc-scan:s3cret
        assert legit_mail.state == "Completed", legit_mail
        assert [rcpt for _, rcpt, _ in relay.messages] == [["ann@corp.example"]]
    finally:
        evil.close()
        smtp.stop()


# --- 6. spool hygiene --------------------------------------------------------------------------


def spool_folders(data: Path) -> set[str]:
    spool = data / "spool"
    return {p.name for p in spool.iterdir()} if spool.exists() else set()


@pytest.mark.parametrize("binding", BINDINGS)
def test_spool_does_not_grow_with_history(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    """A client filling the disk through the history: scans that complete or are canceled leave
    nothing in the spool; a failed job keeps its documents for the retention, then they go."""
    config = tmp_path / "dsc.toml"
    config.write_text("[jobs]\nspool_retention_seconds = 3\n")
    server = servers(tmp_path / "data", binding=binding, config=config)
    client = Soap(server.url)
    share = [FileShareInstructions((r"\\localhost\scans",))]

    def flood() -> list[str]:
        tokens = []
        for n in range(12):
            token = client.create(share, root_name=f"flood{n}")
            client.send_image(token, 1, os.urandom(100_000))
            if n % 2:
                client.dsc_cancel(token)
            else:
                client.end(token)
            tokens.append(token)
        for token in tokens:
            client.wait_ended(token, 30)
        return tokens

    def failing() -> Any:
        # A share path the server refuses (R9): the job fails and may be re-run later.
        return scan(client, [FileShareInstructions((r"\\localhost\..\etc",))], b"kept page")

    tokens, failed = concurrently(flood, failing)
    legit = scan(client, share, b"legit page")
    assert legit.state == "Completed", legit
    assert failed.state == "Aborted", failed
    assert [(f.state, f.reasons) for f in failed.filters] == [
        ("Canceled", ("FileShareAccessDenied",))
    ]
    # 14 jobs in the history; only the failed one still has a spool folder (or none at all once
    # its 3 s retention has passed on a slow machine).
    assert len(client.history()) == 14
    # A job is seen ended once the core has ended it; its documents go right after, on the
    # writer thread (runtime/writer.py: DiscardDocuments follows the job's record).
    wait_for(
        lambda: spool_folders(server.data) <= {failed.token},
        10,
        "the completed and canceled jobs' documents to go",
    )
    assert not set(tokens) & spool_folders(server.data)
    wait_for(lambda: not spool_folders(server.data), 15, "the failed job's retention to pass")
    delivered = tmp_path / "data" / "shares" / "localhost" / "scans"
    assert len([p for p in delivered.rglob("flood*")]) == 6  # the six that were not canceled
    server.stop_cleanly()


# --- 7. configuration checked when it is loaded ------------------------------------------------


def _bad_invocations(tmp_path: Path) -> list[tuple[list[str], str]]:
    def config(name: str, text: str) -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        return str(path)

    key = tmp_path / "server.key"
    key.write_text("not used")
    a_file = tmp_path / "a-file"
    a_file.write_text("in the way")
    return [
        (["--config", config("port", "[server]\nport = 99999\n")], "[server] port must be"),
        (["--port", "65536"], "--port must be from 0 to 65535"),
        (["--config", config("hist", '[jobs]\nhistory_size = "x"\n')], "[jobs] history_size"),
        (["--config", config("size", "[limits]\nmax_image_bytes = -1\n")], "max_image_bytes"),
        (["--config", config("tmo", "[jobs]\ntimeout_seconds = 0\n")], "[jobs] timeout_seconds"),
        (["--config", config("tls", "[smtp]\nstarttls = 1\n")], "[smtp] starttls"),
        (["--tls-key", str(key)], "without a certificate: give the server certificate"),
        (["--tls-cert", str(tmp_path / "none.pem")], "none.pem: no such file"),
        (["--data", str(a_file)], "is a file, not a directory"),
        # Not creatable for anyone, root included (sysfs refuses new directories).
        (["--data", "/sys/dsc-data"], "cannot create the data directory /sys/dsc-data"),
    ]


def test_bad_configuration_is_one_line_and_exit_2(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    from e2e_support import dsc

    server = servers(tmp_path / "good")
    client = Soap(server.url)
    for args, message in _bad_invocations(tmp_path):
        # --port 0 so that a case that wrongly starts does not take 5362 (not for port cases).
        port = [] if "port" in " ".join(args) else ["--port", "0"]
        run = dsc("serve", *port, "--data", str(tmp_path / "data"), *args, timeout=60)
        assert run.code == 2, (args, run)
        assert "Traceback" not in run.err + run.out, (args, run)
        lines = run.err.strip().splitlines()
        assert len(lines) == 1, (args, run.err)
        assert message in lines[0], (args, lines[0])
        assert "listening" not in run.out + run.err
        # The server that was configured properly serves a scan meanwhile.
        done = scan(client, [FileShareInstructions((r"\\localhost\scans",))], b"page")
        assert done.state == "Completed", done
    server.stop_cleanly()


# --- 2. R10 on eventing ------------------------------------------------------------------------


class EventSink:
    """An HTTP server that keeps every notification body POSTed to it."""

    def __init__(self) -> None:
        import http.server

        self.bodies: list[bytes] = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                sink.bodies.append(self.rfile.read(length))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def tokens(self) -> set[str]:
        found = set()
        for body in self.bodies:
            root = etree.fromstring(body)
            found |= {t.strip() for t in root.xpath("//*[local-name()='JobToken']/text()")}
        return found

    def ended(self) -> set[str]:
        """Tokens of the jobs a PostScanJobEndStateEvent (either namespace) announced."""
        found = set()
        for body in self.bodies:
            root = etree.fromstring(body)
            if root.xpath("//*[local-name()='PostScanJobEndStateEvent']"):
                found |= {t.strip() for t in root.xpath("//*[local-name()='JobToken']/text()")}
        return found

    def actions(self) -> set[str]:
        return {
            str(a).strip()
            for body in self.bodies
            for a in etree.fromstring(body).xpath("//*[local-name()='Action']/text()")
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def service_urls(server: ServerProcess) -> tuple[str, str]:
    """The WS-DSP and MS-BDSRR addresses from the start-up log."""
    dsp = re.search(r"WS-DSP \(scanners\): +(\S+)", server.log)
    dsc = re.search(r"MS-BDSRR \(management\): +(\S+)", server.log)
    assert dsp and dsc, server.log
    return dsp.group(1), dsc.group(1)


def eventing(client: Soap, to: str, action: str, body: str, identifier: str = "") -> Any:
    """A WS-Eventing request; returns the parsed response, or the ClientFault it raised."""
    from core_support import soap

    headers = f"<wse:Identifier>{identifier}</wse:Identifier>" if identifier else ""
    status, _, reply = client.post(
        soap(body, action, to=to, headers=headers, message_id=f"urn:uuid:{uuid.uuid4()}")
    )
    try:
        return dc.parse_response(reply, status)
    except dc.ClientFault as fault:
        return fault


def subscribe_to(client: Soap, to: str, sink: EventSink) -> str:
    response = eventing(client, to, A.SUBSCRIBE, subscribe_body(sink.url, end_to=None))
    assert not isinstance(response, Exception), response
    ids = response.payload.xpath("//*[local-name()='Identifier']/text()")
    return str(ids[0]).strip()


@pytest.mark.parametrize("binding", BINDINGS)
def test_events_follow_r10(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    from test_e2e_serve import Pki

    pki = Pki(tmp_path / "pki")
    config = tmp_path / "dsc.toml"
    config.write_text('[users]\nscan_admins = ["admin"]\n')
    server = servers(
        tmp_path / "data",
        binding=binding,
        config=config,
        tls=(pki.server_cert, pki.server_key),
        client_ca=pki.ca_pem,
    )
    dsp_url, dsc_url = service_urls(server)
    alice, bob, admin = (Soap(server.url, pki.context(u)) for u in ("alice", "bob", "admin"))
    sinks = {name: EventSink() for name in ("alice", "bob", "admin", "alice-any")}
    try:
        # MS-BDSRR events need a scan administrator (R13: Subscribe, and the manager ops).
        refused = eventing(alice, dsc_url, A.SUBSCRIBE, subscribe_body(sinks["alice"].url))
        assert isinstance(refused, dc.ClientFault), refused
        assert refused.subcode.endswith("ClientErrorCurrentUserNotScanAdmin"), refused
        admin_sub = subscribe_to(admin, dsc_url, sinks["admin"])
        for action, body in (
            (A.GET_STATUS, "<wse:GetStatus/>"),
            (A.UNSUBSCRIBE, "<wse:Unsubscribe/>"),
        ):
            fault = eventing(alice, dsc_url, action, body, admin_sub)
            assert isinstance(fault, dc.ClientFault), fault
            assert fault.subcode.endswith("ClientErrorCurrentUserNotScanAdmin"), fault
        # WS-DSP subscriptions of non-administrators: their own jobs' events only.
        alice_sub = subscribe_to(alice, dsp_url, sinks["alice"])
        subscribe_to(bob, dsp_url, sinks["bob"])
        # No service named and no filter: what a non-administrator may have (WS-DSP).
        subscribe_to(alice, server.url, sinks["alice-any"])
        # Bob cannot see or end Alice's subscription: as unknown as a job of another user.
        fault = eventing(bob, dsp_url, A.UNSUBSCRIBE, "<wse:Unsubscribe/>", alice_sub)
        assert isinstance(fault, dc.ClientFault) and "InvalidMessage" in fault.subcode, fault

        share = [FileShareInstructions((r"\\localhost\scans",))]
        a_job, b_job = concurrently(
            lambda: scan_as_device(alice, share, b"alice's page"),
            lambda: scan_as_device(bob, share, b"bob's page"),
        )
        assert a_job.state == b_job.state == "Completed"
        # Each subscriber has heard the end of the jobs it may hear of (deliveries are
        # asynchronous: wait for the last event, then compare).
        for name, tokens in (
            ("admin", {a_job.token, b_job.token}),
            ("alice", {a_job.token}),
            ("bob", {b_job.token}),
            ("alice-any", {a_job.token}),
        ):
            wait_for(lambda n=name, t=tokens: t <= sinks[n].ended(), 30, f"{name}'s end events")
        assert sinks["alice"].tokens() == sinks["alice-any"].tokens() == {a_job.token}
        assert sinks["bob"].tokens() == {b_job.token}
        # And no MS-BDSRR event (repository state, the dsc actions) reached a non-admin.
        for name in ("alice", "bob", "alice-any"):
            assert sinks[name].actions() <= {A.DSP_JOB_STATUS_EVENT, A.DSP_JOB_END_STATE_EVENT}
        assert A.DSC_JOB_END_STATE_EVENT in sinks["admin"].actions()
        server.stop_cleanly()
    finally:
        for sink in sinks.values():
            sink.close()


# --- 3. one client cannot hold every job slot ------------------------------------------------


class SoapFrom(Soap):
    """A client whose connections come from a given loopback address (127.0.0.0/8)."""

    def __init__(self, url: str, source: str) -> None:
        super().__init__(url)
        self.source = source

    def connection(self) -> Any:
        import http.client

        return http.client.HTTPConnection(
            self.host, self.port, timeout=self.timeout, source_address=(self.source, 0)
        )


@pytest.mark.parametrize("binding", BINDINGS)
def test_creating_jobs_are_limited_per_client(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    config = tmp_path / "dsc.toml"
    config.write_text("[limits]\nmax_creating_jobs_per_user = 3\n")
    server = servers(tmp_path / "data", binding=binding, config=config)
    greedy, other = SoapFrom(server.url, "127.0.0.1"), SoapFrom(server.url, "127.0.0.2")
    share = [FileShareInstructions((r"\\localhost\scans",))]
    held = [greedy.create(share) for _ in range(3)]
    with pytest.raises(dc.ClientFault) as refused:
        greedy.create(share)
    assert refused.value.subcode.endswith("ServerErrorTemporaryError"), refused.value
    # The second scanner, while the first is at its limit, is served as usual.
    view = scan(other, share, b"second scanner's page")
    assert view.state == "Completed", view
    # When one of its jobs ends, the first scanner may create again (the fault said: retry).
    greedy.end(held[0])
    greedy.wait_ended(held[0], 30)
    assert greedy.create(share)
    assert "ServerErrorTemporaryError" in server.log  # the refusal is logged
    server.stop_cleanly()


# --- 4. HTTP framing --------------------------------------------------------------------------


def _read_until_closed(sock: Any, limit: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``limit``)."""
    sock.settimeout(limit)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("binding", BINDINGS)
def test_http_framing_edge_cases(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    import socket

    server = servers(tmp_path / "data", binding=binding)
    legit = Soap(server.url)
    body = legit.envelope(A.DSC_GET_ACTIVE_JOBS, dc.empty_request("GetActiveJobsRequest"))
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    smuggled = (
        b"POST /ScanServer HTTP/1.1\r\nHost: x\r\nContent-Type: application/soap+xml\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )

    # Both Transfer-Encoding and Content-Length: answered (by Transfer-Encoding alone), then
    # the connection is closed, so the request behind it is never read (RFC 9112 6.1).
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /ScanServer HTTP/1.1\r\nHost: x\r\nContent-Type: application/soap+xml\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + chunked + smuggled
        )
        answer = _read_until_closed(sock)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert b"\r\nconnection: close" in head.lower()
    assert b"GetActiveJobsResponse" in rest
    assert answer.count(b"HTTP/1.1 ") == 1, "the request behind it was answered"

    # A Content-Length of 20 or more digits is 413 like any other over-limit length.
    for digits in (20, 21, 40):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /ScanServer HTTP/1.1\r\nHost: x\r\nContent-Type: application/soap+xml\r\n"
                + b"Content-Length: "
                + b"9" * digits
                + b"\r\n\r\n"
                + body
            )
            answer = _read_until_closed(sock)
        assert answer.startswith(b"HTTP/1.1 413 "), (digits, answer[:300])
        assert answer.count(b"HTTP/1.1 ") == 1
    # A legitimate client on its own connections meanwhile: served as usual.
    assert legit.active() == []
    assert "connection is closed (RFC 9112 6.1)" in server.log
    server.stop_cleanly()
