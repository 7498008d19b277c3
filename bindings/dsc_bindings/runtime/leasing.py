"""Filters run once, wherever (issue 18 point 2): the job leases of this instance, with a
PostgreSQL store (store/leases.py has the SQL, docs/architecture.md "Several instances" the
whole story).

- **Claim.** The instance whose core moves a job to Pending claims it when it carries out the
  core's StartProcessing (:meth:`LeaseKeeper.claim`, in the writer thread) if its engine has
  a free place: no needless hop to another instance.  Without one it passes the job on
  (``JobLeases.pass_on``): it leases only what it runs, so a busy instance never hoards a
  queue that idle ones could run, nor leaves one behind when it dies.  A job another instance
  holds is not started here.  At start, the jobs this data folder's earlier run held
  (it is dead: this run holds the folder's lock; not those it had passed on) are taken
  back at once and the first beat resumes them (R13, as on SQLite;
  :meth:`LeaseKeeper.start`).  Jobs nobody holds (passed on, handed back, the claiming instance
  died, or the database did not answer) and jobs whose lease expired are taken by the sweep.
- **Take up** (:meth:`LeaseKeeper.take_up`, in a thread of its own): a job let go rings the
  job feed's doorbell (``<token>:claimable``, store/leases.py); each instance with a free
  engine place then sweeps at once, and so does this one when a job leaves its engine, so a
  queue drains as fast as the cluster's engines run it, oldest job first.  The heartbeat's
  sweep below is the fallback (a lost ring, an expired lease).
- **Fencing.** Every record write of a job this instance holds carries its lease
  (:meth:`LeaseKeeper.fence`); the store writes it only while the lease is still this one.  A
  refused write (:meth:`LeaseKeeper.refused`) means the lease was lost: the job's filters stop
  at once, and the engine's further reports of it are dropped (:meth:`LeaseKeeper.holds`).
- **Heartbeat** (:meth:`LeaseKeeper.beat`, in the cluster's heartbeat thread, never the event
  loop): one statement renews every lease held and tells which jobs ended on another instance
  (a CancelPostScanJob answered there: StopProcessing within a heartbeat; not one whose end
  this instance wrote, :meth:`LeaseKeeper.written`) and which were taken over; an instance
  that cannot renew stops its filters before its leases end.  Then the sweep:
  up to as many jobs as the engine has free places, among those whose lease expired (or that
  nobody claimed), are claimed, ``FOR UPDATE SKIP LOCKED`` so each by one instance only, and
  resumed with R13 (``ScanServer.resume``).  Every instance sweeps: a rescue does not wait for
  a new leader, and idle instances take work.  A sweep passes over the jobs whose records this
  instance cannot decode (a newer server's during a rolling upgrade, store/undecodable.py):
  the instances that can run them take them at once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from dsc_bindings.store.errors import JobChanged, StoreError
from dsc_bindings.store.interface import EventsWrite, VersionedWrite
from dsc_bindings.store.leases import JobLeases, Rescued
from dsc_core import Command, DropJob

__all__ = ["EnginePlaces", "LeaseKeeper"]

log = logging.getLogger("dsc.cluster")

#: The epoch of a fence no lease has: the store refuses such a write without being asked.
NO_LEASE = -1


class EnginePlaces(Protocol):
    """What the keeper asks of this instance's engine (filters/engine.py ``ProcessingEngine``):
    one object, so that its size and its free places cannot disagree."""

    @property
    def slots(self) -> int:
        """The engine's places: at most this many leases held at once (module doc)."""
        ...

    def free_slots(self) -> int:
        """How many more jobs would start at once."""
        ...


