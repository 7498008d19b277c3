"""Pieces shared by the three PostScan filters (R9): the outcome record, name sanitizing, file
names, content types and the "never raise" guard."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dsc_bindings.filters.interruption import Contained
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.filters.sharejournal import DeliveryRefused
from dsc_core.model import Document, FilterState, FilterStateReason, Job, extension_for

log = logging.getLogger(__name__)
#: The job log (.observe writes the rest of it): what each filter delivered, where.
jobs_log = logging.getLogger("dsc.jobs")


class Deliveries:
    """What one filter run delivered, in order: each thing logged at INFO as it is delivered
    (issue 14 §3: the log names the files) and reported with the filter's outcome, so the job
    record keeps it (issue 19: the job detail shows the file names written).  One per run,
    made by :func:`never_raises`, so what a run delivered before it failed is kept too."""

    def __init__(self, job: Job, filter_index: int) -> None:
        self._job = job
        self._filter_index = filter_index
        self._names: dict[str, None] = {}

    def add(self, kind: str, where: str) -> None:
        """``where``: a file's path on the share, a SharePoint document's URL, an e-mail's
        Message-ID and recipients.  A name this run already reported (a file share delivery
        attempted again after a lost SMB connection finds its journaled files) is not
        repeated."""
        if where in self._names:
            return
        self._names[where] = None
        jobs_log.info(
            "job %s filter %d (%s) delivered %s",
            self._job.token,
            self._filter_index,
            kind,
            where,
            extra={
                "event": "job.delivered",
                "job": self._job.token,
                "filter": kind,
                "where": where,
            },
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)


@dataclass(frozen=True, slots=True)
class FilterOutcome:
    """How one filter run ended: what the engine reports in FilterFinished."""

    state: FilterState
    reasons: tuple[FilterStateReason, ...] = ()
    #: What the run delivered (:class:`Deliveries`), whatever the state.
    delivered: tuple[str, ...] = ()

    @classmethod
    def success(cls) -> FilterOutcome:
        return cls(FilterState.COMPLETED_SUCCESSFULLY)

    @classmethod
    def canceled(cls, *reasons: FilterStateReason) -> FilterOutcome:
        return cls(FilterState.CANCELED, tuple(reasons))

    @classmethod
    def errors(cls, *reasons: FilterStateReason) -> FilterOutcome:
        return cls(FilterState.COMPLETED_WITH_ERRORS, _unique(reasons))

    @classmethod
    def warnings(cls, *reasons: FilterStateReason) -> FilterOutcome:
        return cls(FilterState.COMPLETED_WITH_WARNINGS, _unique(reasons))


def _unique(reasons: tuple[FilterStateReason, ...]) -> tuple[FilterStateReason, ...]:
    return tuple(dict.fromkeys(reasons))


class FilterRun(Protocol):
    """The signature every filter implements (a :func:`never_raises` filter function, which
    takes a :class:`Deliveries` too)."""

    def __call__(
        self,
        job: Job,
        filter_index: int,
        documents: list[tuple[Document, Path]],
        settings: FilterSettings,
        cancelled: threading.Event,
    ) -> FilterOutcome: ...


class Cancelled(Exception):
    """Raised inside a filter when the job's cancel event is seen (between documents/chunks)."""


class SourceError(Exception):
    """A stored document could not be read: our fault, not the destination's (UnknownError)."""


def check_cancel(cancelled: threading.Event) -> None:
    if cancelled.is_set():
        raise Cancelled()


class DeliveringRun(Protocol):
    """A filter function before :func:`never_raises`: it records each delivery in ``delivered``."""

    def __call__(
        self,
        job: Job,
        filter_index: int,
        documents: list[tuple[Document, Path]],
        settings: FilterSettings,
        cancelled: threading.Event,
        delivered: Deliveries,
    ) -> FilterOutcome: ...


