"""A directory that refuses the connection leaves no socket open (directory/closing.py):
ldap3 keeps the socket of a failed ``open()`` and its ``unbind()`` does not close it."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import ldap3
import pytest

from dsc_bindings.directory.closing import let_go
from dsc_bindings.directory.ldap import Directory, DirectorySettings, DirectoryUnavailable


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound by this test and not listening: a connection to it is refused, and no
    other server can take it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


def refused_connection(port: int) -> ldap3.Connection:
    server = ldap3.Server("127.0.0.1", port=port, connect_timeout=5, get_info=ldap3.NONE)
    conn = ldap3.Connection(server, raise_exceptions=True)
    with pytest.raises(ldap3.core.exceptions.LDAPSocketOpenError):
        conn.open()
    return conn


def test_let_go_closes_the_socket_a_refused_open_left(refusing_port: int) -> None:
    conn = refused_connection(refusing_port)
    conn.unbind()
    assert conn.socket.fileno() != -1  # ldap3's own unbind left it open
    let_go(conn)
    assert conn.socket.fileno() == -1


def test_a_directory_that_refuses_leaves_no_socket_open(
    refusing_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[ldap3.Connection] = []
    real = ldap3.Connection

    def recorded(*args: object, **kwargs: object) -> ldap3.Connection:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(ldap3, "Connection", recorded)
    settings = DirectorySettings(
        url=f"ldap://127.0.0.1:{refusing_port}",
        bind_user="scan@example.test",
        password="secret",
        base_dn="DC=example,DC=test",
    )
    with pytest.raises(DirectoryUnavailable, match="refused"):
        Directory(settings).connect()
    assert made, "no connection was tried"
    assert all(c.socket is None or c.socket.fileno() == -1 for c in made), made
