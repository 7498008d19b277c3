"""Directed Probe over UDP (R11): the core answers only Probes; the binding replies by datagram."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lxml import etree

from dsc_bindings.discovery.probe_limit import ProbeLimiter
from dsc_bindings.discovery.udp import UdpDiscovery
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.serve import compose
from dsc_core import RequestInfo, ScanServer, ServerConfig, names
from dsc_core import client as dc
from dsc_core import scopes as scopes_mod
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
    service = compose(ServerConfig(), tmp_path, FilterSettings.embedded_default(tmp_path)).service
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
        service = compose(
            ServerConfig(), tmp_path, FilterSettings.embedded_default(tmp_path)
        ).service
        service.start()
        try:
            answer = service.answer_datagram(probe(), answer_datagram)
            assert answer is not None
            ids.append(_app_sequence(answer)[0])
        finally:
            service.shutdown()
    assert ids[1] > ids[0]


# --- Scopes (issue 16; WS-Discovery 2005/04 section 5.1) ---------------------------------------

SCOPES = ("http://contoso.com/Scanners/Floor2", "urn:uuid:0F5B2A1E-1C4D-4E6F-8A9B-0C1D2E3F4A5B")


def scoped_probe(scopes: str, match_by: str | None = None, types: str = "") -> bytes:
    body = etree.Element(f"{{{names.WSD}}}Probe", nsmap={"wsd": names.WSD, "wsdp": names.WSDP})
    if types:
        etree.SubElement(body, f"{{{names.WSD}}}Types").text = types
    element = etree.SubElement(body, f"{{{names.WSD}}}Scopes")
    element.text = scopes
    if match_by is not None:
        element.set("MatchBy", match_by)
    return dc.envelope(names.Action.PROBE, body, message_id="urn:uuid:1234")


@pytest.mark.parametrize(
    ("match_by", "scopes", "matches"),
    [
        (None, "", True),  # no scope asked: every device
        (None, "http://CONTOSO.com/Scanners", True),  # host ignores case; a segment prefix
        (None, "HTTP://contoso.com/Scanners/Floor2/", True),
        (None, "http://contoso.com/Scanners/%46loor2?x=1#f", True),  # decoded; query ignored
        (None, "http://contoso.com/scanners", False),  # path segments are case-sensitive
        (None, "http://contoso.com/Scan", False),  # segment-wise, not a string prefix
        (None, "http://contoso.com/Scanners/../Scanners", False),  # no ".." (5.1)
        (None, "http://contoso.com/Scanners ldap:///x", False),  # every scope must match
        (scopes_mod.RFC2396, "http://contoso.com/", True),
        (
            "http://docs.oasis-open.org/ws-dd/ns/discovery/2009/01/rfc3986",
            "http://contoso.com",
            True,
        ),
        (scopes_mod.STRCMP0, "http://contoso.com/Scanners/Floor2", True),
        (scopes_mod.STRCMP0, "http://contoso.com/Scanners", False),
        (scopes_mod.UUID, "urn:uuid:0f5b2a1e-1c4d-4e6f-8a9b-0c1d2e3f4a5b", True),
        (scopes_mod.UUID, "urn:uuid:00000000-1c4d-4e6f-8a9b-0c1d2e3f4a5b", False),
    ],
)
def test_probe_scopes_match_by_the_rules(match_by: str | None, scopes: str, matches: bool) -> None:
    srv = ScanServer(ServerConfig(scopes=SCOPES), new_id=lambda: "x")
    answer = answer_datagram(srv, scoped_probe(scopes, match_by, types="wsdp:Device"), NOW)
    assert (answer is not None) is matches
    over_http = srv.handle(
        scoped_probe(scopes, match_by), RequestInfo(now=NOW, content_type="application/soap+xml")
    )
    assert over_http.reply.status == 200
    found = xp(parse(over_http.reply.body), "//wsd:ProbeMatch")
    assert bool(found) is matches
    if matches:  # the scopes are advertised
        assert text(parse(over_http.reply.body), "//wsd:ProbeMatch/wsd:Scopes").split() == list(
            SCOPES
        )


def test_a_device_without_scopes_matches_only_probes_without_scopes() -> None:
    srv = server()
    assert answer_datagram(srv, scoped_probe(""), NOW) is not None
    assert answer_datagram(srv, scoped_probe("http://contoso.com/"), NOW) is None
    reply = answer_datagram(srv, probe(), NOW)
    assert reply is not None and not xp(parse(reply), "//wsd:ProbeMatch/wsd:Scopes")


def test_an_unknown_match_by_is_a_fault_over_http_and_silence_over_udp() -> None:
    srv = ScanServer(ServerConfig(scopes=SCOPES), new_id=lambda: "x")
    ldap = names.WSD + "/ldap"
    assert answer_datagram(srv, scoped_probe("ldap:///ou=x", ldap), NOW) is None
    outcome = srv.handle(
        scoped_probe("ldap:///ou=x", ldap),
        RequestInfo(now=NOW, content_type="application/soap+xml"),
    )
    assert outcome.reply.status == 400
    reply = parse(outcome.reply.body)
    assert text(reply, "//soap:Code/soap:Subcode/soap:Value").endswith(":MatchingRuleNotSupported")
    assert text(reply, "//soap:Detail/wsd:SupportedMatchingRules").split() == list(
        scopes_mod.SUPPORTED_RULES
    )


def test_scopes_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="scopes"):
        ServerConfig(scopes=("has space",))
    with pytest.raises(ValueError, match="scopes"):
        ServerConfig(scopes=["http://a/"])  # type: ignore[arg-type]


def test_probe_replies_are_rate_limited_per_source_address(tmp_path: Path) -> None:
    """Issue 14 §4 (bounded state), over real UDP: a sender beyond its burst gets no more
    replies, the excess is counted in /metrics, and another address is answered as usual."""
    composition = compose(ServerConfig(), tmp_path, FilterSettings.embedded_default(tmp_path))
    service = composition.service
    service.start()
    # No refill during the test (one token in 1,000 s): the burst is all a sender gets.
    discovery = UdpDiscovery(
        service,
        "127.0.0.1",
        0,
        ProbeLimiter(rate=0.001, burst=3),
        dropped=composition.observer.metrics.probes_dropped.inc,
    )
    port = discovery.start()
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as scanner,
        ):
            flood.bind(("127.0.0.2", 0))
            scanner.bind(("127.0.0.3", 0))
            for _ in range(10):
                flood.sendto(probe(), ("127.0.0.1", port))
            # Datagrams are answered in order: once the scanner has its answer, every probe
            # of the flood has been handled.
            scanner.settimeout(5)
            scanner.sendto(probe(), ("127.0.0.1", port))
            assert xp(parse(scanner.recvfrom(65535)[0]), "//wsd:ProbeMatch")
            flood.setblocking(False)
            answers = 0
            while True:
                try:
                    flood.recvfrom(65535)
                except BlockingIOError:
                    break
                answers += 1
        assert answers == 3
        metrics = service.observer.metrics.render().decode()
        assert "dsc_discovery_probes_dropped_total 7.0" in metrics, metrics
    finally:
        discovery.close()
        service.shutdown()


def test_the_probe_limiter_tracks_a_bounded_number_of_addresses() -> None:
    now = [0.0]
    limiter = ProbeLimiter(rate=1.0, burst=2, max_tracked=2, clock=lambda: now[0])
    assert limiter.allow("a") and limiter.allow("a") and not limiter.allow("a")
    assert limiter.allow("b")
    # The table is full: new addresses share one bucket (burst 2), however many there are.
    assert limiter.allow("c") and limiter.allow("d") and not limiter.allow("e")
    assert limiter.tracked == 2
    now[0] = 1.0  # "a" has one token again, and so has the shared bucket
    assert limiter.allow("a") and not limiter.allow("a")
    now[0] = 10.0  # full again: forgotten as soon as room is needed
    assert limiter.allow("f") and limiter.tracked == 1
