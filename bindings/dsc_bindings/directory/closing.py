"""Letting go of an ldap3 connection, whatever state it is in.

``Connection.unbind()`` closes the socket of an open connection only: when ``open()`` failed
(connection refused, a TLS handshake refused), ldap3 has already made the socket and keeps it
on ``conn.socket``, marked closed, so ``unbind()`` does nothing and the socket stays open
until the garbage collector finds it, in whatever code runs then, with a ResourceWarning.  A
directory that is down is asked again every RETRY_SECONDS (directory/ldap.py): each attempt
such a socket."""

from __future__ import annotations

import contextlib

import ldap3
from ldap3.core.exceptions import LDAPException

__all__ = ["let_go"]


def let_go(conn: ldap3.Connection) -> None:
    """Unbind ``conn`` if it is open and close the socket ldap3 may have left behind."""
    with contextlib.suppress(LDAPException, OSError):
        conn.unbind()
    sock = getattr(conn, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
