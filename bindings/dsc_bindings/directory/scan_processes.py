"""Scan processes in the directory (R14): ``msImaging-PostScanProcess`` objects under
``CN=PSPs,CN=System,<domain>``, as the Scan Management console kept them.

An object has ``displayName`` (the name users see), ``msImaging-PSPIdentifier`` (we write the
16-byte GUID in Windows byte order, R14; we read that and GUID text) and ``msImaging-PSPString``:
the ``psp:PostScanProcess`` XML (PostScan.xsd) with ScanRepository (the scan server), ScanTicket
(WS-Scan scan settings) and PostScanInstructions (the filters, as a device sends them).

Validation before anything is written: a structural check built in (the core's own reader of
PostScanInstructions, plus the ScanRepository and ScanTicket rules), and, when ``[directory]
schema_dir`` names a folder holding them, the schemas PostScan.xsd + WDPScan.xsd +
bdsrr-fsf/emlf/spf.xsd with lxml.  The schema files are not shipped (they are Microsoft's
published texts, not ours), and the product never goes looking for them: an installation without
``schema_dir`` relies on the structural check.

Who may see a process: ``allow`` groups become the object's DACL (protected, no inheritance):
full control for SYSTEM, Domain Admins, Administrators and the account that wrote it, read for
each allowed group.  A user outside them who binds with their own credentials does not find it.
Without ``allow`` the schema's default applies (Authenticated Users may read).
"""

from __future__ import annotations

import copy
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.protocol.microsoft import security_descriptor_control
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from lxml import etree

from dsc_bindings.directory.ldap import (
    Directory,
    DirectoryError,
    DirectoryUnavailable,
    decode_guid,
    escape_bytes,
    guid_filter_values,
    sid_to_bytes,
    sid_to_text,
)
from dsc_core import FilterState, faults, names
from dsc_core.args import Args
from dsc_core.client import filter_instructions
from dsc_core.instructions import read_post_scan_instructions
from dsc_core.model import (
    DOCUMENT_FORMATS,
    EmailInstructions,
    FileShareInstructions,
    SharePointInstructions,
)
from dsc_core.xmlread import children, split
from dsc_core.xmlwrite import sub

__all__ = [
    "COLORS",
    "FORMATS",
    "ProcessStore",
    "ScanProcess",
    "ScanSettings",
    "ValidationError",
    "missing_schema_files",
    "parse_psp_string",
    "validate_psp_string",
]

PSP, WSCN = names.PSP, names.WSCN
OBJECT_CLASS = "msImaging-PostScanProcess"
#: WS-Scan DocumentFormatWKVType (WDPScan.xsd): the core's one list, in a stable order.
FORMATS: tuple[str, ...] = tuple(sorted(DOCUMENT_FORMATS))
#: WS-Scan ColorWKVType.
COLORS = (
    "BlackAndWhite1",
    "Grayscale4",
    "Grayscale8",
    "Grayscale16",
    "RGB24",
    "RGB48",
    "RGBa32",
    "RGBa64",
)
_OFFERED = (names.FSF, names.EMLF, names.SPF)


class ValidationError(ValueError):
    """A PSPString that the schemas (or the built-in structural check) refuse."""


@dataclass(frozen=True, slots=True)
class ScanSettings:
    """The scan ticket of a process (WS-Scan DocumentParameters)."""

    format: str = "pdf-a"
    resolution: int = 300
    color: str = "RGB24"
    duplex: bool = False


