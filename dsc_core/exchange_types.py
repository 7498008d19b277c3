"""The values that cross the core's boundary for one HTTP request."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .commands import Command


class UsageError(Exception):
    """The caller misused the core's API (a bug in the binding, never caused by request bytes)."""


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the transport knows about a request before its body arrives."""

    now: datetime
    #: The HTTP Content-Type header, or None when absent.
    content_type: str | None = None
    #: The authenticated identity (TLS client certificate subject), R10.  None without one.
    identity: str | None = None
    #: The request path; informational only (R1: not used to reject a request).
    path: str = "/"

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise UsageError("RequestInfo.now must be timezone-aware (R6: explicit UTC offset)")


@dataclass(frozen=True, slots=True)
class Reply:
    """The HTTP answer: status, content type and body."""

    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """A reply plus the commands to carry out, in order, before sending it."""

    reply: Reply
    commands: tuple[Command, ...] = ()
    #: For a fault reply, one readable line (code/subcode: reason) for the binding's log: R12
    #: wants every limit exceeded to be logged, and the core itself never logs.
    fault: str | None = None
