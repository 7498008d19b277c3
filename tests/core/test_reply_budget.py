"""R15's reply budget (``operation.reply_budget``) is measured once per envelope shape and then
only adjusted for the request's RelatesTo (issue 20 point 3): it must stay exactly what a
freshly built and serialized envelope gives, whatever the RelatesTo holds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from lxml import etree

from dsc_core import RequestInfo, ScanServer, names, soap
from dsc_core.operation import Request, reply_budget
from dsc_core.xmlwrite import SPLICE_MARKER, SPLICE_ONLY, splice_payload, splice_point

RELATES = [
    None,
    "urn:uuid:6c8f2a52-1f0e-4b43-9a53-0c8a1a3e5d10",
    "a & b < c > d\r",  # escaped by the serializer
    "urn:\u00e9t\u00e9:\u4e2d",  # several octets per character
]


def _measured(
    addressing: soap.Addressing, action: str, payload: etree._Element, nsmap: dict[str, str]
) -> int:
    """The budget as the reply's own bytes give it: the limit less everything but the splice."""
    empty = soap.reply_envelope(
        addressing, action, "urn:uuid:00000000-0000-0000-0000-000000000000", payload, nsmap
    )
    return 32_767 - (len(empty) - len(SPLICE_MARKER))


def _listing_payload() -> etree._Element:
    response = etree.Element(f"{{{names.DSC}}}GetActiveJobsResponse")
    splice_point(etree.SubElement(response, f"{{{names.DSC}}}ActiveJobs"))
    return response


@pytest.mark.parametrize("wsa_ns", [names.WSA, names.WSA10])
@pytest.mark.parametrize("relates", RELATES)
def test_the_budget_is_what_the_envelope_measures(wsa_ns: str, relates: str | None) -> None:
    server = ScanServer(new_id=lambda: "id")
    assert server.config.limits.max_reply_bytes == 32_767
    root = etree.Element(f"{{{names.SOAP}}}Envelope")
    addressing = soap.Addressing(wsa_ns=wsa_ns, message_id=relates)
    request = Request(
        server,
        soap.Envelope(root, etree.SubElement(root, f"{{{names.SOAP}}}Body"), addressing),
        RequestInfo(datetime(2026, 1, 1, tzinfo=UTC)),
    )
    for _ in range(2):  # measured, then from the cache
        action = names.Action.DSP_GET_JOB_ELEMENTS + "Response"
        assert reply_budget(request, action, SPLICE_ONLY, {}) == _measured(
            addressing, action, splice_payload(), {}
        )
        nsmap = {"dsc": names.DSC}
        action = names.Action.DSC_GET_ACTIVE_JOBS + "Response"
        assert reply_budget(request, action, _listing_payload(), nsmap) == _measured(
            addressing, action, _listing_payload(), nsmap
        )
