"""Deployment files in examples/deploy: the example configuration loads and a real ``dsc serve``
starts with it; the systemd unit and the Dockerfile run what the README says; the container
image is built where a container engine is available (it is skipped, saying why, elsewhere)."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from dsc_bindings.exposure import check_exposure
from dsc_bindings.settings import load_settings
from e2e_support import ROOT, ServerProcess, dsc, free_port
from waiting import wait_for

DEPLOY = ROOT / "examples" / "deploy"
CONFIG = DEPLOY / "dsc-server.toml"
UNIT = DEPLOY / "dsc-server.service"
MONITOR_PORT = 9362  # the example's monitor_listen, which the Dockerfile's HEALTHCHECK asks
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(4000)


@dataclass(frozen=True)
class Deployed:
    """The example configuration with its paths moved under a temporary folder, and the TLS
    files it names made by trustme: the server certificate (for scan.example.com and
    127.0.0.1), the client CA, and client certificates for the administrator and a scanner."""

    root: Path
    config: Path
    ca_pem: Path
    admin_pem: Path
    scanner_pem: Path

    @property
    def data(self) -> Path:
        return self.root / "var" / "lib" / "dsc-server"

    def context(self, client: Path | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        if client is not None:
            context.load_cert_chain(str(client))
        return context


def deploy(root: Path, text: str | None = None, *, paths_here: bool = True) -> Deployed:
    """The files of /etc/dsc-server under ``root``; with ``paths_here`` the configuration's
    paths point under ``root`` too, else they stay as written (for a container that mounts the
    folder at /etc/dsc-server)."""
    etc = root / "etc" / "dsc-server"
    etc.mkdir(parents=True)
    (root / "var" / "lib").mkdir(parents=True)  # what the unit's StateDirectory= sits in
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(etc / "clients-ca.pem"))
    server = ca.issue_cert("scan.example.com", "127.0.0.1")
    server.private_key_pem.write_to_path(str(etc / "server.key"))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(etc / "server.pem"), append=i > 0)
    pems = []
    for name in ("admin@example.com", "scanner@example.com"):
        path = etc / f"{name}.pem"
        ca.issue_cert(name, common_name=name).private_key_and_cert_chain_pem.write_to_path(
            str(path)
        )
        pems.append(path)
    config = etc / "dsc-server.toml"
    source = CONFIG.read_text() if text is None else text
    if paths_here:  # ... and the monitor listener on a free port (tests run side by side)
        source = (
            source.replace('"/etc/dsc-server/', f'"{etc}/')
            .replace('"/var/lib/dsc-server', f'"{root}/var/lib/dsc-server')
            .replace(f'"127.0.0.1:{MONITOR_PORT}"', f'"127.0.0.1:{free_port()}"')
        )
    config.write_text(source)
    return Deployed(root, config, etc / "clients-ca.pem", pems[0], pems[1])


def test_example_configuration_loads(tmp_path: Path) -> None:
    site = deploy(tmp_path)
    settings = load_settings(site.config)
    listen = settings.listen
    assert (listen.host, listen.port, listen.binding) == ("0.0.0.0", 5362, "async")
    # Production: TLS with client certificates, a public address, nothing waived.
    assert listen.tls and listen.client_ca == site.ca_pem and not listen.allow_insecure
    assert settings.server.require_client_certificates
    assert settings.server.base_url == "https://scan.example.com:5362"
    assert check_exposure(settings) is None  # it starts: no refusal, no warning
    assert settings.server_ssl_context() is not None
    assert settings.data_dir == site.data
    # The share folder is the one the unit creates (StateDirectory=dsc-server/shares).
    assert settings.filters.share_roots == ((r"\\fileserver\scans", site.data / "shares"),)
    server = settings.server
    assert server.limits.max_image_bytes == 512 * 1024 * 1024
    assert server.job_timeout_seconds == 600 and server.history_size == 1000
    assert server.spool_retention_seconds == 7 * 24 * 3600
    assert set(server.scan_admins) == {"admin@example.com"}
    assert server.user_directory["S-1-5-21-0-0-0-1000"] == "scanner@example.com"
    assert settings.filters.smtp_host == "mail.example.com"


def test_example_configuration_refuses_to_start_without_its_edits(tmp_path: Path) -> None:
    """What the comments say must be set is enforced: without public_url, or without the TLS
    section, `dsc serve` exits 2 with one line naming what to set."""
    text = CONFIG.read_text()
    without_url = "\n".join(line for line in text.splitlines() if not line.startswith("public_url"))
    tls_start = text.index("[tls]")
    without_tls = text[:tls_start] + text[text.index("[limits]") :]
    for folder, source, wanted in (
        ("no-url", without_url, "set [server] public_url"),
        ("no-tls", without_tls, "plain HTTP"),
    ):
        site = deploy(tmp_path / folder, source)
        run = dsc("serve", "--config", str(site.config), "--port", "0", timeout=30)
        assert run.code == 2, run
        assert run.err.count("\n") == 1 and run.err.startswith("dsc: configuration: "), run.err
        assert wanted in run.err and "refusing to listen on 0.0.0.0:0" in run.err, run.err
        assert not site.data.exists()  # refused before anything was created


def test_allow_insecure_starts_with_a_warning_at_every_start(tmp_path: Path) -> None:
    """The operator's explicit override: every interface, plain HTTP, no public_url; the server
    starts, and says what was waived as a WARNING each time it starts."""
    config = tmp_path / "dsc.toml"
    config.write_text('[server]\nhost = "0.0.0.0"\nallow_insecure = true\n')
    server = ServerProcess(tmp_path / "data", config=config)
    for _ in range(2):
        server.start()
        try:
            warnings = [line for line in server.log.splitlines() if " WARNING " in line]
            waived = [line for line in warnings if "allow_insecure = true: listening on" in line]
            assert len(waived) == 1, server.log
            assert "plain HTTP" in waived[0] and "set [server] public_url" in waived[0]
            server.stop_cleanly()
        finally:
            if server.alive:
                server.kill9()


def test_process_add_never_publishes_a_loopback_name(tmp_path: Path) -> None:
    """`dsc process add` writes psp:ScanRepository, the name devices send their scans to: without
    a public_url it refuses (before binding to the directory), and so for a loopback name."""
    config = tmp_path / "dsc.toml"
    directory = (
        '[directory]\nurl = "ldap://127.0.0.1:9"\nbind_user = "svc@example.com"\n'
        'password = "x"\nbase_dn = "DC=example,DC=com"\n'
    )
    config.write_text('[server]\nhost = "0.0.0.0"\n' + directory)
    share = ("--share", r"\\files\scans")
    unknown = dsc("process", "add", "Invoices", "--config", str(config), *share)
    assert unknown.code == 2 and unknown.err.count("\n") == 1, unknown
    assert "public name is unknown" in unknown.err and "http://127.0.0.1:5362" in unknown.err
    assert "set [server] public_url" in unknown.err and "--scan-server" in unknown.err
    for name in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
        given = dsc(
            "process", "add", "Invoices", "--config", str(config), *share, "--scan-server", name
        )
        assert given.code == 2 and "not an address devices can reach" in given.err, given
    # With a public_url it goes on to the directory (here: nothing listens on port 9).
    config.write_text('[server]\npublic_url = "https://scan.example.com:5362"\n' + directory)
    reached = dsc("process", "add", "Invoices", "--config", str(config), *share)
    assert reached.code == 1 and reached.err.startswith("dsc: directory:"), reached


def test_dsc_serve_runs_with_the_example_configuration(tmp_path: Path) -> None:
    """The example as written (every interface, TLS, client certificates), paths moved to a
    temporary folder and a free port: the administrator reaches the status page and a scanner
    files a scan into the share folder; a client without a certificate gets no connection."""
    site = deploy(tmp_path)
    server = ServerProcess(site.data, config=site.config, binding="").start()
    try:
        log = server.log
        assert f"dsc-server listening on https://0.0.0.0:{server.port}" in log, log
        # The start banner names the status page at the advertised address (issue 14, 5).
        assert "web console:                https://scan.example.com:5362/" in log, log
        assert "security: HTTPS, client certificates required" in log, log
        # Nothing waived (the SMTP relay of the example does not exist here: the health check
        # may warn about it, which is not the listener's business).
        assert "allow_insecure" not in log and "WARNING dsc.serve" not in log, log
        base = f"https://127.0.0.1:{server.port}"

        def get(path: str, client: Path | None) -> int:
            request = urllib.request.Request(base + path)
            opener = urllib.request.build_opener(
                urllib.request.HTTPSHandler(context=site.context(client))
            )
            try:
                with opener.open(request, timeout=10) as reply:
                    return int(reply.status)
            except urllib.error.HTTPError as refused:
                return int(refused.code)

        # The container's HEALTHCHECK command, against this server's monitor listener.
        monitor = load_settings(site.config).listen.monitor
        assert monitor is not None and monitor[1] != MONITOR_PORT
        check = _healthcheck_command().replace(f":{MONITOR_PORT}/", f":{monitor[1]}/")
        probe = subprocess.run([sys.executable, "-c", check], capture_output=True, timeout=30)
        assert probe.returncode == 0, probe

        assert get("/status", site.admin_pem) == 200  # the status page, for the administrator
        assert get("/status", site.scanner_pem) == 403  # ... and no one else
        assert get("/api/jobs", site.admin_pem) == 200  # the console's data likewise
        assert get("/api/jobs", site.scanner_pem) == 403
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            get("/", None)  # no client certificate: no TLS session at all

        image = tmp_path / "page.png"
        image.write_bytes(PNG)
        scan = dsc(
            "scan",
            str(image),
            "--server",
            f"{base}/ScanServer",
            "--ca",
            str(site.ca_pem),
            "--cert",
            str(site.scanner_pem),
            "--share",
            r"\\fileserver\scans",
            "--quiet",
        )
        assert scan.code == 0, (scan, server.log)
        filed = [p for p in (site.data / "shares").rglob("*") if p.is_file()]
        assert [p.read_bytes() for p in filed] == [PNG], filed
        server.stop_cleanly()
    finally:
        if server.alive:
            server.kill9()


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["ExecStart"].split()[:4] == [
        "/opt/dsc-server/bin/dsc",
        "serve",
        "--config",
        "/etc/dsc-server/dsc-server.toml",
    ]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # README: SIGHUP reloads
    assert service["KillSignal"] == "SIGTERM"
    # A dedicated user, and its files closed to other users.
    assert service["User"] == service["Group"] == "dsc-server"
    assert service["UMask"] == "0027"
    # The unit creates the data directory and the share folder of the example configuration.
    settings_text = CONFIG.read_text()
    assert service["StateDirectory"].split() == ["dsc-server", "dsc-server/shares"]
    assert 'data = "/var/lib/dsc-server"' in settings_text
    assert '= "/var/lib/dsc-server/shares"' in settings_text
    assert service["StateDirectoryMode"] == "0750"
    assert service["ReadWritePaths"].startswith("-")  # optional: ignored while missing
    hardening = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
    }
    assert {key: service.get(key) for key in hardening} == hardening
    # A refused configuration (exit 2) is not restarted in a loop.
    assert service["RestartPreventExitStatus"] == "2"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    # The options it passes exist.
    help_text = subprocess.run(
        [sys.executable, "-m", "dsc_bindings.console.main", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--config", "--log-format"):
        assert option in help_text


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip(
            "systemd-analyze is not installed (Debian package systemd; .ci/run installs it)"
        )
    # The unit as shipped, with ExecStart pointing at an executable that exists here (verify
    # checks it): every other line is verified as written.
    unit = tmp_path / "dsc-server.service"
    unit.write_text(UNIT.read_text().replace("/opt/dsc-server/bin/dsc", sys.executable))
    done = subprocess.run([verify, "verify", str(unit)], capture_output=True, text=True)
    # systemd-analyze exits 0 even for unknown keys or bad values: it only says so on stderr.
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    # ... and it does say so: the check above would catch a broken line.
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("UMask=0027", "UMask=0027\nUmask=0027"))
    caught = subprocess.run([verify, "verify", str(broken)], capture_output=True, text=True)
    assert "Unknown key" in caught.stderr, caught.stderr


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


def _healthcheck_command() -> str:
    """The Python text of the Dockerfile's HEALTHCHECK."""
    line = next(
        line
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if "CMD python3 -c" in line
    )
    return str(shlex.split(line.split("CMD ", 1)[1])[2])


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


def test_container_image_builds_and_serves(tmp_path: Path) -> None:
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
    # The example configuration as written, with its TLS files, mounted where it says.
    site = deploy(tmp_path, paths_here=False)
    mount = f"{site.config.parent}:/etc/dsc-server:ro"
    try:
        subprocess.run(
            [tool, "run", "-d", "--name", name, "-p", "127.0.0.1::5362", "-v", mount, tag],
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
        context = site.context(site.admin_pem)

        def healthy() -> bool:
            url = f"https://127.0.0.1:{port}/healthz"
            try:
                with urllib.request.urlopen(url, timeout=5, context=context) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, 60, "the container's /healthz over TLS")
        # The image's HEALTHCHECK asks the loopback monitor listener inside the container.
        probe = subprocess.run(
            [tool, "exec", name, "python3", "-c", _healthcheck_command()],
            capture_output=True,
            timeout=60,
        )
        assert probe.returncode == 0, probe
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
