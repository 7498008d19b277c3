"""DPWS hosting: the device's WS-Transfer Get metadata and the directed WS-Discovery Probe
(R11)."""

from __future__ import annotations

from typing import Any

from lxml import etree

from . import faults, names
from .config import ServerConfig
from .operation import Operation, OpResult, Request, no_arguments
from .scopes import SUPPORTED_RULES, UnsupportedMatchingRule, scopes_match
from .xmlread import Element, children, split, trimmed
from .xmlwrite import sub

A = names.Action
_DIALECT = names.WSDP + "/"


def transfer_get(request: Request, _args: None) -> OpResult:
    """GetResponse: ThisDevice, ThisModel and a Relationship with both hosted services."""
    config = request.config
    wsa = request.envelope.addressing.wsa_ns
    metadata = etree.Element(f"{{{names.MEX}}}Metadata")
    section = sub(metadata, names.MEX, "MetadataSection")
    section.set("Dialect", _DIALECT + "ThisDevice")
    device = sub(section, names.WSDP, "ThisDevice")
    sub(device, names.WSDP, "FriendlyName", config.friendly_name).set(f"{{{names.XML}}}lang", "en")
    sub(device, names.WSDP, "FirmwareVersion", config.firmware_version)
    sub(device, names.WSDP, "SerialNumber", config.serial_number)
    section = sub(metadata, names.MEX, "MetadataSection")
    section.set("Dialect", _DIALECT + "ThisModel")
    model = sub(section, names.WSDP, "ThisModel")
    sub(model, names.WSDP, "Manufacturer", config.manufacturer).set(f"{{{names.XML}}}lang", "en")
    sub(model, names.WSDP, "ModelName", config.model_name).set(f"{{{names.XML}}}lang", "en")
    section = sub(metadata, names.MEX, "MetadataSection")
    section.set("Dialect", _DIALECT + "Relationship")
    relationship = sub(section, names.WSDP, "Relationship")
    relationship.set("Type", _DIALECT + "host")
    host = sub(relationship, names.WSDP, "Host")
    sub(sub(host, wsa, "EndpointReference"), wsa, "Address", config.device_address)
    sub(host, names.WSDP, "Types", "wsdp:Device")
    sub(host, names.WSDP, "ServiceId", config.device_address)
    for url, service_type, uuid in (
        (config.dsp_url, "dsp:DistributedScanProcessingServiceType", config.dsp_service_uuid),
        (config.dsc_url, "dsc:RepositoryConfigurationServiceType", config.dsc_service_uuid),
    ):
        hosted = sub(relationship, names.WSDP, "Hosted")
        sub(sub(hosted, wsa, "EndpointReference"), wsa, "Address", url)
        sub(hosted, names.WSDP, "Types", service_type)
        sub(hosted, names.WSDP, "ServiceId", f"urn:uuid:{uuid}")
    nsmap = {"wsx": names.MEX, "wsdp": names.WSDP, "dsp": names.DSP, "dsc": names.DSC}
    return OpResult(A.TRANSFER_GET_RESPONSE, metadata, nsmap)


_OUR_TYPES = frozenset(
    {
        (names.WSDP, "Device"),
        (names.DSP, "DistributedScanProcessingServiceType"),
        (names.DSC, "RepositoryConfigurationServiceType"),
    }
)


def probe_matches(payload: Element | None, config: ServerConfig) -> bool:
    """Whether a wsd:Probe matches this device (WS-Discovery 2005/04 section 5.1): every Type
    (a QName, compared by namespace, R3) is ours (wsdp:Device or one of our service types) and
    every Scope matches one of ``config.scopes`` under the Probe's MatchBy rule.  A rule this
    device does not implement raises ``wsd:MatchingRuleNotSupported``."""
    if payload is None or split(payload.tag) != (names.WSD, "Probe"):
        return True  # an empty Probe body asks for every device
    for child in children(payload):
        tag = split(child.tag)
        if tag == (names.WSD, "Types"):
            for text in trimmed(child.text).split():
                prefix, _, local = text.rpartition(":")
                if (child.nsmap.get(prefix or None, "") or "", local) not in _OUR_TYPES:
                    return False
        elif tag == (names.WSD, "Scopes"):
            match_by = child.get("MatchBy")
            try:
                if not scopes_match(
                    trimmed(child.text).split(),
                    config.scopes,
                    trimmed(match_by) if match_by is not None else None,
                ):
                    return False
            except UnsupportedMatchingRule:
                raise faults.matching_rule_not_supported(SUPPORTED_RULES) from None
    return True


def probe(request: Request, _args: None) -> OpResult:
    """A directed Probe (HTTP POST to the device address): one ProbeMatch when it matches."""
    matches = etree.Element(f"{{{names.WSD}}}ProbeMatches")
    if probe_matches(request.envelope.payload, request.config):
        wsa = request.envelope.addressing.wsa_ns
        match = sub(matches, names.WSD, "ProbeMatch")
        sub(sub(match, wsa, "EndpointReference"), wsa, "Address", request.config.device_address)
        sub(match, names.WSD, "Types", "wsdp:Device")
        if request.config.scopes:  # issue 16: advertised, in the schema's order
            sub(match, names.WSD, "Scopes", " ".join(request.config.scopes))
        sub(match, names.WSD, "XAddrs", request.config.device_url)
        sub(match, names.WSD, "MetadataVersion", "1")
    # R13 (R11): AppSequence, as WSDAPI validates: InstanceId grows per start, MessageNumber
    # per discovery message (over HTTP and UDP alike: both answer through here).
    request.state.discovery_messages += 1
    sequence = etree.Element(f"{{{names.WSD}}}AppSequence")
    sequence.set("InstanceId", str(request.config.discovery_instance_id))
    sequence.set("MessageNumber", str(request.state.discovery_messages))
    return OpResult(
        A.PROBE_MATCHES, matches, {"wsd": names.WSD, "wsdp": names.WSDP}, headers=(sequence,)
    )


OPERATIONS: tuple[Operation[Any], ...] = (
    # Neither reads a job: "listing" lets a shared store's binding answer them without a read.
    Operation(A.TRANSFER_GET, names.WXF, no_arguments, transfer_get, listing=True),
    Operation(A.PROBE, names.WSD, no_arguments, probe, listing=True),
)
