"""Directed Probe over UDP (R11): the core answers only Probes; the binding replies by datagram."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path

from lxml import etree

from dsc_bindings.discovery import UdpDiscovery
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.service import ScanService
from dsc_core import RequestInfo, ScanServer, ServerConfig, names
from dsc_core import client as dc
from dsc_core.discovery import answer_datagram
from helpers import parse, text, xp

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def probe(types: str = "wsdp:Device") -> bytes:
    body = etree.Element(f"{{{names.WSD}}}Probe", nsmap={"wsd": names.WSD, "wsdp": names.WSDP})
    if types:
        etree.SubElement(body, f"{{{names.WSD}}}Types").text = types
    return dc.envelope(names.Action.PROBE, body, message_id="urn:uuid:1234")


def server() -> ScanServer:
    return ScanServer(ServerConfig(base_url="https://scan.example:5362"), new_id=lambda: "x")


def test_probe_datagram_gets_probe_matches() -> None:
    answer = answer_datagram(server(), probe(), NOW)
    assert answer is not None
    reply = parse(answer)
    assert text(reply, "//wsa:Action") == names.Action.PROBE_MATCHES
    assert text(reply, "//wsa:RelatesTo") == "urn:uuid:1234"
    assert text(reply, "//wsd:ProbeMatch/wsd:XAddrs") == "https://scan.example:5362/ScanServer"


def test_other_datagrams_are_not_answered() -> None:
    srv = server()
    assert answer_datagram(srv, b"garbage", NOW) is None
    assert answer_datagram(srv, probe("wsdp:Printer"), NOW) is None  # no match, no answer
    create = dc.envelope(
        names.Action.DSP_CREATE,
        dc.create_post_scan_job(user_identifier="S-1", psp_identifier="P", instructions=[]),
        message_id="urn:uuid:9",
    )
    assert answer_datagram(srv, create, NOW) is None
    assert not srv.jobs.active() and not srv.jobs.history()  # no job via UDP


def test_udp_listener_answers_a_real_datagram(tmp_path: Path) -> None:
    service = ScanService(ServerConfig(), tmp_path, FilterSettings.embedded_default(tmp_path))
    service.start()
    discovery = UdpDiscovery(service, "127.0.0.1", 0)
    port = discovery.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(probe(), ("127.0.0.1", port))
            data, _ = sock.recvfrom(65535)
        assert xp(parse(data), "//wsd:ProbeMatch")
        instance, number = _app_sequence(data)  # R13: over UDP too
        assert instance >= 1 and number == 1
    finally:
        discovery.close()
        service.shutdown()


def _app_sequence(answer: bytes) -> tuple[int, int]:
    sequence = xp(parse(answer), "/soap:Envelope/soap:Header/wsd:AppSequence")
    assert len(sequence) == 1
    return int(sequence[0].get("InstanceId", "")), int(sequence[0].get("MessageNumber", ""))


def test_probe_matches_carry_app_sequence() -> None:
    """R13 (R11): InstanceId grows per start (configured by the binding), MessageNumber per
    discovery message, over UDP and HTTP alike."""
    srv = ScanServer(ServerConfig(discovery_instance_id=7), new_id=lambda: "x")
    first = answer_datagram(srv, probe(), NOW)
    second = answer_datagram(srv, probe(), NOW)
    assert first is not None and second is not None
    assert _app_sequence(first) == (7, 1)
    assert _app_sequence(second) == (7, 2)
    # The same operation over HTTP continues the sequence.
    over_http = srv.handle(probe(), RequestInfo(now=NOW, content_type="application/soap+xml"))
    assert over_http.reply.status == 200
    assert _app_sequence(over_http.reply.body) == (7, 3)


def test_a_second_start_has_a_larger_instance_id(tmp_path: Path) -> None:
    ids = []
    for _ in range(2):
        service = ScanService(ServerConfig(), tmp_path, FilterSettings.embedded_default(tmp_path))
        service.start()
        try:
            answer = service.answer_datagram(probe(), answer_datagram)
            assert answer is not None
            ids.append(_app_sequence(answer)[0])
        finally:
            service.shutdown()
    assert ids[1] > ids[0]
