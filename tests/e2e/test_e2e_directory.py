"""End to end with a directory (R14): ``dsc serve`` with ``[directory]`` pointing at a real Samba
AD DC (provisioned once per session, see samba_support.py), a real SMTP relay (aiosmtpd), real
sockets and TLS.  ``dsc scan --process`` plays the DSM device."""

from __future__ import annotations

import email
import email.policy
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller

from e2e_support import Relay, ServerProcess, dsc, free_port
from samba_support import DOMAIN, USERS, SambaDC
from waiting import wait_for


@pytest.fixture
def relay() -> Iterator[tuple[Relay, int]]:
    handler = Relay()
    smtp = Controller(handler, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        yield handler, smtp.port
    finally:
        smtp.stop()


def config_file(folder: Path, dc: SambaDC, smtp_port: int, **directory: str) -> Path:
    path = folder / "dsc.toml"
    path.write_text(
        '[server]\npublic_url = "http://scan.example.test:5362"\n'
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp_port}\nfrom = "scans@example.test"\n'
        "timeout = 10\n" + dc.config(path, **directory),
        encoding="utf-8",
    )
    return path


def password_file(folder: Path, user: str) -> Path:
    path = folder / f"{user}.pw"
    path.write_text(USERS[user][0], encoding="utf-8")
    return path


def test_device_scan_files_and_mails_as_the_directory_user(
    samba_dc: SambaDC, tmp_path: Path, relay: tuple[Relay, int]
) -> None:
    handler, smtp_port = relay
    config = config_file(tmp_path, samba_dc, smtp_port)
    c = ("--config", str(config))
    added = dsc(
        "process",
        "add",
        "To my folder",
        *c,
        "--share",
        r"\\localhost\scans",
        "--email-scan-user",
        "--format",
        "png",
        "--root-name",
        "scan",
    )
    assert added.code == 0, added
    server = ServerProcess(tmp_path / "data", config=config).start()
    try:
        page = tmp_path / "page.png"
        page.write_bytes(os.urandom(50_000))
        run = dsc(
            "scan",
            str(page),
            "--process",
            "To my folder",
            *c,
            "--as",
            f"alice@{DOMAIN}",
            "--password-file",
            str(password_file(tmp_path, "alice")),
            "--server",
            server.url,
            "--quiet",
            "--json",
        )
        assert run.code == 0, (run, server.log)
        job = run.json()
        # The SID the device sent was resolved through objectSid (R14) ...
        assert job["user_name"] == f"alice@{DOMAIN}"
        # ... and the display name came from msImaging-PSPIdentifier (no ext:ProcessName sent).
        assert job["psp_display_name"] == "To my folder"
        assert job["state"] == "Completed", job
        folder = tmp_path / "data" / "shares" / "localhost" / "scans" / f"alice@{DOMAIN}"
        (filed,) = list(folder.iterdir())
        assert filed.read_bytes() == page.read_bytes() and filed.suffix == ".png"
        wait_for(lambda: handler.messages, what="the e-mail to alice")
        _sender, recipients, raw = handler.messages[-1]
        assert recipients == [USERS["alice"][1]]  # the directory's mail attribute
        message = email.message_from_bytes(raw, policy=email.policy.default)
        (attachment,) = list(message.iter_attachments())
        assert attachment.get_content() == page.read_bytes()
        assert "Traceback" not in server.log
    finally:
        server.stop_cleanly()
        dsc("process", "rm", "To my folder", *c, "--yes")


