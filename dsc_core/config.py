"""The one configuration object: every limit, timeout and policy of the server (R12, h2's model).

Bindings read their HTTP limits from here too, so an administrator changes a limit in exactly one
place and a test can shrink any of them.  Both objects are checked when they are made (as h11
validates its events at construction): a value of the wrong type or out of range is a
``ValueError`` naming the field, not a fault on every later request.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import names

#: ServerConfig.fault_http_status values (docs/rulings.md "HTTP status of faults").
FAULT_HTTP_STATUSES = ("soap12", "500")

#: The filter dialects this server can run (bdsrr §3; local names under names.FILTER).
KNOWN_FILTERS = frozenset({"fileshare", "sharepoint", "email"})


def _fail(owner: str, name: str, what: str, value: object) -> ValueError:
    return ValueError(f"{owner}.{name} must be {what}, got {value!r}")


def _int(owner: str, name: str, value: object, *, minimum: int) -> None:
    # bool is an int to Python, never to an administrator.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int of at least {minimum}"
        raise _fail(owner, name, what, value)


def _seconds(owner: str, name: str, value: object) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _fail(owner, name, "a positive number of seconds", value)


def _text(owner: str, name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise _fail(owner, name, "a non-empty str", value)


def _str_mapping(owner: str, name: str, value: object) -> None:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _fail(owner, name, "a mapping of str to str", value)


@dataclass(frozen=True, slots=True)
class Limits:
    """R12 defaults.  Each is enforced where noted and answered with a named fault or status."""

    #: SOAP envelope, or the MTOM root part, in bytes (core: env:Sender fault, HTTP 400).
    max_envelope_bytes: int = 64 * 1024
    #: One SendImage attachment in bytes (core: env:Sender fault, HTTP 413).
    max_image_bytes: int = 512 * 1024 * 1024
    #: XML nesting depth and element count of one envelope (core: env:Sender fault).
    max_xml_depth: int = 64
    max_xml_elements: int = 10_000
    #: dsc:Name entries in one RequestedElements (core: InvalidArgs).
    max_requested_names: int = 64
    #: MIME part header block inside a multipart body (core: env:Sender fault).
    max_part_header_bytes: int = 16 * 1024
    #: HTTP request head (binding: 431).
    max_http_header_bytes: int = 16 * 1024
    #: Seconds to receive a request head / without body progress / idle keep-alive (binding).
    head_timeout: float = 30.0
    body_timeout: float = 60.0
    idle_timeout: float = 120.0
    #: Open connections (binding: 503 beyond it).
    max_connections: int = 1000
    #: Replies and notifications, in bytes (R15: DPWS MAX_ENVELOPE_SIZE, R0003/R0026 and
    #: [MS-DPWSSN] 1.3; WSDAPI closes the connection on a larger one).  GetJobHistory and
    #: GetActiveJobs list the jobs that fit; raise it only for clients that opt in.
    max_reply_bytes: int = 32_767
    #: Active subscriptions per hosted service (core: wse:EventSourceUnableToProcess).
    max_subscriptions: int = 1000
    #: Active jobs at once (core: ServerErrorTemporaryError on create beyond it).
    max_active_jobs: int = 1000
    #: Creating jobs of one user at once: the certificate identity, else the client address
    #: (core: ServerErrorTemporaryError beyond it), so one client cannot hold every job slot.
    max_creating_jobs_per_user: int = 32
    #: Documents in one job (core: InvalidArgs beyond it).
    max_documents_per_job: int = 10_000
    #: Share of max_connections one client address may hold (binding: beyond it, that
    #: address's longest-idle keep-alive connection is reclaimed, else 503).
    max_connection_share: float = 0.5
    #: Share of max_connections and of max_active_jobs kept for clients that hold none
    #: (issue 14, lockouts; rule in ``reserved_slots``): an address with a request in
    #: progress gets no connection from the last slots (binding: 503), a client with a job in
    #: Creating no job from the last job slots (core: ServerErrorTemporaryError).  0 keeps none.
    new_client_share: float = 0.1
    #: Serialized wsa:ReferenceParameters of one Subscribe's NotifyTo/EndTo, in bytes (core:
    #: wse:InvalidMessage): they are copied into every notification (R7).
    max_reference_parameter_bytes: int = 4096
    #: Event delivery (binding, R7): notifications queued per subscription (a full queue ends
    #: it with DeliveryFailure), seconds to connect / to get the answer, and the caps on the
    #: answer's head and body (read, then dropped).
    delivery_queue_size: int = 64
    delivery_connect_timeout: float = 5.0
    delivery_answer_timeout: float = 10.0
    max_delivery_answer_head_bytes: int = 16 * 1024
    max_delivery_answer_body_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        # Every field is a count or size (a positive int) or a timeout (positive seconds).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "max_connection_share":
                if (
                    not isinstance(value, int | float)
                    or isinstance(value, bool)
                    or not 0 < value <= 1
                ):
                    raise _fail("Limits", f.name, "a share greater than 0 and at most 1", value)
            elif f.name == "new_client_share":
                if (
                    not isinstance(value, int | float)
                    or isinstance(value, bool)
                    or not 0 <= value < 1
                ):
                    raise _fail("Limits", f.name, "a share of at least 0 and less than 1", value)
            elif f.type in ("int", int):
                _int("Limits", f.name, value, minimum=1)
            else:
                _seconds("Limits", f.name, value)


def reserved_slots(slots: int, limits: Limits) -> int:
    """How many of ``slots`` (max_connections, or max_active_jobs) are kept for clients that
    hold none of them (issue 14, lockouts).  The one rule for connections (the bindings'
    admission) and for jobs (CreatePostScanJob): a client already holding one may take a
    slot only while more than this many are free, so a few addresses with requests in
    progress, or many holding Creating jobs, never take the last slots; a newcomer can.  The
    reserve admits as many new clients as it has slots (100 of the default 1,000)."""
    return int(slots * limits.new_client_share)


#: MIME framing around the root part and the image of a SendImage: the preamble and two part
#: header blocks are each bounded by ``max_part_header_bytes`` (mime.py); boundaries, CRLFs and
#: the closing delimiter fit in this much.
_MIME_FRAMING_SLACK = 1024


def max_request_bytes(limits: Limits) -> int:
    """The largest HTTP body worth reading (R12, HTTP 413 beyond it): one image plus its
    envelope, plus the MIME framing around them (a preamble, two part-header blocks,
    boundaries), so that an image the core would accept is never refused by a binding first."""
    return (
        limits.max_image_bytes
        + limits.max_envelope_bytes
        + 3 * limits.max_part_header_bytes
        + _MIME_FRAMING_SLACK
    )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the core needs to know about this installation."""

    limits: Limits = field(default_factory=Limits)
    #: Installation identity (R1): the device endpoint and the two hosted services.
    device_uuid: str = "9f3c6a52-3d0c-4c5e-9b38-5b7f0c1f2a10"
    dsp_service_uuid: str = "2b1d9a7e-5c43-4f7e-8d6a-0c7b1e3f4a21"
    dsc_service_uuid: str = "7c8e4f10-6a2b-4d9c-b1e3-3f5a7d9c2e32"
    #: Base URL the device is reachable at, for metadata and discovery (R11).
    base_url: str = "http://127.0.0.1:5362"
    friendly_name: str = "Open Distributed Scan Server"
    manufacturer: str = "dsc-server project"
    model_name: str = "dsc-server"
    firmware_version: str = "0.1.0"
    serial_number: str = "0"
    #: Filter dialects the repository offers (bdsrr §3; R6): local names under names.FILTER.
    filters: tuple[str, ...] = ("fileshare", "sharepoint", "email")
    #: R6: Creating jobs with no SendImage/EndPostScanJob for this long end Aborted.
    job_timeout_seconds: float = 600.0
    #: R6: completed jobs kept in the history.
    history_size: int = 1000
    #: A Creating job whose device sent nothing for this long is shown as stalled (status page,
    #: ``dsc jobs``) long before job_timeout_seconds aborts it (issue 14: a vanished scanner).
    stalled_after_seconds: float = 60.0
    #: Documents of a job with a failed filter stay in the spool this long after it ended, so
    #: its filters can be run again; other completed jobs keep none (issue 8, spool hygiene).
    spool_retention_seconds: float = 7 * 24 * 3600.0
    #: R10: when True, the identity is the TLS client certificate's, and MS-BDSRR needs an admin.
    require_client_certificates: bool = False
    scan_admins: frozenset[str] = frozenset()
    #: R10: user directory, SID -> name@domain (unmapped SIDs stay as they are).
    user_directory: Mapping[str, str] = field(default_factory=dict)
    #: R10/R9: name@domain -> e-mail address for SendToScanUser (default: the name itself).
    user_email: Mapping[str, str] = field(default_factory=dict)
    #: PSP_Identifier -> PSP_DisplayName (the directory service of bdsrr §3; default: the id).
    process_names: Mapping[str, str] = field(default_factory=dict)
    #: R14: users, scan administrators and process names also come from a directory the binding
    #: asks (Exchange.lookups, dsc_core.directory); the tables above remain the fallback.
    directory: bool = False
    #: R7 eventing.
    subscription_default_seconds: float = 3600.0
    subscription_max_seconds: float = 86400.0
    delivery_failures_before_end: int = 3
    #: R13 (R11): wsd:AppSequence InstanceId, a number that grows with each server start (the
    #: binding keeps a counter in its data directory).
    discovery_instance_id: int = 1
    #: WS-Discovery scopes of the device (issue 16): advertised in ProbeMatches and matched
    #: against a Probe's wsd:Scopes (WS-Discovery 2005/04 section 5; docs/rulings.md "Scopes").
    scopes: tuple[str, ...] = ()
    #: HTTP status of env:Sender faults: "soap12" gives 400 (SOAP 1.2 Part 2 section 7.5.1.2,
    #: R4), "500" gives 500 to every fault, for WCF clients that read a fault only from a 500
    #: (docs/rulings.md "HTTP status of faults").
    fault_http_status: str = "soap12"

    def __post_init__(self) -> None:
        owner = "ServerConfig"
        if not isinstance(self.limits, Limits):
            raise _fail(owner, "limits", "a Limits", self.limits)
        for name in ("device_uuid", "dsp_service_uuid", "dsc_service_uuid"):
            value = getattr(self, name)
            try:
                uuid.UUID(value)
            except (TypeError, ValueError, AttributeError):
                raise _fail(owner, name, "a UUID string", value) from None
        if not isinstance(self.base_url, str) or not self.base_url.startswith(
            ("http://", "https://")
        ):
            raise _fail(owner, "base_url", "an http:// or https:// URL", self.base_url)
        for name in ("friendly_name", "manufacturer", "model_name", "firmware_version"):
            _text(owner, name, getattr(self, name))
        if not isinstance(self.serial_number, str):
            raise _fail(owner, "serial_number", "a str", self.serial_number)
        if not isinstance(self.filters, tuple) or not set(self.filters) <= KNOWN_FILTERS:
            what = "a tuple of " + ", ".join(repr(f) for f in sorted(KNOWN_FILTERS))
            raise _fail(owner, "filters", what, self.filters)
        _seconds(owner, "job_timeout_seconds", self.job_timeout_seconds)
        _int(owner, "history_size", self.history_size, minimum=0)
        _seconds(owner, "stalled_after_seconds", self.stalled_after_seconds)
        _seconds(owner, "spool_retention_seconds", self.spool_retention_seconds)
        if not isinstance(self.require_client_certificates, bool):
            raise _fail(
                owner, "require_client_certificates", "a bool", self.require_client_certificates
            )
        if not isinstance(self.scan_admins, frozenset) or not all(
            isinstance(a, str) for a in self.scan_admins
        ):
            raise _fail(owner, "scan_admins", "a frozenset of str", self.scan_admins)
        for name in ("user_directory", "user_email", "process_names"):
            _str_mapping(owner, name, getattr(self, name))
        _seconds(owner, "subscription_default_seconds", self.subscription_default_seconds)
        _seconds(owner, "subscription_max_seconds", self.subscription_max_seconds)
        _int(owner, "delivery_failures_before_end", self.delivery_failures_before_end, minimum=1)
        _int(owner, "discovery_instance_id", self.discovery_instance_id, minimum=1)
        if not isinstance(self.scopes, tuple) or not all(
            isinstance(s, str) and s and not any(c.isspace() for c in s) and ":" in s
            for s in self.scopes
        ):
            # wsd:Scopes is a space-separated list of absolute URIs.
            what = "a tuple of absolute URIs without white space"
            raise _fail(owner, "scopes", what, self.scopes)
        if self.fault_http_status not in FAULT_HTTP_STATUSES:
            what = " or ".join(repr(v) for v in FAULT_HTTP_STATUSES)
            raise _fail(owner, "fault_http_status", what, self.fault_http_status)

    def replace(self, **changes: object) -> ServerConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def device_address(self) -> str:
        return f"urn:uuid:{self.device_uuid}"

    @property
    def device_url(self) -> str:
        return f"{self.base_url}/ScanServer"

    @property
    def dsp_url(self) -> str:
        return f"{self.base_url}/ScanServer/{self.dsp_service_uuid}"

    @property
    def dsc_url(self) -> str:
        return f"{self.base_url}/ScanServer/{self.dsc_service_uuid}"

    def filter_dialect_uris(self) -> tuple[str, ...]:
        return tuple(f"{names.FILTER}/{local}" for local in self.filters)
