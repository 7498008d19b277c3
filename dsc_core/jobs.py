"""The job table shared by both protocols (R1): active jobs, the history, uploads in flight.

With several instances on one shared store (issue 18) the table is a cache of the job rows: the
binding hands it the rows other instances changed (:meth:`JobTable.absorb`) and the uploads they
have in flight (``uploads_elsewhere``) before each request and tick; the core still decides only
from this table."""

from __future__ import annotations

from collections.abc import Set
from datetime import datetime, timedelta

from .deadlines import DeadlineChanges
from .model import Job, JobState


class JobTable:
    def __init__(self, history_size: int, changes: DeadlineChanges | None = None) -> None:
        self.history_size = history_size
        #: Bumped by each change of what the R6 timeout's deadline reads (:meth:`next_timeout`,
        #: ScanServer.next_deadline): the active jobs' :func:`_idle_since` and the uploads.
        self.changes = changes or DeadlineChanges()
        self._active: dict[str, Job] = {}
        #: Completed jobs, oldest first; read newest first (R6).
        self._history: dict[str, Job] = {}
        #: (token, document_id) of SendImage uploads in progress: reserved ids (R6 duplicates).
        #: Changed only by :meth:`reserve` and :meth:`let_go` (they count); read :attr:`uploads`.
        self._uploads: set[tuple[str, int]] = set()
        #: The same for uploads in flight on other instances of a shared store (issue 18), as
        #: the binding last read them: an R6 duplicate there is a duplicate here, and a job
        #: receiving an image there is not idle here.  Set only by :meth:`absorb_uploads`
        #: (it counts); read :attr:`uploads_elsewhere`.
        self._uploads_elsewhere: frozenset[tuple[str, int]] = frozenset()

    @property
    def uploads(self) -> Set[tuple[str, int]]:
        """The uploads in progress here, read-only: a change that bypassed :meth:`reserve` or
        :meth:`let_go` would move a job's R6 deadline uncounted (dsc_core/deadlines.py), and
        mypy refuses one made through this view."""
        return self._uploads

    @property
    def uploads_elsewhere(self) -> frozenset[tuple[str, int]]:
        """The uploads in flight on other instances (issue 18), read-only like :attr:`uploads`."""
        return self._uploads_elsewhere

    def reserve(self, key: tuple[str, int]) -> None:
        """A SendImage's DocumentId ``key`` is being received: its job is not idle meanwhile
        (no R6 deadline), and a second SendImage of it is a duplicate."""
        self._uploads.add(key)
        self.changes.moved()

    def let_go(self, key: tuple[str, int]) -> None:
        """The upload of ``key`` ended (received, refused, cut off): its job's R6 deadline
        is back.  Often without a command (nothing of it was written), so this count is how
        the binding learns of it."""
        if key in self._uploads:
            self._uploads.remove(key)
            self.changes.moved()

    def absorb_uploads(self, uploads: frozenset[tuple[str, int]]) -> None:
        """The uploads in flight on other instances, as the binding read them (issue 18)."""
        if uploads != self._uploads_elsewhere:
            self._uploads_elsewhere = uploads
            self.changes.moved()

    def uploading(self, key: tuple[str, int]) -> bool:
        """Whether the DocumentId ``key`` = (token, document_id) is being received, on this
        instance or another (R6: a second SendImage of it is a duplicate)."""
        return key in self._uploads or key in self._uploads_elsewhere

    def get(self, token: str) -> Job | None:
        return self._active.get(token) or self._history.get(token)

    def put(self, job: Job) -> list[str]:
        """Store the new record of a job; returns tokens that fell out of the history."""
        self._count(self._active.get(job.token), job)
        if job.is_active:
            self._history.pop(job.token, None)
            self._active[job.token] = job
            return []
        self._active.pop(job.token, None)
        self._history.pop(job.token, None)
        self._history[job.token] = job
        return self.trim()

    def absorb(self, job: Job) -> list[str]:
        """Take a job's record as another instance wrote it (issue 18): like :meth:`put`, but a
        completed job takes its place in the history by the time it ended (R6 history order),
        not at the newest end, since records arrive in the order they were read, not ended.
        Returns the tokens that fell out of the history."""
        if job.is_active:
            return self.put(job)
        self._count(self._active.pop(job.token, None), job)
        self._history.pop(job.token, None)
        ended = _ended(job)
        newest = next(reversed(self._history.values()), None)
        self._history[job.token] = job
        if newest is not None and _ended(newest) > ended:
            self._history = dict(sorted(self._history.items(), key=lambda item: _ended(item[1])))
        return self.trim()

    def trim(self) -> list[str]:
        """Drop the oldest completed jobs beyond ``history_size``; returns their tokens."""
        dropped = []
        while len(self._history) > self.history_size:
            oldest = next(iter(self._history))
            del self._history[oldest]
            dropped.append(oldest)
        return dropped

    def remove(self, token: str) -> None:
        self._count(self._active.pop(token, None), None)
        self._history.pop(token, None)

    def _count(self, old: Job | None, new: Job | None) -> None:
        """An active job's record ``old`` is replaced by ``new`` (None: none, before or after):
        count it only when what the R6 timeout reads of it changed (:func:`_idle_since`).  A
        Processing job's filter progress, its start or its end moves no deadline of this
        table (a job that ends keeping its documents counts in ``JobLifecycle``)."""
        if _idle_since(old) != _idle_since(new):
            self.changes.moved()

    def purgeable(self, before: datetime) -> list[Job]:
        """The completed jobs that ended before ``before``, oldest first: what :meth:`purge`
        removes (and what the web console's dry run lists)."""
        return [j for j in self._history.values() if _ended(j) < before]

    def purge(self, before: datetime) -> list[Job]:
        """Remove the completed jobs that ended before ``before``; returns them."""
        gone = self.purgeable(before)
        for job in gone:
            del self._history[job.token]
        return gone

    def restore_history(self, jobs: list[Job]) -> None:
        """Undo :meth:`purge`: put the jobs back in their place (history order = end order)."""
        merged = sorted([*self._history.values(), *jobs], key=_ended)
        self._history = {j.token: j for j in merged}

    def active(self) -> list[Job]:
        """Active jobs in creation order."""
        return list(self._active.values())

    def history(self) -> list[Job]:
        """Completed jobs, newest first (R6)."""
        return list(reversed(self._history.values()))

    def _idle_creating(self) -> list[Job]:
        """Creating jobs that no image is arriving for: the ones the R6 timeout applies to (an
        image in progress is activity; its end restarts the clock)."""
        receiving = {t for t, _ in self._uploads} | {t for t, _ in self._uploads_elsewhere}
        return [
            j
            for j in self._active.values()
            if j.state is JobState.CREATING and j.token not in receiving
        ]

    def processing_count(self) -> int:
        return sum(
            1 for j in self._active.values() if j.state in (JobState.STARTED, JobState.PROCESSING)
        )

    def timed_out(self, now: datetime, timeout: float) -> list[Job]:
        """Creating jobs idle for ``timeout`` seconds, not counting ones receiving an image."""
        limit = timedelta(seconds=timeout)
        return [j for j in self._idle_creating() if now - j.last_activity >= limit]

    def next_timeout(self, timeout: float) -> datetime | None:
        """The earliest ``now`` at which :meth:`timed_out` returns a job, if nothing changes
        before; None when it would return none however late (exact: no early wake-ups)."""
        limit = timedelta(seconds=timeout)
        return min((j.last_activity + limit for j in self._idle_creating()), default=None)


def _idle_since(job: Job | None) -> datetime | None:
    """What :meth:`JobTable.next_timeout` reads of a job's record (R6): a Creating job's last
    activity; nothing of a job in any other state (every other field leaves the deadline)."""
    return job.last_activity if job is not None and job.state is JobState.CREATING else None


def _ended(job: Job) -> datetime:
    """When a completed job ended: the order of the history (R6)."""
    return job.completed or job.last_activity
