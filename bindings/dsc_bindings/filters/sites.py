"""Where the SharePoint filter may send documents and the configured credentials (R13, R9).

A scanner names the site URL in its PostScan instructions, so without a rule it could make the
server PUT documents, with the ``[sharepoint]`` account's password, to any host.  The rule:
a site URL is used only when it lies under a configured prefix, over https unless that prefix
allows http.  Anything else is refused before a connection is opened.

URLs are compared in a normalized form, and the upload goes to exactly that form, so what was
checked is what is sent: lower-case host, the effective port, path segments percent-decoded
(an encoded ``/`` or a ``.``/``..`` segment is refused rather than resolved), no user
information, query or fragment.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

__all__ = ["SiteError", "SitePrefix", "SiteUrl", "parse_site_url"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Characters left as they are in one path segment of the upload URL (RFC 3986 pchar).
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"


class SiteError(ValueError):
    """A URL that cannot be used as a SharePoint site (the message says why)."""


@dataclass(frozen=True, slots=True)
class SiteUrl:
    """A site URL in normalized form."""

    scheme: str  # "http" or "https"
    host: str  # lower case
    port: int  # effective: the scheme's default when the URL gives none
    explicit_port: bool
    segments: tuple[str, ...]  # decoded path segments, no empty ones

    @property
    def https(self) -> bool:
        return self.scheme == "https"

    @property
    def path(self) -> str:
        """The percent-encoded path without a trailing slash ("" for the root)."""
        return "".join("/" + quote(s, safe=_SEGMENT_SAFE) for s in self.segments)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.explicit_port else ""
        return f"{self.scheme}://{host}{port}{self.path}"


def parse_site_url(text: str) -> SiteUrl:
    """Normalize an http(s) site URL or raise :class:`SiteError`."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise SiteError(f"not a URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise SiteError(f"scheme {parts.scheme!r} is not http or https")
    if not parts.hostname:
        raise SiteError("no host")
    if parts.username is not None or parts.password is not None:
        # "https://allowed.example@evil.example/" tricks people, and credentials in the URL
        # would bypass the configured account.
        raise SiteError("user information in the URL")
    if parts.query or parts.fragment:
        raise SiteError("a query or fragment has no place in '<site>/<file name>'")
    segments = []
    for raw in parts.path.split("/"):
        if not raw:
            continue
        segment = unquote(raw, errors="strict") if "%" in raw else raw
        if segment in (".", "..") or any(c in segment for c in "/\\") or _has_control(segment):
            raise SiteError(f"path segment {raw!r} is not allowed")
        segments.append(segment)
    return SiteUrl(
        scheme,
        parts.hostname.lower(),
        port if port is not None else _DEFAULT_PORTS[scheme],
        port is not None,
        tuple(segments),
    )


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


@dataclass(frozen=True, slots=True)
class SitePrefix:
    """One configured prefix: URLs under it may receive documents and the credentials."""

    url: str
    #: Also allow plain http to this host and path (the credentials then cross the network
    #: readable by anyone on the path: only for a trusted network, and only when asked).
    allow_http: bool = False
    _site: SiteUrl | None = None

    def __post_init__(self) -> None:
        try:
            site = parse_site_url(self.url)
        except SiteError as exc:
            raise ValueError(f"SharePoint site prefix {self.url!r}: {exc}") from exc
        if not site.https and not self.allow_http:
            raise ValueError(
                f"SharePoint site prefix {self.url!r} is plain http: write it with https://, "
                "or allow http for it explicitly (allow_http = true)"
            )
        object.__setattr__(self, "_site", site)

    @property
    def site(self) -> SiteUrl:
        assert self._site is not None
        return self._site

    def covers(self, url: SiteUrl) -> bool:
        prefix = self.site
        if not url.https and not self.allow_http:
            return False
        if url.host != prefix.host:
            return False
        if prefix.explicit_port:
            if url.port != prefix.port:
                return False
        elif url.port != _DEFAULT_PORTS[url.scheme]:
            return False
        n = len(prefix.segments)
        # Whole segments (``/sites/scans`` does not cover ``/sites/scansevil``); SharePoint
        # paths are case-insensitive.
        return len(url.segments) >= n and all(
            a.casefold() == b.casefold()
            for a, b in zip(url.segments[:n], prefix.segments, strict=True)
        )
