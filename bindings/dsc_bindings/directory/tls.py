"""TLS to the directory (ldaps://, or StartTLS on ldap://) with errors an administrator can act
on (issue 14 §3).

ldap3's own check compares the certificate with the URL's host *plus* any extra names and, on a
mismatch, reports the whole certificate as a Python dict over several lines.  Here the handshake
is Python's verified one: OpenSSL checks the chain against ``ca_file`` and the certificate against
one name, ``[directory] tls_server_name`` when set (a DC reached by address: the name is also
sent as SNI), else the URL's host.  A failure is kept as one line in :attr:`DirectoryTls.failure`;
a name mismatch names both sides, the name asked for and the names in the certificate.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException

from dsc_bindings.directory.closing import let_go

#: X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH (openssl/x509_vfy.h).
_NAME_MISMATCH = {62, 64}


class DirectoryTls(ldap3.Tls):
    """ldap3's TLS settings with Python's verified handshake (module doc)."""

    def __init__(self, ca_file: Path | None, server_name: str | None) -> None:
        super().__init__(
            validate=ssl.CERT_REQUIRED,
            ca_certs_file=str(ca_file) if ca_file else None,
            version=ssl.PROTOCOL_TLS_CLIENT,
            sni=server_name,
        )
        self.ca_file = ca_file
        self.server_name = server_name
        #: Why the last handshake failed, in one line; None while none failed.
        self.failure: str | None = None

    def context(self, *, check_name: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        context.check_hostname = check_name
        return context

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        # The handshake always happens here (ldap3 asks for it for ldaps:// and StartTLS alike),
        # so its failure is explained here and not later inside a send.
        server = connection.server
        name = self.server_name or server.host
        try:
            connection.socket = self.context().wrap_socket(connection.socket, server_hostname=name)
        except ssl.SSLCertVerificationError as exc:
            self.failure = self._untrusted(exc, name, server)
            raise
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
            self.failure = (
                f"TLS handshake with {server.host}:{server.port} failed ({reason}): is it an "
                "LDAPS port (636), or StartTLS on ldap:// (389)?"
            )
            raise

    def _untrusted(self, exc: ssl.SSLCertVerificationError, name: str, server: Any) -> str:
        host, port = server.host, server.port
        if exc.verify_code in _NAME_MISMATCH:
            names = certificate_names(host, port, server.ssl, self.ca_file)
            hint = (
                "correct [directory] tls_server_name"
                if self.server_name
                else "reach the DC by one of those names, or set [directory] tls_server_name"
            )
            return (
                f"the certificate of {host}:{port} is not valid for {name!r}: it names "
                f"{', '.join(names) if names else 'no name that could be read'} ({hint})"
            )
        where = f"ca_file {self.ca_file}" if self.ca_file else "the system's CAs (no ca_file)"
        return (
            f"the certificate of {host}:{port} is not trusted ({exc.verify_message}): "
            f"{where} must hold the CA that signed it"
        )


class _CertificateReader(DirectoryTls):
    """Reads the names of a trusted certificate without checking them (for the message)."""

    def __init__(self, ca_file: Path | None) -> None:
        super().__init__(ca_file, None)
        self.names: list[str] = []

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        tls = self.context(check_name=False).wrap_socket(connection.socket)
        connection.socket = tls
        self.names = _names_of(dict(tls.getpeercert() or {}))


def certificate_names(host: str, port: int, use_ssl: bool, ca_file: Path | None) -> list[str]:
    """The DNS names and addresses the directory's (trusted) certificate is for, read over a
    second connection made like the first (ldaps://, or StartTLS); [] when unreadable."""
    reader = _CertificateReader(ca_file)
    server = ldap3.Server(
        host, port=port, use_ssl=use_ssl, tls=reader, connect_timeout=5, get_info=ldap3.NONE
    )
    conn = ldap3.Connection(server, receive_timeout=5, raise_exceptions=True)
    try:
        conn.open()
        if not use_ssl:
            conn.start_tls()
    except (LDAPException, OSError):
        pass
    finally:
        let_go(conn)
    return reader.names


def _names_of(cert: dict[str, Any]) -> list[str]:
    """A certificate's subjectAltName entries, else its subject commonName."""
    names = [str(value) for _kind, value in cert.get("subjectAltName", ())]
    if not names:
        names = [
            str(value)
            for rdn in cert.get("subject", ())
            for key, value in rdn
            if key == "commonName"
        ]
    return names


__all__ = ["DirectoryTls", "certificate_names"]
