"""Notifications are built once per event (issue 7, R7): every subscriber's message shares the
envelope and body bytes and adds only its own header blocks; reference parameters are limited
(Limits.max_reference_parameter_bytes, a WS-Eventing fault)."""

from __future__ import annotations

from core_support import (
    Act,
    check_fault,
    create_job,
    ok,
    parse,
    soap,
    subscribe,
    subscribe_body,
    xp,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import Limits, ServerConfig, names


def test_one_event_body_shared_by_every_subscriber() -> None:
    t = InProcessTransport()
    for i in range(3):
        subscribe(
            t,
            t.server.config.dsc_url,
            notify_to=f"http://sink{i}.example/n",
            notify_params=f'<x:Ref xmlns:x="urn:test:sink">N-{i}</x:Ref>',
        )
    t.deliveries.clear()
    create_job(t)
    status = [d for d in t.deliveries if b"PostScanJobStatusEvent" in d.body]
    assert len(status) == 3
    # The envelope start and the body are the same objects for all (built once) ...
    assert all(d.parts[0] is status[0].parts[0] for d in status)
    assert all(d.parts[2] is status[0].parts[2] for d in status)
    # ... and each message is still its subscriber's own, well-formed, complete.
    ids = set()
    for i, d in enumerate(status):
        root = parse(d.body)
        assert xp(root, "//a:To")[0].text == f"http://sink{i}.example/n"
        assert xp(root, "/s:Envelope/s:Header/*[local-name()='Ref']")[0].text == f"N-{i}"
        ids.add(xp(root, "//a:MessageID")[0].text)
        assert xp(root, "/s:Envelope/s:Body/dsc:PostScanJobStatusEvent/dsc:JobStatus")
    assert len(ids) == 3  # a fresh MessageID per message


def test_addresses_are_escaped_in_the_header() -> None:
    t = InProcessTransport()
    subscribe(t, t.server.config.dsc_url, notify_to="http://sink.example/n?a=1&amp;b=&lt;2")
    t.deliveries.clear()
    create_job(t)
    root = parse(t.deliveries[0].body)
    assert xp(root, "//a:To")[0].text == "http://sink.example/n?a=1&b=<2"


def test_reference_parameters_over_the_limit_are_refused() -> None:
    t = InProcessTransport(ServerConfig(limits=Limits(max_reference_parameter_bytes=200)))
    big = '<x:Ref xmlns:x="urn:test:sink">' + "A" * 300 + "</x:Ref>"
    reply = t.post(
        soap(subscribe_body(notify_params=big), Act.SUBSCRIBE, to=t.server.config.dsc_url)
    )
    check_fault(
        reply,
        status=500,
        code="Receiver",
        subcode=(names.WSE, "EventSourceUnableToProcess"),
    )
    assert not t.server.subscriptions.by_id
    # Within the limit it is accepted.
    ok(t.post(soap(subscribe_body(), Act.SUBSCRIBE, to=t.server.config.dsc_url)))


def test_subscriptions_in_total_are_limited() -> None:
    t = InProcessTransport(ServerConfig(limits=Limits(max_subscriptions=2)))
    for _ in range(2):
        subscribe(t, t.server.config.dsc_url)
    reply = t.post(soap(subscribe_body(), Act.SUBSCRIBE, to=t.server.config.dsc_url))
    check_fault(
        reply,
        status=500,
        code="Receiver",
        subcode=(names.WSE, "EventSourceUnableToProcess"),
    )
