"""The user directory: Active Directory (or a Samba AD DC) over LDAP, with ``ldap3`` (R14).

What the server asks it (through the core's seam, :mod:`dsc_core.directory`):

- a WS-DSP ``UserIdentifier`` SID -> the account through ``objectSid``: ``sAMAccountName@<DNS
  domain>`` (the R9 folder) and its ``mail`` (SendToScanUser);
- a TLS client certificate identity -> the account whose ``userPrincipalName`` equals it (or,
  for an identity without ``@``, whose ``sAMAccountName`` does);
- is an identity a scan administrator: a member, nested included, of ``admin_group``
  (``memberOf:1.2.840.113556.1.4.1941:=`` LDAP_MATCHING_RULE_IN_CHAIN; Samba supports it);
- the display name of a ``msImaging-PSPIdentifier`` (16-byte GUID or GUID text, both read).

Every answer (found or not) is cached for ``cache_seconds``, keyed by the name exactly as
asked: the directory decides which spellings match (its own case rules), so the cache must not
fold names itself (``casefold()`` made a CN written with U+212A KELVIN SIGN the cached answer of
the administrator ``kate``, issue 14).  Lookups block on the network, so
they run in worker threads only (the service calls :meth:`Directory.answer` from the thread that
carries out a request, never from the event loop).  Every LDAP call has a connect and a receive
timeout, so a directory that is down or hangs costs at most those seconds: the request then
gets ServerErrorTemporaryError (R4 step 9) and the log says why.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ldap3
from ldap3.core.exceptions import (
    LDAPBusyResult,
    LDAPException,
    LDAPInvalidCredentialsResult,
    LDAPOperationResult,
    LDAPStrongerAuthRequiredResult,
    LDAPUnavailableResult,
)
from ldap3.utils.conv import escape_filter_chars

from dsc_bindings.directory.closing import let_go
from dsc_bindings.directory.tls import DirectoryTls
from dsc_core import DirectoryAnswers, Lookups

__all__ = [
    "IN_CHAIN",
    "RETRY_SECONDS",
    "Directory",
    "DirectoryError",
    "DirectorySettings",
    "DirectoryUnavailable",
    "DirectoryUser",
    "escape_bytes",
    "guid_filter_values",
    "sid_to_bytes",
    "sid_to_text",
]

log = logging.getLogger("dsc.directory")

#: After the directory could not be reached, seconds before the next attempt (meanwhile the
#: requests that need it get the temporary fault at once).
RETRY_SECONDS = 2.0
#: LDAP_MATCHING_RULE_IN_CHAIN: membership through nested groups ([MS-ADTS] 3.1.1.3.4.4.3).
IN_CHAIN = "1.2.840.113556.1.4.1941"


class DirectoryError(Exception):
    """A directory operation failed for a reason the user can fix (message says what)."""


class DirectoryUnavailable(DirectoryError):
    """The directory could not be reached or did not answer in time."""


class _StaleConnection(DirectoryUnavailable):
    """The shared connection failed (it may have been idle too long): worth one retry."""


@dataclass(frozen=True)
class DirectorySettings:
    """``[directory]`` of the configuration file (see docs/directory.md)."""

    url: str
    bind_user: str
    password: str
    base_dn: str
    #: The CA that signed the directory's certificate (ldaps://, or StartTLS on ldap://).
    ca_file: Path | None = None
    #: Scan administrators: members (nested included) of this group (name or DN).
    admin_group: str | None = None
    cache_seconds: float = 300.0
    connect_timeout: float = 5.0
    timeout: float = 10.0
    #: Where scan processes live (default ``CN=PSPs,CN=System,<base_dn>``).
    processes_dn: str | None = None
    #: The name the DC's certificate must carry (and the SNI sent), for a DC reached by
    #: address; default: the URL's host.
    tls_server_name: str | None = None
    #: A folder holding PostScan.xsd, WDPScan.xsd and bdsrr-fsf/emlf/spf.xsd: scan processes
    #: are then also checked against these schemas before they are written (default: the
    #: built-in structural check alone; the schemas are not shipped).
    schema_dir: Path | None = None

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
            raise ValueError(
                f"url must be ldap://HOST[:PORT] or ldaps://HOST[:PORT], not {self.url!r}"
            )
        if not self.base_dn or "=" not in self.base_dn:
            raise ValueError(f"base_dn must be a DN like DC=contoso,DC=com, not {self.base_dn!r}")
        if self.tls_server_name is not None and (
            not self.tls_server_name or any(c.isspace() or c in "/:@" for c in self.tls_server_name)
        ):
            raise ValueError(
                f"tls_server_name must be a host name like dc1.contoso.com, not "
                f"{self.tls_server_name!r}"
            )
        for name in ("cache_seconds", "connect_timeout", "timeout"):
            if getattr(self, name) < 0 or (name != "cache_seconds" and getattr(self, name) == 0):
                raise ValueError(f"{name} must be positive")

    @property
    def domain(self) -> str:
        """The DNS domain of ``base_dn`` (DC=contoso,DC=com -> contoso.com)."""
        return ".".join(
            rdn.split("=", 1)[1].strip().lower()
            for rdn in self.base_dn.split(",")
            if rdn.strip().lower().startswith("dc=")
        )

    @property
    def psp_dn(self) -> str:
        return self.processes_dn or f"CN=PSPs,CN=System,{self.base_dn}"


@dataclass(frozen=True, slots=True)
class DirectoryUser:
    dn: str
    sid: str
    account: str  # sAMAccountName@domain (R14)
    mail: str | None
    upn: str | None


# --- encodings ---------------------------------------------------------------------------------


def sid_to_bytes(sid: str) -> bytes:
    """``S-1-5-21-...`` -> the binary SID of ``objectSid`` ([MS-DTYP] 2.4.2.2)."""
    parts = sid.strip().upper().split("-")
    if len(parts) < 3 or parts[0] != "S" or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"not a SID: {sid!r}")
    revision, authority, subs = int(parts[1]), int(parts[2]), [int(p) for p in parts[3:]]
    if revision != 1 or len(subs) > 15 or authority >= 2**48 or any(s >= 2**32 for s in subs):
        raise ValueError(f"not a SID: {sid!r}")
    return (
        bytes([revision, len(subs)])
        + authority.to_bytes(6, "big")
        + b"".join(s.to_bytes(4, "little") for s in subs)
    )


def sid_to_text(raw: bytes) -> str:
    count = raw[1]
    authority = int.from_bytes(raw[2:8], "big")
    subs = [int.from_bytes(raw[8 + 4 * i : 12 + 4 * i], "little") for i in range(count)]
    return "-".join(["S", str(raw[0]), str(authority), *map(str, subs)])


def escape_bytes(raw: bytes) -> str:
    """An octet string as an LDAP filter value (RFC 4515: every byte escaped)."""
    return "".join(f"\\{b:02x}" for b in raw)


def guid_filter_values(psp_identifier: str) -> list[str]:
    """Filter values that find a ``msImaging-PSPIdentifier`` in either encoding: the 16 bytes in
    Windows GUID byte order (what we write, R14) and the GUID text as stored by others."""
    values = [escape_filter_chars(psp_identifier)]
    try:
        guid = uuid.UUID(psp_identifier.strip().strip("{}"))
    except ValueError:
        return values
    values.append(escape_bytes(guid.bytes_le))
    for text in (str(guid).upper(), str(guid), "{" + str(guid).upper() + "}"):
        if escape_filter_chars(text) not in values:
            values.append(escape_filter_chars(text))
    return values


def decode_guid(raw: bytes | str) -> str:
    """A stored ``msImaging-PSPIdentifier`` as GUID text (upper case), whatever its encoding."""
    if isinstance(raw, bytes) and len(raw) == 16:
        return str(uuid.UUID(bytes_le=raw)).upper()
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        return str(uuid.UUID(text.strip().strip("{}"))).upper()
    except ValueError:
        return text


# --- the directory -----------------------------------------------------------------------------


class Directory:
    """A cached LDAP view of users, the admin group and scan processes (module doc)."""

    def __init__(
        self, settings: DirectorySettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}
        self._cache_lock = threading.Lock()
        #: One bound connection, shared under a lock (ldap3's SYNC strategy is not thread-safe).
        self._conn: ldap3.Connection | None = None
        self._conn_lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._last_failure = ""

    # - connections -

    def server(self) -> ldap3.Server:
        s = self.settings
        parts = urllib.parse.urlsplit(s.url)
        use_ssl = parts.scheme == "ldaps"
        tls = None
        if s.ca_file is not None or use_ssl:
            tls = DirectoryTls(s.ca_file, s.tls_server_name)
        return ldap3.Server(
            parts.hostname or "",
            port=parts.port or (636 if use_ssl else 389),
            use_ssl=use_ssl,
            tls=tls,
            connect_timeout=s.connect_timeout,
            get_info=ldap3.NONE,
        )

    def connect(self, user: str | None = None, password: str | None = None) -> ldap3.Connection:
        """A new bound connection (as the configured account, or as ``user``).  Raises
        DirectoryUnavailable when the directory cannot be reached, DirectoryError when the
        credentials are refused."""
        s = self.settings
        parts = urllib.parse.urlsplit(s.url)
        server = self.server()
        conn = ldap3.Connection(
            server,
            user=user or s.bind_user,
            password=password if user else s.password,
            # ldap3 packs it into SO_RCVTIMEO as whole seconds.
            receive_timeout=max(1, math.ceil(s.timeout)),
            raise_exceptions=True,
            auto_referrals=False,
        )
        try:
            conn.open()
            if parts.scheme == "ldap" and s.ca_file is not None:
                conn.start_tls()
            conn.bind()
        except LDAPInvalidCredentialsResult as exc:
            let_go(conn)
            raise DirectoryError(
                f"the directory refused the credentials of {user or s.bind_user!r}"
            ) from exc
        except LDAPStrongerAuthRequiredResult as exc:
            let_go(conn)
            raise DirectoryError(
                "the directory wants a protected connection for simple binds: use ldaps:// "
                "or give ca_file for StartTLS"
            ) from exc
        except (LDAPException, OSError) as exc:
            let_go(conn)
            # A TLS failure explained in one line (issue 14 §3) rather than ldap3's wrapping.
            tls = server.tls
            failure = tls.failure if isinstance(tls, DirectoryTls) else None
            raise DirectoryUnavailable(f"{s.url}: {failure or _reason(exc)}") from exc
        return conn

    @contextmanager
    def _session(self) -> Iterator[ldap3.Connection]:
        """The shared connection, opened on demand; dropped after any failure."""
        with self._conn_lock:
            reused = self._conn is not None
            if self._conn is None:
                # A directory that just failed is not asked again for RETRY_SECONDS: requests
                # queued behind a timed-out attempt fail at once instead of each waiting out
                # its own timeout.
                if self._clock() < self._retry_at:
                    raise DirectoryUnavailable(
                        f"{self.settings.url}: {self._last_failure} (next attempt within "
                        f"{RETRY_SECONDS:.0f} s)"
                    )
                try:
                    self._conn = self.connect()
                except DirectoryUnavailable as exc:
                    self._retry_at = self._clock() + RETRY_SECONDS
                    self._last_failure = str(exc).removeprefix(f"{self.settings.url}: ")
                    raise
                self._retry_at = 0.0
            try:
                yield self._conn
            except (LDAPException, OSError) as exc:
                conn, self._conn = self._conn, None
                let_go(conn)
                if isinstance(exc, LDAPOperationResult) and not isinstance(
                    exc,
                    LDAPUnavailableResult | LDAPBusyResult,
                ):
                    raise DirectoryError(f"{self.settings.url}: {_reason(exc)}") from exc
                kind = _StaleConnection if reused else DirectoryUnavailable
                raise kind(f"{self.settings.url}: {_reason(exc)}") from exc

    def search(
        self,
        base: str,
        search_filter: str,
        attributes: Sequence[str],
        *,
        scope: Literal["BASE", "LEVEL", "SUBTREE"] = "SUBTREE",
        retry: bool = True,
    ) -> list[dict[str, Any]]:
        """Entries as ``{"dn": ..., "raw": {attribute: [bytes, ...]}}`` (a stale shared
        connection is reopened once)."""
        try:
            with self._session() as conn:
                conn.search(base, search_filter, scope, attributes=list(attributes))
                return [
                    {"dn": r["dn"], "raw": r["raw_attributes"]}
                    for r in conn.response or []
                    if r.get("type") == "searchResEntry"
                ]
        except _StaleConnection as exc:
            # The shared connection may have been closed by the server while idle: once more
            # on a new one.  A directory that is really down fails again, fast or on timeout.
            if not retry:
                raise DirectoryUnavailable(str(exc)) from exc
        return self.search(base, search_filter, attributes, scope=scope, retry=False)

    def close(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            let_go(conn)

    # - cache -

    def _cached(self, kind: str, key: str, load: Callable[[], Any]) -> Any:
        now = self._clock()
        with self._cache_lock:
            hit = self._cache.get((kind, key))
            if hit is not None and hit[0] > now:
                return hit[1]
        value = load()
        with self._cache_lock:
            if len(self._cache) > 10_000:  # bounded: drop what has expired, else everything
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now} or {}
                if len(self._cache) > 10_000:
                    self._cache.clear()
            self._cache[(kind, key)] = (now + self.settings.cache_seconds, value)
        return value

    # - lookups -

    def _user(self, search_filter: str) -> DirectoryUser | None:
        entries = self.search(
            self.settings.base_dn,
            f"(&(objectCategory=person)(objectClass=user){search_filter})",
            ["objectSid", "sAMAccountName", "mail", "userPrincipalName"],
        )
        if len(entries) != 1:
            return None
        raw = entries[0]["raw"]
        name = _text(raw, "sAMAccountName")
        sid = raw.get("objectSid") or [b""]
        if not name or len(sid[0]) < 8:
            return None
        user = DirectoryUser(
            dn=entries[0]["dn"],
            sid=sid_to_text(sid[0]),
            account=f"{name}@{self.settings.domain}" if self.settings.domain else name,
            mail=_text(raw, "mail"),
            upn=_text(raw, "userPrincipalName"),
        )
        with self._cache_lock:  # the mail lookup of SendToScanUser finds it later
            self._cache[("account", user.account)] = (
                self._clock() + self.settings.cache_seconds,
                user,
            )
        return user

    def user_by_sid(self, sid: str) -> DirectoryUser | None:
        try:
            value = escape_bytes(sid_to_bytes(sid))
        except ValueError:
            return None  # not a SID: nobody has it
        result: DirectoryUser | None = self._cached(
            "sid", sid.upper(), lambda: self._user(f"(objectSid={value})")
        )
        return result

    def user_by_identity(self, identity: str) -> DirectoryUser | None:
        """The account of a certificate identity: ``userPrincipalName`` (``sAMAccountName``
        when the identity has no ``@``)."""
        attribute = "userPrincipalName" if "@" in identity else "sAMAccountName"
        result: DirectoryUser | None = self._cached(
            "identity",
            identity,
            lambda: self._user(f"({attribute}={escape_filter_chars(identity)})"),
        )
        return result

    def user_by_account(self, account: str) -> DirectoryUser | None:
        """``name@domain`` (what jobs carry) -> the user."""
        name = account.split("@", 1)[0]
        result: DirectoryUser | None = self._cached(
            "account",
            account,
            lambda: self._user(f"(sAMAccountName={escape_filter_chars(name)})"),
        )
        return result

    def admin_group_dn(self) -> str | None:
        group = self.settings.admin_group
        if not group:
            return None
        if "=" in group:
            return group

        def load() -> str | None:
            value = escape_filter_chars(group)
            entries = self.search(
                self.settings.base_dn,
                f"(&(objectClass=group)(|(sAMAccountName={value})(cn={value})))",
                ["cn"],
            )
            if len(entries) != 1:
                log.error("admin_group %r not found in %s", group, self.settings.base_dn)
                return None
            return str(entries[0]["dn"])

        result: str | None = self._cached("group", group, load)
        return result

    def is_admin(self, identity: str) -> bool:
        group = self.admin_group_dn()
        user = self.user_by_identity(identity)
        if group is None or user is None:
            return False

        def load() -> bool:
            entries = self.search(
                self.settings.base_dn,
                f"(&(distinguishedName={escape_filter_chars(user.dn)})"
                f"(memberOf:{IN_CHAIN}:={escape_filter_chars(group)}))",
                ["cn"],
            )
            return len(entries) == 1

        result: bool = self._cached("admin", identity, load)
        return result

    def process_name(self, psp_identifier: str) -> str | None:
        def load() -> str | None:
            values = guid_filter_values(psp_identifier)
            clauses = "".join(f"(msImaging-PSPIdentifier={v})" for v in values)
            entries = self.search(
                self.settings.psp_dn,
                f"(&(objectClass=msImaging-PostScanProcess)(|{clauses}))",
                ["displayName"],
            )
            return _text(entries[0]["raw"], "displayName") if entries else None

        result: str | None = self._cached("psp", psp_identifier.upper(), load)
        return result

    def mail_of(self, account: str) -> str | None:
        """The ``mail`` of a job's user (SendToScanUser), or None.  Used by the e-mail filter
        (a worker thread); a directory that is down is logged and gives None."""
        try:
            user = self.user_by_account(account)
        except DirectoryError as exc:
            log.error("directory: no e-mail address for %s: %s", account, exc)
            return None
        return user.mail if user is not None else None

    # - the core's seam -

    def answer(self, needs: Lookups) -> DirectoryAnswers:
        """Answers to one request's lookups (dsc_core.directory).  A directory that cannot be
        asked gives ``unavailable``: the core answers ServerErrorTemporaryError where needed."""
        users: dict[str, str] = {}
        admins: set[str] = set()
        names: dict[str, str] = {}
        try:
            for sid in needs.sids:
                user = self.user_by_sid(sid)
                if user is not None:
                    users[sid] = user.account
            if needs.identity:
                user = self.user_by_identity(needs.identity)
                if user is not None:
                    users[needs.identity] = user.account
            if needs.admin and self.is_admin(needs.admin):
                admins.add(needs.admin)
            for psp in needs.processes:
                name = self.process_name(psp)
                if name:
                    names[psp] = name
        except DirectoryError as exc:
            if self._down_since is None:
                self._down_since = self._clock()
            log.error(
                "directory %s unavailable: %s; answering ServerErrorTemporaryError",
                self.settings.url,
                exc,
            )
            return DirectoryAnswers(unavailable=True)
        if self._down_since is not None:
            log.info(
                "directory %s reachable again after %.0f s",
                self.settings.url,
                self._clock() - self._down_since,
            )
            self._down_since = None
        return DirectoryAnswers(users=users, admins=frozenset(admins), process_names=names)


def _text(raw: dict[str, list[bytes]], attribute: str) -> str | None:
    values = raw.get(attribute) or []
    return values[0].decode("utf-8", "replace") if values else None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return text[:300]
