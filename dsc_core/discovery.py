"""Directed WS-Discovery Probe over UDP (R11): "a UDP datagram to port 5362 returns
ProbeMatches".  Only a Probe is answered; any other datagram is dropped without a reply, because
answering arbitrary requests over UDP would let a forged source address turn the server into a
reflector, and UDP has no room for a job's conversation anyway."""

from __future__ import annotations

from datetime import datetime

from . import faults, names, soap
from .metadata import probe_matches
from .server import ScanServer
from .transport import RequestInfo
from .xmlread import parse_document


def answer_datagram(server: ScanServer, data: bytes, now: datetime) -> bytes | None:
    """The ProbeMatches datagram for a Probe that matches this device, else None."""
    try:
        envelope = soap.read_envelope(parse_document(data, server.config.limits))
    except faults.SoapFault:
        return None
    if envelope.addressing.action != names.Action.PROBE:
        return None
    try:
        if not probe_matches(envelope.payload, server.config):
            return None  # no match: WS-Discovery sends no answer
    except faults.SoapFault:
        return None  # a MatchBy we do not implement: no match, and no fault over UDP
    outcome = server.handle(
        data, RequestInfo(now=now, content_type="application/soap+xml", datagram=True)
    )
    return outcome.reply.body if outcome.reply.status == 200 else None
