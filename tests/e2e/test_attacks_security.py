"""Attack tests of issue 14 §4 (security defects) against the real ``dsc serve`` over real
sockets; each also shows that a legitimate client is still served."""

from __future__ import annotations

import datetime
import functools
import http.client
import json
import os
import socket
import sqlite3
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dsc_bindings.directory.ldap import Directory
from dsc_bindings.filters import sanitize_name
from dsc_bindings.http.certidentity import UPN_OID
from dsc_core import client as dc
from dsc_core import names
from dsc_core.model import FileShareInstructions
from e2e_support import ServerProcess, Soap, started_servers
from samba_support import DOMAIN, SambaDC
from test_attacks_e2e import SoapFrom, concurrently
from test_directory import settings as directory_settings
from waiting import wait_for

BINDINGS = ["async", "blocking"]
A = names.Action
LOCAL_SHARE = "\\\\scan\\share"


class IPv6ServerProcess(ServerProcess):
    """``dsc serve --host ::1``: ready when ::1 answers."""

    def _connectable(self) -> bool:
        try:
            socket.create_connection(("::1", self.port), timeout=1.0).close()
            return True
        except OSError:
            return False


@pytest.fixture
def servers() -> Iterator[Callable[..., ServerProcess]]:
    with started_servers() as keep:
        yield lambda data, ipv6=False, **kwargs: keep(
            (IPv6ServerProcess if ipv6 else ServerProcess)(data, **kwargs)
        )


# --- 1. identity of a client certificate (R10) --------------------------------------------------


