"""How the server's own addresses are written in URLs (RFC 3986), and the base URL it
advertises when ``[server] public_url`` is not set (issue 14; the rules on which addresses
may be advertised are :mod:`.exposure`'s).  Below the settings, which use it."""

from __future__ import annotations

__all__ = ["WILDCARDS", "bound_base_url", "url_host"]

#: Addresses that mean "every interface": they name no host a scanner could reach.
WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def url_host(host: str) -> str:
    """``host`` as it is written in a URL: an IPv6 address in brackets (RFC 3986 3.2.2)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def bound_base_url(scheme: str, host: str, port: int) -> str:
    """The base URL without ``public_url``: the bound address.  A wildcard names no one host, so
    it is the loopback address, which .exposure refuses beyond a development machine."""
    return f"{scheme}://{url_host('127.0.0.1' if host in WILDCARDS else host)}:{port}"
