"""The job lifecycle of R6, in one file (as h11 keeps every state rule in ``_state.py``).

Rule: everything that moves a job from one state to another, and everything such a move causes,
lives here.  The table ``TRANSITIONS`` says which input moves which state where; the code below
it says what else a move does, because that does not fit in a table:

- Entering a final state sets the completion time, and the job's unfinished filters end
  Canceled (R6).
- Entering Pending hands the job to the processing engine (StartProcessing).  Leaving Started or
  Processing for Aborted or Canceled stops it (StopProcessing).  A job that ends canceled,
  timed out, or with every filter successful has its documents discarded (DiscardDocuments);
  one with a failed filter keeps them for ``spool_retention_seconds`` (``keeps_documents``).
- Every change is persisted (CreateJob/UpdateJob, the latter with the input that caused it and
  the filters it ended, so that a binding never compares records to learn what happened), may
  push the oldest completed jobs out of the history (DropJob), and is announced to subscribers
  (``events.Notifier``).
- The engine's reports are turned into inputs here: the first failed filter of a job without
  ContinueOnError ends the job Aborted at once (its StopProcessing tells the engine to run no
  further filter); when the engine is done, the filters decide how the job completed.
- The clock times out Creating jobs idle for ``job_timeout_seconds``, except one whose image is
  still arriving; ``next_timeout`` is exactly the time the next one would be timed out.
- A restart hands jobs that were running back to the engine (Pending again, the completed
  filters kept, R13), and Pending ones too.

Invariants of the table (checked by tests/test_lifecycle.py over every pair):
- A job is created in Creating (reason None), or directly Aborted with
  NoValidPostScanInstructionsFound when no filter is usable; that is not a transition.
- Only Creating accepts images and EndPostScanJob.  Only active states accept a cancel.
- Completed, Aborted and Canceled are final: no input leaves them, except an administrator's
  retry (vendor RetryPostScanJob) of a Completed or Aborted job whose documents are still kept
  (a filter failed, ``keeps_documents``): back to Pending, where its failed filters run again.
- Pending-Held and Terminating are never entered by this server (the spec reaches Pending-Held
  only "by means outside this protocol", and Windows never returns Terminating, note <9>); they are
  in the table so that a job restored in them can still be canceled.
- A pair that is not in the table is refused: a request input gets the fault named in
  ``REFUSALS`` (R4 step 7 or 8); an input from the processing engine is stale and ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Final

from .commands import (
    Command,
    CreateJob,
    DiscardDocuments,
    DropJob,
    FilterFinished,
    FilterStarted,
    JobInput,
    ProcessingEvent,
    ProcessingFinished,
    ProcessingStarted,
    Removal,
    StartProcessing,
    StopProcessing,
    UpdateJob,
)
from .errors import UsageError
from .events import Notifier
from .jobs import JobTable
from .model import (
    FilterState,
    FilterStateReason,
    FilterStatus,
    Job,
    JobState,
    JobStateReason,
    RepositoryState,
)

S = JobState
R = JobStateReason


I = JobInput

#: None as the reason means "keep the current reasons".
TRANSITIONS: Final[dict[tuple[JobState, JobInput], tuple[JobState, JobStateReason | None]]] = {
    (S.CREATING, I.IMAGE): (S.CREATING, None),
    (S.CREATING, I.END): (S.PENDING, R.NONE),
    (S.CREATING, I.TIMEOUT): (S.ABORTED, R.TIMED_OUT),
    (S.PENDING, I.ENGINE_STARTED): (S.STARTED, R.NONE),
    (S.STARTED, I.FILTER_STARTED): (S.PROCESSING, R.NONE),
    (S.PROCESSING, I.FILTER_STARTED): (S.PROCESSING, None),
    (S.PROCESSING, I.FILTER_FINISHED): (S.PROCESSING, None),
    (S.STARTED, I.COMPLETE_SUCCESSFULLY): (S.COMPLETED, R.COMPLETED_SUCCESSFULLY),
    (S.STARTED, I.COMPLETE_WITH_WARNINGS): (S.COMPLETED, R.COMPLETED_WITH_WARNINGS),
    (S.STARTED, I.COMPLETE_WITH_ERRORS): (S.COMPLETED, R.COMPLETED_WITH_ERRORS),
    (S.STARTED, I.FAIL): (S.ABORTED, R.PROCESSING_FAILED),
    (S.PROCESSING, I.COMPLETE_SUCCESSFULLY): (S.COMPLETED, R.COMPLETED_SUCCESSFULLY),
    (S.PROCESSING, I.COMPLETE_WITH_WARNINGS): (S.COMPLETED, R.COMPLETED_WITH_WARNINGS),
    (S.PROCESSING, I.COMPLETE_WITH_ERRORS): (S.COMPLETED, R.COMPLETED_WITH_ERRORS),
    (S.PROCESSING, I.FAIL): (S.ABORTED, R.PROCESSING_FAILED),
    # R13: a job the server was running when it died goes back to the engine; the filters that
    # completed keep their state, so only the interrupted one and those after it run.
    (S.STARTED, I.RESUMED): (S.PENDING, R.NONE),
    (S.PROCESSING, I.RESUMED): (S.PENDING, R.NONE),
    # R6: cancel from either protocol on any active job, at once, with the single reason.
    (S.CREATING, I.CANCEL): (S.CANCELED, R.CANCELED),
    (S.PENDING, I.CANCEL): (S.CANCELED, R.CANCELED),
    (S.PENDING_HELD, I.CANCEL): (S.CANCELED, R.CANCELED),
    (S.STARTED, I.CANCEL): (S.CANCELED, R.CANCELED),
    (S.PROCESSING, I.CANCEL): (S.CANCELED, R.CANCELED),
    (S.TERMINATING, I.CANCEL): (S.CANCELED, R.CANCELED),
    # An administrator's retry of a job that kept its documents (vendor RetryPostScanJob).
    (S.COMPLETED, I.RETRY): (S.PENDING, R.NONE),
    (S.ABORTED, I.RETRY): (S.PENDING, R.NONE),
}

#: The fault for a request input in a state that does not accept it (R4 steps 7 and 8).
#: A completed job is no longer "currently processing": cancel answers JobTokenNotFound (R6).
REFUSALS: Final[dict[JobInput, str]] = {
    I.IMAGE: "OperationFailed",
    I.END: "OperationFailed",
    I.CANCEL: "ClientErrorJobTokenNotFound",
    I.RETRY: "OperationFailed",
}


#: The states in which a job is the engine's (queued or running): a cancel elsewhere stops it.
_ENGINE_STATES: Final = (JobState.PENDING, JobState.STARTED, JobState.PROCESSING)


class Refused(Exception):
    """The table has no entry for (state, input).  ``fault`` names the R4 fault for a request
    input, or is None for a stale engine/clock input that is to be ignored."""

    def __init__(self, state: JobState, job_input: JobInput) -> None:
        super().__init__(f"{job_input.value} is not accepted in state {state.value}")
        self.state = state
        self.input = job_input
        self.fault = REFUSALS.get(job_input)


def transition(state: JobState, job_input: JobInput) -> tuple[JobState, JobStateReason | None]:
    try:
        return TRANSITIONS[(state, job_input)]
    except KeyError:
        raise Refused(state, job_input) from None


# --- What a transition causes ------------------------------------------------------------------


class JobLifecycle:
    """The job table, moved only through :data:`TRANSITIONS`.  Each method returns the commands
    its changes cause, in the order the binding carries them out."""

    def __init__(self, jobs: JobTable, notifier: Notifier) -> None:
        self.jobs = jobs
        self.notifier = notifier
        #: The server is shutting down: the repository is Stopped (R4 step 8 refuses requests).
        self.stopped = False
        #: Completed jobs whose documents stay in the spool for a re-run (a filter failed),
        #: with the time they ended: discarded ``retention`` seconds later (issue 8, spool).
        #: Changed only by :meth:`_keep` and :meth:`_release` (they count); read :attr:`kept`.
        self._kept: dict[str, datetime] = {}

    @property
    def kept(self) -> Mapping[str, datetime]:
        """The completed jobs whose documents are kept, read-only: each is a deadline
        (:meth:`next_document_expiry`), and a change that bypassed :meth:`_keep` or
        :meth:`_release` would move it uncounted (dsc_core/deadlines.py); mypy refuses one
        made through this view."""
        return self._kept

    @property
    def repository_state(self) -> RepositoryState:
        if self.stopped:
            return RepositoryState.STOPPED
        if self.jobs.processing_count():
            return RepositoryState.PROCESSING
        return RepositoryState.IDLE

    def apply(
        self, job: Job, job_input: JobInput, now: datetime, **changes: object
    ) -> tuple[Job, list[Command]]:
        """Move ``job`` through the transition table, update the table, and return the new
        record with the commands it causes.  Raises :class:`Refused`."""
        new_state, reason = transition(job.state, job_input)
        updates: dict[str, object] = dict(changes)
        updates["state"] = new_state
        if reason is not None:
            updates["reasons"] = (reason,)
        if new_state.is_active and not job.is_active:
            updates["completed"] = None  # a retry: the job is running again
        if not new_state.is_active:
            updates["completed"] = now
            updates["filters"] = _cancel_unfinished(updates.get("filters", job.filters))  # type: ignore[arg-type]
        new = job.evolve(**updates)
        return new, self.record(job, new, now, job_input)

    def record(
        self, old: Job | None, new: Job, now: datetime, cause: JobInput | None = None
    ) -> list[Command]:
        """Put ``new`` in the table (``old`` None: a new job, else ``cause`` moved it); the
        store, engine and event commands this causes."""
        if old is None:
            commands: list[Command] = [CreateJob(new)]
        elif cause is None:
            raise UsageError(f"the change of job {new.token} needs its cause")
        else:
            commands = [UpdateJob(new, cause, _filters_ended(old, new))]
        dropped = self.jobs.put(new)
        if old is not None and old.state is not new.state:
            if new.state is JobState.PENDING:
                commands.append(StartProcessing(new))
            if (
                old.state in (JobState.STARTED, JobState.PROCESSING)
                and not new.is_active
                and new.state is not JobState.COMPLETED
            ):
                commands.append(StopProcessing(new.token))
            if old.is_active and not new.is_active:
                commands += self._documents_after_end(new)
        elif new.is_active:
            self._release(new.token)
        if old is not None and not old.is_active and new.is_active:
            self._release(new.token)  # a retry: its documents are in use again
        commands.extend(DropJob(token, Removal.HISTORY_FULL) for token in dropped)
        commands.extend(self.notifier.job_changed(old, new, now))
        commands.extend(self.notifier.repository_state(self.repository_state, now))
        return commands

    def undo(self, old: Job | None, new: Job) -> list[Command]:
        """Undo a change whose store command failed (R4 step 9): put ``old`` back (or forget
        ``new``).  Its events were never sent, so none are owed."""
        if old is None:
            self.jobs.remove(new.token)
        else:
            self.jobs.put(old)
            if not old.is_active and new.is_active and keeps_documents(old):
                self._keep(old)  # an undone retry
        self.notifier.assume_repository_state(self.repository_state)
        return []

    # --- other instances (issue 18) -------------------------------------------------------

    def absorb(
        self,
        jobs: Iterable[Job],
        dropped: Iterable[str],
        uploads_elsewhere: Iterable[tuple[str, int]],
    ) -> list[Command]:
        """Take what other instances of a shared store changed: their new job records, the
        tokens whose rows they deleted (history trimmed, purged) and the uploads they have in
        flight.  The instance that made a change announced its job events; so this emits no
        events, and it drops no row (the trimming instance did).  Its only commands:
        StopProcessing for a job that was handed to this instance's engine and that another
        instance ended (a cancel), or whose row is gone for this instance (``dropped`` also
        holds the rows the binding can no longer read: a newer server's, during a rolling
        upgrade; the job is forgotten here as if deleted, and its run stops: an instance that
        can read it takes it over).  The repository state the rows make is announced by the
        leader (issue 18 point 4) at its next tick or change (``Notifier.repository_state``
        compares with what subscribers last heard)."""
        commands: list[Command] = []
        for new in jobs:
            old = self.jobs.get(new.token)
            self.jobs.absorb(new)
            if (
                old is not None
                and old.state in _ENGINE_STATES
                and not new.is_active
                and new.state is not JobState.COMPLETED
            ):
                commands.append(StopProcessing(new.token))
            if not new.is_active and keeps_documents(new):
                self._keep(new)
            else:
                self._release(new.token)
        for token in dropped:
            gone = self.jobs.get(token)
            if gone is not None and gone.state in _ENGINE_STATES:
                commands.append(StopProcessing(token))
            self.jobs.remove(token)
            self._release(token)
        self.jobs.absorb_uploads(frozenset(uploads_elsewhere))
        return commands

    # --- the processing engine ------------------------------------------------------------

    def engine_report(
        self, event: ProcessingEvent, now: datetime, max_delivered_names: int
    ) -> list[Command]:
        """An input from the processing engine.  Inputs for unknown or finished jobs are stale
        (the job was canceled meanwhile) and ignored.  A filter's record keeps at most
        ``max_delivered_names`` names of what it delivered (the rest are counted)."""
        job = self.jobs.get(event.token)
        if job is None or not job.is_active:
            return []
        try:
            if isinstance(event, ProcessingStarted):
                return self.apply(job, JobInput.ENGINE_STARTED, now)[1]
            if isinstance(event, FilterStarted):
                filters = _set_filter(job, event.index, FilterState.PROCESSING, ())
                return self.apply(job, JobInput.FILTER_STARTED, now, filters=filters)[1]
            if isinstance(event, FilterFinished):
                return self._filter_finished(job, event, now, max_delivered_names)
            if isinstance(event, ProcessingFinished):
                return self._finish(job, now)
        except (Refused, IndexError):
            return []
        raise UsageError(f"not a processing event: {event!r}")

    def _filter_finished(
        self, job: Job, event: FilterFinished, now: datetime, max_delivered_names: int
    ) -> list[Command]:
        filters = _set_filter(job, event.index, event.state, event.reasons)
        filters = _add_delivered(filters, event.index, event.delivered, max_delivered_names)
        if event.failed and not job.continue_on_error:
            # R6: the first failure stops the run: the filters not yet run are Canceled, the
            # job ends Aborted, and its StopProcessing keeps the engine from running another.
            return self.apply(job, JobInput.FAIL, now, filters=filters)[1]
        if job.state is JobState.STARTED:
            job, commands = self.apply(job, JobInput.FILTER_STARTED, now)
        else:
            commands = []
        job, more = self.apply(job, JobInput.FILTER_FINISHED, now, filters=filters)
        commands += more
        if all(f.state.is_final for f in job.filters):
            commands += self._finish(job, now)
        return commands

    def _finish(self, job: Job, now: datetime) -> list[Command]:
        # Filters the engine never finished count as failed (UnknownError).
        filters = tuple(
            f
            if f.state.is_final
            else _replace_filter(
                f, FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,)
            )
            for f in job.filters
        )
        ran = [f for f, o in zip(filters, job.filters, strict=False) if o.instructions is not None]
        failed = any(f.state.is_failure for f in ran)
        if failed and not job.continue_on_error:
            outcome = JobInput.FAIL
        elif failed or any(f.state is FilterState.CANCELED for f in filters):
            outcome = JobInput.COMPLETE_WITH_ERRORS
        elif any(f.state is FilterState.COMPLETED_WITH_WARNINGS for f in filters):
            outcome = JobInput.COMPLETE_WITH_WARNINGS
        else:
            outcome = JobInput.COMPLETE_SUCCESSFULLY
        return self.apply(job, outcome, now, filters=filters)[1]

    # --- the spool -----------------------------------------------------------------------------

    def _documents_after_end(self, job: Job) -> list[Command]:
        """A job just ended: keep its documents only while they may still be needed.

        A canceled or timed-out job's images are discarded (R6), and so are those of a job
        whose every filter succeeded: nothing will read them again, and the spool must not grow
        with the history.  A job with a failed filter keeps them for the retention period, so
        that the failed filters can be run again.
        """
        if keeps_documents(job):
            self._keep(job)
            return []
        self._release(job.token)
        return [DiscardDocuments(job.token)]

    def expire_documents(self, now: datetime, retention: float) -> list[Command]:
        """Discard the documents of failed jobs that ended ``retention`` seconds ago."""
        limit = timedelta(seconds=retention)
        expired = [t for t, ended in self.kept.items() if now - ended >= limit]
        for token in expired:
            self._release(token)
        # A job that fell out of the history meanwhile had its documents dropped with it.
        return [DiscardDocuments(t) for t in expired if self.jobs.get(t) is not None]

    def retry(self, job: Job, now: datetime) -> tuple[Job, list[Command]]:
        """Run the failed filters of a completed job again (vendor RetryPostScanJob): only while
        its documents are kept (a filter failed and the retention has not expired), else
        :class:`Refused`.  Filters that succeeded keep their state, so the engine skips them;
        failed ones, and those a failure canceled, are Pending again."""
        if job.is_active or not keeps_documents(job) or job.token not in self.kept:
            raise Refused(job.state, JobInput.RETRY)
        filters = tuple(
            _replace_filter(f, FilterState.PENDING, ())
            if f.instructions is not None and f.state.is_failure
            else f
            for f in job.filters
        )
        return self.apply(job, JobInput.RETRY, now, filters=filters)

    def purge(self, before: datetime) -> tuple[list[Job], list[Command], Callable[[], None]]:
        """An administrator trims the history (vendor PurgeJobHistory): completed jobs that
        ended before ``before`` go, with their documents (DropJob), as when they fall out of
        the R6 history.  Returns them, the commands, and the undo (R4 step 9)."""
        gone = self.jobs.purge(before)
        kept = [j for j in gone if j.token in self.kept]
        for job in kept:
            self._release(job.token)

        def undo() -> None:
            self.jobs.restore_history(gone)
            for job in kept:
                self._keep(job)

        return gone, [DropJob(j.token, Removal.PURGED) for j in gone], undo

    def _keep(self, job: Job) -> None:
        """Keep a completed job's documents, from when it ended: a deadline
        (:meth:`next_document_expiry`), counted when it changed (the same record absorbed
        again keeps the same time: no change)."""
        ended = job.completed or job.last_activity
        if self._kept.get(job.token) != ended:
            self._kept[job.token] = ended
            self.jobs.changes.moved()

    def _release(self, token: str) -> None:
        """The documents of ``token`` are no longer kept for a re-run (in use again, or
        discarded): its deadline goes."""
        if self._kept.pop(token, None) is not None:
            self.jobs.changes.moved()

    def next_document_expiry(self, retention: float) -> datetime | None:
        if not self.kept:
            return None
        return min(self.kept.values()) + timedelta(seconds=retention)

    # --- the clock ------------------------------------------------------------------------------

    def time_out(self, now: datetime, timeout: float) -> list[Command]:
        """R6: Creating jobs idle for ``timeout`` seconds end Aborted (PostScanJobTimedOut)."""
        commands: list[Command] = []
        for job in self.jobs.timed_out(now, timeout):
            commands += self.apply(job, JobInput.TIMEOUT, now)[1]
        return commands

    def next_timeout(self, timeout: float) -> datetime | None:
        """When :meth:`time_out` next times out a job: None while every Creating job is
        receiving an image (its deadline starts when the image has arrived)."""
        return self.jobs.next_timeout(timeout)

    # --- start and stop ------------------------------------------------------------------------

    def restart(self, jobs: Iterable[Job], now: datetime, *, resume: bool = True) -> list[Command]:
        """Load the jobs a store kept across a restart.

        R13 (crash during processing): a job that was Started or Processing when the server
        died goes back to Pending and to the engine.  Filters that completed are not run again;
        the one that was running is Pending again and runs again from its start, which the
        filters make idempotent (the file share keeps its file names and replaces a partial
        file, SharePoint PUTs to the same URL, e-mail is sent at least once with the same
        Message-ID).  A Pending job is handed to the engine again; a Creating job keeps its
        images and waits for more (the R6 timeout still applies).

        ``resume`` False (a shared store, issue 18): the jobs are loaded and none is resumed;
        each is resumed by :meth:`resume` once its lease has expired (another instance may be
        running it).
        """
        commands: list[Command] = []
        for job in jobs:
            self.jobs.put(job)
        if resume:
            for job in self.jobs.active():
                commands += self.resume(job.token, now)
        # Completed jobs: the spool rule again, so that a crash between a job's end and the
        # removal of its documents (or a spool from before this rule) leaves no garbage.
        # DiscardDocuments of a job without documents on disk does nothing.
        for job in self.jobs.history():
            commands += self._documents_after_end(job)
        commands += self.notifier.repository_state(self.repository_state, now)
        return commands

    def resume(self, token: str, now: datetime) -> list[Command]:
        """R13 for one job whose engine is gone (a restart, or an expired lease, issue 18): a
        Started or Processing job goes back to Pending, its finished filters stay done and the
        interrupted one is Pending again; a Pending job is handed to the engine again.  Any
        other job (ended meanwhile, or still Creating) is left alone."""
        job = self.jobs.get(token)
        if job is None or not job.is_active:
            return []
        if job.state in (JobState.STARTED, JobState.PROCESSING):
            filters = tuple(
                _replace_filter(f, FilterState.PENDING, ())
                if f.state is FilterState.PROCESSING
                else f
                for f in job.filters
            )
            return self.apply(job, JobInput.RESUMED, now, filters=filters)[1]
        if job.state is JobState.PENDING:
            return [StartProcessing(job)]
        return []

    def stop(self, now: datetime) -> list[Command]:
        """The server is stopping: the repository is Stopped from now on."""
        self.stopped = True
        return self.notifier.repository_state(self.repository_state, now)


def keeps_documents(job: Job) -> bool:
    """Whether a completed job's documents stay in the spool: a filter that had instructions
    failed, so a re-run may still deliver them.  Canceled and timed-out jobs keep nothing."""
    if job.is_active:
        return True
    if job.state is JobState.CANCELED or job.reasons == (JobStateReason.TIMED_OUT,):
        return False
    return any(f.instructions is not None and f.state.is_failure for f in job.filters)


def _replace_filter(
    f: FilterStatus, state: FilterState, reasons: tuple[FilterStateReason, ...]
) -> FilterStatus:
    return replace(f, state=state, reasons=reasons)


def _set_filter(
    job: Job, index: int, state: FilterState, reasons: tuple[FilterStateReason, ...]
) -> tuple[FilterStatus, ...]:
    if not 0 <= index < len(job.filters):
        raise IndexError(index)
    filters = list(job.filters)
    filters[index] = _replace_filter(filters[index], state, reasons)
    return tuple(filters)


def _add_delivered(
    filters: tuple[FilterStatus, ...], index: int, names: tuple[str, ...], keep: int
) -> tuple[FilterStatus, ...]:
    """Filter ``index`` with ``names`` added to what it delivered before (a retry appends; a
    name the re-run delivered again, such as a file share's journaled file, is not repeated),
    at most ``keep`` of them (``delivered_truncated`` when more were reported)."""
    old = filters[index]
    known = set(old.delivered)
    new = tuple(n for n in dict.fromkeys(names) if n not in known)
    room = max(0, keep - len(old.delivered))
    changed = replace(
        old,
        delivered=old.delivered + new[:room],
        delivered_truncated=old.delivered_truncated or len(new) > room,
    )
    return (*filters[:index], changed, *filters[index + 1 :])


def _filters_ended(old: Job, new: Job) -> tuple[int, ...]:
    """The positions of the filters that reached a final state from ``old`` to ``new``."""
    return tuple(
        index
        for index, (before, after) in enumerate(zip(old.filters, new.filters, strict=False))
        if after.state.is_final and not before.state.is_final
    )


def _cancel_unfinished(filters: tuple[FilterStatus, ...]) -> tuple[FilterStatus, ...]:
    """R6: when a job ends, Pending filters become Canceled (running ones are told to stop
    and end Canceled too)."""
    return tuple(
        f if f.state.is_final else _replace_filter(f, FilterState.CANCELED, ()) for f in filters
    )
