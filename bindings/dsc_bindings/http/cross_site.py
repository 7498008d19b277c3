"""Requests a browser marks as sent by another site are refused (issue 14, section 1).

A page on any other site can make an administrator's browser POST to the server (a
``fetch(..., {mode: "no-cors"})`` or a form needs no permission), with the administrator's
client certificate.  Browsers say where such a request comes from: ``Sec-Fetch-Site``
(Fetch Metadata) and ``Origin`` (RFC 6454).  Scanners and management clients send neither, so
refusing what a browser marks as foreign costs no legitimate client anything.

The rule, for every request on every path (the HTTP driver applies it before anything else is
read): ``Sec-Fetch-Site: cross-site`` or ``same-site`` is refused; so is an ``Origin`` that is
not the server's own, the origin of the URL it advertises (``[server] public_url``, else the
address it is bound to).  The ``Host`` header does not count as "own": under DNS rebinding a
hostile name points at the server and the browser sends that name as Host and Origin alike.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

__all__ = ["cross_site_refusal", "origin_of"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Sec-Fetch-Site values of a request that did not come from the server's own pages.
_FOREIGN_SITES = frozenset({b"cross-site", b"same-site"})


def origin_of(url: str) -> str | None:
    """The serialized origin (RFC 6454 section 6.1) of an http(s) URL: lower-case scheme and
    host, the port only when it is not the scheme's default; None for anything else."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def cross_site_refusal(
    fetch_site: bytes | None, origin: bytes | None, own_origins: Callable[[], frozenset[str]]
) -> str | None:
    """Why a request is refused as cross-site (one line, for a 403), or None.

    ``fetch_site`` and ``origin`` are the raw header values (None when absent); ``own_origins``
    is asked only when an Origin is present (rare: browsers only)."""
    if fetch_site is not None and fetch_site.strip().lower() in _FOREIGN_SITES:
        site = fetch_site.strip().decode("ascii", "replace")
        return (
            f"The browser marked this request as sent by another site (Sec-Fetch-Site: {site}); "
            "this server does not accept requests from other web pages."
        )
    if origin is None:
        return None
    text = origin.decode("latin-1").strip()
    own = own_origins()
    # "null" (a sandboxed page, a file, a redirect chain) is never our own.
    if text.lower() == "null" or origin_of(text) not in own:
        return (
            f"Requests from web pages of {text} are not accepted; this server's own origin "
            f"is {', '.join(sorted(own)) or '(none)'}."
        )
    return None
