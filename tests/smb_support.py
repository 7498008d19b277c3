"""A real Samba file server (Debian's ``smbd``) for the SMB file share tests (issue 21).

Started in a temporary folder with a private ``smb.conf`` (every state directory inside it),
on a loopback address of its own and a private port, standalone, SMB 3 only with encryption
and signing required.  The account is the system user ``nobody`` (it exists everywhere, owns
nothing, and so shows that the server writes with the share's permissions, not root's), added
to the private password database with ``smbpasswd -a``.  Shares: ``scans`` (writable by the
account), ``denied`` (read only) and ``dfs`` (a DFS root: a link in it made by
:meth:`SmbServer.refer` sends the client to another server).  Stopped by its process id.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

USER = "nobody"
PASSWORD = "Sc4n!Passw0rd"


def unavailable_reason() -> str | None:
    for tool in ("smbd", "smbpasswd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install samba)"
    if os.geteuid() != 0:
        return "smbd with a private configuration must run as root"
    return None


def need_smbclient() -> None:
    """Skip the calling test when Samba's client is missing (it reads the share back)."""
    import pytest

    if shutil.which("smbclient") is None:
        pytest.skip("smbclient is not installed (Debian: apt-get install smbclient)")


@dataclass
class SmbServer:
    folder: Path
    address: str
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.folder / "smb.conf"

    @property
    def scans(self) -> Path:
        return self.folder / "scans"

    @property
    def log(self) -> str:
        path = self.folder / "smbd.out"
        return path.read_text(errors="replace") if path.exists() else ""

    @classmethod
    def create(cls, folder: Path) -> SmbServer:
        """``folder`` and its parents must be searchable by the account (not pytest's 0700
        temporary folders: use :func:`public_folder`)."""
        folder.mkdir(parents=True, exist_ok=True)
        address, port = _free_loopback_port()
        server = cls(folder, address, port)
        account = pwd.getpwnam(USER)
        for name in ("private", "lock", "state", "cache", "pid", "ncalrpc", "denied", "dfs"):
            (folder / name).mkdir()
        server.scans.mkdir()
        os.chown(server.scans, account.pw_uid, account.pw_gid)
        folder.chmod(0o755)
        state = {
            k: str(folder / v)
            for k, v in {
                "private dir": "private",
                "lock directory": "lock",
                "state directory": "state",
                "cache directory": "cache",
                "pid directory": "pid",
                "ncalrpc dir": "ncalrpc",
            }.items()
        }
        lines = [
            "[global]",
            f"interfaces = {address}/8",
            "bind interfaces only = yes",
            f"smb ports = {port}",
            "server role = standalone server",
            *(f"{k} = {v}" for k, v in state.items()),
            f"log file = {folder}/log.%m",
            "passdb backend = tdbsam",
            "server min protocol = SMB3",
            "server smb encrypt = required",
            "server signing = mandatory",
            "disable netbios = yes",
            "load printers = no",
            "printing = bsd",
            "printcap name = /dev/null",
            "disable spoolss = yes",
            "map to guest = never",
            "host msdfs = yes",
            "[scans]",
            f"path = {server.scans}",
            "read only = no",
            "create mask = 0640",
            "[denied]",
            f"path = {folder / 'denied'}",
            "read only = yes",
            "[dfs]",
            f"path = {folder / 'dfs'}",
            "msdfs root = yes",
            "read only = no",
        ]
        server.conf.write_text("\n".join(lines) + "\n")
        subprocess.run(
            ["smbpasswd", "-c", str(server.conf), "-s", "-a", USER],
            input=f"{PASSWORD}\n{PASSWORD}\n".encode(),
            check=True,
            capture_output=True,
            timeout=30,
        )
        return server

    def give(self, *paths: Path) -> None:
        """Hand what a test made on the share to the account (as if the account made it)."""
        account = pwd.getpwnam(USER)
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)

    def read_back(self, remote: str, local: Path) -> bytes:
        """``remote`` (a path in the share ``scans``) read back by Samba's own client, over the
        same encrypted SMB 3 the filter speaks (see :func:`need_smbclient`)."""
        subprocess.run(
            [
                "smbclient",
                f"//{self.address}/scans",
                "-p",
                str(self.port),
                "-U",
                f"{USER}%{PASSWORD}",
                "--client-protection=encrypt",
                "-c",
                f'get "{remote}" "{local}"',
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return local.read_bytes()

    def refer(self, link: str, host: str, share: str) -> None:
        """A DFS link ``\\\\<this server>\\dfs\\<link>`` referring to ``\\\\host\\share``."""
        (self.folder / "dfs" / link).symlink_to(f"msdfs:{host}\\{share}")

    def start(self, timeout: float = 30.0) -> None:
        out = (self.folder / "smbd.out").open("ab")
        self.proc = subprocess.Popen(
            ["smbd", "-F", "--no-process-group", "--debug-stdout", "-s", str(self.conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # smbd signals its whole process group when it stops: its own, not pytest's.
            start_new_session=True,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"smbd exited with {self.proc.returncode}:\n{self.log}")
            try:
                socket.create_connection((self.address, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"smbd did not listen within {timeout} s:\n{self.log}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # smbd forks a child per connection, all in the session it leads.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def config(self, **extra: str) -> str:
        """The ``[smb]`` section for this server."""
        lines = [
            "[smb]",
            f'username = "{USER}"',
            f'password = "{PASSWORD}"',
            f'servers = ["{self.address}"]',
            f"port = {self.port}",
            "timeout = 5",
        ]
        lines += [f"{k} = {v}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"


@contextmanager
def public_folder() -> Iterator[Path]:
    """A temporary folder the share's account can reach (mode 0755 under the system's
    temporary directory), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="dsc-smbd-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _free_loopback_port() -> tuple[str, int]:
    rng = random.Random()
    for _ in range(50):
        address = f"127.{rng.randint(16, 250)}.{rng.randint(1, 250)}.{rng.randint(2, 250)}"
        with socket.socket() as s:
            try:
                s.bind((address, 0))
            except OSError:
                continue
            return address, s.getsockname()[1]
    raise AssertionError("no free loopback address for smbd")
