"""dsc_core: the sans-IO protocol core of the scan server (WS-DSP and MS-BDSRR).

Feed it request bytes, get reply bytes and ordered commands.  No sockets, files, clocks or threads.
"""

from .commands import (
    AbortDocument,
    AnnounceRepositoryState,
    AppendDocument,
    BeginDocument,
    Command,
    CreateJob,
    Deliver,
    DiscardDocuments,
    DropJob,
    EndSubscription,
    FilterFinished,
    FilterStarted,
    FinishDocument,
    JobInput,
    ProcessingEvent,
    ProcessingFinished,
    ProcessingStarted,
    RecordDeliveryFailures,
    Removal,
    StartProcessing,
    StopProcessing,
    StoreSubscription,
    UpdateJob,
)
from .config import Limits, ServerConfig
from .deadlines import DeadlineChanges
from .directory import DirectoryAnswers, Lookups
from .errors import UsageError
from .exchange import Exchange
from .model import (
    Document,
    FilterState,
    FilterStateReason,
    FilterStatus,
    Job,
    JobState,
    JobStateReason,
    RepositoryState,
)
from .server import ScanServer
from .transport import Outcome, Reply, RequestInfo

__all__ = [
    "AbortDocument",
    "AnnounceRepositoryState",
    "AppendDocument",
    "BeginDocument",
    "Command",
    "CreateJob",
    "DeadlineChanges",
    "Deliver",
    "DirectoryAnswers",
    "DiscardDocuments",
    "Document",
    "DropJob",
    "EndSubscription",
    "Exchange",
    "FilterFinished",
    "FilterStarted",
    "FilterState",
    "FilterStateReason",
    "FilterStatus",
    "FinishDocument",
    "Job",
    "JobInput",
    "JobState",
    "JobStateReason",
    "Limits",
    "Lookups",
    "Outcome",
    "ProcessingEvent",
    "ProcessingFinished",
    "ProcessingStarted",
    "RecordDeliveryFailures",
    "Removal",
    "Reply",
    "RepositoryState",
    "RequestInfo",
    "ScanServer",
    "ServerConfig",
    "StartProcessing",
    "StopProcessing",
    "StoreSubscription",
    "UpdateJob",
    "UsageError",
]
