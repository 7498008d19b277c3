"""TLS to the directory (issue 14 §3): ``[directory] tls_server_name`` for a DC reached by
address, and TLS failures in one readable line (a name mismatch names both sides), against the
real Samba AD DC and a real TLS listener on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from dsc_bindings.directory.ldap import Directory, DirectorySettings, DirectoryUnavailable
from dsc_core import Lookups
from e2e_support import dsc
from samba_support import BASE_DN, DC_NAME, DOMAIN, SambaDC
from test_directory import certifi_like_ca, settings


def test_a_dc_reached_by_address_is_checked_against_tls_server_name(samba_dc: SambaDC) -> None:
    by_name = Directory(settings(samba_dc, tls_server_name=DC_NAME))
    user = by_name.user_by_sid(samba_dc.sid("alice"))
    assert user is not None and user.account == f"alice@{DOMAIN}"
    # StartTLS on ldap:// checks the same name.
    starttls = Directory(
        settings(samba_dc, url=f"ldap://{samba_dc.address}", tls_server_name=DC_NAME)
    )
    assert starttls.is_admin(f"alice@{DOMAIN}")


@pytest.mark.parametrize("scheme", ["ldaps", "ldap"])
def test_a_name_mismatch_is_one_line_naming_both_names(samba_dc: SambaDC, scheme: str) -> None:
    """The certificate carries the DC's address too: only tls_server_name is compared, so a
    wrong one is refused although the address would match."""
    wrong = f"intranet.{DOMAIN}"
    directory = Directory(
        settings(samba_dc, url=f"{scheme}://{samba_dc.address}", tls_server_name=wrong)
    )
    with pytest.raises(DirectoryUnavailable) as refused:
        directory.connect()
    message = str(refused.value)
    assert "\n" not in message and len(message) < 300, message
    assert f"not valid for '{wrong}'" in message, message
    assert f"it names {DC_NAME}, {samba_dc.address}" in message, message
    assert "tls_server_name" in message
    # The requests that needed it get the temporary fault, and the answer says why.
    answers = directory.answer(Lookups(sids=(samba_dc.sid("bob"),)))
    assert answers.unavailable


def test_an_untrusted_certificate_is_one_line_naming_ca_file(samba_dc: SambaDC) -> None:
    other = Path(certifi_like_ca(samba_dc))
    with pytest.raises(DirectoryUnavailable) as refused:
        Directory(settings(samba_dc, ca_file=other)).connect()
    message = str(refused.value)
    assert "\n" not in message, message
    assert "is not trusted" in message and f"ca_file {other}" in message, message


def test_dsc_names_both_names_in_one_line(samba_dc: SambaDC, tmp_path: Path) -> None:
    """From the configuration file to the administrator's terminal."""
    config = tmp_path / "dsc.toml"
    config.write_text(samba_dc.config(config, tls_server_name=f'"intranet.{DOMAIN}"'))
    refused = dsc("process", "list", "--config", str(config))
    assert refused.code == 1, refused
    [line] = refused.err.strip().splitlines()
    assert line.startswith(f"dsc: directory: {samba_dc.url}: the certificate of"), line
    assert f"'intranet.{DOMAIN}'" in line and DC_NAME in line, line
    config.write_text(samba_dc.config(config, tls_server_name=f'"{DC_NAME}"'))
    listed = dsc("process", "list", "--config", str(config))
    assert listed.code == 0, listed


# --- a TLS listener on 127.0.0.1 whose certificate names only a DNS name -------------------------


class TlsListener:
    """Accepts TLS connections on 127.0.0.1, records the SNI each client sent, then closes."""

    def __init__(self, folder: Path, name: str) -> None:
        self.ca = trustme.CA()
        self.ca_pem = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(name).configure_cert(self.context)
        self.server_names: list[str | None] = []
        self.context.sni_callback = lambda _sock, sni, _ctx: self.server_names.append(sni)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        # shutdown wakes the accept() blocked in the thread (close() alone does not, and the
        # join would wait out its 5 s).
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[TlsListener]:
    server = TlsListener(tmp_path, "dc1.contoso.example")
    yield server
    server.close()


def _directory(listener: TlsListener, server_name: str | None) -> Directory:
    return Directory(
        DirectorySettings(
            url=f"ldaps://127.0.0.1:{listener.port}",
            bind_user="svc@contoso.example",
            password="x",
            base_dn="DC=contoso,DC=example",
            ca_file=listener.ca_pem,
            connect_timeout=3,
            timeout=3,
            tls_server_name=server_name,
        )
    )


def test_tls_server_name_is_sent_as_sni_and_matched(listener: TlsListener) -> None:
    with pytest.raises(DirectoryUnavailable) as after_tls:
        _directory(listener, "dc1.contoso.example").connect()
    # The handshake passed (the listener then hangs up: it is no LDAP server).
    assert "certificate" not in str(after_tls.value), after_tls.value
    assert listener.server_names == ["dc1.contoso.example"]


def test_by_address_without_tls_server_name_says_what_to_set(listener: TlsListener) -> None:
    with pytest.raises(DirectoryUnavailable) as refused:
        _directory(listener, None).connect()
    assert str(refused.value) == (
        f"ldaps://127.0.0.1:{listener.port}: the certificate of 127.0.0.1:{listener.port} is "
        "not valid for '127.0.0.1': it names dc1.contoso.example (reach the DC by one of "
        "those names, or set [directory] tls_server_name)"
    )


def test_tls_server_name_must_be_a_host_name() -> None:
    for bad in ("", "ldaps://dc1", "dc1 .contoso", "dc1:636"):
        with pytest.raises(ValueError, match="tls_server_name"):
            DirectorySettings(
                url="ldaps://10.0.0.5",
                bind_user="u",
                password="p",
                base_dn=BASE_DN,
                tls_server_name=bad,
            )
