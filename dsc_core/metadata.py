"""DPWS hosting: WS-Transfer Get metadata, directed WS-Discovery Probe (R11) and the
WS-Eventing subscription operations of both hosted services (R7)."""

from __future__ import annotations

from lxml import etree

from . import faults, names
from .server import Call, Handler, OpResult
from .xmlread import children, split, trimmed

A = names.Action
_DIALECT = names.WSDP + "/"


def _sub(parent: etree._Element, ns: str, local: str, text: str | None = None) -> etree._Element:
    el = etree.SubElement(parent, f"{{{ns}}}{local}")
    if text is not None:
        el.text = text
    return el


def transfer_get(call: Call) -> OpResult:
    """GetResponse: ThisDevice, ThisModel and a Relationship with both hosted services."""
    config = call.config
    wsa = call.envelope.addressing.wsa_ns
    metadata = etree.Element(f"{{{names.MEX}}}Metadata")
    section = _sub(metadata, names.MEX, "MetadataSection")
    section.set("Dialect", _DIALECT + "ThisDevice")
    device = _sub(section, names.WSDP, "ThisDevice")
    _sub(device, names.WSDP, "FriendlyName", config.friendly_name).set(f"{{{names.XML}}}lang", "en")
    _sub(device, names.WSDP, "FirmwareVersion", config.firmware_version)
    _sub(device, names.WSDP, "SerialNumber", config.serial_number)
    section = _sub(metadata, names.MEX, "MetadataSection")
    section.set("Dialect", _DIALECT + "ThisModel")
    model = _sub(section, names.WSDP, "ThisModel")
    _sub(model, names.WSDP, "Manufacturer", config.manufacturer).set(f"{{{names.XML}}}lang", "en")
    _sub(model, names.WSDP, "ModelName", config.model_name).set(f"{{{names.XML}}}lang", "en")
    section = _sub(metadata, names.MEX, "MetadataSection")
    section.set("Dialect", _DIALECT + "Relationship")
    relationship = _sub(section, names.WSDP, "Relationship")
    relationship.set("Type", _DIALECT + "host")
    host = _sub(relationship, names.WSDP, "Host")
    _sub(_sub(host, wsa, "EndpointReference"), wsa, "Address", config.device_address)
    _sub(host, names.WSDP, "Types", "wsdp:Device")
    _sub(host, names.WSDP, "ServiceId", config.device_address)
    for url, service_type, uuid in (
        (config.dsp_url, "dsp:DistributedScanProcessingServiceType", config.dsp_service_uuid),
        (config.dsc_url, "dsc:RepositoryConfigurationServiceType", config.dsc_service_uuid),
    ):
        hosted = _sub(relationship, names.WSDP, "Hosted")
        _sub(_sub(hosted, wsa, "EndpointReference"), wsa, "Address", url)
        _sub(hosted, names.WSDP, "Types", service_type)
        _sub(hosted, names.WSDP, "ServiceId", f"urn:uuid:{uuid}")
    nsmap = {"wsx": names.MEX, "wsdp": names.WSDP, "dsp": names.DSP, "dsc": names.DSC}
    return OpResult(A.TRANSFER_GET_RESPONSE, metadata, nsmap)


_OUR_TYPES = frozenset(
    {
        (names.WSDP, "Device"),
        (names.DSP, "DistributedScanProcessingServiceType"),
        (names.DSC, "RepositoryConfigurationServiceType"),
    }
)


def probe_matches(payload: etree._Element | None) -> bool:
    """Whether a wsd:Probe matches this device: its Types (QNames, compared by namespace, R3)
    are empty or all ours (wsdp:Device or one of our service types)."""
    if payload is None or split(payload.tag) != (names.WSD, "Probe"):
        return True  # an empty Probe body asks for every device
    for child in children(payload):
        if split(child.tag) == (names.WSD, "Types"):
            for text in trimmed(child.text).split():
                prefix, _, local = text.rpartition(":")
                if (child.nsmap.get(prefix or None, "") or "", local) not in _OUR_TYPES:
                    return False
    return True


def probe(call: Call) -> OpResult:
    """A directed Probe (HTTP POST to the device address): one ProbeMatch when it matches."""
    matches = etree.Element(f"{{{names.WSD}}}ProbeMatches")
    if probe_matches(call.envelope.payload):
        wsa = call.envelope.addressing.wsa_ns
        match = _sub(matches, names.WSD, "ProbeMatch")
        _sub(_sub(match, wsa, "EndpointReference"), wsa, "Address", call.config.device_address)
        _sub(match, names.WSD, "Types", "wsdp:Device")
        _sub(match, names.WSD, "XAddrs", call.config.device_url)
        _sub(match, names.WSD, "MetadataVersion", "1")
    return OpResult(A.PROBE_MATCHES, matches, {"wsd": names.WSD, "wsdp": names.WSDP})


def _service_hint(call: Call) -> str | None:
    """Which hosted service a Subscribe is for: by wsa:To or the request path (R7)."""
    where = f"{call.envelope.addressing.to or ''} {call.info.path}"
    if call.config.dsp_service_uuid in where:
        return "dsp"
    if call.config.dsc_service_uuid in where:
        return "dsc"
    return None


def subscribe(call: Call) -> OpResult:
    payload = call.envelope.payload
    if payload is None or split(payload.tag) != (names.WSE, "Subscribe"):
        raise faults.eventing("InvalidMessage", faults.Detail("wse:Subscribe"))
    _, response = call.server.subscriptions.subscribe(
        call.envelope, payload, _service_hint(call), call.now
    )
    return OpResult(A.SUBSCRIBE_RESPONSE, response, {"wse": names.WSE})


def renew(call: Call) -> OpResult:
    payload = call.envelope.payload
    if payload is None or split(payload.tag) != (names.WSE, "Renew"):
        raise faults.eventing("InvalidMessage", faults.Detail("wse:Renew"))
    response = call.server.subscriptions.renew(call.envelope, payload, call.now)
    return OpResult(A.RENEW_RESPONSE, response, {"wse": names.WSE})


def get_status(call: Call) -> OpResult:
    response = call.server.subscriptions.get_status(call.envelope, call.now)
    return OpResult(A.GET_STATUS_RESPONSE, response, {"wse": names.WSE})


def unsubscribe(call: Call) -> OpResult:
    response = call.server.subscriptions.unsubscribe(call.envelope, call.now)
    return OpResult(A.UNSUBSCRIBE_RESPONSE, response, {"wse": names.WSE})


HANDLERS: dict[str, tuple[str, Handler]] = {
    A.TRANSFER_GET: (names.WXF, transfer_get),
    A.PROBE: (names.WSD, probe),
    A.SUBSCRIBE: (names.WSE, subscribe),
    A.RENEW: (names.WSE, renew),
    A.GET_STATUS: (names.WSE, get_status),
    A.UNSUBSCRIBE: (names.WSE, unsubscribe),
}
