"""Deployment files in examples/deploy: the example configuration loads and a real ``dsc serve``
starts with it; the systemd unit and the Dockerfile run what the README says; the container
image is built where a container engine is available (it is skipped, saying why, elsewhere)."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from dsc_bindings.settings import load_settings
from e2e_support import ROOT, ServerProcess, wait_for

DEPLOY = ROOT / "examples" / "deploy"
CONFIG = DEPLOY / "dsc-server.toml"


def test_example_configuration_loads(tmp_path: Path) -> None:
    settings = load_settings(CONFIG, data_dir=tmp_path / "data")
    assert (settings.listen.host, settings.listen.port) == ("0.0.0.0", 5362)
    assert settings.listen.binding == "async" and not settings.listen.tls
    server = settings.server
    assert server.limits.max_image_bytes == 512 * 1024 * 1024
    assert server.job_timeout_seconds == 600 and server.history_size == 1000
    assert server.spool_retention_seconds == 7 * 24 * 3600
    assert set(server.scan_admins) == {"admin@example.com"}
    assert server.user_directory["S-1-5-21-0-0-0-1000"] == "scanner@example.com"
    assert settings.filters.smtp_host == "mail.example.com"
    # Without the data override, the configured directory is used.
    assert load_settings(CONFIG).data_dir == Path("/var/lib/dsc-server")


def test_dsc_serve_runs_with_the_example_configuration(tmp_path: Path) -> None:
    # The file says 0.0.0.0:5362; a test listens on loopback and a free port instead (options
    # override the file), everything else as written.
    config = tmp_path / "dsc-server.toml"
    config.write_text(CONFIG.read_text().replace('host = "0.0.0.0"', 'host = "127.0.0.1"'))
    server = ServerProcess(tmp_path / "data", config=config).start()
    try:
        assert "dsc-server listening on http://127.0.0.1:" in server.log
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
            assert r.status == 200
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "dsc-server.service").read_text())
    service = unit["Service"]
    assert service["ExecStart"].split()[:4] == [
        "/opt/dsc-server/bin/dsc",
        "serve",
        "--config",
        "/etc/dsc-server/dsc-server.toml",
    ]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # README: SIGHUP reloads
    assert service["KillSignal"] == "SIGTERM" and service["User"] == "dsc"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # The options it passes exist.
    help_text = subprocess.run(
        [sys.executable, "-m", "dsc_bindings.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--config", "--log-format"):
        assert option in help_text
    verify = shutil.which("systemd-analyze")
    if verify:
        done = subprocess.run(
            [verify, "verify", str(DEPLOY / "dsc-server.service")], capture_output=True, text=True
        )
        # Only the unit's own syntax matters here (the binary is not installed at /opt).
        assert "Unknown key" not in done.stderr and "Invalid" not in done.stderr, done.stderr


def test_dockerfile_installs_without_test_extras() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    assert lines[0].startswith("FROM python:3.11")
    assert "RUN pip install --no-cache-dir . && rm -rf /src" in lines  # no [test]
    assert "EXPOSE 5362/tcp 5362/udp" in lines
    cmd = [line for line in lines if line.startswith("CMD ")][-1]
    assert json.loads(cmd[4:])[:4] == [
        "dsc",
        "serve",
        "--config",
        "/etc/dsc-server/dsc-server.toml",
    ]
    for source in ("pyproject.toml", "README.md", "dsc_core", "bindings", "examples/deploy"):
        assert (ROOT / source).exists(), source


def _container_tool() -> tuple[str, str]:
    """A container tool whose engine answers, or ("", why not)."""
    reasons = []
    for tool in ("docker", "podman"):
        path = shutil.which(tool)
        if path is None:
            reasons.append(f"no {tool}")
            continue
        done = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            return path, ""
        last = (done.stderr.strip().splitlines() or ["no answer"])[-1]
        reasons.append(f"{tool} has no engine here ({last})")
    return "", "; ".join(reasons)


def test_container_image_builds_and_serves() -> None:
    tool, why = _container_tool()
    if not tool:
        pytest.skip(f"cannot build the container image: {why}")
    tag = f"dsc-server-test:{uuid.uuid4().hex[:8]}"
    built = subprocess.run(
        [tool, "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    name = f"dsc-test-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run(
            [tool, "run", "-d", "--name", name, "-p", "127.0.0.1::5362", tag],
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = (
            subprocess.run(
                [tool, "port", name, "5362/tcp"], capture_output=True, text=True, check=True
            )
            .stdout.strip()
            .rsplit(":", 1)[-1]
        )
        import urllib.request

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, 60, "the container's /healthz")
    finally:
        subprocess.run([tool, "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run([tool, "rmi", "-f", tag], capture_output=True, timeout=120)


def test_readme_setup_creates_a_virtual_environment_first() -> None:
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Install and run") :]
    venv = setup.index("python3 -m venv")
    assert venv < setup.index("pip install .")
    assert "pip install . && dsc serve" in setup.replace("python3 -m ", "")
    assert "examples/deploy/dsc-server.service" in readme
    assert "examples/deploy/Dockerfile" in readme
