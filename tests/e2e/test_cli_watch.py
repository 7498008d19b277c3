"""``dsc watch`` honest about what it receives, against a real ``dsc serve``: it listens on
loopback by default, says so (exit 1) when the server cannot reach the address it advertised
(the subscription ends unseen, or jobs change and no event arrives), ignores notifications that
are not for its subscription, and prints no control characters."""

from __future__ import annotations

import http.client
import os
import signal
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from dsc_bindings.console.watch import WATCH_KEY, describe, line_of
from e2e_support import ServerProcess, dsc, free_port, serving
from test_cli_client import Watch

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(2000)
FORGED = b"""<?xml version="1.0"?>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"
  xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing"
  xmlns:d="http://schemas.microsoft.com/windows/2006/08/wdp/scan/distributedscan/configuration">
 <s:Header>
  <a:Action>http://schemas.microsoft.com/windows/2006/08/wdp/scan/distributedscan/configuration/RepositoryStatusSummaryEvent</a:Action>
  KEY
 </s:Header>
 <s:Body><d:RepositoryStatusSummaryEvent><d:RepositoryStatus>
  <d:RepositoryState>Idle&#x9b;2J&#10;12:00:00  job ended&#x202e;</d:RepositoryState>
 </d:RepositoryStatus></d:RepositoryStatusSummaryEvent></s:Body>
</s:Envelope>"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(ServerProcess(tmp_path_factory.mktemp("watch") / "data")) as server:
        yield server


@pytest.fixture
def page(tmp_path: Path) -> Path:
    path = tmp_path / "page.png"
    path.write_bytes(PNG)
    return path


def listening_addresses(port: int) -> set[str]:
    """The local addresses a socket listens on at ``port`` (Linux /proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_watch_listens_on_loopback_by_default(server: ServerProcess) -> None:
    watch = Watch(server)
    try:
        assert watch.callback.startswith("http://127.0.0.1:"), watch.callback
        port = int(watch.callback.rsplit(":", 1)[1])
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        watch.proc.send_signal(signal.SIGINT)
        assert watch.proc.wait(20) == 0
    finally:
        watch.close()


def test_an_unreachable_callback_is_reported_with_its_address(
    server: ServerProcess, page: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    watch = Watch(server, "--callback", nowhere, "--check-every", "0.3")
    try:
        for _ in range(2):  # each scan is several events: three failed deliveries end it
            assert dsc("scan", "--server", server.url, "-q", str(page)).code == 0
            if watch.proc.poll() is not None:
                break
        assert watch.proc.wait(30) == 1
        said = watch.err.next()
        assert said == (
            "dsc: the server ended this watch's subscription without a word here: it could not "
            f"deliver events to {nowhere}/events (the address this watch advertised); make that "
            "address reachable from the server, or give --listen ADDR:PORT (and --callback URL "
            "behind NAT)"
        ), said
    finally:
        watch.close()


def test_jobs_that_change_without_events_are_reported(server: ServerProcess, page: Path) -> None:
    # A callback that accepts connections and never answers: every delivery waits for its
    # answer timeout, the subscription lives on, and no event arrives.
    black_hole = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        url = f"http://127.0.0.1:{black_hole.getsockname()[1]}"
        watch = Watch(server, "--callback", url, "--check-every", "0.3")
        try:
            assert dsc("scan", "--server", server.url, "-q", str(page)).code == 0
            said = watch.err.next()
            assert said.startswith(
                "dsc: warning: jobs changed on the server but no event arrived"
            ), said
            assert f"the server may not reach {url}/events" in said, said
            watch.proc.send_signal(signal.SIGINT)
            watch.proc.wait(30)
        finally:
            watch.close()
    finally:
        black_hole.close()


def test_foreign_notifications_are_ignored_and_nothing_unescaped_is_printed(
    server: ServerProcess, page: Path
) -> None:
    watch = Watch(server)
    try:
        host, port = watch.callback.removeprefix("http://").rsplit(":", 1)
        for body in (FORGED.replace(b"KEY", b""), b"not xml at all \x1b[2J"):
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request(
                "POST", "/events", body=body, headers={"Content-Type": "application/soap+xml"}
            )
            assert conn.getresponse().status == 202
            conn.close()
        token = dsc("scan", "--server", server.url, "-q", "--json", str(page)).json()["token"]
        lines = []
        while not lines or "job ended" not in lines[-1]:
            lines.append(watch.out.next())
            assert lines[-1], "dsc watch ended early"
        # Only the server's events, the first about the scan's job: the forged ones never showed.
        assert "Idle" not in "\n".join(lines)
        assert f"job {token[:8]}" in lines[0], lines
        watch.proc.send_signal(signal.SIGINT)
        assert watch.proc.wait(20) == 0
    finally:
        watch.close()


def test_a_notification_line_escapes_control_characters() -> None:
    key = f'<w:Watch xmlns:w="{WATCH_KEY[1:].split("}")[0]}">k</w:Watch>'.encode()
    fields = describe(FORGED.replace(b"KEY", key))
    assert fields["watch_key"] == "k"
    line = line_of(fields, datetime.now().astimezone())
    assert line.isprintable(), line
    # XML 1.0 keeps C0 controls out, but a C1 CSI (U+009B), a newline that would forge a
    # second line and a right-to-left override get through: all escaped.
    assert line.endswith(r"repository Idle\x9b2J\n12:00:00  job ended\u202e"), line
