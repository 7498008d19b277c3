"""What the core asks its binding to do, and what the processing engine tells the core.

Commands come out of the core as an ordered list.  The binding carries them out in order before
it sends the reply of the exchange that produced them (design.md, "The core's contract").  All are
small frozen slotted dataclasses, validated at construction where a wrong value is a caller bug.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .model import FilterState, FilterStateReason, Job, RepositoryState
from .subscription import Subscription

# --- What moves a job -------------------------------------------------------------------------


class JobInput(enum.Enum):
    """Everything that moves an existing job (R6): the inputs of ``lifecycle.TRANSITIONS``, and
    the cause each :class:`UpdateJob` carries, so that a binding reads what happened instead of
    comparing records (issue 15)."""

    # From requests (WS-DSP or MS-BDSRR)
    IMAGE = "SendImage"
    END = "EndPostScanJob"
    CANCEL = "CancelPostScanJob"
    RETRY = "RetryPostScanJob"
    # From the clock (tick)
    TIMEOUT = "Timeout"
    # From the processing engine
    ENGINE_STARTED = "ProcessingStarted"
    FILTER_STARTED = "FilterStarted"
    FILTER_FINISHED = "FilterFinished"
    COMPLETE_SUCCESSFULLY = "CompleteSuccessfully"
    COMPLETE_WITH_WARNINGS = "CompleteWithWarnings"
    COMPLETE_WITH_ERRORS = "CompleteWithErrors"
    FAIL = "Fail"
    # From a restart: processing was interrupted by a crash; the job runs again (R13)
    RESUMED = "Resumed"

    @property
    def from_request(self) -> bool:
        return self in (JobInput.IMAGE, JobInput.END, JobInput.CANCEL, JobInput.RETRY)


class Removal(enum.Enum):
    """Why a completed job left the history (:class:`DropJob`)."""

    #: R6: the history keeps ``history_size`` jobs; the oldest made room (or the size shrank).
    HISTORY_FULL = "HistoryFull"
    #: An administrator's PurgeJobHistory (vendor) removed it.
    PURGED = "PurgeJobHistory"


# --- Job-store commands -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateJob:
    """Persist a new job record.  A job created with no usable filter is already Aborted
    (R6, NoValidPostScanInstructionsFound): then this record also ends it."""

    job: Job


@dataclass(frozen=True, slots=True)
class UpdateJob:
    """Persist the new state of an existing job (status, filters, documents, history).

    ``cause`` says which input moved it (``lifecycle.TRANSITIONS``); a record that is no longer
    active was ended by this input (only RETRY leaves a final state, and it leads to Pending).
    ``filters_ended`` are the positions of the filters that reached a final state with this
    change: the one the engine reported, and those a job's end canceled (R6) or counted as
    failed (the engine never finished them)."""

    job: Job
    cause: JobInput
    filters_ended: tuple[int, ...] = ()

    @property
    def ends_job(self) -> bool:
        return not self.job.is_active


@dataclass(frozen=True, slots=True)
class BeginDocument:
    """Open a new, not yet visible document of a job (a temporary file in the spool)."""

    token: str
    document_id: int
    format: str


@dataclass(frozen=True, slots=True)
class AppendDocument:
    """Append image bytes to the open document.  Chunks arrive as the request body does."""

    token: str
    document_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FinishDocument:
    """Make the document durable (flush, fsync, rename into place).  Only after this succeeds is
    the SendImage acknowledged (R4 step 9)."""

    token: str
    document_id: int
    size: int


@dataclass(frozen=True, slots=True)
class AbortDocument:
    """Forget an open document: the upload failed or was refused.  Leaves no debris."""

    token: str
    document_id: int


@dataclass(frozen=True, slots=True)
class DiscardDocuments:
    """Delete every stored document of a job (R6: a timed-out job's images are discarded)."""

    token: str


@dataclass(frozen=True, slots=True)
class DropJob:
    """Remove a completed job that left the history, with its documents (``cause``)."""

    token: str
    cause: Removal


# --- Processing-engine commands ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartProcessing:
    """The job is Pending: run its filters and report with the inputs below."""

    job: Job


@dataclass(frozen=True, slots=True)
class StopProcessing:
    """The job was canceled or aborted: stop its running filters (best effort, R6)."""

    token: str


# --- Delivery commands ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deliver:
    """POST this one-way SOAP message to ``address`` (R7).  Report the outcome with
    :meth:`ScanServer.delivery_result` so that repeated failures end the subscription."""

    subscription_id: str
    address: str
    #: The message in pieces: the envelope's start, this subscriber's header blocks, and the
    #: rest with the event body.  The first and last are shared by every subscriber of one
    #: event (built once per event, not per subscriber); ``body`` joins them when sent.
    parts: tuple[bytes, ...]
    content_type: str = "application/soap+xml; charset=utf-8"
    #: True for a SubscriptionEnd: the result needs no report.
    final: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


# --- Subscription commands (issue 18) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreSubscription:
    """A subscription was created or renewed (R7).  A store shared by several instances keeps
    it, so that any instance answers Renew/GetStatus/Unsubscribe and delivers to it, and it
    outlives any instance (issue 18); a store of one server has nothing to do."""

    subscription: Subscription


@dataclass(frozen=True, slots=True)
class EndSubscription:
    """A subscription ended (Unsubscribe, repeated delivery failures, the last instance
    stopping): a shared store forgets it and the notifications still waiting for it."""

    identifier: str


@dataclass(frozen=True, slots=True)
class RecordDeliveryFailures:
    """A subscription's count of deliveries failed in a row changed (R7: it ends at
    ``delivery_failures_before_end``).  A shared store keeps the count with the subscription,
    so that the instance delivering to it next counts on from there (issue 18 point 3); one
    server keeps it in memory."""

    identifier: str
    failures: int


SubscriptionCommand = StoreSubscription | EndSubscription | RecordDeliveryFailures


# --- The repository state (issue 18 point 4) --------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnnounceRepositoryState:
    """The repository state subscribers last heard was ``previous``; it is ``state`` now (R7: a
    RepositoryStatusSummaryEvent per change), sent as ``events`` (one Deliver per subscriber,
    none without any).  One server hands the events to its subscribers like any Deliver.  A
    store shared by several instances records the state announced, compare-and-set on
    ``previous`` and on the leader's term, in the transaction of its events, so that one
    leader announces each change once (issue 18 point 4): the events travel inside the
    announcement, so a binding cannot write one without the other."""

    state: RepositoryState
    previous: RepositoryState
    events: tuple[Deliver, ...] = ()


StoreCommand = (
    CreateJob
    | UpdateJob
    | BeginDocument
    | AppendDocument
    | FinishDocument
    | AbortDocument
    | DiscardDocuments
    | DropJob
)
EngineCommand = StartProcessing | StopProcessing
Command = StoreCommand | EngineCommand | Deliver | SubscriptionCommand | AnnounceRepositoryState


# --- Inputs from the processing engine --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessingStarted:
    """The engine took the job: Pending -> Started (R6)."""

    token: str


@dataclass(frozen=True, slots=True)
class FilterStarted:
    """Filter ``index`` (position in the job's filter list) began: the job is Processing."""

    token: str
    index: int


@dataclass(frozen=True, slots=True)
class FilterFinished:
    """Filter ``index`` ended.  ``state`` is CompletedSuccessfully, CompletedWithWarnings,
    CompletedWithErrors or Canceled; failures carry the R9 reasons.  ``delivered`` names what
    this run delivered (file paths, document URLs, Message-IDs), also when it then failed:
    the core keeps them with the filter (:attr:`~dsc_core.model.FilterStatus.delivered`)."""

    token: str
    index: int
    state: FilterState
    reasons: tuple[FilterStateReason, ...] = ()
    delivered: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.state.is_final:
            raise ValueError(f"FilterFinished needs a final state, not {self.state.value}")

    @property
    def failed(self) -> bool:
        return self.state.is_failure


@dataclass(frozen=True, slots=True)
class ProcessingFinished:
    """The engine is done with the job.  Filters it never finished count as failed."""

    token: str


ProcessingEvent = ProcessingStarted | FilterStarted | FilterFinished | ProcessingFinished