@dataclass(frozen=True, slots=True)
class ScanProcess:
    name: str
    #: PSP_Identifier as GUID text (upper case).
    identifier: str
    #: The scan server's name (psp:ScanRepository).
    scan_repository: str
    shares: tuple[str, ...] = ()
    sharepoint_sites: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    email_scan_user: bool = False
    continue_on_error: bool = False
    document_root_name: str = "Scan"
    settings: ScanSettings = field(default_factory=ScanSettings)
    #: Groups that may use it (empty: everyone authenticated).
    allow: tuple[str, ...] = ()
    dn: str = ""
    #: The PSPString as stored (what a device sends), "" for a process not read from LDAP.
    stored: str = field(default="", compare=False, repr=False)

    @property
    def has_destination(self) -> bool:
        """A process must send the scans somewhere (a share, a site or a mail)."""
        return bool(self.shares or self.sharepoint_sites or self.emails or self.email_scan_user)

    def instructions(
        self,
    ) -> list[FileShareInstructions | EmailInstructions | SharePointInstructions]:
        out: list[FileShareInstructions | EmailInstructions | SharePointInstructions] = []
        if self.shares:
            out.append(FileShareInstructions(self.shares))
        if self.emails or self.email_scan_user:
            out.append(EmailInstructions(self.email_scan_user, self.emails))
        if self.sharepoint_sites:
            out.append(SharePointInstructions(False, self.sharepoint_sites))
        return out

    def psp_string(self) -> str:
        """The ``psp:PostScanProcess`` XML of this process."""
        root = etree.Element(f"{{{PSP}}}PostScanProcess", nsmap={"psp": PSP, "wscn": WSCN})
        sub(root, PSP, "ScanRepository", self.scan_repository)
        ticket = sub(root, PSP, "ScanTicket")
        job = sub(ticket, WSCN, "JobDescription")
        sub(job, WSCN, "JobName", self.name)
        sub(job, WSCN, "JobOriginatingUserName", "")
        params = sub(ticket, WSCN, "DocumentParameters")
        sub(params, WSCN, "Format", self.settings.format)
        sub(params, WSCN, "InputSource", "ADFDuplex" if self.settings.duplex else "ADF")
        sides = sub(params, WSCN, "MediaSides")
        for side in ("MediaFront", "MediaBack") if self.settings.duplex else ("MediaFront",):
            media = sub(sides, WSCN, side)
            sub(media, WSCN, "ColorProcessing", self.settings.color)
            resolution = sub(media, WSCN, "Resolution")
            sub(resolution, WSCN, "Width", str(self.settings.resolution))
            sub(resolution, WSCN, "Height", str(self.settings.resolution))
        psi = sub(root, PSP, "PostScanInstructions")
        sub(psi, PSP, "ContinueOnError", "true" if self.continue_on_error else "false")
        sub(psi, PSP, "DocumentRootName", self.document_root_name)
        filters = sub(psi, PSP, "FiltersToProcess")
        for item in self.instructions():
            dialect, config = filter_instructions(item)
            f = sub(filters, PSP, "Filter")
            sub(f, PSP, "Dialect", dialect)
            sub(f, PSP, "Instructions").append(config)
        return etree.tostring(root, encoding="unicode")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "identifier": self.identifier,
            "scan_repository": self.scan_repository,
            "shares": list(self.shares),
            "sharepoint_sites": list(self.sharepoint_sites),
            "emails": list(self.emails),
            "email_scan_user": self.email_scan_user,
            "continue_on_error": self.continue_on_error,
            "document_root_name": self.document_root_name,
            "format": self.settings.format,
            "resolution": self.settings.resolution,
            "color": self.settings.color,
            "duplex": self.settings.duplex,
            "allow": list(self.allow),
        }


# --- reading and validating a PSPString --------------------------------------------------------


def _parse_xml(text: str) -> etree._Element:
    if len(text) > 524_288:  # rangeUpper of msImaging-PSPString (R14)
        raise ValidationError("the PSPString is longer than 524,288 characters")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        return etree.fromstring(text.encode("utf-8"), parser)
    except etree.XMLSyntaxError as exc:
        raise ValidationError(f"the PSPString is not well-formed XML: {exc}") from exc


def _child(el: etree._Element, ns: str, local: str) -> etree._Element | None:
    for c in children(el):
        if split(c.tag) == (ns, local):
            return c
    return None


