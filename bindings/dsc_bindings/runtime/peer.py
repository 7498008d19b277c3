"""The client at the other end of a connection, parsed once from the socket's address.

Every place that needs the client's address (the job quota's origin, the device book, the log)
reads ``Peer.host``; none parses a ``host:port`` text again (issue 14: ``::1:5678`` was one
device in the quota and another in the device book).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsc_core.fast_init import fast_init

__all__ = ["UNKNOWN_PEER", "Peer"]


@fast_init
@dataclass(frozen=True, slots=True)
class Peer:
    """A client address: ``host`` is the IP address as the socket gave it (IPv6 without
    brackets), ``port`` None when unknown."""

    host: str
    port: int | None = None

    @classmethod
    def of(cls, address: object) -> Peer:
        """From a socket's remote address: ``(host, port)`` or ``(host, port, flow, scope)``;
        anything else (a UNIX socket, a test's socketpair) is an unknown peer."""
        if isinstance(address, tuple) and len(address) >= 2:
            host, port = address[0], address[1]
            if isinstance(host, str) and host and isinstance(port, int):
                return cls(host, port)
        return UNKNOWN_PEER

    @property
    def known(self) -> bool:
        return self.host != "?"

    def __str__(self) -> str:
        """For the log: ``1.2.3.4:5678``, ``[::1]:5678`` or ``?``."""
        if self.port is None:
            return self.host
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


UNKNOWN_PEER = Peer("?")
