"""The exchange's optional early parse (``prepare``) and what a binding may call without being
the core's owner (``owner_free``): the answer is the same as without them, byte for byte but
for the fresh MessageID."""

from __future__ import annotations

import re

import pytest

from core_support import (
    REQUEST_ID,
    SOAP_CONTENT_TYPE,
    Act,
    create_job,
    repository_body,
    send_image_exchange,
    soap,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import RequestInfo, UsageError

_MESSAGE_ID = re.compile(rb"<wsa:MessageID>[^<]*</wsa:MessageID>")


def _answer(t: InProcessTransport, body: bytes, *, prepare: bool) -> tuple[int, bytes]:
    exchange = t.server.open_exchange(RequestInfo(now=t.clock, content_type=SOAP_CONTENT_TYPE))
    assert exchange.owner_free
    assert exchange.feed(body[:10]) == [] and exchange.feed(body[10:]) == []
    if prepare:
        exchange.prepare()
        exchange.prepare()  # idempotent
    outcome = exchange.end()
    return outcome.reply.status, _MESSAGE_ID.sub(b"", outcome.reply.body)


@pytest.mark.parametrize(
    "body",
    [
        soap(repository_body("dsc:RepositoryStatus"), Act.DSC_REPOSITORY),
        b"<not-xml",  # R4 step 1
        soap("<dsc:GetRepositoryElementsRequest/>", Act.DSC_REPOSITORY),  # InvalidArgs
        soap(repository_body("dsc:RepositoryStatus"), None),  # no Action: RelatesTo kept
        b"<!DOCTYPE x []><x/>",
    ],
    ids=["ok", "malformed", "invalid-args", "no-action", "dtd"],
)
def test_prepare_gives_the_same_answer(body: bytes) -> None:
    t = InProcessTransport()
    assert _answer(t, body, prepare=True) == _answer(t, body, prepare=False)


def test_a_fault_found_by_prepare_keeps_relates_to() -> None:
    t = InProcessTransport()
    status, reply = _answer(t, soap(repository_body("dsc:RepositoryStatus"), None), prepare=True)
    assert status == 400 and REQUEST_ID.encode() in reply


def test_feed_after_prepare_and_prepare_after_end_are_misuse() -> None:
    t = InProcessTransport()
    exchange = t.server.open_exchange(RequestInfo(now=t.clock, content_type=SOAP_CONTENT_TYPE))
    exchange.feed(soap(repository_body("dsc:RepositoryStatus"), Act.DSC_REPOSITORY))
    exchange.prepare()
    with pytest.raises(UsageError):
        exchange.feed(b" ")
    exchange.end()
    with pytest.raises(UsageError):
        exchange.prepare()


def test_a_multipart_body_needs_the_owner_and_prepare_leaves_it_alone() -> None:
    t = InProcessTransport()
    exchange, body = send_image_exchange(t, create_job(t), b"image")
    assert not exchange.owner_free
    t._run(exchange.feed(body))
    exchange.prepare()  # the root part was read while feeding: nothing to do
    outcome = exchange.end()
    assert outcome.reply.status == 200, outcome.reply.body


def test_the_shared_parser_serves_several_threads_at_once() -> None:
    """xmlread reuses one lxml parser (its context has a lock): parses from many threads at
    the same moment each get their own, complete tree."""
    import threading

    from dsc_core import Limits
    from dsc_core.xmlread import parse_xml

    bodies = [soap(repository_body(f"dsc:Name{i}"), Act.DSC_REPOSITORY) for i in range(8)]
    errors: list[BaseException] = []

    def parse(body: bytes, name: str) -> None:
        try:
            for _ in range(200):
                root = parse_xml(body, Limits())
                assert root.xpath("string(//*[local-name()='Name'])") == f"dsc:{name}"
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=parse, args=(body, f"Name{i}")) for i, body in enumerate(bodies)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[:1]
