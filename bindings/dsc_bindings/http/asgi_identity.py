"""The R10 identity of an ASGI request: from the server's TLS extension, else from a trusted proxy.

An ASGI server that terminates TLS itself may give the verified client certificate in the ASGI
TLS extension (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM, the client's own
first).  Behind a reverse proxy that terminates TLS, the proxy passes the certificate it
verified in a header (``[server] client_cert_header``, e.g. nginx's
``$ssl_client_escaped_cert``); that header is read only when the request comes from one of
``[server] trusted_proxies``, never from any other peer: anyone can send a header.  The
certificate is then mapped to a user by the one rule of :mod:`.certidentity`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dsc_bindings.http.certidentity import connection_identity

__all__ = ["ClientIdentity", "certificate_der"]

log = logging.getLogger("dsc.http")

_PEM_ARMOUR = re.compile(rb"-----(BEGIN|END) CERTIFICATE-----")
#: What proxies send for "no certificate" (nginx: empty; haproxy and Apache: "(null)").
_NO_CERTIFICATE = frozenset({b"", b"(null)", b"-"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def certificate_der(value: bytes) -> bytes | None:
    """The DER bytes of a certificate as a proxy passes it: URL-escaped PEM (nginx
    ``$ssl_client_escaped_cert``), PEM with its line breaks turned into spaces or tabs, or bare
    base64 DER (haproxy ``ssl_c_der,base64``).  None for "no certificate"; ValueError when the
    value is none of these."""
    text = urllib.parse.unquote_to_bytes(value.strip())
    if text.strip() in _NO_CERTIFICATE:
        return None
    body = b"".join(_PEM_ARMOUR.sub(b"", text).split())
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the certificate header is neither PEM nor base64 DER") from exc
    if not der:
        return None
    return der


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Where an ASGI request's identity comes from (module doc)."""

    trusted_proxies: tuple[Network, ...] = ()
    #: The header name, lower-cased (ASGI gives header names so), or None.
    header: bytes | None = None

    @classmethod
    def of(cls, trusted_proxies: Iterable[str], header: str | None) -> ClientIdentity:
        """From the settings' texts (addresses or networks; validated by the settings)."""
        return cls(
            tuple(ipaddress.ip_network(text, strict=False) for text in trusted_proxies),
            header.strip().lower().encode("latin-1") if header else None,
        )

    def is_trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_proxies)

    def identify(self, scope: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """(identity, None), or (None, why the certificate is refused); (None, None) without
        a certificate."""
        extensions = scope.get("extensions")
        tls = extensions.get("tls") if extensions else None
        if tls is not None and isinstance(tls, Mapping):  # (an ABC check costs ~2k instructions)
            chain = tls.get("client_cert_chain") or ()
            if chain:
                try:
                    der = certificate_der(str(chain[0]).encode("ascii"))
                except (ValueError, UnicodeEncodeError):
                    return None, "the client certificate cannot be read"
                return connection_identity(der)
        if self.header is None:
            return None, None
        value = None
        for key, item in scope.get("headers", ()):
            if key == self.header:
                value = item
                break
        if value is None:
            return None, None
        client = scope.get("client")
        host = str(client[0]) if client else "?"
        if not self.is_trusted(host):
            log.warning(
                "%s: a %s header from a peer that is not in [server] trusted_proxies: ignored",
                host,
                self.header.decode("latin-1"),
            )
            return None, None
        try:
            der = certificate_der(bytes(value))
        except ValueError as exc:
            return None, f"the proxy's client certificate cannot be read ({exc})"
        return connection_identity(der)
