"""The scan server at run time: the core and what carries out its commands.

Both HTTP bindings talk to a :class:`ScanService` (through the composition root's
:class:`~dsc_bindings.http.site.Site`); they never touch the core.  The rules (issue 7, 15):

- **The core has one owner** (:mod:`.owner`): the serving loop (the async binding's event loop,
  the blocking binding's service thread), else whoever holds its lock for a pure core call.
  The processing engine, the ticker, delivery results, UDP discovery and configuration reloads
  hand their core calls to it (``owner.call`` / ``owner.soon``).  No lock is held across I/O.
- **Commands run off the owner, in the order the core gave them** (:mod:`.writer`): job
  records, fsyncs, SQLite, starting and stopping filters, handing notifications to the delivery
  hub.  A request (:mod:`.request`) waits for its own batch's :class:`~.ticket.Ticket` before
  its reply is sent (R4 step 9 unchanged: an acknowledged image is durable; a failed command
  turns the reply into the core's fault).  A request without store commands (most MS-BDSRR
  reads) is answered at once, whatever the disk is doing.
- **Filters** run in the :class:`~dsc_bindings.filters.ProcessingEngine`'s threads; their
  reports go back to the core's owner.
- **Event delivery** (:mod:`.delivery`): one bounded queue and task per subscription, on the
  hub's own loop; results go back to the core's owner, which counts failures (R7).
- A ticker thread asks the owner to run ``ScanServer.tick`` at ``next_deadline()`` (R6 job
  timeouts, R7 subscription expiry), sleeping until then (:mod:`.alarm`): the core's owner
  nudges it to read the deadline again after each call that may have moved it (:mod:`.owner`).  With a shared store
  it still wakes once a second (other instances' rows are read before a tick); on a PostgreSQL
  store only the cluster's leader (:mod:`.cluster`) runs these sweeps and announces the
  repository state (:mod:`.announcing`).
- **A shared store** (PostgreSQL, issue 18): before an exchange's first core call and before
  each tick, the other instances' changes are read off the owner and handed to the core, and
  record writes are compare-and-set (:mod:`.catchup`).
- What happened is reported to a :class:`~.observing.ServiceObserver`; the status page, the
  health checks and the web endpoints sit above this module (``dsc_bindings.observe``) and are
  wired by ``dsc_bindings.serve``.

Usage (``dsc_bindings.serve.build_service`` adds the observer and the health checks)::

    service = ScanService(ServerConfig(), Path("data"), FilterSettings.embedded_default("data"),
                          observer=observer)
    service.start()
    request = service.open_request("application/soap+xml", None, "/ScanServer")
    step = request.feed(body)     # None, or a Wait (commands are being written)
    step = request.finish()       # a Reply, or a Wait whose chain ends in the Reply
    reply = settle(step)          # blocking callers; the async binding awaits the ticket
    ...
    service.shutdown()

``ScanService.handle(body)`` does all of it in one blocking call (tools and tests).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from dsc_bindings.filters.engine import ProcessingEngine
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.filters.sharejournal import JournalOf
from dsc_bindings.runtime.alarm import Alarm, Wake
from dsc_bindings.runtime.announcing import LeaderTerm, NewTerm
from dsc_bindings.runtime.catchup import Caught, JobCatchUp, RequestReads
from dsc_bindings.runtime.clock import local_now, new_uuid
from dsc_bindings.runtime.delivery import DeliveryHub, DeliveryLimits
from dsc_bindings.runtime.installation import record_start_of
from dsc_bindings.runtime.leasing import LeaseKeeper
from dsc_bindings.runtime.observing import ServiceObserver, StartCheck
from dsc_bindings.runtime.outbox import OutboxPump
from dsc_bindings.runtime.owner import CoreOwner
from dsc_bindings.runtime.peer import Peer
from dsc_bindings.runtime.request import RequestRuntime, ServiceRequest
from dsc_bindings.runtime.ticket import Ticket, settle
from dsc_bindings.runtime.writer import CommandWriter, Routes, Writable
from dsc_bindings.store.backends import StorageSettings, open_job_store
from dsc_bindings.store.errors import CreationRefused, JobChanged, StoreError
from dsc_bindings.store.instances import ClusterSettings
from dsc_bindings.store.interface import (
    Closable,
    EventsWrite,
    JobStore,
    Rang,
    SharedJobRecords,
    VersionedWrite,
)
from dsc_bindings.store.interruption import interrupting
from dsc_bindings.store.leases import JobLeases, Rescued
from dsc_bindings.store.pgdeliveries import PgDeliveryJournal
from dsc_bindings.store.split import SplitStore
from dsc_core import (
    AnnounceRepositoryState,
    Command,
    Deliver,
    Document,
    EndSubscription,
    Job,
    JobState,
    ProcessingEvent,
    ProcessingFinished,
    RecordDeliveryFailures,
    Reply,
    RequestInfo,
    ScanServer,
    ServerConfig,
    StartProcessing,
    StopProcessing,
)

if TYPE_CHECKING:
    from dsc_bindings.directory.ldap import Directory
    from dsc_bindings.runtime.cluster import ClusterMember

__all__ = ["SHUTDOWN_DELIVERY_SECONDS", "ScanService", "settle"]

log = logging.getLogger("dsc.service")

#: At shutdown, SubscriptionEnd (SourceShuttingDown, R7) deliveries get at most this long.
SHUTDOWN_DELIVERY_SECONDS = 2.0
#: With a shared store the ticker wakes at least this often: what is due depends on the rows
#: other instances write, which it reads before each tick (a job created elsewhere times out
#: here, on the leader), and the holder of the cluster's lock takes its term at a wake-up
#: (a second: a new leader sweeps within a second of the lock, docs/architecture.md).
TICK_SHARED_SECONDS = 1.0
#: A nudge is heeded no sooner than this after the ticker's sleep began (.alarm): under load
#: every request nudges, and the ticker reads the deadline (a hop into the core's owner) at
#: most once a second, as often as it did when it woke each second.  A second late is nothing
#: to a deadline that is seconds away at least (R6 job timeouts, R7 expiries).
NUDGE_HEED_SECONDS = 1.0
#: After a failed round (a bug, a store that does not answer) the ticker pauses this long, and
#: nudges do not end the pause: under load each request nudges, and the failure, with its
#: logged traceback, would repeat at each one.  A second keeps that to one line a second
#: while a passing fault still costs the sweeps no more than a second.
TICK_FAILED_PAUSE_SECONDS = 1.0
#: One server wakes at least this often while nothing is due: the service clock is the wall
#: clock (clock.local_now), and a step of it (NTP, a resumed virtual machine) moves every
#: deadline; a minute bounds how late one is then honoured.
TICK_IDLE_SECONDS = 60.0
#: The ticker never wakes more often than this (the core may report a deadline in the past
#: while a job is receiving an image elsewhere: the R6 timeout does not run during an upload,
#: so the deadline stays put until the upload ends).
TICK_MIN_SECONDS = 0.05
#: An engine thread waits at most this long for its report's commands (the job store is stuck).
ENGINE_REPORT_WAIT_SECONDS = 60.0
#: The ticker applies the device book's retention and cap this often (service clock), so that a
#: device past ``[devices] retention_days`` also goes while no job is created (devices.py).
DEVICE_BOUNDS_INTERVAL = timedelta(hours=1)


#: A shared store's outbox is read at least this often, besides its doorbell (issue 18).
OUTBOX_POLL_SECONDS = 2.0
#: One server (no job leases): a job whose filters were interrupted (the store did not answer,
#: filters/interruption.py) is resumed this long after, and again after each interruption.
#: With leases the lease running out spaces the attempts instead (.leasing).
RESUME_INTERRUPTED_SECONDS = 5.0


def _to_outbox(command: Command) -> bool:
    """Whether a shared store sends ``command`` through its outbox (every notification but a
    SubscriptionEnd)."""
    return isinstance(command, Deliver) and not command.final


class ScanService:
    """The scan server at run time: core, store, writer, engine, ticker, deliveries (module)."""

    def __init__(
        self,
        config: ServerConfig,
        data_dir: Path,
        filter_settings: FilterSettings,
        *,
        clock: Callable[[], datetime] = local_now,
        new_id: Callable[[], str] = new_uuid,
        delivery_ssl_context: ssl.SSLContext | None = None,
        max_processing_jobs: int = 2,
        directory: Directory | None = None,
        observer: ServiceObserver,
        health: StartCheck | None = None,
        storage: StorageSettings | None = None,
        cluster: ClusterSettings | None = None,
        instance_suffix: str = "",
    ) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        #: The user directory (R14), or None: the core's tables are used.
        self.directory = directory
        #: A shared store: the file share's delivery records are rows (set at start).
        self._journal_of: JournalOf | None = None
        self.filter_settings = self._with_directory(filter_settings)
        self.clock = clock
        self.server = ScanServer(config, new_id=new_id)
        self._delivery_ssl_context = delivery_ssl_context
        self._max_processing_jobs = max_processing_jobs
        #: The ticker's sleep; the owner nudges it after each call that may have moved the
        #: core's next deadline (.alarm, .owner).
        self._alarm = Alarm()
        #: Every core call runs through it (.owner).
        self.owner = CoreOwner(self.server.deadline_changes, self._alarm.nudge)
        self._store: JobStore | None = None
        #: [store] and [spool]: which engines keep the jobs and images (issue 17).
        self.storage = storage or StorageSettings()
        #: ``[cluster]``: this instance among those on one PostgreSQL store (issue 18).
        self._cluster_settings = cluster or ClusterSettings()
        self._instance_suffix = instance_suffix
        #: This instance's row, heartbeat and leadership; None with the SQLite store.
        self.cluster: ClusterMember | None = None
        self._engine: ProcessingEngine | None = None
        self._writer = CommandWriter(
            Routes(self._store_apply, self._start_processing, self._stop_processing, self._deliver)
        )
        self._hub = DeliveryHub(
            DeliveryLimits.from_limits(config.limits, config.delivery_failures_before_end),
            self._delivery_report,
            self._delivery_give_up,
            ssl_context=delivery_ssl_context,
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: One server: the pending resumes of interrupted jobs (token -> timer).
        self._resumes: dict[str, threading.Timer] = {}
        self._resumes_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._instance_id = config.discovery_instance_id
        #: Job log, metrics, device records (``.observe.Observer``, wired by .serve).
        self.observer = observer
        #: What a scan needs, checked once at start (``.observe.health``), if given.
        self.health = health
        #: Set at start when the store is shared (issue 18): the catch-up with other instances.
        self._catch_up: JobCatchUp | None = None
        self._reads: RequestReads | None = None
        #: The first read of the shared rows (its subscriptions go to the core at start).
        self._seed: Caught | None = None
        #: A shared store: this instance's part of sending the outbox (.outbox).
        self._outbox: OutboxPump | None = None
        #: A shared store with a cluster (issue 18 point 2): the job leases (.leasing).
        self._leases: LeaseKeeper | None = None
        #: A shared store in a cluster: the term under which this instance announces the
        #: repository state, if it leads (issue 18 point 4, .announcing).
        self._term: LeaderTerm | None = None
        self._doorbell: Closable | None = None
        self._requests = RequestRuntime(
            self.owner,
            self.submit,
            self._writer.offload,
            directory,
            clock,
            observer,
            (self._begin_catch_up, self._end_catch_up),
        )

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the store, restore the jobs it kept, start the writer, engine, ticker and
        deliveries."""
        if self._started:
            raise RuntimeError("ScanService.start() called twice")
        self._started = True
        try:
            store: JobStore = open_job_store(self.data_dir, self.storage)
        except StoreError as exc:
            log.error("cannot open the job store in %s: %s", self.data_dir, exc)
            raise
        self._store = store
        log.info("job store at %s", self.data_dir.resolve())
        try:
            # R13 (R11): each start gets a larger wsd:AppSequence InstanceId.
            self._instance_id = record_start_of(self.data_dir, self.storage).starts
        except StoreError:
            store.close()
            raise
        except (OSError, ValueError) as exc:
            store.close()
            raise StoreError(f"cannot record this start: {exc}", temporary=False) from exc
        self.config = self.config.replace(discovery_instance_id=self._instance_id)
        try:
            self.cluster = self._join_cluster()
        except StoreError:
            store.close()
            raise
        try:
            jobs = self._load_jobs(store)
            self.observer.open(jobs, self.clock())
            self._engine = engine = ProcessingEngine(
                self.filter_settings,
                self._documents_of,
                self._engine_report,
                interrupted=self._filters_interrupted,
                max_jobs=self._max_processing_jobs,
                freed=self._engine_freed,
            )
            self._leases = self._lease_keeper(store, engine)
            self._writer.start()
            self._hub.start()
            config = self.config
            # With leases, a job is resumed once its lease has expired, by whichever instance
            # takes it (.leasing): never here at start, another instance may be running it.
            resume = self._leases is None
            commands = self.owner.call(
                lambda: [
                    *self.server.reconfigure(config, self.clock()),
                    *self.server.restore(jobs, self.clock(), resume=resume),
                ]
            )
            self._writer.submit(self._stamped(commands), strict=False).wait()
            self._start_events(store)
            self._change_term()  # the leader announces from its first moment
            if self.cluster is not None:
                self.cluster.publish_leading()
        except BaseException:
            log.exception("starting the scan service failed")
            self._abandon_start(store)
            raise
        active = sum(1 for job in jobs if job.is_active)
        log.info(
            "restored %d job(s): %d active, %d in the history",
            len(jobs),
            active,
            len(jobs) - active,
        )
        self._log_resumed(jobs)
        if self.config.require_client_certificates:
            log.info(
                "client certificates required; scan administrators: %s",
                ", ".join(sorted(self.config.scan_admins)) or "(none)",
            )
        else:
            # R10: development mode must be visible in the log.
            log.warning(
                "client certificates are not required: every client is a scan administrator (R10)"
            )
        for _, root in self.filter_settings.share_roots:
            if root.resolve().is_relative_to(self.data_dir.resolve()):
                # A root inside the data directory (the embedded default) is the server's own
                # to create; one elsewhere is the administrator's (/healthz says if missing).
                root.mkdir(parents=True, exist_ok=True)
        if self.health is not None:
            self.health.check_at_start()
        thread = threading.Thread(target=self._tick_loop, name="dsc-ticker", daemon=True)
        self._threads.append(thread)
        thread.start()
        self._sweep_leases()

    def _log_resumed(self, jobs: list[Job]) -> None:
        """R13 at start; with leases nothing is resumed at start (.leasing logs its rescues)."""
        for job in jobs if self._leases is None else ():
            if job.state in (JobState.STARTED, JobState.PROCESSING):
                log.info(
                    "job %s was processing when the server stopped: resumed, filter(s) %s run "
                    "again (R13)",
                    job.token,
                    _unfinished(job),
                )

    def _sweep_leases(self) -> None:
        """The first sweep now (this folder's earlier run left jobs to resume), then one after
        each heartbeat, in the heartbeat thread (.leasing)."""
        if self._leases is not None and self.cluster is not None:
            keeper = self._leases
            threading.Thread(
                target=keeper.beat, args=(True,), name="dsc-first-sweep", daemon=True
            ).start()
            self.cluster.after_beat = keeper.beat
            keeper.start_taking_up()

    def _abandon_start(self, store: JobStore) -> None:
        """Stop what a failed start had started."""
        if self._outbox is not None:
            self._outbox.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self._engine is not None:
            self._engine.close(1.0)
        self._writer.close()
        self._hub.close(0)
        store.close()

    def _load_jobs(self, store: JobStore) -> list[Job]:
        """The stored jobs.  A shared store (issue 18): also the catch-up with the other
        instances, seeded by a read made before the rows are loaded (JobCatchUp.seed);
        otherwise requests skip the catch-up."""
        if not (isinstance(store, SplitStore) and store.shared):
            self._requests = dataclasses.replace(self._requests, catch_up=None)
            return store.load_jobs()
        records = store.records
        catch_up = self._catch_up = JobCatchUp(
            store.job_changes,
            lambda: getattr(records, "instance", ""),
            undecodable=store.undecodable,
        )
        self._reads = RequestReads(
            catch_up, lambda caught: self.owner.soon(functools.partial(self._absorb, caught))
        )
        # Listening before the seed read: every change after it rings, every one before is in
        # the read (.catchup).
        try:
            self._doorbell = store.listen(self._rang, self._heard)
        except StoreError as exc:
            log.warning("no job doorbell (%s): every request reads the job feed", exc.message)
        caught = self._seed = catch_up.read()
        jobs = store.load_jobs()
        catch_up.seed(caught)
        return jobs

    def _rang(self, rang: Rang | None) -> None:
        """The job feed's doorbell, in its listener's thread: news for the catch-up; a job let
        go wakes this instance's take-up (.leasing), which claims it if a place is free."""
        assert self._catch_up is not None
        self._catch_up.ring(rang)
        keeper = self._leases
        if keeper is not None and rang is not None and rang.claimable:
            keeper.wake()

    def _heard(self, listening: bool) -> None:
        """The listener (re)connected or lost its connection: rings may have been missed, so
        the catch-up reads in full and the take-up sweeps once (.leasing)."""
        assert self._catch_up is not None
        self._catch_up.heard(listening)
        keeper = self._leases
        if keeper is not None and listening:
            keeper.wake()

    def _start_events(self, store: JobStore) -> None:
        """A shared store (issue 18 point 3): the stored subscriptions go to the core (the
        start's read; its jobs are in the table already), and this instance sends the outbox
        rows of the subscriptions it holds the delivery lease of (.outbox)."""
        seed = self._seed
        if seed is not None:
            self.owner.call(lambda: self._absorb(seed))
        if self.cluster is None or not (isinstance(store, SplitStore) and store.shared):
            return
        settings = self._cluster_settings
        self._outbox = OutboxPump(
            store.outbox(),
            self._hub,
            self.cluster.id,
            poll_seconds=min(settings.heartbeat_seconds, OUTBOX_POLL_SECONDS),
            lease_seconds=settings.lease_seconds,
        )
        self._outbox.start()

    def _leader_term(self, store: JobStore | None, cluster: ClusterMember) -> LeaderTerm | None:
        """A shared store in a cluster: the leader's term (.announcing); None otherwise."""
        if not isinstance(store, SplitStore) or not store.shared:
            return None
        records = store.records
        if not isinstance(records, SharedJobRecords):
            return None
        term = LeaderTerm(
            cluster.id, records.take_lead, name=lambda: cluster.name, lock_lost=cluster.lock_lost
        )
        records.announcement_refused = term.refused
        return term

    def _change_term(self) -> None:
        """Take a term when this instance became the leader, or follow when it no longer is
        (.announcing); the core leads from the rows as they are now (read first)."""
        if self._term is None:
            return
        self._change_term_as(leader=self.holds_leader_lock)

    def _change_term_as(self, *, leader: bool) -> None:
        assert self._term is not None
        change = self._term.change(leader)
        if change is not None:
            caught = self._read_for_tick()
            self.owner.call(functools.partial(self._lead_or_follow, caught, change))

    def _lead_or_follow(self, caught: Caught | None, change: NewTerm | str | None) -> None:
        """As the owner: the other instances' changes, then ``lead`` or ``follow``."""
        if caught is not None:
            self._absorb(caught)
        if change is None or self._term is None:
            return
        self._term.apply(change)
        if isinstance(change, NewTerm):
            self._background(self.server.lead(change.announced, self.clock()))
        else:
            self.server.follow()

    def _lease_keeper(self, store: JobStore, engine: ProcessingEngine) -> LeaseKeeper | None:
        """A shared store in a cluster: the job leases (.leasing); None otherwise."""
        if self.cluster is None or not isinstance(store, SplitStore) or not store.shared:
            return None
        from dsc_bindings.store.postgresql import PostgresRecords

        records = store.records
        if not isinstance(records, PostgresRecords):
            return None
        cluster = self.cluster
        records.pending_grace = self._cluster_settings.lease_seconds
        records.home = store.home
        records.limits = lambda: self.config.limits
        keeper = LeaseKeeper(
            JobLeases(
                records.database, cluster.id, store.home, self._cluster_settings.lease_seconds
            ),
            heartbeat_seconds=self._cluster_settings.heartbeat_seconds,
            stop=self._stop_filters,
            resume=self._resume_rescued,
            engine=engine,
            name_of=self._instance_name,
            undecodable=store.undecodable.tokens,
        )
        keeper.start()
        database = records.database

        def journal_of(job: Job, documents: object, filter_index: int) -> PgDeliveryJournal:
            return PgDeliveryJournal(database, job.token, filter_index, keeper.lease_of(job.token))

        self._journal_of = journal_of
        self.filter_settings = self._with_directory(self.filter_settings)
        engine.set_settings(self.filter_settings)
        return keeper

    def _instance_name(self, instance_id: str) -> str:
        for row in self.cluster.instances if self.cluster is not None else ():
            if row.id == instance_id:
                return f"{row.name} ({instance_id})"
        return instance_id

    def _stop_filters(self, token: str) -> None:
        if self._engine is not None:
            self._engine.stop(token)

    def _resume_rescued(self, rescued: list[Rescued]) -> None:
        """In the heartbeat or the take-up thread: jobs this instance just took over
        (.leasing).  Their rows are read first (the core's table may hold an older record),
        then R13 per job; a job that needs no engine after all (it ended meanwhile) is
        released at once.  One whose record is not in the table (the read failed) keeps its
        lease until it runs out: released, it would ring and be taken again at once, by every
        instance in turn, for as long as the reads fail.  One whose record the read found
        undecodable here (taken before this instance had read it; a newer server's) is released
        at once: from now on this instance's sweeps pass it over (store/undecodable.py), and an
        instance that can decode it takes it at the release's ring."""
        caught = self._read_for_tick()
        now = self.clock()
        unread: set[str] = set()

        def resume() -> Sequence[Command]:
            if caught is not None:
                self._absorb(caught)
            commands: list[Command] = []
            for job in rescued:
                record = self.server.jobs.get(job.token)
                if record is None:
                    unread.add(job.token)
                if record is not None and record.state in (JobState.STARTED, JobState.PROCESSING):
                    log.info(
                        "job %s was processing when its instance stopped: resumed, filter(s) "
                        "%s run again (R13)",
                        job.token,
                        _unfinished(record),
                    )
                commands += self.server.resume(job.token, now)
            return commands

        commands = self.owner.call(resume)
        starting = {c.job.token for c in commands if isinstance(c, StartProcessing)}
        assert self._leases is not None
        undecodable = self._leases.undecodable()
        for job in rescued:
            if job.token in unread and job.token not in undecodable:
                self._leases.interrupted(job.token)
            elif job.token not in starting:
                self._leases.finished(job.token)
        self._background(commands)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop: repository Stopped and SubscriptionEnd SourceShuttingDown (R7; deliveries get at
        most ~2 s), the engine (its last reports still reach the store), the writer (everything
        queued is carried out), threads, the store.

        Stop the HTTP bindings first: requests arriving afterwards get the core's answer for a
        Stopped repository, or a store fault once the store is closed.
        """
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        began = time.monotonic()
        self._stop.set()
        self._alarm.stop()
        with self._resumes_lock:
            resumes, self._resumes = list(self._resumes.values()), {}
        for timer in resumes:
            timer.cancel()
        for thread in self._threads:
            thread.join(2.0)
            if thread.is_alive():
                log.warning("thread %s did not stop in time", thread.name)
        last = self._last_instance()
        if last and self._term is not None:
            # The last instance announces Stopped (R7), leader or not (nobody else is), under
            # a fresh term: the one it holds may be stale (another instance took one while
            # this one's lock lapsed unnoticed, then went), and a Stopped refused by the row
            # is announced by nobody (.announcing).
            self._term.retake()
            self._change_term_as(leader=True)
        stopping = self.owner.call(lambda: self.server.shutdown(self.clock(), last=last))
        if self._outbox is not None:
            stopping = self._announce_stopped(stopping)
        self._background(stopping)
        if self._leases is not None:
            # Its running jobs are not ended by the stop: handed back, the next sweep of any
            # instance resumes them (R13); the stopped filters' reports are dropped.
            self._leases.hand_back()
        if self._engine is not None:
            self._engine.close(max(0.0, timeout - (time.monotonic() - began)))
        self._writer.close(max(1.0, timeout - (time.monotonic() - began)))
        if self._reads is not None:
            self._reads.close()
        if self._outbox is not None:
            self._outbox.stop()  # hands nothing more; the hub finishes what it holds
        if self._doorbell is not None:
            self._doorbell.close()
        self._hub.close(min(SHUTDOWN_DELIVERY_SECONDS, max(0.0, timeout)))
        if self._outbox is not None:
            self._outbox.release()
        if self.cluster is not None:
            self.cluster.stop()
        if self._store is not None:
            self._store.close()
        self.observer.close()
        log.info("scan service stopped")

    def _announce_stopped(self, stopping: Sequence[Command]) -> list[Command]:
        """The last instance of a shared store stops (R7): its announcement of Stopped is
        recorded and its outbox rows handed to the hub now, before the rest of ``stopping``
        (returned) ends the subscriptions.  Ending one deletes its outbox rows and its
        SubscriptionEnd goes to the hub directly, so in one batch the Stopped event was
        recorded, then deleted unsent (and this instance's outbox stops next)."""
        assert self._outbox is not None
        announcements = [c for c in stopping if isinstance(c, AnnounceRepositoryState)]
        if announcements:
            self.submit(announcements, False).wait(SHUTDOWN_DELIVERY_SECONDS)
            self._outbox.hand_now()
        return [c for c in stopping if not isinstance(c, AnnounceRepositoryState)]

    def _join_cluster(self) -> ClusterMember | None:
        """On a PostgreSQL store this server is one instance of a cluster (.cluster)."""
        if self.storage.store_kind != "postgresql":
            return None
        from dsc_bindings.runtime.cluster import ClusterMember

        store = self._store
        cluster = ClusterMember(
            self.storage.dsn,
            self._cluster_settings,
            address=lambda: self.config.base_url,
            password_file=self.storage.password_file,
            suffix=self._instance_suffix,
            home=store.home if isinstance(store, SplitStore) else None,
        )
        # Holding the lock is not leading (.announcing): what the views show asks the core,
        # which follows until it takes a term, from before the first heartbeat (which may take
        # the lock and writes whether it leads): a core leads unless told otherwise.
        self._term = term = self._leader_term(store, cluster)
        if term is not None:
            self.owner.call(self.server.follow)
            cluster.term_failing = lambda: term.failing
        cluster.core_leads = lambda: self.server.leads
        cluster.start()
        if isinstance(store, SplitStore) and store.shared:
            store.join(cluster.id)  # its uploads rows count while its heartbeat does
        return cluster

    def _last_instance(self) -> bool:
        """Whether this is the last instance serving the repository: only then is it Stopped
        and every subscription ended (R7 SourceShuttingDown; issue 18 point 4)."""
        if self.cluster is None:
            return True
        others = self.cluster.others_alive()
        if others is None:
            log.warning(
                "cluster: cannot tell whether other instances are up: ending this instance's "
                "subscriptions (SourceShuttingDown) so that their subscribers subscribe again"
            )
            return True
        if others:
            log.info(
                "cluster: other instances are up: leaving quietly (no SubscriptionEnd, the "
                "repository is not Stopped)"
            )
            return False
        log.info("cluster: the last instance stops: the repository is Stopped (R7)")
        return True

    @property
    def holds_leader_lock(self) -> bool:
        """Whether this instance should lead (sweep and announce, issue 18 point 4): the holder
        of the cluster's lock, or the only server (SQLite store).  It leads (:attr:`leads`)
        once its core took a term (.announcing); one server's core leads from the start (it
        is never told to follow)."""
        return self.cluster is None or self.cluster.holds_lock

    @property
    def leads(self) -> bool:
        """Whether this instance leads now: it holds the lock and its core took a term
        (``ClusterMember.leads``), or it is the only server."""
        return self.cluster.leads if self.cluster is not None else self.server.leads

    def __enter__(self) -> ScanService:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # --- requests -------------------------------------------------------------------------------

    def open_request(
        self,
        content_type: str | None,
        identity: str | None,
        path: str,
        peer: Peer | None = None,
    ) -> ServiceRequest:
        """Begin one HTTP request.  ``identity`` is the authenticated TLS client identity
        (R10), None without one; ``path`` is informational (R1); ``peer`` is the client's
        address for the log and the device records."""
        # Positional: a keyword call to a class builds a dict (~3k instructions, issue 20).
        info = RequestInfo(
            self.clock(),  # now
            content_type,
            identity,
            path,
            peer.host if peer is not None and peer.known else None,  # client_address
        )
        # Opening reads only the configuration (ScanServer.open_exchange): no owner needed.
        return ServiceRequest(self._requests, self.server.open_exchange(info), peer)

    def reconfigure(
        self, config: ServerConfig, filter_settings: FilterSettings | None = None
    ) -> None:
        """Apply a reloaded configuration (SIGHUP): the core's settings and its
        RepositoryElementsChangeEvent (R7), and the filters' settings for jobs started next."""

        # The start count stays this run's AppSequence InstanceId (R13).
        config = config.replace(discovery_instance_id=self._instance_id)

        def apply() -> Sequence[Command]:
            self.config = config
            return self.server.reconfigure(config, self.clock())

        # A shorter job timeout or retention brings deadlines forward: the owner nudges.
        commands = self.owner.call(apply)
        self._hub.set_limits(
            DeliveryLimits.from_limits(config.limits, config.delivery_failures_before_end)
        )
        if filter_settings is not None:
            filter_settings = self._with_directory(filter_settings)
            self.filter_settings = filter_settings
            if self._engine is not None:
                self._engine.set_settings(filter_settings)
        self._background(commands)
        log.info("configuration reloaded")

    def answer_datagram(
        self, data: bytes, answer: Callable[[ScanServer, bytes, datetime], bytes | None]
    ) -> bytes | None:
        """Run a UDP discovery datagram through the core (dsc_core.discovery), as its owner."""
        return self.owner.call(lambda: answer(self.server, data, self.clock()))

    def handle(
        self,
        body: bytes,
        *,
        content_type: str | None = None,
        identity: str | None = None,
        path: str = "/",
    ) -> Reply:
        """A whole request in one blocking call (tools and tests; not from the loop)."""
        request = self.open_request(content_type, identity, path)
        settle(request.feed(body))
        reply = settle(request.finish())
        assert isinstance(reply, Reply)
        return reply

    def _with_directory(self, settings: FilterSettings) -> FilterSettings:
        """SendToScanUser's address comes from the directory when there is one (R14); with
        leases the file share records its deliveries in the database (issue 18 point 2)."""
        if self._journal_of is not None:
            settings = dataclasses.replace(settings, journal_of=self._journal_of)
        if self.directory is None:
            return settings
        return dataclasses.replace(settings, directory_mail=self.directory.mail_of)

    # --- commands ------------------------------------------------------------------------------

    def submit(
        self, commands: Sequence[Command], strict: bool, after: Ticket | None = None
    ) -> Ticket:
        """Hand a batch to the writer (module doc).  A batch of engine and delivery hand-offs
        only runs inline when nothing waits before it: those never block."""
        if not commands and (after is None or after.done):
            return Ticket.completed()
        if (
            (after is None or after.done)
            and (self._outbox is None or not any(_to_outbox(c) for c in commands))
            and self._writer.run_inline(commands)
        ):
            return Ticket.completed()
        return self._writer.submit(self._stamped(commands), strict=strict, after=after)

    def _stamped(self, commands: Sequence[Command]) -> Sequence[Writable]:
        """As the core's owner, right after the call that made them: with a shared store, each
        record command carries the row version it replaces (.catchup)."""
        if self._catch_up is None:
            return commands
        term = None if self._term is None else self._term.current
        stamped = self._catch_up.stamp(commands, term)
        return stamped if self._leases is None else self._leases.fence(stamped)

    # --- other instances of a shared store (issue 18, .catchup) ------------------------------

    def _begin_catch_up(self, needed: bool) -> Ticket:
        """Read what other instances changed, off the owner, waited for at most
        ``catchup.CATCH_UP_WAIT_SECONDS``; the ticket's value is a Caught, if read in time.
        A request that does not need current rows (a listing) skips the read while the
        doorbell says nothing changed (JobCatchUp.fresh)."""
        if self._reads is None or self._catch_up is None:
            return Ticket.completed()
        if not needed and self._catch_up.fresh():
            return Ticket.completed()
        return self._reads.begin()

    def _end_catch_up(self, ticket: Ticket) -> tuple[frozenset[str], frozenset[str]] | None:
        """Hand a read to the core, as its owner (a request's, before its first core call):
        the jobs whose rows this instance cannot read, a newer server's and corrupt ones
        (JobCatchUp.unreadable), or None when there was no read (failed, too slow, or
        skipped)."""
        if isinstance(ticket.value, Caught):
            caught = ticket.value
            self.owner.call(lambda: self._absorb(caught))
            assert self._catch_up is not None
            return self._catch_up.unreadable()
        return None

    def _absorb(self, caught: Caught) -> None:
        assert self._catch_up is not None
        self._background(self._catch_up.absorb(self.server, caught))

    def _background(self, commands: Sequence[Command]) -> None:
        """Commands not tied to a request (engine reports, ticks, deliveries, reloads): a
        failure is logged and the rest still run (a later record of the same job supersedes
        the lost one, and the events still tell subscribers what happened)."""
        if commands:
            self.submit(commands, False)

    @property
    def store(self) -> JobStore | None:
        """The job store while the service runs (None before ``start``)."""
        return self._store

    @property
    def store_open(self) -> bool:
        return self._store is not None and not self._closed

    def offload(self, function: Callable[[], object]) -> Ticket:
        """Run a blocking call that is not a command (a directory lookup, R14) off the
        core's owner; the ticket carries its result (:meth:`CommandWriter.offload`)."""
        return self._writer.offload(function)

    def job_record(self, token: str) -> Job | None:
        """The core's record of one job (its documents), read as the core's owner."""
        return self.owner.call(lambda: self.server.jobs.get(token))

    def purgeable(self, before: datetime) -> list[str]:
        """The tokens PurgeJobHistory with ``before`` would remove now (the console's dry run)."""
        return self.owner.call(lambda: [j.token for j in self.server.jobs.purgeable(before)])

    def _require_store(self) -> JobStore:
        if self._store is None:
            raise StoreError("the scan service is not started", temporary=False)
        return self._store

    def _store_apply(self, command: Writable) -> None:
        if isinstance(command, VersionedWrite):
            self._versioned_apply(command)
            return
        try:
            self._require_store().apply(command)  # type: ignore[arg-type]
        except StoreError as exc:
            self.observer.store_failed(exc.message)
            raise
        finally:
            if self._catch_up is not None and isinstance(command, RecordDeliveryFailures):
                self._catch_up.counted(command)  # stamped (.catchup's failure counts)
        if not isinstance(command, EventsWrite):
            self.observer.applied(command)  # durable now: log it, count it, show it

    def _versioned_apply(self, write: VersionedWrite) -> None:
        assert self._catch_up is not None
        error: BaseException | None = None
        try:
            self._catch_up.check(write)
            if self._leases is not None:
                self._leases.check(write)
            self._require_store().apply(write)
        except (JobChanged, CreationRefused) as exc:
            error = exc  # a lost race or a refusal, not a store fault (logged where answered)
            if self._leases is not None and isinstance(exc, JobChanged):
                self._leases.refused(write)
            raise
        except StoreError as exc:
            error = exc
            self.observer.store_failed(exc.message)
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._catch_up.settled(write, error)
        if self._leases is not None:
            self._leases.written(write)
        self.observer.applied(write.command)

    def _start_processing(self, command: StartProcessing) -> None:
        if self._engine is None:
            log.error("job %s cannot start: no processing engine", command.job.token)
        elif self._leases is None or self._leases.claim(command.job.token):
            self._engine.start(command.job)

    def _stop_processing(self, command: StopProcessing) -> None:
        if self._engine is not None:
            self._engine.stop(command.token)

    def _deliver(self, command: Deliver) -> None:
        """A notification: to the hub, or, with a shared store, an outbox row (one that no
        job record write carried, .catchup) that some instance's hub sends (.outbox).  A
        SubscriptionEnd goes to this hub directly: its subscription is gone from the store."""
        if self._outbox is not None and _to_outbox(command):
            self._store_apply(command)
        else:
            self._hub.deliver(command)

    # --- processing engine ------------------------------------------------------------------------

    def _documents_of(self, job: Job) -> list[tuple[Document, Path]]:
        """The job's documents as local files (an S3 spool downloads them): a spool that does
        not answer for a moment interrupts the run (store/interruption.py)."""
        store = self._require_store()
        with interrupting():
            return [
                (document, store.document_path(job.token, document.document_id))
                for document in job.documents
            ]

    def _engine_freed(self) -> None:
        """In an engine thread, a job out of the engine: its place takes the oldest job
        waiting for any instance's engine (.leasing), not at the next heartbeat."""
        if self._leases is not None:
            self._leases.wake()

    def _filters_interrupted(self, token: str) -> None:
        """In an engine thread, the job out of the engine: its run was interrupted (the store
        did not answer, filters/interruption.py).  It resumes (R13) once the store answers:
        with leases, whichever instance's sweep takes it when its lease has run out
        (LeaseKeeper.interrupted); on one server, here, after RESUME_INTERRUPTED_SECONDS (an
        interrupted resume comes back here and waits again)."""
        if self._leases is not None:
            self._leases.interrupted(token)
            return
        with self._resumes_lock:
            if self._stop.is_set() or token in self._resumes:
                return
            timer = threading.Timer(
                RESUME_INTERRUPTED_SECONDS, functools.partial(self._resume_interrupted, token)
            )
            timer.name = "dsc-resume"
            timer.daemon = True
            self._resumes[token] = timer
        log.info(
            "job %s: resumed in %.0f s (R13), and again until the store answers",
            token,
            RESUME_INTERRUPTED_SECONDS,
        )
        timer.start()

    def _resume_interrupted(self, token: str) -> None:
        """A resume timer: R13 for the interrupted job, as the core's owner (ScanServer.resume:
        a job that ended meanwhile, a cancel, is left alone)."""
        with self._resumes_lock:
            self._resumes.pop(token, None)
        if self._stop.is_set():
            return  # the next start resumes it (ScanServer.restore, R13)
        self.owner.soon(lambda: self._background(self.server.resume(token, self.clock())))

    def _engine_report(self, event: ProcessingEvent) -> None:
        """Called in an engine thread.  It returns only once the core has seen the report and
        the commands it caused were carried out: R6's "the first failure without
        ContinueOnError ends the run" is decided by the core alone, and its StopProcessing must
        reach the engine before the engine starts the next filter."""
        keeper = self._leases
        if keeper is not None and not keeper.holds(event.token):
            # The lease was lost (.leasing): another instance runs the job now; this run's
            # reports change nothing, here or in the store.
            if isinstance(event, ProcessingFinished):
                self._run_dropped(
                    event.token, "it no longer held the job (its lease lost or handed back)"
                )
            else:
                log.debug("job %s: %s dropped: the lease is not held", event.token, event)
            return
        now = self.clock()

        def report() -> tuple[Ticket, bool]:
            commands = self.server.processing(event, now)
            if keeper is None:
                return self.submit(commands, False), bool(commands)
            # Fenced even if the lease goes while they wait in the writer's queue.
            fenced = keeper.fence(self._stamped(commands), event.token)
            return self._writer.submit(fenced, strict=False), bool(commands)

        ticket, recorded = self.owner.call(report)
        if not ticket.wait(ENGINE_REPORT_WAIT_SECONDS):
            log.error(
                "job store did not take a processing report within %.0f s",
                ENGINE_REPORT_WAIT_SECONDS,
            )
            return
        if keeper is None or not isinstance(event, ProcessingFinished):
            return
        keeper.finished(event.token)
        # The lease was held when the report began, but the job had ended on another
        # instance (it rescued the job while this one was frozen): the core knew it from the
        # catch-up read and made nothing of the report, or the store refused the fenced write
        # of its end.  Said as for a lease lost before the report: the run is over either way.
        if not recorded:
            self._run_dropped(event.token, "the job had ended on another instance")
        elif event.token in ticket.refused:
            self._run_dropped(
                event.token, "the write of its end was refused (another instance has it)"
            )

    @staticmethod
    def _run_dropped(token: str, why: str) -> None:
        """The one line that says a run of a job's filters here ended without its end being
        recorded here (another instance has the job)."""
        log.info(
            "job %s: the run of its filters here has ended; %s, so what it reported was dropped",
            token,
            why,
        )

    # --- deliveries ---------------------------------------------------------------------------

    def _delivery_report(self, subscription_id: str, ok: bool) -> None:
        if not ok:
            self.observer.event_delivery_failed()
        self.owner.soon(lambda: self._background(self.server.delivery_result(subscription_id, ok)))

    def _delivery_give_up(self, subscription_id: str) -> None:
        self.owner.soon(lambda: self._background(self.server.end_subscription(subscription_id)))

    # --- ticker -------------------------------------------------------------------------------

    def _read_for_tick(self) -> Caught | None:
        """A shared store: what other instances changed, before a tick (in the ticker thread),
        waited for as a request's (.catchup).  None without a shared store, or when it is not
        read in time: the tick then runs on what the table has (its writes are
        compare-and-set, so a stale timeout is refused)."""
        if self._reads is None:
            return None
        gate = self._reads.begin()
        gate.wait()
        return gate.value if isinstance(gate.value, Caught) else None

    def _tick(self, caught: Caught | None, change: NewTerm | str | None) -> None:
        self._lead_or_follow(caught, change)
        commands = self.server.tick(self.clock())  # sweeps only if the core leads
        for command in commands:
            if isinstance(command, EndSubscription):  # a tick ends only expired ones
                log.info("subscription %s expired: ended", command.identifier)
        self._background(commands)

    def _tick_loop(self) -> None:
        # In this thread, not on the event loop: the device book's DELETE waits for the disk.
        bound_devices_at = self.clock() + DEVICE_BOUNDS_INTERVAL
        while True:
            try:
                now = self.clock()
                if now >= bound_devices_at:
                    bound_devices_at = now + DEVICE_BOUNDS_INTERVAL
                    self.observer.bound_devices(now)
                if self.cluster is not None:  # the last tick may have led or followed
                    self.cluster.publish_leading()
                self._alarm.clear()  # the read below answers the nudges given so far
                # None while the core follows (issue 18 point 4): a new leader's term is taken
                # at the next wake-up, so it starts sweeping within a second of the lock.
                deadline = self.owner.call(self.server.next_deadline)
                wait = self._tick_wait(deadline, self.clock(), bound_devices_at)
                woke = self._alarm.sleep(wait, heed_after=NUDGE_HEED_SECONDS)
                if woke is Wake.STOPPED:
                    return
                if woke is Wake.NUDGED:
                    continue  # read the deadline again; tick if it has come
                # Off the owner: taking a term is a statement (.announcing).
                change = None if self._term is None else self._term.change(self.holds_leader_lock)
                caught = self._read_for_tick()
                self.owner.soon(functools.partial(self._tick, caught, change))
            except Exception:  # a bug must not stop job timeouts for the rest of the run
                log.exception("tick failed")
                # A nudge ends no pause of this length (heed_after = the pause itself).
                pause = TICK_FAILED_PAUSE_SECONDS
                if self._alarm.sleep(pause, heed_after=pause) is Wake.STOPPED:
                    return

    def _tick_wait(
        self, deadline: datetime | None, now: datetime, bound_devices_at: datetime
    ) -> float:
        """How long the ticker sleeps: until the core's deadline, the device book's next
        bounds, or the cap (TICK_SHARED_SECONDS with a shared store, else TICK_IDLE_SECONDS),
        whichever is first; never less than TICK_MIN_SECONDS."""
        shared = self.cluster is not None or self._reads is not None
        wait = TICK_SHARED_SECONDS if shared else TICK_IDLE_SECONDS
        if deadline is not None:
            wait = min(wait, (deadline - now).total_seconds())
        wait = min(wait, (bound_devices_at - now).total_seconds())
        return max(TICK_MIN_SECONDS, wait)


def _unfinished(job: Job) -> str:
    """The filters R13 runs again, for the log."""
    return ", ".join(str(i) for i, f in enumerate(job.filters) if not f.state.is_final) or "-"
