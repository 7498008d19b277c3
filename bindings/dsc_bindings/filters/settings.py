"""Configuration of the PostScan filters (R9): where UNC paths land, the SMTP relay, the user
directory's e-mail addresses and the SharePoint client."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dsc_bindings.filters.sharejournal import JournalOf
from dsc_bindings.filters.sites import SitePrefix, SiteUrl
from dsc_bindings.filters.smbsettings import SmbSettings

_UNC_FORBIDDEN = frozenset('<>:"|?*')


def parse_unc(text: str) -> tuple[str, ...] | None:
    """The components of ``\\\\host\\share\\path`` or None when it is not a plain UNC path.

    Refused (R9: a path we cannot map safely is a path outside the roots): no leading ``\\\\``,
    empty components (``\\\\host\\\\x``), ``.``/``..``, drive letters and stream names (``:``),
    wildcards, control characters, and the ``\\\\?\\`` / ``\\\\.\\`` device namespaces.  Forward
    slashes count as separators, so they can never reach the local file system inside a name.
    A trailing separator is tolerated.  ``\\\\`` alone gives ``()`` (used for a catch-all root).
    """
    unc = text.strip().replace("/", "\\")
    if not unc.startswith("\\\\"):
        return None
    body = unc[2:].rstrip("\\")
    if not body:
        return ()
    parts = tuple(body.split("\\"))
    for part in parts:
        if (
            not part.strip(". ")  # "", ".", "..", "...", " " (Windows reads these as "here"/"up")
            or any(c in _UNC_FORBIDDEN or ord(c) < 32 or ord(c) == 127 for c in part)
        ):
            return None
    return parts


@dataclass(frozen=True)
class FilterSettings:
    """Everything the filters need from the server configuration.  Immutable: a reload builds a
    new one, and a running job keeps the one it started with."""

    #: (UNC prefix, local directory) pairs.  A UNC path is mapped through the longest matching
    #: prefix (components compared case-insensitively); what follows the prefix becomes
    #: sub-directories of the local directory.  A path under no prefix is refused (R9).
    share_roots: tuple[tuple[str, Path], ...] = ()

    # SMTP relay (R9: "STARTTLS and login optional").
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_timeout: float = 30.0
    mail_from: str = "scan-server@localhost"
    #: For STARTTLS; None means ssl.create_default_context() (certificate verified).
    smtp_ssl_context: ssl.SSLContext | None = None
    #: An ``[smtp]`` table was given: /healthz checks that the relay accepts a connection.
    smtp_configured: bool = False

    #: The user directory's addresses: ``name@domain`` -> e-mail address (R9 SendToScanUser).
    #: A user not listed whose name contains '@' is mailed at that name.
    user_email: Mapping[str, str] = field(default_factory=dict)
    #: The directory's ``mail`` of a user (R14), asked before the table above; None: no
    #: directory.  Called from the engine's worker threads.
    directory_mail: Callable[[str], str | None] | None = field(default=None, compare=False)
    #: Where the file share filter records its deliveries (sharejournal.JournalOf); None: the
    #: journal file beside the job's documents.  A shared store sets its own (issue 18).
    journal_of: JournalOf | None = field(default=None, compare=False)

    # SharePoint (HTTP PUT).
    sharepoint_timeout: float = 60.0
    sharepoint_username: str | None = None
    sharepoint_password: str | None = None
    #: For https site URLs; None means ssl.create_default_context().
    sharepoint_ssl_context: ssl.SSLContext | None = None
    #: R13 (R9 SharePoint): the only site URLs documents and credentials may go to.  Empty:
    #: every SharePoint URL is refused (SharePointAccessDenied), so the default sends nothing.
    sharepoint_sites: tuple[SitePrefix, ...] = ()

    #: E-mail recipient domains (``contoso.com``; ``.contoso.com`` also covers sub-domains).
    #: None: any domain.  A recipient outside them is refused and not sent to.
    mail_domains: tuple[str, ...] | None = None

    #: ``[smb]``: UNC paths on these servers that no share root maps are written over SMB
    #: (issue 21); None: every UNC path must be mapped by a share root.
    smb: SmbSettings | None = None

    #: Bytes per read/write/send: memory stays flat and a cancel is seen between chunks.
    chunk_size: int = 256 * 1024

    _roots: tuple[tuple[tuple[str, ...], Path], ...] = field(
        init=False, repr=False, compare=False, default=()
    )
    _user_email_folded: Mapping[str, str] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        roots = []
        for prefix, local in self.share_roots:
            parts = parse_unc(prefix)
            if parts is None:
                raise ValueError(f"share root {prefix!r} is not a UNC prefix like \\\\host\\share")
            roots.append((tuple(p.casefold() for p in parts), Path(local)))
        # Longest prefix first, so a more specific root wins over a catch-all.
        roots.sort(key=lambda r: len(r[0]), reverse=True)
        object.__setattr__(
            self, "share_roots", tuple((prefix, Path(local)) for prefix, local in self.share_roots)
        )
        object.__setattr__(self, "_roots", tuple(roots))
        object.__setattr__(self, "user_email", MappingProxyType(dict(self.user_email)))
        object.__setattr__(
            self,
            "_user_email_folded",
            MappingProxyType({k.casefold(): v for k, v in self.user_email.items()}),
        )
        if self.chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        object.__setattr__(self, "sharepoint_sites", tuple(self.sharepoint_sites))
        if self.mail_domains is not None:
            domains = []
            for domain in self.mail_domains:
                folded = domain.strip().casefold()
                if not folded.lstrip(".") or "@" in folded or any(c.isspace() for c in folded):
                    raise ValueError(f"e-mail domain {domain!r} is not a domain name")
                domains.append(folded)
            object.__setattr__(self, "mail_domains", tuple(domains))

    @classmethod
    def embedded_default(cls, data_dir: str | Path, **overrides: Any) -> FilterSettings:
        """The embedded server's mapping: any ``\\\\host\\share\\path`` is written to
        ``DATA/shares/host/share/path`` (host and share lower-cased, see :meth:`map_unc`)."""
        return cls(share_roots=(("\\\\", Path(data_dir) / "shares"),), **overrides)

    def map_unc(self, unc: str) -> Path | None:
        """The local directory for a UNC path from the instructions, or None if refused (R9)."""
        mapped = self.share_location(unc)
        return None if mapped is None else mapped[0].joinpath(*mapped[1])

    def share_location(self, unc: str) -> tuple[Path, tuple[str, ...]] | None:
        """:meth:`map_unc` in two parts: the configured root (the administrator's, trusted) and
        the components below it (named by the share's users, so the file share filter opens
        them one by one without following a symbolic link, issue 14 §4); None if refused."""
        parts = parse_unc(unc)
        if parts is None or len(parts) < 2:  # a UNC path names at least \\host\share
            return None
        folded = tuple(p.casefold() for p in parts)
        for prefix, local in self._roots:
            if folded[: len(prefix)] == prefix:
                tail = list(parts[len(prefix) :])
                # Host and share names are case-insensitive on Windows; when they become
                # directory names, lower-case them so \\Srv\Scans and \\srv\scans are one place.
                for i in range(max(0, 2 - len(prefix))):
                    if i < len(tail):
                        tail[i] = tail[i].lower()
                return local, tuple(tail)
        return None

    def sharepoint_allows(self, site: SiteUrl) -> bool:
        """Whether documents and credentials may go to ``site`` (R13)."""
        return any(prefix.covers(site) for prefix in self.sharepoint_sites)

    def mail_allows(self, address: str) -> bool:
        """Whether ``address`` is in a configured recipient domain (always, without a list)."""
        if self.mail_domains is None:
            return True
        domain = address.rpartition("@")[2].casefold()
        return any(
            domain == allowed.lstrip(".") or (allowed.startswith(".") and domain.endswith(allowed))
            for allowed in self.mail_domains
        )

    def address_of(self, user_name: str) -> str | None:
        """The e-mail address of a scan user (``name@domain``), or None if unknown."""
        if self.directory_mail is not None:
            found = self.directory_mail(user_name)
            if found:
                return found
        address = self.user_email.get(user_name) or self._user_email_folded.get(
            user_name.casefold()
        )
        if address:
            return address
        return user_name if "@" in user_name else None
