"""What an operation is: its declaration (:class:`Operation`), what it sees (:class:`Request`)
and what it produces (:class:`OpResult`), plus the steps operations share after reading their
arguments: finding the job (R4 step 7) and changing it (step 8, undone on a store failure).

An operation declares

- ``action``: the WS-Addressing Action URI it answers;
- ``service``: the namespace of the hosted service, whose faults it answers with;
- ``read``: its argument reader (R4 step 6), from the request to a value, or an InvalidArgs fault;
- ``handle``: its handler, from the request and those arguments to an :class:`OpResult`;
- ``admin_only``: MS-BDSRR operations need a scan administrator (R4 step 5, R10);
- ``lookups``: what it needs from a user directory before it is answered (R14): the exchange
  asks it in :meth:`~dsc_core.exchange.Exchange.lookups` and the binding brings the answers;
- ``begin_upload``: for an operation whose request carries an MTOM attachment (SendImage), the
  step run as soon as the root part is read, before the attachment arrives.  It checks the
  request and reserves the document, so that the exchange streams the attachment straight to the
  store as :class:`~dsc_core.commands.AppendDocument` chunks (R8); the handler then finds the
  received attachment in ``Request.upload``;
- ``listing``: the operation answers from the job table as a whole (a listing, a count), not
  from one job: a binding whose table is a cache of rows several servers share (issue 18) may
  answer it from that cache without first asking what changed elsewhere, so it may lag those
  changes (docs/architecture.md "Several instances").  Every other operation is answered from
  a table brought up to date first (a job-addressed request reads its own writes wherever
  they were made).

The exchange runs them in R4 order: action (step 4), repository stopped (step 8), administrator
(step 5), ``read``, ``begin_upload``, ``handle``.  ``registry.py`` lists every operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Generic, TypeVar

from . import faults, names, soap
from .commands import Command, JobInput
from .config import ServerConfig
from .directory import Lookups
from .fast_init import fast_init
from .lifecycle import Refused
from .model import Job
from .state import ServerState
from .transport import RequestInfo
from .users import identity
from .xmlread import Element
from .xmlwrite import SPLICE_MARKER, SPLICE_ONLY, splice_payload

ArgsT = TypeVar("ArgsT")


@dataclass(slots=True)
class Upload:
    """An attachment streaming through the exchange into a reserved document (R8)."""

    token: str
    document_id: int
    format: str
    #: The Content-ID the request's xop:Include points to.
    href: str
    begun: bool = False
    complete: bool = False
    size: int = 0

    @property
    def key(self) -> tuple[str, int]:
        """The reservation in ``JobTable.uploads``."""
        return (self.token, self.document_id)


@fast_init
@dataclass(frozen=True, slots=True)
class Request:
    """One request being handled, as its operation sees it."""

    state: ServerState
    envelope: soap.Envelope
    info: RequestInfo
    #: The attachment as received, for an operation with ``begin_upload`` (None: none came).
    upload: Upload | None = None
    #: False when the binding could not read the shared job rows first (Exchange.rows_unread).
    rows_current: bool = True
    #: Jobs whose shared rows the binding cannot read (Exchange.rows_unreadable): a newer
    #: server's, and those no server reads.
    unreadable: frozenset[str] = frozenset()
    corrupt: frozenset[str] = frozenset()

    @property
    def now(self) -> datetime:
        return self.info.now

    @property
    def config(self) -> ServerConfig:
        return self.state.config


@dataclass
class OpResult:
    """What an operation produced: the response payload and the commands to carry out."""

    action: str
    #: The Body's child; None for an empty Body (the 2004/08 UnsubscribeResponse, R13).
    payload: Element | None
    nsmap: dict[str, str] = field(default_factory=dict)
    commands: list[Command] = field(default_factory=list)
    #: Undo the operation's state change if a store command fails (R4 step 9).
    undo: Callable[[], list[Command]] | None = None
    #: Header blocks after the addressing headers (wsd:AppSequence of ProbeMatches, R13).
    headers: tuple[Element, ...] = ()
    #: Serialized elements that replace the payload's ``xmlwrite.splice_point`` (cached job
    #: XML, issue 7); None when the payload has no splice point.
    splice: tuple[bytes, ...] | None = None


@dataclass(frozen=True, slots=True)
class Operation(Generic[ArgsT]):
    """One operation's declaration (see the module docstring)."""

    action: str
    service: str
    read: Callable[[Request], ArgsT]
    handle: Callable[[Request, ArgsT], OpResult]
    admin_only: bool = False
    begin_upload: Callable[[Request, ArgsT], Upload] | None = None
    #: What the request needs from a user directory (R14; see directory.py), or None.
    lookups: Callable[[Request], Lookups] | None = None
    #: Answered from the table as a whole, so it tolerates a lagging cache (module doc).
    listing: bool = False

    @property
    def repository_service(self) -> bool:
        """WS-DSP and MS-BDSRR operations: refused while the repository is Stopped (R4 step 8),
        and answered with their own ServerError faults (step 9)."""
        return self.service in (names.DSP, names.DSC)