class CertificateAuthority:
    """A trustme CA that also issues the odd client certificates trustme cannot make (two
    commonNames, a UPN otherName, no name at all)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_pem = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        server = self.ca.issue_cert("127.0.0.1")
        self.server_cert, self.server_key = folder / "server.pem", folder / "server.key"
        server.private_key_pem.write_to_path(str(self.server_key))
        for i, blob in enumerate(server.cert_chain_pems):
            blob.write_to_path(str(self.server_cert), append=i > 0)

    def client(
        self, label: str, common_names: tuple[str, ...], alt_names: list[x509.GeneralName]
    ) -> ssl.SSLContext:
        """A client context holding a certificate with exactly these names."""
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())
        ca_key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), None)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clients")]
            + [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names]
        )
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        path = self.folder / f"{label}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            + cert.public_bytes(serialization.Encoding.PEM)
        )
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        context.load_cert_chain(str(path))
        return context


def upn(name: str) -> x509.OtherName:
    encoded = name.encode("utf-8")
    assert len(encoded) < 128
    return x509.OtherName(UPN_OID, bytes([0x0C, len(encoded)]) + encoded)


def get(url: str, context: ssl.SSLContext, path: str) -> tuple[int, bytes]:
    host, port = url.split("/")[2].rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("binding", BINDINGS)
def test_certificates_without_one_clear_identity_are_refused(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    pki = CertificateAuthority(tmp_path / "pki")
    config = tmp_path / "dsc.toml"
    config.write_text('[users]\nscan_admins = ["kate"]\n', encoding="utf-8")
    server = servers(
        tmp_path / "data",
        binding=binding,
        config=config,
        tls=(pki.server_cert, pki.server_key),
        client_ca=pki.ca_pem,
    )
    kate_sid = "S-1-5-21-1-2-3-1105"
    nameless = pki.client("nameless", (), [x509.DNSName("laptop.clients.example")])
    two_cns = pki.client("two", ("mallory", "kate"), [])
    kelvin = pki.client("kelvin", ("\u212aate",), [])  # U+212A KELVIN SIGN, casefolds to "k"
    by_upn = pki.client("upn", (), [upn("erin@corp.example")])
    by_mail = pki.client("mail", (), [x509.RFC822Name("frank@corp.example")])
    kate = pki.client("kate", ("kate",), [])

    # No usable identity, or two commonNames: refused outright, whatever SID the body claims.
    for context in (nameless, two_cns):
        client = Soap(server.url, context)
        status, _ctype, body = client.post(
            client.envelope(
                A.DSP_CREATE,
                dc.create_post_scan_job(
                    user_identifier=kate_sid,
                    psp_identifier="8A2E6B52-0C84-4D2E-9C35-6B4D1B4E2F10",
                    instructions=[FileShareInstructions((LOCAL_SHARE,))],
                    document_root_name="scan",
                ),
            )
        )
        assert status == 403, body
        assert b"client certificate" in body, body
        assert get(server.url, context, "/status.json")[0] == 403
    log = server.log
    assert "names no user" in log and "2 commonNames" in log, log[-3000:]

    # A lookalike of the administrator's name is its own identity, not "kate".
    with pytest.raises(dc.ClientFault) as fault:
        Soap(server.url, kelvin).call(
            A.DSC_GET_ACTIVE_JOBS, dc.empty_request("GetActiveJobsRequest")
        )
    assert fault.value.subcode == "dsc:ClientErrorCurrentUserNotScanAdmin"

    # A UPN or an e-mail address names the user when there is no commonName.
    for context, user in ((by_upn, "erin@corp.example"), (by_mail, "frank@corp.example")):
        client = Soap(server.url, context)
        token = client.create([FileShareInstructions((LOCAL_SHARE,))], user=kate_sid)
        client.send_image(token, 1, os.urandom(2000))
        job = client.dsp_job(token)
        assert job.user_name == user, job

    # The administrator still manages the repository.
    admin = Soap(server.url, kate)
    jobs = admin.call(A.DSC_GET_ACTIVE_JOBS, dc.empty_request("GetActiveJobsRequest"))
    assert jobs.action == A.DSC_GET_ACTIVE_JOBS + "Response"
    assert get(server.url, kate, "/status.json")[0] == 200


def test_directory_cache_does_not_fold_names(samba_dc: SambaDC) -> None:
    """The cache keys a name exactly as asked: the directory alone decides what matches."""
    if "kate" not in samba_dc.tool("user", "list").split():
        samba_dc.tool("user", "create", "kate", "K4te!Passw0rd")
        samba_dc.tool("group", "addmembers", "scanadmins", "kate")
    directory = Directory(directory_settings(samba_dc))
    assert directory.is_admin("kate")
    lookalike = "\u212aate"  # KELVIN SIGN: "\u212aate".casefold() == "kate"
    asked: list[str] = []
    search = directory.search

    def recording(*args: Any, **kw: Any) -> list[dict[str, Any]]:
        asked.append(str(args[1]))
        return search(*args, **kw)

    directory.search = recording  # type: ignore[method-assign]
    answer = directory.is_admin(lookalike)
    assert any(lookalike in f or "\\e2\\84\\aa" in f for f in asked), asked
    # The same answer as a directory that never heard of kate.
    assert answer == Directory(directory_settings(samba_dc)).is_admin(lookalike)
    assert not answer


# --- 6. one rule in one place: the status page's administrators, the client's address ----------


@pytest.mark.parametrize("binding", BINDINGS)
def test_status_page_admits_directory_admins_like_bdsrr(
    servers: Callable[..., ServerProcess], samba_dc: SambaDC, tmp_path: Path, binding: str
) -> None:
    pki = CertificateAuthority(tmp_path / "pki")
    config = tmp_path / "dsc.toml"
    config.write_text(samba_dc.config(config), encoding="utf-8")
    server = servers(
        tmp_path / "data",
        binding=binding,
        config=config,
        tls=(pki.server_cert, pki.server_key),
        client_ca=pki.ca_pem,
    )
    # alice is a nested member of admin_group (scanadmins > itstaff > alice); bob is not.
    alice = pki.client("alice", (f"alice@{DOMAIN}",), [])
    bob = pki.client("bob", (f"bob@{DOMAIN}",), [])
    Soap(server.url, alice).call(A.DSC_GET_ACTIVE_JOBS, dc.empty_request("GetActiveJobsRequest"))
    for path in ("/status", "/status.json", "/api/jobs"):
        status, body = get(server.url, alice, path)
        assert status == 200, (path, body[:300], server.log[-2000:])
        assert get(server.url, bob, path)[0] == 403
    with pytest.raises(dc.ClientFault):
        Soap(server.url, bob).call(A.DSC_GET_ACTIVE_JOBS, dc.empty_request("GetActiveJobsRequest"))
    assert get(server.url, bob, "/metrics")[0] == 200  # not for administrators only


@pytest.mark.parametrize("binding", BINDINGS)
def test_an_ipv6_client_is_one_device_and_one_quota(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    if not socket.has_ipv6:
        pytest.skip("this machine has no IPv6 (the test needs ::1)")
    config = tmp_path / "dsc.toml"
    config.write_text("[limits]\nmax_creating_jobs_per_user = 2\n", encoding="utf-8")
    server = servers(
        tmp_path / "data", binding=binding, config=config, extra=["--host", "::1"], ipv6=True
    )
    url = f"http://[::1]:{server.port}/ScanServer"
    client = Soap(url)
    client.host = "::1"
    first, second = (client.create([FileShareInstructions((LOCAL_SHARE,))]) for _ in range(2))
    with pytest.raises(dc.ClientFault) as refused:  # each create is a new connection (port)
        client.create([FileShareInstructions((LOCAL_SHARE,))])
    assert refused.value.subcode == "dsp:ServerErrorTemporaryError"
    conn = http.client.HTTPConnection("::1", server.port, timeout=30)
    conn.request("GET", "/status.json")
    snapshot = json.loads(conn.getresponse().read())
    conn.close()
    devices = snapshot["devices"]
    assert [(d["address"], d["jobs"]) for d in devices] == [("::1", 2)], devices
    assert {first, second} <= {j["token"] for j in snapshot["active"]}


# --- 5. store: one corrupt job record ------------------------------------------------------------


@pytest.mark.parametrize("binding", BINDINGS)
def test_a_corrupt_job_record_is_quarantined_and_the_server_starts(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    data = tmp_path / "data"
    server = servers(data, binding=binding)
    client = Soap(server.url)
    kept, broken = (client.create([FileShareInstructions((LOCAL_SHARE,))]) for _ in range(2))
    client.send_image(broken, 1, os.urandom(3000))
    server.stop_cleanly()
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        db.execute('UPDATE jobs SET job = \'{"v": 1, "token": 7\' WHERE token = ?', (broken,))
    server.start()
    client = Soap(server.url)  # a new port
    assert client.dsp_job(kept).state == "Creating"  # served as usual
    with pytest.raises(dc.ClientFault):
        client.dsp_job(broken)
    error = [line for line in server.log.splitlines() if "does not decode" in line]
    assert len(error) == 1 and "ERROR" in error[0] and broken in error[0], server.log[-3000:]
    (record,) = (data / "quarantine").glob("job-*.json")
    assert json.loads(record.read_text())["token"] == broken
    assert (data / "quarantine" / record.name.replace(".json", ".spool") / "1").stat().st_size


# --- 2. file share ----------------------------------------------------------------------------


@pytest.mark.parametrize("binding", BINDINGS)
def test_scanned_files_are_not_world_readable(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    server = servers(tmp_path / "data", binding=binding)
    client = Soap(server.url)
    token = client.create([FileShareInstructions((r"\\localhost\scans",))])
    client.send_image(token, 1, os.urandom(3000))
    client.end(token)
    assert client.wait_ended(token, 30).state == "Completed"
    (delivered,) = (tmp_path / "data" / "shares" / "localhost" / "scans").rglob("*.png")
    assert delivered.stat().st_mode & 0o777 == 0o640, oct(delivered.stat().st_mode)


def _user_folder(data: Path, client: Soap, token: str) -> Path:
    """Where the embedded server puts the scans of this job's user (R9 sub-folder)."""
    return data / "shares" / "localhost" / "scans" / sanitize_name(client.dsp_job(token).user_name)


