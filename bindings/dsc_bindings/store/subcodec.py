"""A subscription's record as text, for a store shared by several instances (issue 18 point 3):
JSON, with the endpoint references' reference parameters (serialized XML, copied into every
message sent to them) as text, and the expiry as ISO 8601 with its offset."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from dsc_core.subscription import EndpointReference, Subscription

__all__ = ["decode_subscription", "encode_subscription"]


def _epr(epr: EndpointReference) -> dict[str, object]:
    return {"address": epr.address, "parameters": [p.decode("utf-8") for p in epr.parameters]}


def _read_epr(data: dict[str, Any]) -> EndpointReference:
    return EndpointReference(
        str(data["address"]), tuple(str(p).encode("utf-8") for p in data["parameters"])
    )


def encode_subscription(sub: Subscription) -> str:
    """The record without its failure count (a column of its own, written by the delivery
    owner: RecordDeliveryFailures)."""
    return json.dumps(
        {
            "identifier": sub.identifier,
            "notify_to": _epr(sub.notify_to),
            "end_to": None if sub.end_to is None else _epr(sub.end_to),
            "actions": sorted(sub.actions),
            "expires": sub.expires.isoformat(),
            "wsa_ns": sub.wsa_ns,
            "owner": sub.owner,
        },
        separators=(",", ":"),
    )


def decode_subscription(text: str) -> Subscription:
    """Raises ValueError, KeyError or TypeError for a record this server cannot read."""
    data = json.loads(text)
    end_to = data["end_to"]
    owner = data["owner"]
    return Subscription(
        str(data["identifier"]),
        _read_epr(data["notify_to"]),
        None if end_to is None else _read_epr(end_to),
        frozenset(str(a) for a in data["actions"]),
        datetime.fromisoformat(str(data["expires"])),
        str(data["wsa_ns"]),
        # The count of failed deliveries is a column of its own, merged in by the feed.
        failures=int(data.get("failures", 0)),
        owner=None if owner is None else str(owner),
    )
