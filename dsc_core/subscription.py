"""A WS-Eventing subscription's record (R7): what the core keeps of it, and what a store shared
by several instances keeps of it (issue 18: ``StoreSubscription``), so that any instance manages
it and delivers to it.  The rules are in ``eventing.py``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from . import names


@dataclass(frozen=True, slots=True)
class EndpointReference:
    address: str
    #: Reference parameters, serialized, copied as SOAP headers into messages sent to it.
    parameters: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Subscription:
    identifier: str
    notify_to: EndpointReference
    end_to: EndpointReference | None
    actions: frozenset[str]
    expires: datetime
    wsa_ns: str = names.WSA
    failures: int = 0
    #: R13 (R10 on eventing): a non-administrator's subscription gets only the events of jobs
    #: whose owner is this identity; None (an administrator, or no client certificates): all.
    owner: str | None = None

    def active(self, now: datetime) -> bool:
        """Not expired at ``now`` (R7).  The one test of the expiry: an expired subscription
        may still be held until the leader's tick ends it (issue 18 point 4), and gets no
        event, answers no request and counts against no quota meanwhile."""
        return self.expires > now
