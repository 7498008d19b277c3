"""What a transport (an HTTP binding, the UDP listener, a test) hands the core with a request,
and what it gets back: :class:`RequestInfo` in, :class:`Reply` and :class:`Outcome` out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .commands import Command
from .directory import DirectoryAnswers
from .errors import UsageError
from .fast_init import fast_init


@fast_init
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
    #: The client's network address (host, no port), None when unknown.  Without client
    #: certificates it stands for the user in per-user limits (R13 quotas).
    client_address: str | None = None
    #: The directory's answers to the request's lookups (R14), set by ``Exchange.end``; None
    #: without a directory (the configured tables apply).
    directory: DirectoryAnswers | None = None
    #: A UDP datagram (a WS-Discovery Probe, R11), not an HTTP request: DPWS R0031 (reply
    #: endpoint anonymous) does not apply.
    datagram: bool = False

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise UsageError("RequestInfo.now must be timezone-aware (R6: explicit UTC offset)")


@fast_init
@dataclass(frozen=True, slots=True)
class Reply:
    """The HTTP answer: status, content type and body."""

    status: int
    content_type: str
    body: bytes


@fast_init
@dataclass(frozen=True, slots=True)
class Outcome:
    """A reply plus the commands to carry out, in order, before sending it."""

    reply: Reply
    commands: tuple[Command, ...] = ()
    #: For a fault reply, one readable line (code/subcode: reason) for the binding's log: R12
    #: wants every limit exceeded to be logged, and the core itself never logs.
    fault: str | None = None
    #: For a fault reply, the local name of its subcode (``"-"`` for a fault without one, R4
    #: step 1), from the core's fixed set: what a binding counts faults by (a metric label).
    fault_subcode: str | None = None
