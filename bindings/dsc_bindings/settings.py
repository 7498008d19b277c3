"""The server's TOML configuration file, turned into the core's ServerConfig, the filters'
FilterSettings and the listener options.  Unknown keys are errors: a typo must not silently
leave a limit at its default.

Example (every section optional)::

    [server]
    host = "0.0.0.0"
    port = 5362
    data = "/var/lib/dsc"
    binding = "async"                 # or "blocking"
    blocking_cpu = "auto"             # blocking binding: its threads on one CPU; "any", or 0, 1...
    public_url = "https://scan.contoso.com:5362"   # what scanners and the directory are told
    allow_insecure = false            # true: listen beyond loopback without TLS/client certificates
    scopes = ["http://contoso.com/scanners/floor2"]   # WS-Discovery scopes, in ProbeMatches
    fault_http_status = "soap12"      # 400 for env:Sender faults; "500" for WCF clients
    # device_uuid / dsp_service_uuid / dsc_service_uuid: default generated at the first start
    # and kept in DATA/identity.json, so every installation is its own device (R13)

    [tls]
    cert = "/etc/dsc/server.pem"
    key = "/etc/dsc/server.key"
    client_ca = "/etc/dsc/clients-ca.pem"   # require client certificates (R10)

    [limits]                          # any field of dsc_core.Limits
    max_image_bytes = 536870912

    [jobs]
    timeout_seconds = 600
    history_size = 1000
    spool_retention_seconds = 604800  # a failed job's documents, kept for a re-run
    stalled_after_seconds = 60        # a Creating job this long without a byte is "stalled"
    processing_slots = 2              # jobs whose filters run at once on this instance

    [devices]                         # the device book (dsc devices, the status page)
    max_devices = 10000               # over it, the devices with the oldest last contact go
    retention_days = 365              # a device not seen for this long is removed

    [users]
    scan_admins = ["admin@contoso.com"]
    [users.directory]                 # SID -> name@domain (R10)
    "S-1-5-21-1-2-3-500" = "admin@contoso.com"
    [users.email]                     # name@domain -> e-mail address (R9 SendToScanUser)
    "admin@contoso.com" = "it@contoso.com"

    [processes]                       # PSP_Identifier -> PSP_DisplayName
    "C4F199C7-6876-4549-A86E-A85035952448" = "Scan to share"

    [shares]                          # UNC prefix -> local folder (R9); default: DATA/shares
    '\\\\contoso\\scans' = "/srv/scans"

    [smtp]
    host = "mail.contoso.com"
    port = 587
    starttls = true
    username = "scanner"
    password = "secret"
    from = "scans@contoso.com"
    allowed_domains = ["contoso.com", ".contoso.net"]   # recipients elsewhere are refused

    [sharepoint]
    username = "svc-scan"
    password = "secret"
    ca_file = "/etc/ssl/certs/ca.pem"
    # R13: the only sites documents and these credentials go to; https unless allowed.
    sites = ["https://sharepoint.contoso.com/sites/scans",
             { url = "http://intranet.contoso.com/scans", allow_http = true }]

    [eventing]
    default_seconds = 3600
    max_seconds = 86400

    [directory]                       # Active Directory / Samba AD DC over LDAP (R14)
    url = "ldaps://dc1.contoso.com"   # ldap:// (+ ca_file: StartTLS) or ldaps://
    bind_user = "svc-scan@contoso.com"
    password = "secret"               # or password_file = "/etc/dsc/ldap.secret"
    base_dn = "DC=contoso,DC=com"
    ca_file = "/etc/dsc/contoso-ca.pem"
    admin_group = "Scan Admins"       # name or DN; members, nested included, are admins
    # schema_dir = "/usr/share/dsc/schemas"  # PostScan.xsd & co.: processes also checked by schema
    cache_seconds = 300
    connect_timeout = 5
    timeout = 10
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from dsc_bindings.directory.ldap import DirectorySettings
from dsc_bindings.directory.scan_processes import missing_schema_files
from dsc_bindings.filters.settings import FilterSettings, parse_unc
from dsc_bindings.filters.sites import SitePrefix
from dsc_bindings.filters.smbsettings import SmbSettings
from dsc_bindings.runtime.installation import UUID_KEYS, installation_of
from dsc_bindings.store.backends import (
    POOL_TIMEOUT_SECONDS,
    S3SpoolSettings,
    StorageSettings,
)
from dsc_bindings.store.instances import ClusterSettings
from dsc_bindings.urls import bound_base_url
from dsc_core import Limits, ServerConfig
from dsc_core.config import FAULT_HTTP_STATUSES


class ConfigError(Exception):
    """The configuration is wrong; the message says what to change."""


@dataclass(frozen=True, slots=True)
class DeviceLimits:
    """``[devices]``: how many devices the book keeps (``dsc_bindings.observe.devices``), and for how long after their last
    contact.  The defaults hold a large site's scanners for a year; a book at the cap costs a
    few MB and the status page lists it from memory."""

    max_devices: int = 10_000
    retention_days: int = 365

    def __post_init__(self) -> None:
        if self.max_devices < 1:
            raise ValueError(f"max_devices must be at least 1, got {self.max_devices}")
        if self.retention_days < 1:
            raise ValueError(f"retention_days must be at least 1, got {self.retention_days}")

    def cutoff(self, now: datetime) -> float:
        """The Unix time before which a last contact is past the retention."""
        return (now - timedelta(days=self.retention_days)).timestamp()


@dataclass(frozen=True)
class ListenOptions:
    host: str = "127.0.0.1"
    port: int = 5362
    binding: str = "async"
    #: The blocking binding's CPU for its connection and service threads: "auto" (one of
    #: them, when there are several), None (any CPU) or a CPU number (http_blocking).
    blocking_cpu: int | Literal["auto"] | None = "auto"
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    #: ``[server] monitor_listen = "HOST:PORT"``: a second, plain-HTTP listener serving only
    #: /healthz and /metrics, without client certificates (issue 14); None: none (default).
    monitor: tuple[str, int] | None = None
    #: ``[server] allow_insecure``: listen beyond loopback without TLS, client certificates or a
    #: reachable public_url (exposure.py; a WARNING at every start).
    allow_insecure: bool = False
    #: ``[server] trusted_proxies``: addresses or networks of reverse proxies whose
    #: ``client_cert_header`` the ASGI app believes (``dsc_bindings.http.asgi_identity``).
    trusted_proxies: tuple[str, ...] = ()
    #: ``[server] client_cert_header``: the header in which those proxies pass the client
    #: certificate they verified; setting it requires client certificates (R10).
    client_cert_header: str | None = None

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    listen: ListenOptions
    server: ServerConfig
    filters: FilterSettings
    source: Path | None = None
    #: ``[directory]`` (R14), None without one.
    directory: DirectorySettings | None = None
    #: The installation UUIDs the file set ([server] device_uuid, ...); the others are
    #: generated at the first start and kept in the data directory (identity.py, R13).
    identity: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: ``[devices]``: the device book's cap and retention (issue 14 section 4).
    devices: DeviceLimits = dataclasses.field(default_factory=DeviceLimits)
    #: ``[store]`` and ``[spool]``: which engines keep the jobs and images (issue 17).
    storage: StorageSettings = dataclasses.field(default_factory=StorageSettings)
    #: ``[cluster]``: this instance among those on one PostgreSQL store (issue 18).
    cluster: ClusterSettings = dataclasses.field(default_factory=ClusterSettings)
    #: ``[server] health_max_age_seconds``: how old the last /healthz checks may be before a
    #: request starts new ones; None: observe.health.MAX_AGE_SECONDS.
    health_max_age_seconds: float | None = None
    #: ``[jobs] processing_slots``: jobs whose filters this instance runs at once; with a
    #: shared store, further Pending jobs wait for any instance's free place (issue 18).
    processing_slots: int = 2

    def with_installation_identity(self) -> Settings:
        """These settings with the installation's UUIDs where the file set none (creates
        ``identity.json``, or the PostgreSQL store's row, at the first start).  Raises
        OSError/ValueError (the file), StoreError (the database)."""
        installation = installation_of(self.data_dir, self.storage)
        return dataclasses.replace(self, server=installation.apply(self.server, self.identity))

    def server_ssl_context(self) -> ssl.SSLContext | None:
        """TLS for the listener; with a client CA, client certificates are required (R10)."""
        if not self.listen.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(self.listen.cert), str(self.listen.key or self.listen.cert))
            if self.listen.client_ca:
                context.load_verify_locations(str(self.listen.client_ca))
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate files: {exc}") from exc
        return context


_SECTIONS = {
    "server",
    "tls",
    "limits",
    "jobs",
    "devices",
    "users",
    "processes",
    "shares",
    "smtp",
    "sharepoint",
    "eventing",
    "directory",
    "smb",
    "store",
    "spool",
    "cluster",
}


class _Table:
    """One ``[section]`` of the file, read key by key with its type and range checked, so that
    every mistake is one ConfigError naming the key, what it must be, and the value found
    (issue 8: checked at load, never a traceback, never a server failing every request)."""

    def __init__(self, raw: dict[str, Any], section: str, allowed: set[str]) -> None:
        value = raw.get(section, {})
        if not isinstance(value, dict):
            raise ConfigError(
                f"{section} must be a table ([{section}] on a line of its own), got {_shown(value)}"
            )
        unknown = set(value) - allowed
        if unknown:
            raise ConfigError(
                f"unknown key(s) in [{section}]: {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        self.raw: dict[str, Any] = value
        self.section = section

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def __bool__(self) -> bool:
        return bool(self.raw)

    def get(self, key: str, default: Any = None) -> Any:
        return self.raw.get(key, default)

    def error(self, key: str, what: str, value: object) -> ConfigError:
        return ConfigError(f"[{self.section}] {key} must be {what}, got {_shown(value)}")

    def text(self, key: str, default: str) -> str:
        value = self.raw.get(key, default)
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, "a non-empty string", value)
        return value

    def optional_text(self, key: str) -> str | None:
        return self.text(key, "") if key in self.raw else None

    def integer(self, key: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.raw.get(key, default)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            span = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise self.error(key, f"a whole number {span}", value)
        return value

    def seconds(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise self.error(key, "a positive number of seconds", value)
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, "true or false (without quotes)", value)
        return value

    def text_list(self, key: str) -> list[str]:
        value = self.raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, 'a list of strings, e.g. ["a", "b"]', value)
        return value

    def text_table(self, key: str | None = None) -> dict[str, str]:
        value = self.raw if key is None else self.raw.get(key, {})
        where = f"[{self.section}]" if key is None else f"[{self.section}.{key}]"
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table of names to strings, got {_shown(value)}")
        for name, item in value.items():
            if not isinstance(item, str) or not item:
                raise ConfigError(
                    f'{where} "{name}" must be a non-empty string, got {_shown(item)}'
                )
        return dict(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_PORT_MAX = 65535


def _site_prefixes(value: object) -> tuple[SitePrefix, ...]:
    """``[sharepoint] sites``: URL strings (https), or tables ``{ url = "...", allow_http = true }``."""
    if not isinstance(value, list):
        raise ConfigError(
            "[sharepoint] sites must be a list of site URL prefixes, e.g. "
            'sites = ["https://sharepoint.contoso.com/sites/scans"]'
        )
    prefixes = []
    for entry in value:
        try:
            if isinstance(entry, str):
                prefixes.append(SitePrefix(entry))
            elif isinstance(entry, dict) and isinstance(entry.get("url"), str):
                unknown = set(entry) - {"url", "allow_http"}
                if unknown or not isinstance(entry.get("allow_http", False), bool):
                    raise ValueError(
                        f"{entry!r}: a site table has url (text) and allow_http (true/false)"
                    )
                prefixes.append(SitePrefix(entry["url"], bool(entry.get("allow_http", False))))
            else:
                raise ValueError(
                    f"{entry!r} is neither a URL nor a table {{ url = ..., allow_http = true }}"
                )
        except ValueError as exc:
            raise ConfigError(f"[sharepoint] sites: {exc}") from exc
    return tuple(prefixes)


def _mail_domains(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        raise ConfigError(
            '[smtp] allowed_domains must be a list of domain names, e.g. ["contoso.com"]'
        )
    return tuple(value)


def _fault_http_status(srv: _Table) -> str:
    """[server] fault_http_status: "soap12" (default) or "500" (docs/rulings.md)."""
    value = srv.get("fault_http_status", "soap12")
    if value not in FAULT_HTTP_STATUSES:
        raise srv.error(
            "fault_http_status",
            '"soap12" (400 for env:Sender faults, the default) or "500" (for WCF clients)',
            value,
        )
    return str(value)


def _blocking_cpu(srv: _Table) -> int | Literal["auto"] | None:
    """[server] blocking_cpu: "auto" (default), "any", or a CPU number."""
    value = srv.get("blocking_cpu", "auto")
    if value == "auto":
        return "auto"
    if value == "any":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise srv.error("blocking_cpu", '"auto", "any" or a CPU number (0, 1, ...)', value)


def _monitor_listen(srv: _Table) -> tuple[str, int] | None:
    value = srv.optional_text("monitor_listen")
    if value is None:
        return None
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= _PORT_MAX:
        raise srv.error("monitor_listen", 'HOST:PORT, e.g. "127.0.0.1:9362"', value)
    return host, int(port)


def _trusted_proxies(srv: _Table) -> tuple[str, ...]:
    """[server] trusted_proxies: addresses or networks ("10.0.0.0/8")."""
    proxies = tuple(srv.text_list("trusted_proxies"))
    for text in proxies:
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise srv.error(
                "trusted_proxies",
                'IP addresses or networks, e.g. ["127.0.0.1", "10.0.0.0/8"]',
                text,
            ) from None
    return proxies


def _client_cert_header(srv: _Table) -> str | None:
    """[server] client_cert_header: a header name; it needs trusted_proxies to mean anything."""
    name = srv.optional_text("client_cert_header")
    if name is None:
        return None
    if not re.fullmatch(r"[A-Za-z0-9-]+", name):
        raise srv.error("client_cert_header", 'a header name, e.g. "X-SSL-Client-Cert"', name)
    if "trusted_proxies" not in srv:
        raise ConfigError(
            "[server] client_cert_header needs [server] trusted_proxies: the addresses of the "
            "reverse proxies that set it (from any other peer it is ignored)"
        )
    return name


def _read_file(path: Path | None) -> dict[str, Any]:
    """The configuration file as TOML tables (none: empty), its sections checked."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    unknown = set(raw) - _SECTIONS
    if unknown:
        raise ConfigError(
            f"unknown section(s): {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(_SECTIONS))}"
        )
    return raw


