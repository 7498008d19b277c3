"""The one configuration object: every limit, timeout and policy of the server (R12, h2's model).

Bindings read their HTTP limits from here too, so an administrator changes a limit in exactly one
place and a test can shrink any of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import names


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
    #: Active subscriptions per hosted service (core: wse:EventSourceUnableToProcess).
    max_subscriptions: int = 1000
    #: Active jobs at once (core: ServerErrorTemporaryError on create beyond it).
    max_active_jobs: int = 1000
    #: Documents in one job (core: InvalidArgs beyond it).
    max_documents_per_job: int = 10_000


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
    #: R10: when True, the identity is the TLS client certificate's, and MS-BDSRR needs an admin.
    require_client_certificates: bool = False
    scan_admins: frozenset[str] = frozenset()
    #: R10: user directory, SID -> name@domain (unmapped SIDs stay as they are).
    user_directory: Mapping[str, str] = field(default_factory=dict)
    #: R10/R9: name@domain -> e-mail address for SendToScanUser (default: the name itself).
    user_email: Mapping[str, str] = field(default_factory=dict)
    #: PSP_Identifier -> PSP_DisplayName (the directory service of bdsrr §3; default: the id).
    process_names: Mapping[str, str] = field(default_factory=dict)
    #: R7 eventing.
    subscription_default_seconds: float = 3600.0
    subscription_max_seconds: float = 86400.0
    delivery_failures_before_end: int = 3

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
