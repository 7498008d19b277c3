"""/healthz checks what a scan needs (issue 14, section 2), over real sockets on both bindings:
share roots, the job store (``PRAGMA quick_check``), the SMTP relay and the directory when
configured; ``ok``, ``degraded`` (200) or ``down`` (503) naming each failing check; the same
checks logged at start."""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import socket
import sqlite3
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from prometheus_client.parser import text_string_to_metric_families

from dsc_bindings.directory.ldap import Directory, DirectorySettings
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.observe.health import HealthMonitor, Probe, run_probes, writable_directory
from dsc_bindings.observe.probes import health_probes
from dsc_bindings.serve import compose
from dsc_bindings.store.sqlite import JobStore
from dsc_core import ServerConfig
from e2e_support import Relay, ServerProcess, free_port
from samba_support import SambaDC, _free_loopback_address
from test_directory import settings as directory_settings
from test_e2e_serve import Pki
from test_http_bindings import Raw, running


@pytest.fixture(params=["async", "blocking"])
def binding(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def healthz(port: int) -> tuple[int, str]:
    client = Raw(port)
    client.send(client.head("GET", "/healthz"))
    reply = client.read_response()
    client.close()
    return reply.status, reply.body.decode()


def get(port: int, path: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    """GET over a new connection (HTTPS with ``context``); status and body."""
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        if context is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    )
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    finally:
        conn.close()


def health_gauges(port: int, context: ssl.SSLContext | None = None) -> tuple[str, dict[str, float]]:
    """The health gauges of /metrics: the one state whose ``dsc_health_state`` is 1, and each
    check's ``dsc_health_check_ok``."""
    status, body = get(port, "/metrics", context)
    assert status == 200, body
    states: list[str] = []
    checks: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "dsc_health_state":
                assert sample.value in (0.0, 1.0), sample
                if sample.value == 1.0:
                    states.append(sample.labels["state"])
            elif sample.name == "dsc_health_check_ok":
                checks[sample.labels["check"]] = sample.value
    assert len(states) == 1, body  # exactly one state is the current one
    return states[0], checks


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ok_when_everything_a_scan_needs_is_there(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        assert healthz(srv.port) == (200, "ok\n")


def test_down_names_every_failing_check(binding: str, tmp_path: Path) -> None:
    shares = tmp_path / "shares"
    shares.mkdir()
    settings = FilterSettings(
        share_roots=((r"\\files\scans", shares), (r"\\files\gone", tmp_path / "gone")),
        smtp_host="127.0.0.1",
        smtp_port=closed_port(),
        smtp_configured=True,
    )
    with running(binding, tmp_path, filters=settings) as srv:
        status, body = healthz(srv.port)
        assert status == 503
        lines = body.splitlines()
        assert lines[0] == "down"
        gone = [line for line in lines if line.startswith("share \\\\files\\gone: ")]
        assert len(gone) == 1 and "does not exist" in gone[0], lines
        assert any(line.startswith("smtp: relay 127.0.0.1:") for line in lines), lines
        assert not any(r"\\files\scans" in line for line in lines)  # it passed
        # The missing share appears: only the relay is left, and that is "degraded" (200).
        (tmp_path / "gone").mkdir()
        srv.service.health.check_now()
        status, body = healthz(srv.port)
        assert status == 200 and body.splitlines()[0] == "degraded", body
        assert body.splitlines()[1].startswith("smtp: ")


def test_a_damaged_store_is_down(binding: str, tmp_path: Path) -> None:
    with running(binding, tmp_path) as srv:
        db = srv.data_dir / "jobs.sqlite3"
        assert srv.service.health.check_now().state == "ok"
        with sqlite3.connect(db) as other:  # everything into the main file, then damage it
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = db.stat().st_size
        assert size > 4096
        with db.open("r+b") as f:  # page 2 on: b-tree pages become garbage
            f.seek(4096)
            f.write(b"\xa5" * max(4096, size - 4096))
        srv.service.health.check_now()
        status, body = healthz(srv.port)
        assert status == 503, body
        assert body.startswith("down\nstore: ") and "jobs" in body


def test_checks_run_off_the_loop_with_a_time_limit() -> None:
    import threading

    release = threading.Event()
    monitor = HealthMonitor(
        lambda: [Probe("slow", lambda: None if release.wait(5) else "never")], timeout=0.2
    )
    assert monitor.current() is None  # the first result is still being made: no waiting
    health = monitor.check_now()
    release.set()
    assert health.state == "down" and health.failed[0].problem == "no answer within 0.2 s"


def test_start_logs_each_failing_check(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = FilterSettings(share_roots=((r"\\files\gone", tmp_path / "gone"),))
    service = compose(ServerConfig(), tmp_path / "data", settings).service
    with caplog.at_level(logging.INFO, "dsc.health"), service:
        pass
    errors = [r for r in caplog.records if r.name == "dsc.health" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and r"share \\files\gone" in errors[0].getMessage()
    assert "does not exist" in errors[0].getMessage()


def test_store_quick_check(tmp_path: Path) -> None:
    with JobStore.open(tmp_path) as store:
        assert store.quick_check() is None
    assert store.quick_check() == "the job store is closed"


@pytest.mark.parametrize("binding", ["async", "blocking"])
def test_monitor_listener_serves_only_healthz_and_metrics(tmp_path: Path, binding: str) -> None:
    from e2e_support import ServerProcess, free_port

    port = free_port()
    config = tmp_path / "dsc.toml"
    config.write_text(f'[server]\nmonitor_listen = "127.0.0.1:{port}"\n')
    server = ServerProcess(tmp_path / "data", binding=binding, config=config).start()
    try:
        assert f"monitoring: http://127.0.0.1:{port}/healthz" in server.log
        assert healthz(port) == (200, "ok\n")
        client = Raw(port)
        client.send(client.head("GET", "/metrics"))
        reply = client.read_response()
        assert reply.status == 200 and b"dsc_jobs_created_total" in reply.body
        for method, path in (("GET", "/"), ("GET", "/status.json"), ("POST", "/ScanServer")):
            client.send(client.head(method, path, [("Content-Length", "0")]))
            assert client.read_response().status == 404, (method, path)
        client.close()
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()


# --- each check against the real thing it checks ---------------------------------------------


def test_a_share_root_that_refuses_writes_is_down_also_for_root(
    binding: str, tmp_path: Path
) -> None:
    """The tests run as root, whom mode bits never stop: a share root on sysfs exists, is a
    directory, has mode 755 and still refuses every new file, root's included.  The check
    creates a file, so it sees what a scan would meet (os.access said "writable" here)."""
    sysfs = Path("/sys/kernel")
    assert sysfs.is_dir() and os.access(sysfs, os.W_OK)  # what the mode bits claim
    settings = FilterSettings(share_roots=((r"\\files\sys", sysfs),))
    with running(binding, tmp_path, filters=settings) as srv:
        status, body = healthz(srv.port)
        assert status == 503, body
        lines = body.splitlines()
        assert lines[0] == "down" and len(lines) == 2, lines
        assert lines[1].startswith(
            r"share \\files\sys: /sys/kernel is not writable by the server's user (uid "
        ), lines
        state, checks = health_gauges(srv.port)
        assert state == "down"
        assert checks[r"share \\files\sys"] == 0.0
        assert checks["store"] == checks["data"] == checks["repository"] == 1.0


def as_user(uid: int, gid: int, run: Callable[[], str | None]) -> str | None:
    """``run()`` in a child process with another user's ids (the tests run as root)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, run, report, exit without cleanup
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            answer = run()
            os.write(write_end, b"\x00" if answer is None else answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        got = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got, "the child reported nothing"
    return None if got == b"\x00" else got.decode()


def test_a_share_root_the_servers_user_may_not_write_is_down() -> None:
    """The usual mistake: the share root belongs to another user (755), the server runs as a
    user of its own.  The check, run as such a user, says so and names the uid.  As root (the
    usual test run) the check runs in a child that became nobody; otherwise the test's own user
    is that server user, and the other user's folder is one it made read-only."""
    root = os.geteuid() == 0
    server_uid = 65534 if root else os.geteuid()

    def check(path: Path) -> str | None:
        if root:
            return as_user(server_uid, server_uid, lambda: writable_directory(path))
        return writable_directory(path)

    with tempfile.TemporaryDirectory() as folder:  # under /tmp: every user may traverse it
        os.chmod(folder, 0o755)
        others, own = Path(folder, "others"), Path(folder, "own")
        others.mkdir()
        own.mkdir()
        if root:
            os.chown(own, server_uid, server_uid)  # others stays root's
        else:
            others.chmod(0o555)  # the mode a root-owned 755 folder gives a non-owner
        try:
            assert check(others) == (
                f"{others} is not writable by the server's user (uid {server_uid}): "
                "Permission denied"
            )
            assert check(own) is None
            gone = others / "gone"
            assert check(gone) == (f"{gone} does not exist (create it, owned by the server's user)")
        finally:
            others.chmod(0o755)  # so that the folder can be removed


def test_smtp_relay_up_is_ok_and_down_is_degraded(binding: str, tmp_path: Path) -> None:
    relay = Controller(Relay(), hostname="127.0.0.1", port=free_port())
    relay.start()
    running_relay = True
    try:
        settings = dataclasses.replace(
            FilterSettings.embedded_default(tmp_path / "data"),
            smtp_host="127.0.0.1",
            smtp_port=relay.port,
            smtp_configured=True,
        )
        with running(binding, tmp_path, filters=settings) as srv:
            assert healthz(srv.port) == (200, "ok\n")
            state, checks = health_gauges(srv.port)
            assert (state, checks["smtp"]) == ("ok", 1.0)
            relay.stop()
            running_relay = False
            srv.service.health.check_now()
            status, body = healthz(srv.port)
            assert status == 200, body  # scans still reach the shares
            assert body.splitlines()[0] == "degraded", body
            assert body.splitlines()[1].startswith(
                f"smtp: relay 127.0.0.1:{relay.port} does not accept a connection ("
            ), body
            state, checks = health_gauges(srv.port)
            assert (state, checks["smtp"]) == ("degraded", 0.0)
    finally:
        if running_relay:
            relay.stop()


def test_directory_up_is_ok_stopped_or_unreachable_is_degraded(
    binding: str, samba_dc: SambaDC, tmp_path: Path
) -> None:
    directory = Directory(directory_settings(samba_dc))
    with running(binding, tmp_path, directory=directory) as srv:
        assert healthz(srv.port) == (200, "ok\n")
        assert health_gauges(srv.port)[1]["directory"] == 1.0
        samba_dc.stop()
        try:
            srv.service.health.check_now()
            status, body = healthz(srv.port)
        finally:
            samba_dc.start()
        assert status == 200, body
        lines = body.splitlines()
        assert lines[0] == "degraded" and len(lines) == 2, lines
        # Names the directory and what failed.
        assert lines[1].startswith(f"directory: {samba_dc.url}: "), lines
        assert "refused" in lines[1], lines
        state, checks = health_gauges(srv.port)
        assert (state, checks["directory"]) == ("degraded", 0.0)
        srv.service.health.check_now()  # the DC is back
        assert healthz(srv.port) == (200, "ok\n")

    # A DC nobody answers for (an address with nothing listening).
    nowhere = f"ldaps://{_free_loopback_address()}"
    elsewhere = Directory(directory_settings(samba_dc, url=nowhere))
    with running(binding, tmp_path / "2", directory=elsewhere) as srv:
        status, body = healthz(srv.port)
        assert status == 200 and body.startswith(f"degraded\ndirectory: {nowhere}: "), body
        # Refused credentials do not name the directory themselves: the check adds it.
    wrong = Directory(directory_settings(samba_dc, password="not-the-password"))
    with running(binding, tmp_path / "3", directory=wrong) as srv:
        status, body = healthz(srv.port)
        assert status == 200, body
        assert body.splitlines()[1] == (
            f"directory: {samba_dc.url}: the directory refused the credentials of "
            f"'Administrator@samdom.example.com'"
        ), body


def test_a_check_that_does_not_answer_names_whom_it_waited_for(tmp_path: Path) -> None:
    """A directory and a relay that accept the connection and then say nothing (a firewall's
    half-open port, a hung peer): the check's own message never comes, so the time limit's
    names the URL and the address it waited for."""
    with socket.socket() as ldap_port, socket.socket() as smtp_port:
        for silent in (ldap_port, smtp_port):
            silent.bind(("127.0.0.1", 0))
            silent.listen()  # the kernel completes the handshake; nobody ever answers
        ldap = ldap_port.getsockname()[1]
        smtp = smtp_port.getsockname()[1]
        url = f"ldaps://127.0.0.1:{ldap}"
        directory = Directory(
            DirectorySettings(
                url=url,
                bind_user="scan@example.test",
                password="secret",
                base_dn="DC=example,DC=test",
                connect_timeout=30.0,
                timeout=30.0,
            )
        )
        settings = FilterSettings(smtp_host="127.0.0.1", smtp_port=smtp, smtp_configured=True)
        service = compose(ServerConfig(), tmp_path / "data", settings, directory=directory).service
        health = run_probes(health_probes(service), timeout=0.5)
    problems = {check.name: check.problem for check in health.checks}
    assert problems["directory"] == f"{url}: no answer within 0.5 s"
    assert problems["smtp"] == f"relay 127.0.0.1:{smtp}: no answer within 0.5 s"
    assert health.state == "down"  # the store: not opened, this service never started


# --- the monitoring listener beside a listener that requires client certificates ------------


@pytest.mark.parametrize("binding", ["async", "blocking"])
def test_monitor_listener_needs_no_client_certificate_where_the_main_one_does(
    tmp_path: Path, binding: str
) -> None:
    pki = Pki(tmp_path / "pki")
    port = free_port()
    config = tmp_path / "dsc.toml"
    config.write_text(
        f'[server]\nmonitor_listen = "127.0.0.1:{port}"\n[users]\nscan_admins = ["admin"]\n'
    )
    server = ServerProcess(
        tmp_path / "data",
        binding=binding,
        config=config,
        tls=(pki.server_cert, pki.server_key),
        client_ca=pki.ca_pem,
    ).start()
    try:
        # The main listener: no certificate, no answer; with one, the same endpoints.
        for path in ("/healthz", "/metrics"):
            with pytest.raises(OSError):  # the handshake's alert, or the connection closed
                get(server.port, path, pki.context(None))
        assert get(server.port, "/healthz", pki.context("bob")) == (200, "ok\n")
        # The monitoring listener: plain HTTP, no certificate, both endpoints.
        assert get(port, "/healthz") == (200, "ok\n")
        state, checks = health_gauges(port)
        assert state == "ok" and checks and all(v == 1.0 for v in checks.values()), checks
        assert get(port, "/status.json")[0] == 404  # users and devices stay behind the certificate
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()