def _checked_listen(listen: ListenOptions) -> ListenOptions:
    """``listen``, refused when its binding or TLS files cannot work (one line each)."""
    if listen.binding not in ("async", "blocking"):
        raise ConfigError(f"binding must be 'async' or 'blocking', not {listen.binding!r}")
    if listen.key and not listen.cert:
        # Not plain HTTP: someone who gave a key meant TLS (issue 8).
        raise ConfigError(
            "a TLS key (--tls-key or [tls] key) without a certificate: give the server "
            "certificate with --tls-cert (or [tls] cert) as well"
        )
    if listen.client_ca and not listen.cert:
        raise ConfigError(
            "client certificates (client_ca) need TLS: give a server "
            "certificate with --tls-cert/--tls-key"
        )
    for what, file in (
        ("certificate", listen.cert),
        ("key", listen.key),
        ("client CA", listen.client_ca),
    ):
        if file is not None and not file.is_file():
            raise ConfigError(f"TLS {what} {file}: no such file; check the path")
    return listen


def _sharepoint_context(ca_file: Path | None) -> ssl.SSLContext | None:
    """``[sharepoint] ca_file`` as the TLS context of the SharePoint filter (None: the system's)."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"[sharepoint] ca_file {ca_file}: {getattr(exc, 'strerror', None) or exc}; "
            "give a PEM file of the CA that signed the SharePoint server's certificate"
        ) from exc


def load_settings(
    path: Path | None = None,
    *,
    data_dir: Path | None = None,
    host: str | None = None,
    port: int | None = None,
    binding: str | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    client_ca: Path | None = None,
) -> Settings:
    """The file (if any), then command-line overrides, over the embedded defaults."""
    raw = _read_file(path)
    srv = _Table(
        raw,
        "server",
        {
            "host",
            "port",
            "data",
            "binding",
            "blocking_cpu",
            "monitor_listen",
            "health_max_age_seconds",
            "public_url",
            "allow_insecure",
            "trusted_proxies",
            "client_cert_header",
            "friendly_name",
            "scopes",
            "fault_http_status",
            "device_uuid",
            "dsp_service_uuid",
            "dsc_service_uuid",
        },
    )
    tls = _Table(raw, "tls", {"cert", "key", "client_ca"})
    limits_raw = _Table(raw, "limits", {f.name for f in dataclasses.fields(Limits)})
    jobs = _Table(
        raw,
        "jobs",
        {
            "timeout_seconds",
            "history_size",
            "spool_retention_seconds",
            "stalled_after_seconds",
            "processing_slots",
        },
    )
    devices_raw = _Table(raw, "devices", {"max_devices", "retention_days"})
    users = _Table(raw, "users", {"scan_admins", "directory", "email"})
    smtp = _Table(
        raw,
        "smtp",
        {"host", "port", "starttls", "username", "password", "from", "timeout", "allowed_domains"},
    )
    sharepoint = _Table(raw, "sharepoint", {"username", "password", "timeout", "ca_file", "sites"})
    eventing = _Table(raw, "eventing", {"default_seconds", "max_seconds"})
    processes = _Table(raw, "processes", set(raw.get("processes", {}) or {}))
    shares = _Table(raw, "shares", set(raw.get("shares", {}) or {}))
    smb_raw = _Table(
        raw,
        "smb",
        {
            "username",
            "password",
            "password_file",
            "domain",
            "servers",
            "require_encryption",
            "port",
            "timeout",
            "health_shares",
        },
    )
    directory_raw = _Table(
        raw,
        "directory",
        {
            "url",
            "bind_user",
            "password",
            "password_file",
            "base_dn",
            "ca_file",
            "admin_group",
            "cache_seconds",
            "connect_timeout",
            "timeout",
            "processes_dn",
            "tls_server_name",
            "schema_dir",
        },
    )

    base = path.parent if path is not None else Path.cwd()

    def resolve(value: object) -> Path | None:
        if value is None:
            return None
        candidate = Path(str(value)).expanduser()
        return candidate if candidate.is_absolute() else base / candidate

    data = data_dir or resolve(srv.optional_text("data")) or Path("var")
    if port is not None and not 0 <= port <= _PORT_MAX:
        raise ConfigError(f"--port must be from 0 to {_PORT_MAX}, got {port}")
    listen = _checked_listen(
        ListenOptions(
            host=host or srv.text("host", "127.0.0.1"),
            port=port
            if port is not None
            else srv.integer("port", 5362, minimum=0, maximum=_PORT_MAX),
            binding=binding or srv.text("binding", "async"),
            blocking_cpu=_blocking_cpu(srv),
            cert=cert or resolve(tls.optional_text("cert")),
            key=key or resolve(tls.optional_text("key")),
            client_ca=client_ca or resolve(tls.optional_text("client_ca")),
            monitor=_monitor_listen(srv),
            allow_insecure=srv.boolean("allow_insecure", False),
            trusted_proxies=_trusted_proxies(srv),
            client_cert_header=_client_cert_header(srv),
        )
    )
    try:
        limits = Limits(**limits_raw.raw)
    except (TypeError, ValueError) as exc:  # ValueError names the field and the bad value
        raise ConfigError(f"[limits]: {exc}") from exc
    public = srv.optional_text("public_url") or bound_base_url(
        listen.scheme, listen.host, listen.port
    )
    default_seconds = eventing.seconds("default_seconds", 3600.0)
    max_seconds = eventing.seconds("max_seconds", 86400.0)
    if default_seconds > max_seconds:
        raise ConfigError(
            f"[eventing] default_seconds ({default_seconds:g}) is more than max_seconds "
            f"({max_seconds:g}): raise max_seconds or lower default_seconds"
        )
    try:
        server = ServerConfig(
            limits=limits,
            base_url=str(public).rstrip("/"),
            job_timeout_seconds=jobs.seconds("timeout_seconds", 600.0),
            history_size=jobs.integer("history_size", 1000, minimum=0),
            spool_retention_seconds=jobs.seconds("spool_retention_seconds", 7 * 24 * 3600.0),
            stalled_after_seconds=jobs.seconds("stalled_after_seconds", 60.0),
            require_client_certificates=listen.client_ca is not None
            or listen.client_cert_header is not None,
            scan_admins=frozenset(users.text_list("scan_admins")),
            user_directory=users.text_table("directory"),
            user_email=users.text_table("email"),
            process_names=processes.text_table(),
            subscription_default_seconds=default_seconds,
            subscription_max_seconds=max_seconds,
            scopes=tuple(srv.text_list("scopes")),
            fault_http_status=_fault_http_status(srv),
        )
        identity = {key: srv.text(key, "") for key in UUID_KEYS if key in srv}
        server = server.replace(**identity)  # the rest comes from the data directory
        if "friendly_name" in srv:
            # Only when given: ServerConfig is a slots dataclass, so ServerConfig.friendly_name is
            # a member descriptor, not the default string (it broke WS-Transfer Get with a 500).
            server = server.replace(friendly_name=srv.text("friendly_name", ""))
    except (TypeError, ValueError) as exc:  # what the core's own validation refuses
        raise ConfigError(f"configuration: {exc}") from exc
    directory = _directory_settings(directory_raw.raw, resolve) if directory_raw else None
    if directory is not None:
        server = server.replace(directory=True)
    sharepoint_context = _sharepoint_context(resolve(sharepoint.optional_text("ca_file")))
    roots = tuple(
        (unc, resolve(local) or Path(local)) for unc, local in shares.text_table().items()
    )
    filter_kw: dict[str, Any] = {
        "smtp_host": smtp.text("host", "localhost"),
        "smtp_port": smtp.integer("port", 25, minimum=1, maximum=_PORT_MAX),
        "smtp_starttls": smtp.boolean("starttls", False),
        "smtp_username": smtp.optional_text("username"),
        "smtp_password": smtp.get("password") if "password" in smtp else None,
        "smtp_timeout": smtp.seconds("timeout", 30.0),
        "mail_from": smtp.text("from", "scan-server@localhost"),
        "user_email": users.text_table("email"),
        "sharepoint_username": sharepoint.optional_text("username"),
        "sharepoint_password": sharepoint.get("password") if "password" in sharepoint else None,
        "sharepoint_timeout": sharepoint.seconds("timeout", 60.0),
        "sharepoint_ssl_context": sharepoint_context,
        "sharepoint_sites": _site_prefixes(sharepoint.get("sites", [])),
        "mail_domains": _mail_domains(smtp.get("allowed_domains")),
        "smtp_configured": bool(smtp),
        "smb": _smb_settings(smb_raw.raw, resolve) if smb_raw else None,
    }
    for table in (smtp, sharepoint):
        if "password" in table and not isinstance(table.get("password"), str):
            raise table.error("password", "a string (in quotes)", "...")  # never echo it
    try:
        filters = (
            FilterSettings(share_roots=roots, **filter_kw)
            # With [smb] and no [shares], UNC paths go to the SMB servers only: the embedded
            # catch-all folder would take every path before an SMB server could.
            if roots or smb_raw
            else FilterSettings.embedded_default(data, **filter_kw)
        )
    except ValueError as exc:
        raise ConfigError(f"[shares]/[smtp]: {exc}") from exc
    default_devices = DeviceLimits()
    devices = DeviceLimits(
        max_devices=devices_raw.integer("max_devices", default_devices.max_devices, minimum=1),
        retention_days=devices_raw.integer(
            "retention_days", default_devices.retention_days, minimum=1, maximum=100 * 365
        ),
    )
    storage = _storage(
        _Table(raw, "store", {"kind", "dsn", "password_file", "pool_timeout_seconds"}),
        _Table(
            raw,
            "spool",
            {
                "kind",
                "endpoint_url",
                "bucket",
                "region",
                "access_key_id",
                "secret_access_key_file",
                "ca_file",
                "part_size",
                "max_part_buffers",
            },
        ),
        resolve,
    )
    return Settings(
        data,
        listen,
        server,
        filters,
        path,
        directory,
        identity,
        devices,
        storage,
        _cluster(
            _Table(
                raw,
                "cluster",
                {"instance_name", "heartbeat_seconds", "lease_seconds", "prune_after_seconds"},
            )
        ),
        health_max_age_seconds=(
            srv.seconds("health_max_age_seconds", 1.0) if "health_max_age_seconds" in srv else None
        ),
        processing_slots=jobs.integer("processing_slots", 2, minimum=1),
    )


def _cluster(table: _Table) -> ClusterSettings:
    """``[cluster]`` (issue 18): a lease shorter than two heartbeats would mark a healthy
    instance down between two beats."""
    default = ClusterSettings()
    heartbeat = table.seconds("heartbeat_seconds", default.heartbeat_seconds)
    lease = table.seconds("lease_seconds", default.lease_seconds)
    if lease < 2 * heartbeat:
        raise table.error("lease_seconds", "at least twice heartbeat_seconds", lease)
    return ClusterSettings(
        instance_name=table.optional_text("instance_name"),
        heartbeat_seconds=heartbeat,
        lease_seconds=lease,
        prune_after_seconds=table.seconds("prune_after_seconds", default.prune_after_seconds),
    )


def _storage(
    store: _Table, spool: _Table, resolve: Callable[[object], Path | None]
) -> StorageSettings:
    """``[store]`` and ``[spool]`` (names as in issue 17); each kind's own keys are required."""
    store_kind = store.text("kind", "sqlite")
    if store_kind not in ("sqlite", "postgresql"):
        raise store.error("kind", '"sqlite" or "postgresql"', store_kind)
    dsn = ""
    if store_kind == "postgresql":
        dsn = store.text("dsn", "")
    spool_kind = spool.text("kind", "local")
    if spool_kind not in ("local", "s3"):
        raise spool.error("kind", '"local" or "s3"', spool_kind)
    s3 = None
    if spool_kind == "s3":
        secret = resolve(spool.text("secret_access_key_file", ""))
        assert secret is not None
        s3 = S3SpoolSettings(
            endpoint_url=spool.text("endpoint_url", ""),
            bucket=spool.text("bucket", ""),
            region=spool.text("region", "us-east-1"),
            access_key_id=spool.text("access_key_id", ""),
            secret_access_key_file=secret,
            ca_file=resolve(spool.optional_text("ca_file")),
            part_size=spool.integer("part_size", 8 << 20, minimum=5 << 20, maximum=5 << 30),
            max_part_buffers=spool.integer("max_part_buffers", 16, minimum=1, maximum=4096),
        )
    return StorageSettings(
        store_kind=store_kind,  # type: ignore[arg-type]  # checked above
        dsn=dsn,
        password_file=resolve(store.optional_text("password_file")),
        pool_timeout_seconds=store.seconds("pool_timeout_seconds", POOL_TIMEOUT_SECONDS),
        spool_kind=spool_kind,  # type: ignore[arg-type]  # checked above
        s3=s3,
    )


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data directory if needed and prove it is a writable directory, before the
    server starts (issue 8: not a server that starts and then fails every request).  Raises
    ConfigError naming the path and what to do."""
    hint = "choose another with --data (or [server] data)"
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(
            f"data directory {data_dir} is a file, not a directory: move it away or {hint}"
        )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the data directory {data_dir}: {exc.strerror}; create it, or {hint}"
        ) from exc
    for folder in (data_dir, data_dir / "spool"):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} is a file, not a directory: move it away or {hint}")
        if not folder.exists():
            continue
        probe = folder / f".dsc-write-test-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                f"data directory {folder} is not writable ({exc.strerror}): give the user running "
                f"dsc serve write access to it, or {hint}"
            ) from exc
    database = data_dir / "jobs.sqlite3"
    if database.exists() and (not database.is_file() or not os.access(database, os.W_OK)):
        raise ConfigError(
            f"the job store {database} is not a writable file: fix its permissions, or {hint}"
        )


def _secret(section: str, raw: dict[str, Any], resolve: Callable[[object], Path | None]) -> str:
    """``password``, else the first line of ``password_file`` (kept out of the configuration
    file so that one can be readable by more people than the secret)."""
    password = raw.get("password")
    if password is None:
        secret = resolve(raw["password_file"])
        try:
            password = Path(str(secret)).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"[{section}] cannot read password_file {secret}: {exc.strerror}"
            ) from exc
    if not isinstance(password, str):
        raise ConfigError(f'[{section}] password must be a string (in quotes): password = "..."')
    return password


def _smb_settings(raw: dict[str, Any], resolve: Callable[[object], Path | None]) -> SmbSettings:
    """``[smb]`` (issue 21): the account the file share filter writes as over SMB."""
    missing = [k for k in ("username", "servers") if not raw.get(k)]
    if "password" not in raw and "password_file" not in raw:
        missing.append("password (or password_file)")
    if missing:
        raise ConfigError(f"[smb] needs {', '.join(missing)}")
    servers = raw["servers"]
    if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
        raise ConfigError(
            '[smb] servers must be a list of host names, e.g. servers = ["fs01.contoso.com"]'
        )
    health = raw.get("health_shares", [])
    if not isinstance(health, list) or any(
        not isinstance(h, str) or (p := parse_unc(h)) is None or len(p) != 2 for h in health
    ):
        raise ConfigError(
            "[smb] health_shares must be a list of UNC paths of shares, "
            "e.g. health_shares = ['//fs01.contoso.com/scans']"
        )
    try:
        return SmbSettings(
            username=str(raw["username"]),
            password=_secret("smb", raw, resolve),
            servers=tuple(servers),
            domain=str(raw["domain"]) if raw.get("domain") else None,
            require_encryption=bool(raw.get("require_encryption", True)),
            port=int(raw.get("port", 445)),
            timeout=float(raw.get("timeout", 30.0)),
            health_shares=tuple(health),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[smb]: {exc}") from exc


def _directory_settings(
    raw: dict[str, Any], resolve: Callable[[object], Path | None]
) -> DirectorySettings:
    missing = [k for k in ("url", "bind_user", "base_dn") if not raw.get(k)]
    if "password" not in raw and "password_file" not in raw:
        missing.append("password (or password_file)")
    if missing:
        raise ConfigError(f"[directory] needs {', '.join(missing)}")
    password = _secret("directory", raw, resolve)
    schema_dir = resolve(raw.get("schema_dir"))
    if schema_dir is not None and (missing_files := missing_schema_files(schema_dir)):
        raise ConfigError(
            f"[directory] schema_dir {schema_dir} lacks {', '.join(missing_files)}: give the "
            "folder holding the scan process schemas, or leave schema_dir out (the built-in "
            "check alone)"
        )
    try:
        return DirectorySettings(
            url=str(raw["url"]),
            bind_user=str(raw["bind_user"]),
            password=str(password),
            base_dn=str(raw["base_dn"]),
            ca_file=resolve(raw.get("ca_file")),
            admin_group=str(raw["admin_group"]) if raw.get("admin_group") else None,
            cache_seconds=float(raw.get("cache_seconds", 300.0)),
            connect_timeout=float(raw.get("connect_timeout", 5.0)),
            timeout=float(raw.get("timeout", 10.0)),
            processes_dn=str(raw["processes_dn"]) if raw.get("processes_dn") else None,
            tls_server_name=(
                str(raw["tls_server_name"]) if raw.get("tls_server_name") is not None else None
            ),
            schema_dir=schema_dir,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[directory]: {exc}") from exc
