"""A real Samba AD DC for the directory tests, provisioned into a temporary folder.

``samba-tool domain provision --use-rfc2307 --dns-backend=NONE`` with only the LDAP service
(``server services = ldap``), listening on a loopback address of its own (127.x.y.z: Samba has
no option for the LDAP port, so a private address keeps 389/636 free of collisions), with an
LDAPS certificate from a trustme CA.  ``samba -i -M single`` runs it in the foreground; the
fixture stops it by its process id.  Users and groups are created with ``samba-tool``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import trustme

from conftest import spec_dir

REALM = "SAMDOM.EXAMPLE.COM"
DOMAIN = "samdom.example.com"
BASE_DN = "DC=samdom,DC=example,DC=com"
#: The DC's DNS name: in its LDAPS certificate beside its address (for [directory]
#: tls_server_name; there is no DNS for it, so it is reached by address).
DC_NAME = f"dc1.{DOMAIN}"
ADMIN_PASSWORD = "Adm1n!Passw0rd"
#: Users: name -> (password, mail).
USERS = {
    "alice": ("Al1ce!Passw0rd", "alice@mail.example.com"),
    "bob": ("B0b!Passw0rd", "bob@mail.example.com"),
    "carol": ("C4rol!Passw0rd", "carol@mail.example.com"),
}
#: scanadmins contains itstaff (nesting); alice is in itstaff; bob is in sales.
GROUPS = {"scanadmins": ["itstaff"], "itstaff": ["alice"], "sales": ["bob"]}


def unavailable_reason() -> str | None:
    """Why a Samba AD DC cannot run here, or None."""
    for tool in ("samba", "samba-tool"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install samba)"
    if os.geteuid() != 0:
        return "samba's AD DC must run as root"
    return None


@dataclass
class SambaDC:
    folder: Path
    address: str
    ca_pem: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.folder / "etc" / "smb.conf"

    @property
    def url(self) -> str:
        return f"ldaps://{self.address}"

    @property
    def log(self) -> str:
        path = self.folder / "samba.out"
        return path.read_text(errors="replace") if path.exists() else ""

    # - life cycle -

    @classmethod
    def provision(cls, folder: Path) -> SambaDC:
        folder.mkdir(parents=True, exist_ok=True)
        address = _free_loopback_address()
        ca = trustme.CA()
        tls = folder / "tls"
        tls.mkdir()
        cert = ca.issue_cert(DC_NAME, address)
        ca.cert_pem.write_to_path(str(tls / "ca.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tls / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tls / "key.pem"))
        os.chmod(tls / "key.pem", 0o600)  # samba refuses a key others can read
        (folder / "run").mkdir()
        options = {
            "interfaces": f"{address}/8",
            "bind interfaces only": "yes",
            "server services": "ldap",
            "pid directory": str(folder / "run"),
            "log file": str(folder / "log.%m"),
            "tls enabled": "yes",
            "tls certfile": str(tls / "cert.pem"),
            "tls keyfile": str(tls / "key.pem"),
            "tls cafile": str(tls / "ca.pem"),
        }
        args = [
            "samba-tool",
            "domain",
            "provision",
            "--use-rfc2307",
            "--dns-backend=NONE",
            "--server-role=dc",
            f"--realm={REALM}",
            "--domain=SAMDOM",
            f"--adminpass={ADMIN_PASSWORD}",
            f"--targetdir={folder}",
        ] + [f"--option={k}={v}" for k, v in options.items()]
        _run(args, timeout=120)
        dc = cls(folder, address, tls / "ca.pem")
        for name, (password, mail) in USERS.items():
            dc.tool("user", "create", name, password, f"--mail-address={mail}")
        for group in GROUPS:
            dc.tool("group", "add", group)
        for group, members in GROUPS.items():
            dc.tool("group", "addmembers", group, ",".join(members))
        return dc

    def tool(self, *args: str) -> str:
        """samba-tool on the database directly (fast; the running server sees the change)."""
        return _run(
            [
                "samba-tool",
                *args,
                "-s",
                str(self.conf),
                "-H",
                str(self.folder / "private" / "sam.ldb"),
            ],
            timeout=60,
        )

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "samba is running already"
        out = (self.folder / "samba.out").open("ab")
        self.proc = subprocess.Popen(
            ["samba", "-i", "-M", "single", "-s", str(self.conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"samba exited with {self.proc.returncode}:\n{self.log}")
            if self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"samba did not answer LDAPS within {timeout} s:\n{self.log}")

    def _answers(self) -> bool:
        import ldap3

        from dsc_bindings.directory.closing import let_go

        conn = ldap3.Connection(
            ldap3.Server(self.address, port=389, connect_timeout=1, get_info=ldap3.NONE),
            receive_timeout=2,
        )
        try:
            conn.open()
            conn.search("", "(objectClass=*)", ldap3.BASE, attributes=["defaultNamingContext"])
            return True
        except Exception:
            return False
        finally:
            # Whether it answered or not: a try that failed (the DC still starting) left its
            # socket open, dozens of them per start, into whatever test ran next.
            let_go(conn)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; waits until the LDAP ports are free."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _port_free(self.address, 636):
            time.sleep(0.1)

    # - directory facts -

    def sid(self, name: str) -> str:
        for line in self.tool("user", "show", name, "--attributes=objectSid").splitlines():
            if line.startswith("objectSid:"):
                return line.split(":", 1)[1].strip()
        raise AssertionError(f"no objectSid for {name}")

    def config(self, path: Path, **extra: str) -> str:
        """The ``[directory]`` section for this DC (as the domain Administrator)."""
        lines = [
            "[directory]",
            f'url = "{self.url}"',
            f'bind_user = "Administrator@{DOMAIN}"',
            f'password = "{ADMIN_PASSWORD}"',
            f'base_dn = "{BASE_DN}"',
            f'ca_file = "{self.ca_pem}"',
            'admin_group = "scanadmins"',
            "connect_timeout = 3",
            "timeout = 5",
        ]
        spec = spec_dir()
        if spec is not None:  # scan processes also checked against PostScan.xsd & co.
            lines.append(f'schema_dir = "{spec}"')
        lines += [f"{k} = {v}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"


def _run(args: list[str], timeout: float) -> str:
    done = subprocess.run(args, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args[:3])} failed ({done.returncode}):\n"
            f"{done.stdout.decode(errors='replace')[-2000:]}\n{done.stderr.decode(errors='replace')[-3000:]}"
        )
    return done.stdout.decode(errors="replace")


def _port_free(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
            return True
        except OSError:
            return False


def _free_loopback_address() -> str:
    """A 127.x.y.z address whose LDAP ports nobody uses (Linux routes all of 127/8 to lo)."""
    rng = random.Random()
    for _ in range(50):
        address = f"127.{rng.randint(16, 250)}.{rng.randint(1, 250)}.{rng.randint(2, 250)}"
        if _port_free(address, 389) and _port_free(address, 636):
            return address
    raise AssertionError("no free loopback address for samba")