@pytest.mark.parametrize("binding", BINDINGS)
def test_a_user_folder_planted_as_a_symlink_is_not_followed(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    """Another user of the share replaces this user's folder by a link to a folder of theirs
    (or to /etc): the filter refuses it (FileShareAccessDenied) and writes nothing there."""
    data = tmp_path / "data"
    server = servers(data, binding=binding)
    client = Soap(server.url)
    token = client.create([FileShareInstructions((r"\\localhost\scans",))])
    folder = _user_folder(data, client, token)
    folder.parent.mkdir(parents=True)
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    folder.symlink_to(elsewhere)
    client.send_image(token, 1, os.urandom(3000))
    client.end(token)

    ended = client.wait_ended(token, 30)
    assert [(f.state, f.reasons) for f in ended.filters] == [
        ("CompletedWithErrors", ("FileShareAccessDenied",))
    ], ended
    assert list(elsewhere.iterdir()) == []
    assert "never followed out of the share root" in server.log, server.log[-3000:]

    # The link removed, the same user's next scan lands in a folder of its own.
    folder.unlink()
    token = client.create([FileShareInstructions((r"\\localhost\scans",))])
    page = os.urandom(3000)
    client.send_image(token, 1, page)
    client.end(token)
    assert client.wait_ended(token, 30).filters[0].state == "CompletedSuccessfully"
    assert (folder / "scan_0001.png").read_bytes() == page and not folder.is_symlink()


@pytest.mark.parametrize("binding", BINDINGS)
def test_a_hard_link_planted_under_the_temporary_name_does_not_replace_the_document(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    """The temporary name of the next job's page, planted as a hard link to the user's earlier
    scan: taken for a copy the server had already placed, the new page was never delivered."""
    data = tmp_path / "data"
    server = servers(data, binding=binding)
    client = Soap(server.url)
    share = [FileShareInstructions((r"\\localhost\scans",))]
    first, second = os.urandom(3000), os.urandom(3000)
    token = client.create(share)
    client.send_image(token, 1, first)
    client.end(token)
    assert client.wait_ended(token, 30).filters[0].state == "CompletedSuccessfully"
    folder = _user_folder(data, client, token)

    token = client.create(share)
    os.link(folder / "scan_0001.png", folder / f".dsc-{token}-1.part")
    client.send_image(token, 1, second)
    client.end(token)

    assert client.wait_ended(token, 30).filters[0].state == "CompletedSuccessfully"
    assert sorted(p.name for p in folder.iterdir()) == ["scan_0001.png", "scan_0002.png"]
    assert (folder / "scan_0001.png").read_bytes() == first
    assert (folder / "scan_0002.png").read_bytes() == second


# --- 3. lockouts: keep room for new clients -------------------------------------------------------

#: 40 hostile loopback addresses, each holding requests and jobs; the scanner is 127.0.0.1.
HOSTILE = [f"127.0.0.{n}" for n in range(2, 42)]


def _hold_creating_jobs(server: ServerProcess, jobs_each: int) -> list[str]:
    """Every hostile address creates ``jobs_each`` jobs at once; returns the refusal reasons."""
    refusals: list[str] = []

    def hostile(address: str) -> None:
        client = SoapFrom(server.url, address)
        for _ in range(jobs_each):
            try:
                client.create([FileShareInstructions((LOCAL_SHARE,))])
            except dc.ClientFault as refused:
                refusals.append(refused.reason)

    concurrently(*(functools.partial(hostile, address) for address in HOSTILE))
    return refusals


def _hold_connections(server: ServerProcess, each: int) -> list[socket.socket]:
    """Every hostile address opens ``each`` connections with a request in progress (a head
    that never ends), one address after the other: the worst order for a reserve, since the
    last addresses arrive when the slots for addresses holding some are all taken."""
    held = []
    for address in HOSTILE:
        for _ in range(each):
            sock = socket.create_connection(
                ("127.0.0.1", server.port), timeout=10, source_address=(address, 0)
            )
            sock.sendall(b"POST /ScanServer HTTP/1.1\r\nHost: scan\r\nContent-Type: applic")
            held.append(sock)
    return held


def _metric(server: ServerProcess, name: str) -> float:
    """A value of /metrics (asked from the scanner's address, 127.0.0.1)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def _status_from(server: ServerProcess, address: str) -> tuple[int, bytes]:
    """One request from ``address`` on a new connection: its status and body (0: closed
    without an answer, what the server does when its bounded rejection handlers are busy)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", server.port, timeout=10, source_address=(address, 0)
    )
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        return response.status, response.read()
    except (ConnectionError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


@pytest.mark.parametrize("binding", BINDINGS)
def test_forty_hostile_addresses_leave_room_for_a_scanner(
    servers: Callable[..., ServerProcess], tmp_path: Path, binding: str
) -> None:
    """Issue 14 §4, lockouts: 40 addresses fill every job slot and hold every connection with
    requests in progress; a scanner from another address still completes its job, because
    the last Limits.new_client_share of each (default 10 %) is kept for clients holding none."""
    config = tmp_path / "dsc.toml"
    # 10 % of 500 connections and of 420 jobs: 50 and 42 kept, more than the 40 attackers.
    config.write_text(
        "[limits]\nmax_connections = 500\nmax_active_jobs = 420\nhead_timeout = 300.0\n",
        encoding="utf-8",
    )
    server = servers(tmp_path / "data", binding=binding, config=config)
    # Jobs: 40 x 11 asked for 420 slots.  Holders stop at 378; each newcomer takes one more.
    refusals = _hold_creating_jobs(server, 11)
    assert len(refusals) >= 440 - 420 + 2, len(refusals)
    assert all("new_client_share" in reason for reason in refusals), refusals[:3]
    # Connections: 40 x 13 asked for 500 slots: holders stop at 450, the rest are refused.
    held = _hold_connections(server, 13)
    try:
        assert _metric(server, "dsc_connections") >= 450
        scanner = SoapFrom(server.url, "127.0.0.1")
        token = scanner.create([FileShareInstructions((LOCAL_SHARE,))])
        scanner.send_image(token, 1, os.urandom(3000))
        scanner.end(token)
        assert scanner.wait_ended(token, 60).state == "Completed"
        # The attackers still hold what they took: one more connection of theirs is refused,
        # with a reason that names the setting, once no idle connection is left to reclaim for
        # it (the scanner's last one may be) and no 16 refusals are running (then it is
        # closed at once).
        status, body = wait_for(
            lambda: (answer := _status_from(server, HOSTILE[0]))[0] == 503 and answer,
            30,
            "a 503 to a hostile address",
        )
        assert b"new_client_share" in body, (status, body)
    finally:
        for sock in held:
            sock.close()
    assert "kept for clients with no job in Creating" in server.log
    assert "kept for clients with no request in progress" in server.log