def never_raises(run: DeliveringRun) -> FilterRun:
    """A filter never raises: anything unexpected is CompletedWithErrors + UnknownError, so one
    bad document or bug cannot take the engine's worker down (R9 failure mapping).  Whatever
    way the run ends, its outcome carries what it delivered until then; a BaseException too
    (SystemExit, GeneratorExit, a KeyboardInterrupt raised by hand: in the engine's worker
    thread none of them can do what its raiser meant; on the main thread a KeyboardInterrupt
    or SystemExit goes on to the program, ``interruption.Contained``).  Except one way:
    :class:`~.interruption.Interrupted` (the store does not answer) is no outcome of the
    filter and goes on to the engine, which resumes the job later (R13)."""

    @functools.wraps(run)
    def guarded(
        job: Job,
        filter_index: int,
        documents: list[tuple[Document, Path]],
        settings: FilterSettings,
        cancelled: threading.Event,
    ) -> FilterOutcome:
        delivered = Deliveries(job, filter_index)
        # Unless the run returns: what it raised other than Interrupted (which goes on to the
        # engine: interruption.py) is logged and failed by the engine's own rule, Contained.
        outcome = FilterOutcome.errors(FilterStateReason.UNKNOWN_ERROR)
        with Contained(
            "filter %s of job %s failed unexpectedly", filter_index, job.token, logger=log
        ):
            try:
                outcome = run(job, filter_index, documents, settings, cancelled, delivered)
            except Cancelled:
                outcome = FilterOutcome.canceled()
            except DeliveryRefused as exc:
                log.warning(
                    "filter %s of job %s delivers nothing more: %s", filter_index, job.token, exc
                )
                outcome = FilterOutcome.canceled()
        return dataclasses.replace(outcome, delivered=delivered.names)

    return guarded


# --- Names (R9: "no path separators, no `..`, no device names") ------------------------------

_DEVICE_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)
# Characters Windows refuses in a name (the share may be served to Windows clients by Samba).
_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
#: Most file systems limit a name to 255 bytes; keep room for "_0001.tif" and similar.
MAX_NAME_BYTES = 200


def sanitize_name(text: str, fallback: str = "Scan", max_bytes: int = MAX_NAME_BYTES) -> str:
    """Make ``text`` safe as one path component on both POSIX and Windows."""
    # C1 controls and other format characters are not printable either.
    name = "".join(
        "_" if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c
        for c in unicodedata.normalize("NFC", text)
    )
    name = _FORBIDDEN.sub("_", name)
    name = re.sub(r"\.{2,}", ".", name)  # no ".." anywhere, not even inside a name
    name = name.lstrip(". ").rstrip(". ")  # no hidden files; Windows drops trailing dots/spaces
    if len(name.encode("utf-8")) > max_bytes:
        name = name.encode("utf-8")[:max_bytes].decode("utf-8", "ignore").rstrip(". ")
    base = name.split(".", 1)[0].rstrip(" ").upper()
    if base in _DEVICE_NAMES:
        name = "_" + name  # "CON" and "con.txt" are devices on Windows whatever the extension
    return name or fallback


def document_file_name(root: str, counter: int, fmt: str) -> str:
    """``<sanitized DocumentRootName>_<counter, 4 digits>.<extension>`` (R9)."""
    return f"{sanitize_name(root)}_{counter:04d}.{extension_for(fmt)}"


# --- Content types (e-mail attachments, SharePoint uploads) ----------------------------------

_CONTENT_TYPES: dict[str, str] = {
    "dib": "image/bmp",
    "exif": "image/jpeg",
    "jfif": "image/jpeg",
    "jbig": "application/octet-stream",  # no registered type for JBIG1
    "jpeg2k": "image/jp2",
    "pdf-a": "application/pdf",
    "png": "image/png",
    "xps": "application/vnd.ms-xpsdocument",
}


def content_type_for(fmt: str) -> str:
    if fmt.startswith("tiff-"):
        return "image/tiff"
    return _CONTENT_TYPES.get(fmt, "application/octet-stream")


def read_full(f: BinaryReader, size: int) -> bytes:
    """Read up to ``size`` bytes, fewer only at end of file (pipes return short reads)."""
    parts: list[bytes] = []
    want = size
    while want > 0:
        try:
            data = f.read(want)
        except OSError as exc:
            raise SourceError(str(exc)) from exc
        if not data:
            break
        parts.append(data)
        want -= len(data)
    return b"".join(parts)


class BinaryReader(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class FilterFailure(Exception):
    """A peer (relay, SharePoint site) refused: the R9 filter state reason to report."""

    def __init__(self, reason: FilterStateReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
