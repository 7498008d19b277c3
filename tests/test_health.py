"""/healthz checks what a scan needs (issue 14, section 2), over real sockets on both bindings:
share roots, the job store (``PRAGMA quick_check``), the SMTP relay and the directory when
configured; ``ok``, ``degraded`` (200) or ``down`` (503) naming each failing check; the same
checks logged at start."""

from __future__ import annotations

import logging
import socket
import sqlite3
from pathlib import Path

import pytest

from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.health import HealthMonitor, Probe
from dsc_bindings.service import ScanService
from dsc_bindings.store import JobStore
from dsc_core import ServerConfig
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
    service = ScanService(ServerConfig(), tmp_path / "data", settings)
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
