"""The job data model (bdsrr §3, R6): enumerations, job records and parsed filter instructions.

Records are frozen: a change of a job is a new record, so a command can carry a snapshot that the
store persists as is, and a failed store command is undone by putting the old record back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime

from .outcomes import JobOutcome, job_outcome


class JobState(str, enum.Enum):
    """dsc:JobStateWKVType (2.2.5.12)."""

    CREATING = "Creating"
    PENDING = "Pending"
    PENDING_HELD = "Pending-Held"
    STARTED = "Started"
    PROCESSING = "Processing"
    TERMINATING = "Terminating"
    COMPLETED = "Completed"
    ABORTED = "Aborted"
    CANCELED = "Canceled"

    @property
    def is_active(self) -> bool:
        return self not in COMPLETED_STATES


COMPLETED_STATES = frozenset({JobState.COMPLETED, JobState.ABORTED, JobState.CANCELED})


class JobStateReason(str, enum.Enum):
    """dsc:JobStateReasonWKVType (2.2.5.11); written with the 2.2.5.11 spelling (R3)."""

    NONE = "None"
    TIMED_OUT = "PostScanJobTimedOut"
    NO_VALID_INSTRUCTIONS = "NoValidPostScanInstructionsFound"
    CREATE_FAILED = "CreatePostScanJobFailed"
    SEND_IMAGE_FAILED = "SendImageFailed"
    CANCELED = "PostScanJobCanceled"
    PROCESSING_FAILED = "PostScanJobProcessingFailed"
    COMPLETED_SUCCESSFULLY = "PostScanJobCompletedSuccessfully"
    COMPLETED_WITH_ERRORS = "PostScanJobCompletedWithErrors"
    COMPLETED_WITH_WARNINGS = "PostScanJobCompletedWithWarnings"

    @classmethod
    def parse(cls, text: str) -> JobStateReason:
        # R3: the schema's misspelling is accepted on input.
        if text == "SendImangeFailed":
            return cls.SEND_IMAGE_FAILED
        return cls(text)


class FilterState(str, enum.Enum):
    """dsc:FilterStateWKVType (2.2.5.6)."""

    PENDING = "Pending"
    PROCESSING = "Processing"
    CANCELED = "Canceled"
    COMPLETED_SUCCESSFULLY = "CompletedSuccessfully"
    COMPLETED_WITH_ERRORS = "CompletedWithErrors"
    COMPLETED_WITH_WARNINGS = "CompletedWithWarnings"

    @property
    def is_final(self) -> bool:
        return self not in (FilterState.PENDING, FilterState.PROCESSING)

    @property
    def is_failure(self) -> bool:
        """R6: the outcomes that stop a job without ContinueOnError (and make one with it
        complete with errors)."""
        return self in (FilterState.COMPLETED_WITH_ERRORS, FilterState.CANCELED)


class FilterStateReason(str, enum.Enum):
    """dsc:FilterStateReasonWKVType (2.2.5.5)."""

    INVALID_ARGS = "InvalidArgs"
    OUT_OF_DISK_SPACE = "OutOfDiskSpace"
    SERVER_OUT_OF_MEMORY = "ServerOutOfMemory"
    UNKNOWN_ERROR = "UnknownError"
    FILE_SHARE_ACCESS_DENIED = "FileShareAccessDenied"
    FILE_SHARE_OUT_OF_DISK_SPACE = "FileShareOutOfDiskSpace"
    SHAREPOINT_ACCESS_DENIED = "SharePointAccessDenied"
    SHAREPOINT_OUT_OF_DISK_SPACE = "SharePointOutOfDiskSpace"
    INVALID_SMTP_SERVER = "InvalidSMTPServer"
    UNABLE_TO_SEND_EMAIL = "UnableToSendEmail"


class RepositoryState(str, enum.Enum):
    """dsc:RepositoryStateWKVType (2.2.5.18)."""

    IDLE = "Idle"
    PROCESSING = "Processing"
    STOPPED = "Stopped"


DOCUMENT_FORMATS = frozenset(
    {
        "dib",
        "exif",
        "jbig",
        "jfif",
        "jpeg2k",
        "pdf-a",
        "png",
        "tiff-single-uncompressed",
        "tiff-single-g4",
        "tiff-single-g3mh",
        "tiff-single-jpeg-tn2",
        "tiff-multi-uncompressed",
        "tiff-multi-g4",
        "tiff-multi-g3mh",
        "tiff-multi-jpeg-tn2",
        "xps",
    }
)

#: File name extension per document format (R9 file names).
FORMAT_EXTENSIONS: dict[str, str] = {
    "dib": "bmp",
    "exif": "jpg",
    "jbig": "jbg",
    "jfif": "jpg",
    "jpeg2k": "jp2",
    "pdf-a": "pdf",
    "png": "png",
    "xps": "xps",
}


def extension_for(fmt: str) -> str:
    if fmt.startswith("tiff-"):
        return "tif"
    return FORMAT_EXTENSIONS.get(fmt, "bin")


# --- Parsed filter instructions (psp:Instructions of each filter; R9) -------------------------


@dataclass(frozen=True, slots=True)
class FileShareInstructions:
    """fsf:FileShareConfig: one or more UNC paths."""

    shares: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EmailInstructions:
    """emlf:EmailConfig."""

    send_to_scan_user: bool
    addresses: tuple[str, ...]
    can_add_addresses: bool = False


@dataclass(frozen=True, slots=True)
class SharePointInstructions:
    """spf:SharePointConfig."""

    save_to_my_site: bool
    site_urls: tuple[str, ...]


Instructions = FileShareInstructions | EmailInstructions | SharePointInstructions


@dataclass(frozen=True, slots=True)
class FilterStatus:
    """One filter of a job: what to run and how it went (dsc:FilterStatus)."""

    dialect: str  # the full URI, as psp:Dialect and dsc:FilterStatus/Dialect carry it
    state: FilterState = FilterState.PENDING
    reasons: tuple[FilterStateReason, ...] = ()
    #: None when the dialect is not offered or the instructions did not parse (state Canceled).
    instructions: Instructions | None = None
    #: What the filter delivered, as the engine reported it (issue 19 point 1, issue 14 §3):
    #: a file's path on the share, a SharePoint document's URL, an e-mail's Message-ID and
    #: recipients.  For administrators only: dsc:FilterStatus has no element for it, so it
    #: never reaches the MS-BDSRR wire.  A retry appends what the re-run delivered.
    delivered: tuple[str, ...] = ()
    #: The engine reported more names than the record keeps (``Limits.max_documents_per_job``
    #: per filter): ``delivered`` is the first of them, the job log has every one.
    delivered_truncated: bool = False


@dataclass(frozen=True, slots=True)
class Document:
    """One received scan document (dsc:DocumentDescription)."""

    document_id: int
    format: str
    size: int = 0


@dataclass(frozen=True, slots=True)
class Job:
    """A PostScan job: status, description, documents and what the engine needs to run it."""

    token: str
    state: JobState
    reasons: tuple[JobStateReason, ...]
    filters: tuple[FilterStatus, ...]
    psp_identifier: str
    psp_display_name: str
    user_name: str
    #: The authenticated identity that created it (R10: another user's job is "not found").
    owner: str
    created: datetime
    #: Last SendImage/creation, for the R6 timeout.
    last_activity: datetime
    documents: tuple[Document, ...] = ()
    completed: datetime | None = None
    continue_on_error: bool = False
    document_root_name: str = "Scan"
    #: Whose quota the job counts against (``Limits.max_creating_jobs_per_user``): the
    #: certificate identity, else the client's address; "" when neither is known.
    origin: str = ""

    @property
    def images_received(self) -> int:
        return len(self.documents)

    @property
    def is_active(self) -> bool:
        return self.state.is_active

    @property
    def outcome(self) -> JobOutcome:
        """How the job turned out, in the one vocabulary every view uses (outcomes.py)."""
        return job_outcome(
            self.state.value, (r.value for r in self.reasons), (f.state.value for f in self.filters)
        )

    @property
    def succeeded(self) -> bool:
        """Completed, successfully or with warnings (R6); errors or an abort are failures."""
        return self.outcome is JobOutcome.SUCCEEDED

    def evolve(self, **changes: object) -> Job:
        return replace(self, **changes)  # type: ignore[arg-type]
