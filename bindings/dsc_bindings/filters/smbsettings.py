"""``[smb]``: the account the file share filter writes as over SMB 2/3, the only servers it
goes to, and the pool of connections to them (issue 21).

A scanner names the UNC path in its PostScan instructions, so without a rule it could make the
server authenticate, with the service account, to any host.  The rule mirrors the SharePoint
sites (R13): a UNC host is contacted only when it is one of ``servers`` (compared
case-insensitively, as Windows names are); any other host is refused before a connection opens.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from smbprotocol.connection import Connection

from dsc_bindings.filters.smbwatch import AnswerWatch

log = logging.getLogger(__name__)


class ReferralRefused(PermissionError):
    """A DFS referral named a host outside ``[smb] servers``: nothing is sent to it."""


class _ServersOnly(dict[str, Connection]):
    """smbclient's connection cache, limited to ``servers``.

    A share may be a DFS root whose links refer the client to other hosts, and smbclient follows
    referrals itself, with the same credentials (root referrals in get_smb_tree, link referrals
    when an open answers STATUS_PATH_NOT_COVERED), and its ``skip_dfs`` does not stop either.
    Every connection it opens goes through register_session, which asks this cache for the
    host's connection first: a host outside ``servers`` is refused there, before a socket opens
    (issue 21: the credentials go to those servers only)."""

    def __init__(self, servers: tuple[str, ...]) -> None:
        super().__init__()
        self.servers = servers

    def _check(self, key: str) -> None:
        host = key.rpartition(":")[0]
        if host not in self.servers:
            raise ReferralRefused(
                errno.EACCES, f"refused a DFS referral to {host}: not one of [smb] servers", host
            )

    def get(self, key: str, default: Any = None) -> Any:
        self._check(key)
        return super().get(key, default)

    def __setitem__(self, key: str, value: Connection) -> None:
        self._check(key)
        super().__setitem__(key, value)


class SmbPool:
    """Connections per server (smbprotocol keeps one session per server and account on each,
    and a tree per share), reused across jobs until one breaks; to ``servers`` only."""

    def __init__(self, servers: tuple[str, ...]) -> None:
        #: smbclient's connection cache, ours alone: ``"host:port"`` -> Connection.
        self.connections = _ServersOnly(servers)
        self._lock = threading.Lock()
        #: A deadline on every answer (smbwatch): a silent server's connections are aborted.
        self.watch = AnswerWatch(self.abort)

    def _of(self, host: str) -> list[Connection]:
        with self._lock:
            return [c for k, c in self.connections.items() if k.rpartition(":")[0] == host.lower()]

    def abort(self, host: str) -> None:
        """The server ``host`` stopped answering: wake every call waiting on it, then drop its
        connections.  The socket is shut down directly (not through smbprotocol's close, which
        waits for the lock a send blocked on a full TCP window holds): that ends a blocked send
        and the receiving thread's wait alike."""
        for connection in self._of(host):
            sock = getattr(connection.transport, "_sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError as exc:  # already closed: nothing to wake
                    log.debug("shutting down an SMB socket: %s", exc)
        self.forget(host)

    def forget(self, host: str) -> None:
        """Drop the connections to ``host`` (after one broke): the next use opens afresh."""
        with self._lock:
            stale = [k for k in self.connections if k.rpartition(":")[0] == host.lower()]
            dropped = [self.connections.pop(k) for k in stale]
        for connection in dropped:
            try:
                connection.disconnect(close=False)
            except Exception as exc:  # already broken: nothing more to do with it
                log.debug("closing a broken SMB connection: %s", exc)

    def close(self) -> None:
        self.watch.close()
        with self._lock:
            dropped = list(self.connections.values())
            self.connections.clear()
        for connection in dropped:
            try:
                connection.disconnect(close=True)
            except Exception as exc:
                log.debug("closing an SMB connection: %s", exc)


@dataclass(frozen=True)
class SmbSettings:
    username: str
    password: str = field(repr=False)
    #: The only hosts the credentials go to (lower case).
    servers: tuple[str, ...]
    domain: str | None = None
    #: SMB 3 encryption of every message (signing is always required).
    require_encryption: bool = True
    port: int = 445
    #: Seconds to open a connection, and to wait for each answer (smbwatch).
    timeout: float = 30.0
    #: ``\\host\share`` paths /healthz checks (optional).
    health_shares: tuple[str, ...] = ()
    pool: SmbPool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.username:
            raise ValueError("[smb] username is empty")
        servers = tuple(s.strip().lower() for s in self.servers)
        if not servers or any(not s or "\\" in s or "/" in s for s in servers):
            raise ValueError('[smb] servers must list host names, e.g. ["fs01.contoso.com"]')
        object.__setattr__(self, "servers", servers)
        object.__setattr__(self, "pool", SmbPool(servers))
        object.__setattr__(self, "health_shares", tuple(self.health_shares))

    def allows(self, host: str) -> bool:
        return host.strip().lower() in self.servers

    @property
    def account(self) -> str:
        return f"{self.domain}\\{self.username}" if self.domain else self.username

    def client_options(self) -> dict[str, Any]:
        """The keyword arguments of every smbclient call: this account, this pool."""
        return {
            "username": self.account,
            "password": self.password,
            "port": self.port,
            "encrypt": self.require_encryption,
            "require_signing": True,
            "connection_timeout": self.timeout,
            "connection_cache": self.pool.connections,
        }


def shutdown_pool(settings: SmbSettings | None) -> None:
    if settings is not None:
        settings.pool.close()


__all__ = ["ReferralRefused", "SmbPool", "SmbSettings", "shutdown_pool"]