class LeaseKeeper:
    """The leases this instance holds (token -> epoch) and what happens to them (module doc).
    Thread-safe: used by the writer, the engine's threads, the heartbeat thread and its own
    take-up thread."""

    def __init__(
        self,
        leases: JobLeases,
        *,
        heartbeat_seconds: float,
        stop: Callable[[str], None],
        resume: Callable[[list[Rescued]], None],
        engine: EnginePlaces,
        name_of: Callable[[str], str],
        undecodable: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self._leases = leases
        #: The jobs whose records this instance cannot decode: never taken up here
        #: (store/leases.py, "Rescue"; store/undecodable.py).
        self._undecodable = undecodable
        self._heartbeat = heartbeat_seconds
        self._stop = stop
        self._resume = resume
        self._engine = engine
        self._name_of = name_of
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        #: Held jobs whose end this instance wrote (token -> lease epoch, :meth:`written`):
        #: a renewal that finds one inactive before the engine let go of it is no cancel
        #: from elsewhere.
        self._ended_here: dict[str, int] = {}
        #: Held from counting the free places to recording the leases taken, so that the
        #: writer's claims and the sweeps never take the same free place twice.
        self._claiming = threading.Lock()
        #: Set by a ring or a finished job: the take-up thread sweeps (:meth:`wake`).
        self._wanted = threading.Event()
        self._closed = threading.Event()
        self._taker: threading.Thread | None = None
        #: When the last successful renewal began (monotonic).
        self._renewed = time.monotonic()
        self._failing = False
        #: Taken back at start (:meth:`start`), resumed by the first beat.
        self._taken: list[Rescued] = []

    @property
    def owner(self) -> str:
        return self._leases.owner

    def held(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)

    def lease_of(self, token: str) -> tuple[str, int] | None:
        """(owner, epoch) of the lease held on ``token``: what its delivery records carry."""
        with self._lock:
            epoch = self._held.get(token)
        return None if epoch is None else (self.owner, epoch)

    def undecodable(self) -> frozenset[str]:
        """The jobs whose records this instance cannot decode (never taken up here)."""
        return frozenset(self._undecodable())

    def holds(self, token: str) -> bool:
        with self._lock:
            return token in self._held

    # --- claim and release (writer, engine threads) ---------------------------------------------

    def start(self) -> None:
        """At start: every job an earlier run from this data folder held is this run's now,
        with a new epoch (it is dead: this run holds the folder's lock); the first beat
        resumes them all (R13), as a SQLite server does at start, instead of leaving them to
        expire and be rescued a few per heartbeat.  The earlier run's ``instances`` row was
        marked down just before, as this run joined the cluster (runtime/cluster.py)."""
        taken = self._leases.take_home()
        with self._lock:
            for job in taken:
                self._held[job.token] = job.epoch
            self._taken = taken
        for job in taken:
            log.info(
                "job %s taken back from this folder's earlier run %s (lease epoch %d)",
                job.token,
                job.previous,
                job.epoch,
            )

    def claim(self, token: str) -> bool:
        """StartProcessing: whether this instance may run ``token`` (it holds the lease now).
        Without a free engine place the job is passed on (module doc)."""
        with self._lock:
            if token in self._held:  # taken by the sweep, which resumed it
                return True
        with self._claiming:
            if self._closed.is_set() or self.free() <= 0:  # stopping, or busy
                self._pass_on(token)
                return False
            try:
                epoch = self._leases.claim(token)
            except StoreError as exc:
                log.error(
                    "job %s: cannot claim it (%s): not started here; an instance takes it "
                    "once the database answers",
                    token,
                    exc.message,
                )
                return False
            if epoch is None:
                log.info("job %s is held by another instance: its filters run there", token)
                return False
            with self._lock:
                self._held[token] = epoch
        log.info("job %s claimed (lease epoch %d)", token, epoch)
        return True

    def free(self) -> int:
        """How many more jobs this instance would run at once: the engine's free places, less
        the leases taken and not yet handed to it."""
        with self._lock:
            held = len(self._held)
        return min(self._engine.free_slots(), self._engine.slots - held)

    def _pass_on(self, token: str) -> None:
        try:
            self._leases.pass_on(token)
        except StoreError as exc:  # its lease for the claim expires by itself
            log.warning(
                "job %s: no free engine place here, and it could not be passed on (%s): "
                "any instance takes it once the lease for its claim ends",
                token,
                exc.message,
            )
            return
        log.info(
            "job %s waits for a free engine place: the first instance with one runs it "
            "(all %d busy here)",
            token,
            self._engine.slots,
        )

    def finished(self, token: str) -> None:
        """The engine finished ``token`` and its last report is written: the lease ends (the
        engine tells when the place is free: :meth:`wake`); or a job taken up needs no engine
        after all (it ended meanwhile): let go."""
        with self._lock:
            epoch = self._let_go(token)
        if epoch is None:
            return
        try:
            self._leases.release(token, epoch)
        except StoreError as exc:  # it expires by itself; the job is not active any more
            log.warning("job %s: its lease could not be released (%s)", token, exc.message)

    def interrupted(self, token: str) -> None:
        """The engine's run of ``token`` was interrupted (the store did not answer,
        filters/interruption.py): the lease is no longer renewed, so it runs out within
        ``lease_seconds`` and the sweep of an instance with a free place (this one too) then
        resumes the job (R13) if the database answers; the resumed run's file share finds what
        this one delivered (store/pgdeliveries.py).  Not released: while the database answers
        and the spool does not, a released job would be taken again at every heartbeat; the
        lease spaces the attempts."""
        with self._lock:
            epoch = self._let_go(token)
        if epoch is not None:
            log.warning(
                "job %s: its lease (epoch %d) is left to run out: an instance resumes the job "
                "once the store answers (R13)",
                token,
                epoch,
            )

    # --- taking up jobs let go (the take-up thread) ----------------------------------------------

    def start_taking_up(self) -> None:
        """Start the thread that sweeps when woken (module doc, "Take up")."""
        if self._taker is None:
            self._taker = threading.Thread(
                target=self._take_up_loop, name="dsc-take-up", daemon=True
            )
            self._taker.start()

    def wake(self) -> None:
        """A job was let go somewhere (a ``claimable`` ring), or a place freed here: sweep
        now, in the take-up thread, if a place is free."""
        self._wanted.set()

    def _take_up_loop(self) -> None:
        while True:
            self._wanted.wait()
            if self._closed.is_set():
                return
            self._wanted.clear()
            try:
                self.take_up()
            except Exception:  # a bug there must not stop the taking up
                log.exception("taking up waiting jobs failed")

    def hand_back(self) -> None:
        """A clean stop: every lease held ends now, unfinished (each release rings: an
        instance with a free place resumes the job at once, else at its next sweep), and what
        the stopping engine reports of them is dropped; nothing more is claimed here."""
        self._closed.set()
        self._wanted.set()  # the take-up thread ends
        with self._claiming, self._lock:
            held = self._let_go_all()
        for token, epoch in held.items():
            try:
                self._leases.release(token, epoch)
            except StoreError as exc:  # it expires by itself
                log.warning("job %s: its lease could not be handed back (%s)", token, exc.message)
                continue
            log.info("job %s handed back: another instance resumes it", token)

    # --- fencing (as the core's owner; the writer) -----------------------------------------------

    def fence(
        self,
        writes: Sequence[Command | VersionedWrite | EventsWrite],
        engine_token: str | None = None,
    ) -> list[Command | VersionedWrite | EventsWrite]:
        """Each record write of a job this instance holds carries its lease; one caused by an
        engine report (``engine_token``) carries it whether held or not: a job no longer
        held is written by nobody here (:data:`NO_LEASE`)."""
        fenced: list[Command | VersionedWrite | EventsWrite] = []
        with self._lock:
            for write in writes:
                if isinstance(write, VersionedWrite) and not isinstance(write.command, DropJob):
                    token = write.command.job.token
                    epoch = self._held.get(token)
                    if epoch is None and token == engine_token:
                        epoch = NO_LEASE
                    if epoch is not None:
                        write = dataclasses.replace(write, lease=(self.owner, epoch))
                fenced.append(write)
        return fenced

    def written(self, write: VersionedWrite) -> None:
        """A record write is in the store: one that ended a job under the lease held here (the
        engine's last report, or a cancel or timeout answered here) is remembered until the
        lease goes, so that the beat does not take the job's end for one made elsewhere."""
        if write.lease is None or isinstance(write.command, DropJob):
            return
        job = write.command.job
        if job.is_active:
            return
        with self._lock:
            if self._held.get(job.token) == write.lease[1]:
                self._ended_here[job.token] = write.lease[1]

    def check(self, write: VersionedWrite) -> None:
        """Refuse, without asking the database, a fenced write of a lease not held."""
        if write.lease is not None and write.lease[1] == NO_LEASE:
            assert not isinstance(write.command, DropJob)
            raise JobChanged(write.command.job.token)

    def refused(self, write: VersionedWrite) -> None:
        """A fenced write was refused: the lease was lost, or the job changed on another
        instance (canceled): its filters stop at once and nothing more of it is written."""
        if write.lease is None or isinstance(write.command, DropJob):
            return
        token = write.command.job.token
        if not self._drop(token, write.lease[1]):
            return  # already dropped
        log.error(
            "job %s: a write of its filters was refused (lease epoch %d lost, or the job "
            "changed on another instance): its filters stop here and write nothing more",
            token,
            write.lease[1],
        )
        self._stop(token)

    # --- the heartbeat ---------------------------------------------------------------------------

    def beat(self, ok: bool) -> None:
        """Renew, learn cancellations and losses, then sweep (module doc).  ``ok``: whether the
        instance's own heartbeat worked (the renewal is tried anyway)."""
        with self._lock:
            taken, self._taken = self._taken, []
        if taken:
            self._resume(taken)
        began = time.monotonic()
        held = self.held()
        try:
            renewal = self._leases.renew(held)
        except StoreError as exc:
            self._cannot_renew(exc.message)
            return
        self._renewed = began
        if self._failing:
            log.info("job leases renewed again")
            self._failing = False
        for token in renewal.ended:
            ended_here = self._ended_here_with(token, held[token])
            if not self._drop(token, held[token]):
                continue
            if ended_here:
                # Its end was written here, and the engine is letting go of it (the renewal
                # came between the write and LeaseKeeper.finished): the lease just ends.
                log.info("job %s ended here: its lease ends with it", token)
            else:
                log.info("job %s ended on another instance (canceled): its filters stop", token)
                self._stop(token)
        for token in renewal.lost:
            if self._drop(token, held[token]):
                log.error(
                    "job %s: the lease was lost (another instance took it over): its filters "
                    "stop here",
                    token,
                )
                self._stop(token)
        self.take_up()

    def take_up(self) -> None:
        """The sweep: up to as many jobs as the engine has free places, among those nobody
        holds or whose lease expired, oldest first, are claimed and resumed (module doc)."""
        if self._closed.is_set():
            return
        with self._claiming:
            try:
                rescued = self._leases.rescue(self.free(), self._undecodable())
            except StoreError as exc:
                log.warning("cannot look for jobs to rescue: %s", exc.message)
                return
            if not rescued:
                return
            with self._lock:
                for job in rescued:
                    self._held[job.token] = job.epoch
        for job in rescued:
            if job.previous is None:
                log.info("job %s taken up (nobody had claimed it)", job.token)
            elif job.free and job.previous == self.owner:
                log.info(
                    "job %s taken up again here (it waited for a free engine place)", job.token
                )
            elif job.free:
                log.info(
                    "job %s taken up from instance %s (it had let it go: no free engine "
                    "place, or a clean stop)",
                    job.token,
                    self._name_of(job.previous),
                )
            else:
                log.warning(
                    "job %s rescued from instance %s (its lease expired)",
                    job.token,
                    self._name_of(job.previous),
                )
        self._resume(rescued)

    def _drop(self, token: str, epoch: int) -> bool:
        with self._lock:
            if self._held.get(token) != epoch:
                return False
            self._let_go(token)
            return True

    def _let_go(self, token: str) -> int | None:
        """Under ``_lock``: ``token`` is no longer held here; the epoch it was held with."""
        self._ended_here.pop(token, None)
        return self._held.pop(token, None)

    def _let_go_all(self) -> dict[str, int]:
        """Under ``_lock``: nothing is held here any more; what was (token -> epoch)."""
        held, self._held = self._held, {}
        self._ended_here.clear()
        return held

    def _ended_here_with(self, token: str, epoch: int) -> bool:
        with self._lock:
            return self._ended_here.get(token) == epoch

    def _cannot_renew(self, why: str) -> None:
        silent = time.monotonic() - self._renewed
        if not self._failing:
            log.error("cannot renew the job leases: %s", why)
            self._failing = True
        # The next beat would come after the leases ended: another instance may take the
        # jobs then, so their filters stop now (lesson 2: no two runs of one job).
        if silent + self._heartbeat >= self._leases.lease_seconds:
            with self._lock:
                tokens = list(self._let_go_all())
            for token in tokens:
                log.error(
                    "job %s: its lease could not be renewed for %.0f s: its filters stop "
                    "before the lease ends",
                    token,
                    silent,
                )
                self._stop(token)