def test_admins_by_nested_group_and_certificate_identity_by_upn(
    samba_dc: SambaDC, tmp_path: Path, relay: tuple[Relay, int]
) -> None:
    config = config_file(tmp_path, samba_dc, relay[1])
    ca = trustme.CA()
    pki = tmp_path / "pki"
    pki.mkdir()
    ca_pem = pki / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    server_cert = ca.issue_cert("127.0.0.1")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(pki / "server.pem"))
    certs = {}
    for user in ("alice", "bob"):
        issued = ca.issue_cert(f"{user}@clients.example", common_name=f"{user}@{DOMAIN}")
        certs[user] = pki / f"{user}.pem"
        issued.private_key_and_cert_chain_pem.write_to_path(str(certs[user]))
    server = ServerProcess(
        tmp_path / "data",
        config=config,
        tls=(pki / "server.pem", pki / "server.pem"),
        client_ca=ca_pem,
    ).start()
    try:

        def as_user(user: str, *args: str) -> tuple[int, str, str]:
            run = dsc(
                *args, "--server", server.url, "--ca", str(ca_pem), "--cert", str(certs[user])
            )
            return run.code, run.out, run.err

        # alice is in itstaff, which is in scanadmins: a scan administrator (nested, R14).
        code, out, err = as_user("alice", "jobs", "--json")
        assert code == 0 and out.strip() == "[]", (out, err, server.log)
        code, out, err = as_user("bob", "jobs")
        assert code == 1 and "ClientErrorCurrentUserNotScanAdmin" in err, (out, err)
        # A scan by bob's certificate: his UPN names the account, whatever SID is sent.
        page = tmp_path / "p.png"
        page.write_bytes(b"x" * 1000)
        code, out, err = as_user(
            "bob", "scan", str(page), "--user", "S-1-5-21-9-9-9-9", "--quiet", "--json"
        )
        assert code == 0, (out, err, server.log)
        assert '"user_name": "bob@samdom.example.com"' in out
        assert (tmp_path / "data/shares/localhost/scans" / f"bob@{DOMAIN}").is_dir()
    finally:
        server.stop_cleanly()


def test_directory_down_gives_the_temporary_fault_and_recovers(
    samba_dc: SambaDC, tmp_path: Path, relay: tuple[Relay, int]
) -> None:
    config = config_file(tmp_path, samba_dc, relay[1])
    server = ServerProcess(tmp_path / "data", config=config).start()
    page = tmp_path / "p.png"
    page.write_bytes(b"y" * 1000)

    def scan_as(name: str) -> tuple[int, str, str]:
        run = dsc(
            "scan",
            str(page),
            "--server",
            server.url,
            "--user",
            samba_dc.sid(name),
            "--process-id",
            str(uuid.uuid4()),
            "--quiet",
            "--json",
            "--timeout",
            "30",
        )
        return run.code, run.out, run.err

    try:
        code, out, err = scan_as("alice")  # opens the server's directory connection
        assert code == 0 and f'"user_name": "alice@{DOMAIN}"' in out, (out, err, server.log)
        carol = samba_dc.sid("carol")  # read before the directory goes away
        samba_dc.stop()
        try:
            run = dsc(
                "scan",
                str(page),
                "--server",
                server.url,
                "--user",
                carol,
                "--quiet",
                "--timeout",
                "30",
            )
            assert run.code == 1, run
            assert "dsp:ServerErrorTemporaryError" in run.err and "Traceback" not in run.err, run
            log = server.log
            assert f"directory {samba_dc.url} unavailable" in log, log
            assert "answering ServerErrorTemporaryError" in log
            # What needs no directory still works: the management side answers.
            jobs = dsc("jobs", "--server", server.url, "--json")
            assert jobs.code == 0, jobs
        finally:
            samba_dc.start()

        # Back: within the server's retry pause (RETRY_SECONDS) it may still say "temporary";
        # a device retries, and so does this test, until the scan goes through.
        def retried() -> str | None:
            code, out, err = scan_as("carol")
            if code == 0:
                return out
            assert "dsp:ServerErrorTemporaryError" in err, (out, err, server.log)
            return None

        out = wait_for(retried, timeout=60, what="a scan once the directory is back", interval=0.5)
        assert f'"user_name": "carol@{DOMAIN}"' in out, (out, server.log)
        assert "reachable again" in server.log
        assert (tmp_path / "data/shares/localhost/scans" / f"carol@{DOMAIN}").is_dir()
    finally:
        if samba_dc.proc is None:
            samba_dc.start()
        server.stop_cleanly()
