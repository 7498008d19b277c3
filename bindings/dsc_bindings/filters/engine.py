"""The processing engine: runs a job's PostScan filters outside the core, in worker threads,
and reports progress as the core's processing inputs (R6)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

from dsc_bindings.filters import fileshare, mail, sharepoint
from dsc_bindings.filters.common import FilterOutcome, FilterRun
from dsc_bindings.filters.interruption import Contained, Interrupted
from dsc_bindings.filters.settings import FilterSettings
from dsc_core.commands import (
    FilterFinished,
    FilterStarted,
    ProcessingEvent,
    ProcessingFinished,
    ProcessingStarted,
)
from dsc_core.model import (
    Document,
    EmailInstructions,
    FileShareInstructions,
    FilterState,
    FilterStateReason,
    Job,
    SharePointInstructions,
)

log = logging.getLogger(__name__)

#: Which filter runs which parsed instructions (the dialect was resolved by the core).
DEFAULT_RUNNERS: Mapping[type, FilterRun] = {
    FileShareInstructions: fileshare.run,
    EmailInstructions: mail.run,
    SharePointInstructions: sharepoint.run,
}

DocumentsOf = Callable[[Job], list[tuple[Document, Path]]]
Report = Callable[[ProcessingEvent], None]
#: Told the token of a job whose run was interrupted (filters/interruption.py), once the job
#: has left the engine: the caller has it resumed (R13) when the store answers again.
Resume = Callable[[str], None]


class ProcessingEngine:
    """Runs at most ``max_jobs`` jobs at once; further jobs wait in order of :meth:`start`.

    Each started job gets exactly one ProcessingFinished, also when it was stopped while still
    queued (then it is the only event), so the core can rely on hearing the end of every job.

    The engine decides nothing about the job: it runs the filters in order and reports.  When to
    stop (a cancel, or R6's first failure without ContinueOnError) is the core's decision, which
    reaches the engine as :meth:`stop` (the core's StopProcessing).  ``report`` must carry out
    the commands the core returns, StopProcessing included, before it returns, so that no
    further filter starts (``ScanService`` does, under its lock).

    One run ends without its ProcessingFinished: an interrupted one (the store did not answer,
    filters/interruption.py).  Nothing is wrong with the job, so nothing more of the run is
    reported (no filter failed, the job does not end); the job stays where the last report
    left it, as after a crash, and ``interrupted`` is told once the job has left the engine,
    so that a resume can start it here again (R13).
    """

    def __init__(
        self,
        settings: FilterSettings,
        documents_of: DocumentsOf,
        report: Report,
        *,
        interrupted: Resume,
        max_jobs: int = 2,
        runners: Mapping[type, FilterRun] | None = None,
        freed: Callable[[], None] | None = None,
    ) -> None:
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self._settings = settings
        self._documents_of = documents_of
        self._report = report
        self._interrupted = interrupted
        #: Told each time a job has left the engine (its place is free, :meth:`free_slots`
        #: counts it): with a shared store the instance then takes the next job waiting
        #: for any engine (runtime/leasing.py).
        self._freed = freed
        self._max_jobs = max_jobs
        self._runners = dict(DEFAULT_RUNNERS if runners is None else runners)
        self._lock = threading.Lock()
        self._queue: deque[Job] = deque()
        self._cancel: dict[str, threading.Event] = {}
        self._workers: set[threading.Thread] = set()
        self._closed = False

    # --- API used by the binding that executes the core's commands ---------------------------

    def start(self, job: Job) -> None:
        """StartProcessing: queue the job; a worker picks it up as soon as one is free."""
        with self._lock:
            if self._closed:
                log.warning("engine closed: job %s not started", job.token)
                return
            if job.token in self._cancel:
                log.warning("job %s is already queued or running", job.token)
                return
            self._cancel[job.token] = threading.Event()
            self._queue.append(job)
            if len(self._workers) < self._max_jobs:
                worker = threading.Thread(target=self._work, name="dsc-filters", daemon=True)
                self._workers.add(worker)
                worker.start()

    @property
    def slots(self) -> int:
        """Its places: ``max_jobs`` (runtime/leasing.py holds at most this many leases)."""
        return self._max_jobs

    def free_slots(self) -> int:
        """How many more jobs would start at once (none queued, fewer running than
        ``max_jobs``): the lease sweep takes at most this many (runtime/leasing.py)."""
        with self._lock:
            return 0 if self._closed else max(0, self._max_jobs - len(self._cancel))

    def set_settings(self, settings: FilterSettings) -> None:
        """A configuration reload: jobs started from now on use ``settings``; running ones keep
        the settings they started with."""
        self._settings = settings

    def stop(self, token: str) -> None:
        """StopProcessing (R6 cancel, best effort): the job's filters stop at the next chunk or
        document; what they already delivered stays delivered."""
        with self._lock:
            event = self._cancel.get(token)
        if event is not None:
            event.set()

    def close(self, timeout: float | None = None) -> None:
        """Cancel every job and wait up to ``timeout`` seconds for the workers to finish."""
        with self._lock:
            self._closed = True
            for event in self._cancel.values():
                event.set()
            workers = list(self._workers)
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        still = [w for w in workers if w.is_alive()]
        if still:
            log.warning("%d filter worker(s) still busy after close()", len(still))

    # --- Workers ------------------------------------------------------------------------------

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                if not self._queue:
                    self._workers.discard(me)  # under the lock: start() spawns a new one if needed
                    return
                job = self._queue.popleft()
                cancelled = self._cancel[job.token]
            interrupted = False
            try:
                # Past the steps' own guards: a bug in the engine's code itself.
                with Contained("job %s: processing failed", job.token):
                    self._run(job, cancelled)
            # By name: the one handler of Interrupted (a BaseException, interruption.py).
            except Interrupted as exc:
                interrupted = True
                log.warning(
                    "job %s: its filters were interrupted (%s): nothing is wrong with the job; "
                    "it resumes once the store answers (R13)",
                    job.token,
                    exc,
                )
            finally:
                with self._lock:
                    self._cancel.pop(job.token, None)
            # The callbacks run once the job is out of the engine, so no run is left for an
            # Interrupted to stop: it is contained as well (passes nothing).
            if interrupted:  # out of the engine now: a resume may start it again at once
                with Contained(
                    "job %s: handing the interrupted job back failed", job.token, passes=()
                ):
                    self._interrupted(job.token)
            if self._freed is not None:
                with Contained(
                    "job %s: telling that its place is free failed", job.token, passes=()
                ):
                    self._freed()

    def _run(self, job: Job, cancelled: threading.Event) -> None:
        """Run the job's filters; Interrupted passes through to :meth:`_work` (class doc)."""
        token = job.token
        if cancelled.is_set():  # stopped while queued: nothing ran
            self._emit(ProcessingFinished(token))
            return
        self._emit(ProcessingStarted(token))
        settings = self._settings  # a reload during the run does not change this job's peers
        documents: list[tuple[Document, Path]] | None = None  # None: the filters fail
        with Contained("job %s: cannot list its documents", token):
            documents = list(self._documents_of(job))
        for index, status in enumerate(job.filters):
            # Filters the core already settled (unknown dialect, bad instructions) are skipped.
            if status.state is not FilterState.PENDING or status.instructions is None:
                continue
            if cancelled.is_set():
                break
            self._emit(FilterStarted(token, index))
            outcome = self._run_filter(job, index, documents, settings, cancelled)
            # R6 "the first failure stops the run" is the core's rule: reported this failure,
            # it ends the job and its StopProcessing, carried out by the binding before the
            # report returns, sets ``cancelled``.
            self._emit(
                FilterFinished(token, index, outcome.state, outcome.reasons, outcome.delivered)
            )
            if cancelled.is_set():
                break
        self._emit(ProcessingFinished(token))

    def _run_filter(
        self,
        job: Job,
        index: int,
        documents: list[tuple[Document, Path]] | None,
        settings: FilterSettings,
        cancelled: threading.Event,
    ) -> FilterOutcome:
        instructions = job.filters[index].instructions
        runner = self._runners.get(type(instructions))
        if runner is None:
            log.error("job %s: no filter runs %s", job.token, type(instructions).__name__)
            return FilterOutcome.errors(FilterStateReason.INVALID_ARGS)
        if documents is None:
            return FilterOutcome.errors(FilterStateReason.UNKNOWN_ERROR)
        # Runners never raise; a third-party one might (any kind): a failed filter.
        outcome = FilterOutcome.errors(FilterStateReason.UNKNOWN_ERROR)
        with Contained("job %s: filter %d raised", job.token, index):
            outcome = runner(job, index, documents, settings, cancelled)
        if not outcome.state.is_final:
            log.error("job %s: filter %d returned %s", job.token, index, outcome.state.value)
            failed = FilterOutcome.errors(FilterStateReason.UNKNOWN_ERROR)
            return FilterOutcome(failed.state, failed.reasons, outcome.delivered)
        return outcome

    def _emit(self, event: ProcessingEvent) -> None:
        # The report goes to the core (through the binding); if that fails, keep going: the
        # remaining events still tell it how the job ended.
        with Contained("reporting %r failed", event):
            self._report(event)