def _structure(root: etree._Element) -> etree._Element:
    """The built-in check (always run): PostScanProcessType's sequence and the filters.
    Returns psp:PostScanInstructions."""
    if split(root.tag) != (PSP, "PostScanProcess"):
        raise ValidationError(f"the root element must be psp:PostScanProcess, not {root.tag}")
    own = [c for c in children(root) if split(c.tag)[0] in (PSP, "")]
    order = [split(c.tag)[1] for c in own]
    if order != ["ScanRepository", "ScanTicket", "PostScanInstructions"]:
        raise ValidationError(
            "psp:PostScanProcess must hold ScanRepository, ScanTicket, PostScanInstructions "
            f"in this order, not {', '.join(order) or 'nothing'}"
        )
    repository = (own[0].text or "").strip()
    if not repository or len(own[0].text or "") > 255:
        raise ValidationError("psp:ScanRepository must name the scan server (1-255 characters)")
    ticket = own[1]
    job = _child(ticket, WSCN, "JobDescription")
    if job is None or _child(job, WSCN, "JobName") is None:
        raise ValidationError("psp:ScanTicket needs wscn:JobDescription with wscn:JobName")
    params = _child(ticket, WSCN, "DocumentParameters")
    if params is not None:
        fmt = _child(params, WSCN, "Format")
        if (
            fmt is not None
            and (fmt.text or "").strip() not in FORMATS
            and ":" not in (fmt.text or "")
        ):
            raise ValidationError(f"unknown scan format {fmt.text!r}")
    try:
        parsed = read_post_scan_instructions(own[2], Args(names.DSP), _OFFERED)
    except faults.SoapFault as fault:
        detail = fault.detail.text if fault.detail is not None else ""
        raise ValidationError(f"psp:PostScanInstructions is invalid ({detail})") from None
    for status in parsed.filters:
        if status.state is not FilterState.PENDING:
            raise ValidationError(
                f"the instructions of filter {status.dialect} do not match its schema"
            )
    return own[2]


#: The files ``[directory] schema_dir`` must hold: PostScan.xsd includes WDPScan.xsd, and the
#: filters' ``xs:any namespace="##other"`` in it is strict, so their schemas are needed too.
SCHEMA_FILES = ("PostScan.xsd", "WDPScan.xsd", "bdsrr-fsf.xsd", "bdsrr-emlf.xsd", "bdsrr-spf.xsd")


def missing_schema_files(folder: Path) -> list[str]:
    """The files of :data:`SCHEMA_FILES` that ``folder`` lacks (empty: it can validate)."""
    return [name for name in SCHEMA_FILES if not (folder / name).is_file()]


_SCHEMAS: dict[Path, etree.XMLSchema] = {}


def psp_schema(folder: Path) -> etree.XMLSchema:
    """PostScan.xsd (with WDPScan.xsd) and the three filter schemas as one schema set: the
    filters' ``xs:any namespace="##other"`` is strict, so their schemas must be loaded too."""
    if folder not in _SCHEMAS:
        imports = "".join(
            f'<xs:import namespace="{ns}" schemaLocation="{(folder / name).as_uri()}"/>'
            for ns, name in (
                (PSP, "PostScan.xsd"),
                (names.FSF, "bdsrr-fsf.xsd"),
                (names.EMLF, "bdsrr-emlf.xsd"),
                (names.SPF, "bdsrr-spf.xsd"),
            )
        )
        wrapper = f'<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">{imports}</xs:schema>'
        _SCHEMAS[folder] = etree.XMLSchema(
            etree.fromstring(wrapper.encode(), base_url=(folder / "wrapper.xsd").as_uri())
        )
    return _SCHEMAS[folder]


def validate_psp_string(text: str, *, schema_dir: Path | None = None) -> str:
    """Check a PSPString before it is written; returns how (``"schema"`` or ``"structure"``).
    ``schema_dir`` is ``[directory] schema_dir`` (checked for :data:`SCHEMA_FILES` when the
    settings are read).  Raises ValidationError saying what is wrong."""
    root = _parse_xml(text)
    _structure(root)
    if schema_dir is None:
        return "structure"  # no schema files configured: the built-in check alone
    schema = psp_schema(schema_dir)
    if not schema.validate(root):
        lines = str(schema.error_log).strip().splitlines() or ["?"]
        raise ValidationError(
            f"the PSPString does not match PostScan.xsd: {lines[-1].split(': ', 2)[-1]}"
        )
    return "schema"