def no_arguments(request: Request) -> None:
    """The reader of an operation that reads its request in its handler (or not at all)."""
    return None


def find_job(request: Request, ns: str, token: str, *, own_only: bool) -> Job:
    """R4 step 7.  For WS-DSP (``own_only``) a job of another user is treated as not found."""
    job = request.state.jobs.get(token)
    if job is None and (not request.rows_current or token in request.unreadable):
        # Maybe made on another instance and not read yet (Exchange.rows_unread), or a row
        # this binding cannot read (Exchange.rows_unreadable): unknown here is no proof it
        # does not exist, and JobTokenNotFound is final for a scanner.
        raise faults.store_failed(ns, temporary=True)
    if job is None and token in request.corrupt:
        # A row no server reads: a retry cannot succeed until an operator moves it aside (R4
        # step 9), and a temporary fault would have a scanner ask for it forever.
        raise faults.store_failed(ns, temporary=False)
    if job is None or (own_only and job.owner != identity(request.config, request.info)):
        raise faults.job_not_found(ns, token)
    return job


def change(
    request: Request, ns: str, job: Job, job_input: JobInput, **changes: object
) -> tuple[Job, list[Command], Callable[[], list[Command]]]:
    """Apply an input from a request; a refusal becomes the fault REFUSALS names.  Returns the
    new record, the commands and the undo for R4 step 9."""
    try:
        new, commands = request.state.lifecycle.apply(job, job_input, request.now, **changes)
    except Refused as refused:
        if refused.fault == "ClientErrorJobTokenNotFound":
            raise faults.job_not_found(ns, job.token) from None
        raise faults.operation_failed(ns, str(refused)) from None

    def undo() -> list[Command]:
        return request.state.lifecycle.undo(job, new)

    return new, commands, undo


#: Stands for a reply's MessageID when measuring it (``urn:uuid:`` and a GUID, R4).
_MESSAGE_ID_SIZED = "urn:uuid:00000000-0000-0000-0000-000000000000"
#: Stands for RelatesTo when measuring; the request's own value is counted per request.
_RELATES_TO_SIZED = "urn:dsc:sized:relates-to"
#: (wsa namespace, action, nsmap, payload's shape, with RelatesTo) -> the octets of such a
#: reply besides its splice and RelatesTo's value.  Building and serializing the envelope to
#: measure it was ~9 us of each GetPostScanJobElements (issue 20); a request only changes
#: RelatesTo, whose escaped length is added per request.
_envelope_sizes: dict[tuple[object, ...], int] = {}
_MAX_ENVELOPE_SIZES = 64


def reply_budget(request: Request, action: str, payload: Element, nsmap: dict[str, str]) -> int:
    """How many bytes the splice of a reply may take so that the whole reply stays within
    ``Limits.max_reply_bytes`` (R15): ``payload`` holds the splice point (``SPLICE_ONLY`` for a
    reply whose whole Body child is the splice), the rest of the reply (envelope, addressing
    headers with this request's RelatesTo) is measured."""
    addressing = request.envelope.addressing
    relates = addressing.message_id
    key = (addressing.wsa_ns, action, tuple(nsmap.items()), _shape(payload), relates is not None)
    size = _envelope_sizes.get(key)
    if size is None:
        empty = soap.reply_envelope(
            replace(addressing, message_id=_RELATES_TO_SIZED if relates else None),
            action,
            _MESSAGE_ID_SIZED,
            splice_payload() if payload is SPLICE_ONLY else payload,
            nsmap,
        )
        size = len(empty) - len(SPLICE_MARKER) - (len(_RELATES_TO_SIZED) if relates else 0)
        if len(_envelope_sizes) >= _MAX_ENVELOPE_SIZES:
            _envelope_sizes.clear()
        _envelope_sizes[key] = size
    if relates:
        size += len(soap.text_bytes(relates))
    return request.config.limits.max_reply_bytes - size


def _shape(payload: Element) -> tuple[object, ...]:
    """What of ``payload`` its serialized size depends on (a few elements: the response, its
    container, the splice point; the prefixes in scope come from the envelope's nsmap, part
    of the key)."""
    if payload is SPLICE_ONLY:
        return ()
    return tuple(
        (el.tag, tuple(el.nsmap.items()), el.text, tuple(el.attrib.items()), el.tail)
        for el in payload.iter()
    )