def parse_psp_string(name: str, identifier: str, text: str) -> ScanProcess:
    """A stored process, read leniently (it may have been written by the Windows console)."""
    root = _parse_xml(text)
    psi = _structure(root)
    parsed = read_post_scan_instructions(psi, Args(names.DSP), _OFFERED)
    process = ScanProcess(
        name=name,
        identifier=identifier,
        scan_repository=(_child(root, PSP, "ScanRepository").text or "").strip(),  # type: ignore[union-attr]
        continue_on_error=parsed.continue_on_error,
        document_root_name=parsed.document_root_name,
    )
    shares: list[str] = []
    sites: list[str] = []
    emails: list[str] = []
    to_user = False
    for status in parsed.filters:
        item = status.instructions
        if isinstance(item, FileShareInstructions):
            shares += item.shares
        elif isinstance(item, EmailInstructions):
            emails += item.addresses
            to_user = to_user or item.send_to_scan_user
        elif isinstance(item, SharePointInstructions):
            sites += item.site_urls
    settings = ScanSettings()
    ticket = _child(root, PSP, "ScanTicket")
    params = _child(ticket, WSCN, "DocumentParameters") if ticket is not None else None
    if params is not None:
        fmt = _child(params, WSCN, "Format")
        source = _child(params, WSCN, "InputSource")
        sides = _child(params, WSCN, "MediaSides")
        front = _child(sides, WSCN, "MediaFront") if sides is not None else None
        color = _child(front, WSCN, "ColorProcessing") if front is not None else None
        resolution = _child(front, WSCN, "Resolution") if front is not None else None
        width = _child(resolution, WSCN, "Width") if resolution is not None else None
        settings = ScanSettings(
            format=(fmt.text or "").strip() if fmt is not None else settings.format,
            resolution=int((width.text or "0").strip() or 0)
            if width is not None and (width.text or "").strip().isdigit()
            else settings.resolution,
            color=(color.text or "").strip() if color is not None else settings.color,
            duplex=source is not None and (source.text or "").strip() == "ADFDuplex",
        )
    return replace(
        process,
        shares=tuple(shares),
        sharepoint_sites=tuple(sites),
        emails=tuple(emails),
        email_scan_user=to_user,
        settings=settings,
    )


def post_scan_instructions(text: str) -> etree._Element:
    """The ``psp:PostScanInstructions`` element of a PSPString, as a device sends it."""
    return copy.deepcopy(_structure(_parse_xml(text)))


# --- security descriptors ([MS-DTYP] 2.4.6, self-relative) -----------------------------------

#: RC | LC | RP | LO: read the object (ADS_RIGHT_GENERIC_READ as AD expands it).
READ = 0x00020094
#: Full control (GENERIC_ALL as AD expands it).
FULL = 0x000F01FF
#: Authenticated Users, Everyone: a READ for these means "not restricted".
_EVERYONE = {"S-1-5-11", "S-1-1-0"}
_SE_DACL_PRESENT, _SE_DACL_PROTECTED, _SE_SELF_RELATIVE = 0x0004, 0x1000, 0x8000
#: Only the DACL is written or read (LDAP_SERVER_SD_FLAGS_OID, DACL_SECURITY_INFORMATION).
_DACL_ONLY = security_descriptor_control(sdflags=0x04)


def build_dacl_descriptor(aces: Sequence[tuple[int, str]]) -> bytes:
    """A self-relative security descriptor with only a protected DACL of allow ACEs."""
    body = b""
    for mask, sid in aces:
        raw = sid_to_bytes(sid)
        body += struct.pack("<BBHI", 0, 0, 8 + len(raw), mask) + raw  # ACCESS_ALLOWED_ACE
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(body), len(aces), 0) + body
    control = _SE_SELF_RELATIVE | _SE_DACL_PRESENT | _SE_DACL_PROTECTED
    return struct.pack("<BBHIIII", 1, 0, control, 0, 0, 0, 20) + acl


def dacl_aces(descriptor: bytes) -> list[tuple[int, int, str]]:
    """(type, mask, SID) of each ACE of a self-relative descriptor's DACL (object ACEs keep
    their type and mask, SID omitted)."""
    if len(descriptor) < 20:
        return []
    dacl_offset = struct.unpack_from("<I", descriptor, 16)[0]
    if not dacl_offset or dacl_offset + 8 > len(descriptor):
        return []
    count = struct.unpack_from("<H", descriptor, dacl_offset + 4)[0]
    position = dacl_offset + 8
    out = []
    for _ in range(count):
        if position + 8 > len(descriptor):
            break
        ace_type, _flags, size, mask = struct.unpack_from("<BBHI", descriptor, position)
        sid = sid_to_text(descriptor[position + 8 : position + size]) if ace_type == 0 else ""
        out.append((ace_type, mask, sid))
        position += max(size, 8)
    return out


# --- the store -------------------------------------------------------------------------------


class ProcessStore:
    """List, read, add, change and remove scan processes over one bound connection."""

    ATTRIBUTES = ("displayName", "msImaging-PSPIdentifier", "msImaging-PSPString")

    def __init__(self, directory: Directory, connection: ldap3.Connection) -> None:
        self.directory = directory
        self.conn = connection
        self.base = directory.settings.psp_dn

    # - reading -

    def _search(self, search_filter: str, *, with_sd: bool = False) -> list[dict[str, Any]]:
        attributes = list(self.ATTRIBUTES) + (["nTSecurityDescriptor"] if with_sd else [])
        try:
            self.conn.search(
                self.base,
                f"(&(objectClass={OBJECT_CLASS}){search_filter})",
                ldap3.LEVEL,
                attributes=attributes,
                controls=_DACL_ONLY if with_sd else None,
            )
        except LDAPException as exc:
            raise _error(exc) from exc
        return [r for r in self.conn.response or [] if r.get("type") == "searchResEntry"]

    def _process(self, entry: dict[str, Any]) -> ScanProcess:
        raw = entry["raw_attributes"]
        name = _text(raw, "displayName") or ""
        identifier = decode_guid((raw.get("msImaging-PSPIdentifier") or [b""])[0])
        text = _text(raw, "msImaging-PSPString") or ""
        try:
            process = parse_psp_string(name, identifier, text)
        except ValidationError:
            process = ScanProcess(name, identifier, scan_repository="(unreadable PSPString)")
        allow = self._allowed_groups((raw.get("nTSecurityDescriptor") or [b""])[0])
        return replace(process, dn=entry["dn"], allow=allow, stored=text)

    def _allowed_groups(self, descriptor: bytes) -> tuple[str, ...]:
        sids = [sid for kind, mask, sid in dacl_aces(descriptor) if kind == 0 and mask == READ]
        if _EVERYONE & set(sids):
            return ()  # readable by every user: not restricted
        groups = []
        for sid in sids:
            found = self._lookup(
                f"(objectSid={escape_bytes(sid_to_bytes(sid))})", ["sAMAccountName"]
            )
            name = _text(found[0], "sAMAccountName") if found else None
            groups.append(name or sid)
        return tuple(sorted(groups))

    def all(self) -> list[ScanProcess]:
        return sorted(
            (self._process(e) for e in self._search("", with_sd=True)),
            key=lambda p: p.name.casefold(),
        )

    def get(self, name: str) -> ScanProcess | None:
        """By display name (or GUID text)."""
        clauses = f"(displayName={escape_filter_chars(name)})"
        clauses += "".join(f"(msImaging-PSPIdentifier={v})" for v in guid_filter_values(name)[1:])
        found = self._search(f"(|{clauses})", with_sd=True)
        return self._process(found[0]) if found else None

    # - writing -

    def _descriptor(self, allow: Sequence[str]) -> bytes:
        writer = self._whoami_sid()
        domain_sid = writer.rsplit("-", 1)[0]
        aces = [
            (FULL, "S-1-5-18"),  # SYSTEM
            (FULL, "S-1-5-32-544"),  # BUILTIN\Administrators
            (FULL, f"{domain_sid}-512"),  # Domain Admins
            (FULL, writer),  # the account that manages it (and the server, if the same)
        ]
        for group in allow:
            aces.append((READ, self._group_sid(group)))
        return build_dacl_descriptor(aces)

    def _whoami_sid(self) -> str:
        """The SID of the account this connection is bound as (it keeps full control)."""
        user = str(self.conn.user or "")
        if "=" in user:
            clause = f"(distinguishedName={escape_filter_chars(user)})"
        else:
            name = user.split("\\")[-1]
            sam = escape_filter_chars(name.split("@", 1)[0])
            clause = f"(|(userPrincipalName={escape_filter_chars(name)})(sAMAccountName={sam}))"
        found = self._lookup(f"(&(objectClass=user){clause})", ["objectSid"])
        if len(found) != 1:
            raise DirectoryError(f"the account {user!r} was not found under base_dn")
        return sid_to_text(found[0]["objectSid"][0])

    def _lookup(self, search_filter: str, attributes: list[str]) -> list[dict[str, Any]]:
        try:
            self.conn.search(self.directory.settings.base_dn, search_filter, attributes=attributes)
        except LDAPException as exc:
            raise _error(exc) from exc
        return [
            r["raw_attributes"]
            for r in self.conn.response or []
            if r.get("type") == "searchResEntry"
        ]

    def _group_sid(self, group: str) -> str:
        value = escape_filter_chars(group)
        found = self._lookup(
            f"(&(objectClass=group)(|(sAMAccountName={value})(cn={value})))", ["objectSid"]
        )
        if len(found) != 1:
            raise DirectoryError(f"no group named {group!r} in the directory")
        return sid_to_text(found[0]["objectSid"][0])

    def add(self, process: ScanProcess) -> ScanProcess:
        text = process.psp_string()
        validate_psp_string(text, schema_dir=self.directory.settings.schema_dir)
        if self.get(process.name) is not None:
            raise DirectoryError(f"a scan process named {process.name!r} exists already")
        dn = f"CN={escape_rdn(process.name)},{self.base}"
        attributes: dict[str, Any] = {
            "displayName": process.name,
            "msImaging-PSPIdentifier": uuid.UUID(process.identifier).bytes_le,
            "msImaging-PSPString": text,
        }
        if process.allow:
            attributes["nTSecurityDescriptor"] = self._descriptor(process.allow)
        try:
            self.conn.add(dn, [OBJECT_CLASS], attributes)  # type: ignore[no-untyped-call]
        except LDAPException as exc:
            raise _error(exc) from exc
        return replace(process, dn=dn)

    def update(self, old: ScanProcess, new: ScanProcess, *, allow_changed: bool) -> ScanProcess:
        text = new.psp_string()
        validate_psp_string(text, schema_dir=self.directory.settings.schema_dir)
        changes: dict[str, Any] = {"msImaging-PSPString": [(ldap3.MODIFY_REPLACE, [text])]}
        try:
            self.conn.modify(old.dn, changes)  # type: ignore[no-untyped-call]
            if allow_changed:
                descriptor = self._descriptor(new.allow)
                if not new.allow:  # open again: what the schema gives (Authenticated Users)
                    aces = [(m, s) for t, m, s in dacl_aces(descriptor) if t == 0]
                    descriptor = build_dacl_descriptor([*aces, (READ, "S-1-5-11")])
                self.conn.modify(  # type: ignore[no-untyped-call]
                    old.dn,
                    {"nTSecurityDescriptor": [(ldap3.MODIFY_REPLACE, [descriptor])]},
                    controls=_DACL_ONLY,
                )
        except LDAPException as exc:
            raise _error(exc) from exc
        return new

    def remove(self, process: ScanProcess) -> None:
        try:
            self.conn.delete(process.dn)  # type: ignore[no-untyped-call]
        except LDAPException as exc:
            raise _error(exc) from exc


def _text(raw: dict[str, list[bytes]], attribute: str) -> str | None:
    values = raw.get(attribute) or []
    return values[0].decode("utf-8", "replace") if values else None


def _error(exc: LDAPException) -> DirectoryError:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) or "socket" in text.lower() or "timed out" in text.lower():
        return DirectoryUnavailable(text)
    if "insufficient" in text.lower() or "access" in text.lower():
        return DirectoryError(f"the directory refused: {text} (does the bind account have rights?)")
    return DirectoryError(f"the directory refused: {text}")
