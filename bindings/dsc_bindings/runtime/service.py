"""The runtime around the one core: who may call it, where its commands run, the clock.

Both HTTP bindings (:mod:`.http_async`, :mod:`.http_blocking`) talk to a :class:`ScanService`
only; they never touch the core.  The rules (issue 7):

- **The core has one owner, and no lock is ever held across I/O.**  When the async binding
  serves, its event loop is the owner (``attach_loop``): requests call the core inline, with no
  thread hop; the processing engine, the ticker, delivery results, UDP discovery and
  configuration reloads hand their core calls to the loop (``_core_soon`` / ``_core_call``).
  Without a loop (the blocking binding, tools, start-up and shutdown) the owner is whoever holds
  ``_core_lock``, and holds it only for the pure core call, microseconds.
- **Commands run off the owner, in the order the core gave them** (:mod:`.writer`): job
  records, fsyncs, SQLite, starting and stopping filters, handing notifications to the delivery
  hub.  A request waits for its own batch's :class:`~dsc_bindings.runtime.writer.Ticket` before its
  reply is sent (R4 step 9 unchanged: an acknowledged image is durable; a failed command turns
  the reply into the core's fault).  A request without store commands (most MS-BDSRR reads) is
  answered at once, whatever the disk is doing.
- **Filters** run in the :class:`~dsc_bindings.filters.ProcessingEngine`'s threads; their
  reports go back to the core's owner.
- **Event delivery** (:mod:`.delivery`): one bounded queue and task per subscription, on the
  hub's own loop; results go back to the core's owner, which counts failures (R7).
- A ticker thread asks the owner to run ``ScanServer.tick`` at ``next_deadline()``, at least
  once a second (R6 job timeouts, R7 subscription expiry).

Usage::

    service = ScanService(ServerConfig(), Path("data"), FilterSettings.embedded_default("data"))
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

import concurrent.futures
import dataclasses
import functools
import logging
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TypeVar

from dsc_bindings.filters.engine import ProcessingEngine
from dsc_bindings.filters.settings import FilterSettings
from dsc_bindings.filters.smbfolder import share_problem
from dsc_bindings.http.cross_site import origin_of
from dsc_bindings.observe.devices import DeviceLimits
from dsc_bindings.observe.health import (
    Health,
    HealthMonitor,
    Probe,
    log_health,
    smtp_accepts,
    writable_directory,
)
from dsc_bindings.observe.observer import Observer
from dsc_bindings.runtime.delivery import DeliveryHub, DeliveryLimits
from dsc_bindings.runtime.installation import record_start
from dsc_bindings.runtime.peer import Peer
from dsc_bindings.runtime.writer import CommandWriter, Routes, Ticket, Wait, settle
from dsc_bindings.store.sqlite import JobStore, StoreError
from dsc_bindings.webconsole.session import SessionBook, SignInLimiter
from dsc_core import (
    Command,
    Deliver,
    DirectoryAnswers,
    Document,
    Exchange,
    Job,
    JobState,
    Lookups,
    Outcome,
    ProcessingEvent,
    Reply,
    RequestInfo,
    ScanServer,
    ServerConfig,
    StartProcessing,
    StopProcessing,
)
from dsc_core.faults import SoapFault
from dsc_core.users import is_scan_admin

if TYPE_CHECKING:
    from dsc_bindings.directory.ldap import Directory
    from dsc_bindings.observe.statuspage import View
    from dsc_bindings.webconsole.api import ApiHead, ApiRequest

__all__ = [
    "SHUTDOWN_DELIVERY_SECONDS",
    "LoopHandle",
    "ScanService",
    "ServiceRequest",
    "local_now",
    "settle",
]

log = logging.getLogger("dsc.service")

T = TypeVar("T")

#: At shutdown, SubscriptionEnd (SourceShuttingDown, R7) deliveries get at most this long.
SHUTDOWN_DELIVERY_SECONDS = 2.0
#: The ticker wakes at least this often, and never more often than the minimum below (the core
#: may report a deadline in the past while a job is receiving an image: the R6 timeout does not
#: run during an upload, so the deadline stays put until the upload ends).
TICK_MAX_SECONDS = 1.0
TICK_MIN_SECONDS = 0.05
#: An engine thread waits at most this long for its report's commands (the job store is stuck).
ENGINE_REPORT_WAIT_SECONDS = 60.0
#: The ticker applies the device book's retention and cap this often (service clock), so that a
#: device past ``[devices] retention_days`` also goes while no job is created (devices.py).
DEVICE_BOUNDS_INTERVAL = timedelta(hours=1)


#: The local zone as a fixed offset, and until when (time.monotonic()) it is trusted: finding
#: it (``astimezone``) consults the C library's zone rules, which profiled at about 5 us of each
#: request's 230 us; the offset changes twice a year, so it is looked up again every second.
_local_zone: tuple[float, tzinfo | None] = (-1.0, None)
_ZONE_RECHECK_SECONDS = 1.0


def local_now() -> datetime:
    """Aware local time (R6: times carry an explicit UTC offset)."""
    global _local_zone
    until, zone = _local_zone
    moment = time.monotonic()
    if zone is None or moment >= until:
        now = datetime.now().astimezone()
        _local_zone = (moment + _ZONE_RECHECK_SECONDS, now.tzinfo)
        return now
    return datetime.now(zone)


def new_uuid() -> str:
    """A random (version 4) UUID string, like ``str(uuid.uuid4())``, with the random bytes
    drawn from the OS a page at a time (profiled: one ``os.urandom`` call and a ``UUID``
    object per id were about 3 us of each request)."""
    global _random_pool, _random_used
    with _random_lock:  # ids are drawn from the loop and from threads (blocking binding)
        if _random_used + 16 > len(_random_pool):
            _random_pool, _random_used = os.urandom(4096), 0
        raw = bytearray(_random_pool[_random_used : _random_used + 16])
        _random_used += 16
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4 (RFC 9562 section 5.4)
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_random_pool = b""
_random_used = 0
_random_lock = threading.Lock()


class LoopHandle(Protocol):
    """An event loop that owns the core (given by the async binding)."""

    def call_soon(self, function: Callable[[], object]) -> None:
        """Run ``function`` in the loop's thread soon; callable from any thread, never
        blocks (trio's ``TrioToken.run_sync_soon``, asyncio's ``call_soon_threadsafe``)."""
        ...

    def is_current(self) -> bool:
        """Whether the calling thread is the loop's."""
        ...


def _answers(ticket: Ticket) -> DirectoryAnswers:
    """The directory's answers an offloaded call left on ``ticket``."""
    if ticket.error is not None:
        raise ticket.error  # Directory.answer reports trouble as answers, never raises
    assert isinstance(ticket.value, DirectoryAnswers)
    return ticket.value


class StatusRequest:
    """A GET of an administrators' page whose check needs the directory (R14): the lookup runs
    on the writer's pool, then the answer is made in the core's context.  Has no body."""

    def __init__(self, service: ScanService, target: str, identity: str) -> None:
        self._service = service
        self._target = target
        self._identity = identity

    def feed(self, data: bytes) -> Wait | None:
        return None

    def finish(self) -> Reply | Wait:
        directory = self._service.directory
        assert directory is not None
        asked = self._service._writer.offload(
            lambda: directory.answer(Lookups(admin=self._identity))
        )
        return Wait(asked, lambda: self._reply(_answers(asked)))

    def _reply(self, answers: DirectoryAnswers) -> Reply:
        reply = self._service.status_reply(self._target, self._identity, answers)
        assert reply is not None  # an administrators' path is always ours
        return reply

    def abort(self) -> Wait | None:
        return None


class ServiceRequest:
    """One HTTP request on its way through the core: ``feed`` the body, then ``finish``.

    Used by one connection at a time, from the core's owner context (the loop, or a blocking
    binding's thread: the core calls take the core lock themselves).  Each method returns at
    once; where commands are being carried out it returns a :class:`Wait` (see ``settle``).
    """

    def __init__(self, service: ScanService, exchange: Exchange, peer: Peer | None = None) -> None:
        self._service = service
        self._exchange = exchange
        #: The client's address (``host:port``) for the log and the device records.
        self._peer = peer
        #: The R4 step 9 fault once a store command of this exchange failed.
        self._failed: Reply | None = None
        self._reply: Reply | None = None
        self._done = False
        #: The last batch of this exchange: its next one runs after it.
        self._last: Ticket | None = None

    def feed(self, data: bytes) -> Wait | None:
        """Pass a piece of the body to the core; its commands (image bytes) are written off
        the loop.  After a store failure the rest of the body is discarded: the answer is
        already decided (the fault of R4 step 9) and ``finish`` returns it."""
        if self._done or self._failed is not None or not data:
            return None
        exchange = self._exchange
        if exchange.owner_free:
            exchange.feed(data)  # only buffered: no owner needed (Exchange.owner_free)
            return None
        commands = self._service._core_call(lambda: exchange.feed(data))
        # One batch of this exchange in flight at a time, and the caller does not wait for
        # the batch it just handed over: the next piece of the body is read while this one
        # is written (measured, 400 MB SendImage: waiting for each 256 KiB write before the
        # next read held the async binding to a third of a write+fsync sink's throughput).
        # Batches stay in order: the next is submitted only once this one is done; a failure
        # is seen by the next feed or by finish.  At most one piece waits while one is
        # written, so memory stays flat.
        previous = self._last
        if previous is not None and not previous.done:
            return Wait(previous, lambda: self._feed_after(previous, commands))
        return self._feed_after(previous, commands)

    def _feed_after(self, previous: Ticket | None, commands: Sequence[Command]) -> Wait | None:
        if previous is not None and previous.error is not None:
            return self._after_feed(previous)  # R4 step 9: this piece is dropped with the rest
        if commands:
            self._submit(commands, strict=True)
        return None

    def finish(self) -> Reply | Wait:
        """End the request: the core's reply once its commands were carried out in order
        (so an acknowledged image is durable), or the R4 step 9 fault if one failed."""
        if self._reply is not None:
            return self._reply
        if self._done and self._failed is None:
            raise RuntimeError("finish() after abort()")
        last = self._last
        if self._failed is None and last is not None:
            if not last.done:  # the body's last piece is still being written
                return Wait(last, self.finish)
            if last.error is not None:
                undo = self._after_feed(last)
                if undo is not None:
                    return Wait(undo.ticket, self.finish)
        self._done = True
        if self._failed is not None:
            last = self._last
            if last is not None and not last.done:  # the undo commands still run
                return Wait(last, self.finish)
            self._reply = self._failed
            return self._failed
        exchange = self._exchange
        if exchange.owner_free:
            # Parsed here, not under the core's owner: with the blocking binding's threads,
            # lxml parsing under the core lock made every other connection queue behind it
            # (profiled: two thirds of their time was spent waiting for the lock).
            exchange.prepare()
        directory = self._service.directory
        if directory is not None:
            # R14: what the request needs from the directory is asked off the loop (LDAP may
            # be slow), then the exchange ends with the answers.
            needs = self._service._core_call(exchange.lookups)
            if needs:
                asked = self._service._writer.offload(lambda: directory.answer(needs))
                return self._then(asked, lambda: self._end_with(_answers(asked)))
        return self._end_with(None)

    def _end_with(self, answers: DirectoryAnswers | None) -> Reply | Wait:
        outcome = self._service._core_call(lambda: self._end(answers))
        if not outcome.commands and (self._last is None or self._last.done):
            self._reply = outcome.reply  # nothing to write (most reads): answer at once
            return outcome.reply
        ticket = self._submit(outcome.commands, strict=True)
        return self._then(ticket, lambda: self._after_finish(ticket, outcome.reply))

    def abort(self) -> Wait | None:
        """The connection was lost before ``finish``: drop any upload in progress, so that no
        ``.part`` debris remains and the device may send the same DocumentId again."""
        if self._done:
            return None
        self._done = True
        if self._failed is not None:
            return None  # store_failed already ended the exchange and dropped the upload
        exchange = self._exchange
        commands = self._service._core_call(exchange.abort)
        ticket = self._submit(commands, strict=False)
        return None if ticket.done else Wait(ticket, lambda: None)

    # --- internals ------------------------------------------------------------------------------

    def _submit(self, commands: Sequence[Command], *, strict: bool) -> Ticket:
        ticket = self._service._submit(commands, strict=strict, after=self._last)
        self._last = ticket
        return ticket

    @staticmethod
    def _then(ticket: Ticket, resume: Callable[[], T]) -> T | Wait:
        return resume() if ticket.done else Wait(ticket, resume)

    def _end(self, answers: DirectoryAnswers | None) -> Outcome:
        exchange = self._exchange
        outcome = exchange.end(self._service.clock(), directory=answers)
        if outcome.fault is not None:
            # R12: every limit exceeded (and every other refusal) is logged, with who asked.
            log.info(
                "%s: %s to %s answered with HTTP %d, %s",
                self._peer or "?",
                exchange.operation or "request",
                exchange.info.path,
                outcome.reply.status,
                outcome.fault,
            )
        observer = self._service.observer
        observer.request_commands(
            outcome.commands, exchange.info.client_address, exchange.info.identity
        )
        observer.request_ended(exchange.operation, outcome.fault_subcode)
        return outcome

    def _after_feed(self, ticket: Ticket) -> Wait | None:
        if ticket.error is None:
            return None
        undo = self._store_failed(ticket.error)
        return None if undo.done else Wait(undo, lambda: None)

    def _after_finish(self, ticket: Ticket, reply: Reply) -> Reply | Wait:
        if ticket.error is None:
            self._reply = reply
            return reply
        undo = self._store_failed(ticket.error)
        self._reply = self._failed
        assert self._failed is not None
        failed = self._failed
        return failed if undo.done else Wait(undo, lambda: failed)

    def _store_failed(self, exc: BaseException) -> Ticket:
        """R4 step 9: tell the core, carry out its undo commands, answer with its fault."""
        temporary = isinstance(exc, StoreError) and exc.temporary
        if isinstance(exc, StoreError):
            log.error(
                "job store failed (%s): %s", "temporary" if temporary else "permanent", exc.message
            )
        else:
            log.error("job store raised an unexpected error; answering InternalError: %r", exc)
        exchange = self._exchange
        outcome = self._service._core_call(lambda: exchange.store_failed(temporary=temporary))
        self._failed = outcome.reply
        return self._submit(outcome.commands, strict=False)


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
        device_limits: DeviceLimits | None = None,
    ) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        #: The user directory (R14), or None: the core's tables are used.
        self.directory = directory
        self.filter_settings = self._with_directory(filter_settings)
        #: The web console's sign-ins (issue 19, .webconsole.session).
        self.web_sessions = SessionBook()
        self.sign_in_limiter = SignInLimiter()
        self.clock = clock
        self.server = ScanServer(config, new_id=new_id)
        self._delivery_ssl_context = delivery_ssl_context
        self._max_processing_jobs = max_processing_jobs
        #: The core's owner when no loop is attached; held only for pure core calls.
        self._core_lock = threading.RLock()
        #: The event loop that owns the core, if one is attached (attach_loop).
        self._loop: LoopHandle | None = None
        #: Core calls handed to the loop, in order; guarded by _inbox_lock with _loop.
        self._inbox: deque[Callable[[], object]] = deque()
        self._inbox_lock = threading.Lock()
        self._wake_pending = False
        self._store: JobStore | None = None
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
        self._started = False
        self._closed = False
        self._instance_id = config.discovery_instance_id
        #: Job log, metrics, device records and the status page's live state (.observe).
        self.observer = Observer(self.data_dir, device_limits=device_limits)
        #: What a scan needs, checked off the loop (.health): /healthz and the start log.
        self.health = HealthMonitor(self.health_probes)

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the store, restore the jobs it kept, start the writer, engine, ticker and
        deliveries."""
        if self._started:
            raise RuntimeError("ScanService.start() called twice")
        self._started = True
        try:
            store = JobStore.open(self.data_dir)
        except StoreError as exc:
            log.error("cannot open the job store in %s: %s", self.data_dir, exc)
            raise
        self._store = store
        log.info("job store at %s", self.data_dir.resolve())
        try:
            # R13 (R11): each start gets a larger wsd:AppSequence InstanceId.
            self._instance_id = record_start(self.data_dir).starts
        except (OSError, ValueError) as exc:
            store.close()
            raise StoreError(f"cannot record this start: {exc}", temporary=False) from exc
        self.config = self.config.replace(discovery_instance_id=self._instance_id)
        try:
            jobs = store.load_jobs()
            self.observer.open(jobs, self.clock())
            self._engine = ProcessingEngine(
                self.filter_settings,
                self._documents_of,
                self._engine_report,
                max_jobs=self._max_processing_jobs,
            )
            self._writer.start()
            self._hub.start()
            config = self.config
            commands = self._core_call(
                lambda: [
                    *self.server.reconfigure(config, self.clock()),
                    *self.server.restore(jobs, self.clock()),
                ]
            )
            self._writer.submit(commands, strict=False).wait()
        except BaseException:
            log.exception("starting the scan service failed")
            if self._engine is not None:
                self._engine.close(1.0)
            self._writer.close()
            self._hub.close(0)
            store.close()
            raise
        active = sum(1 for job in jobs if job.is_active)
        log.info(
            "restored %d job(s): %d active, %d in the history",
            len(jobs),
            active,
            len(jobs) - active,
        )
        for job in jobs:
            if job.state in (JobState.STARTED, JobState.PROCESSING):
                log.info(
                    "job %s was processing when the server stopped: resumed, filter(s) %s run "
                    "again (R13)",
                    job.token,
                    ", ".join(str(i) for i, f in enumerate(job.filters) if not f.state.is_final)
                    or "-",
                )
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
        log_health(self.health.check_now())
        thread = threading.Thread(target=self._tick_loop, name="dsc-ticker", daemon=True)
        self._threads.append(thread)
        thread.start()

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
        for thread in self._threads:
            thread.join(2.0)
            if thread.is_alive():
                log.warning("thread %s did not stop in time", thread.name)
        self._background(self._core_call(lambda: self.server.shutdown(self.clock())))
        if self._engine is not None:
            self._engine.close(max(0.0, timeout - (time.monotonic() - began)))
        self._writer.close(max(1.0, timeout - (time.monotonic() - began)))
        self._hub.close(min(SHUTDOWN_DELIVERY_SECONDS, max(0.0, timeout)))
        if self._store is not None:
            self._store.close()
        self.observer.close()
        log.info("scan service stopped")

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

    # --- the core's owner -----------------------------------------------------------------------

    def attach_loop(self, loop: LoopHandle) -> Callable[[], None]:
        """Make ``loop`` the core's owner (the async binding does this while it serves).
        Returns the function that detaches it again; core calls still queued for the loop
        then run in the detaching thread, under the core lock."""
        with self._inbox_lock:
            if self._loop is not None:
                raise RuntimeError("another event loop already owns this service's core")
            self._loop = loop

        def detach() -> None:
            with self._inbox_lock:
                if self._loop is not loop:
                    return
                self._loop = None
            with self._core_lock:
                self._drain_inbox()

        return detach

    def _core_call(self, function: Callable[[], T]) -> T:
        """Run a pure core call as its owner and return its result (blocks a foreign thread
        until the loop ran it; never blocks the loop)."""
        with self._inbox_lock:
            loop = self._loop
        if loop is None:
            with self._core_lock:
                return function()
        if loop.is_current():
            return function()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

        self._core_soon(run)
        return future.result()

    def _core_soon(self, function: Callable[[], object]) -> None:
        """Run a core call as its owner, soon, without waiting (calls from one thread keep
        their order)."""
        with self._inbox_lock:
            loop = self._loop
            if loop is not None and not loop.is_current():
                self._inbox.append(function)
                wake = not self._wake_pending
                self._wake_pending = True
            else:
                wake = False
        if loop is None:
            with self._core_lock:
                self._run_owned(function)
            return
        if loop.is_current():
            self._run_owned(function)
            return
        if wake:
            try:
                loop.call_soon(self._drain_inbox)
            except Exception:  # the loop ended without detaching: run here
                with self._core_lock:
                    self._drain_inbox()

    def _drain_inbox(self) -> None:
        while True:
            with self._inbox_lock:
                if not self._inbox:
                    self._wake_pending = False
                    return
                function = self._inbox.popleft()
            self._run_owned(function)

    @staticmethod
    def _run_owned(function: Callable[[], object]) -> None:
        try:
            function()
        except Exception:  # a bug in one hand-off must not stop the others
            log.exception("a core call handed to the owner failed")

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
        info = RequestInfo(
            now=self.clock(),
            content_type=content_type,
            identity=identity,
            path=path,
            client_address=peer.host if peer is not None and peer.known else None,
        )
        # Opening reads only the configuration (ScanServer.open_exchange): no owner needed.
        return ServiceRequest(self, self.server.open_exchange(info), peer)

    def health_probes(self) -> list[Probe]:
        """The checks of .health, for the current configuration."""
        store = self._store
        spool = self.data_dir / "spool"
        probes = [
            Probe(
                "store",
                lambda: store.quick_check() if store is not None else "the job store is not open",
            ),
            Probe("data", functools.partial(writable_directory, spool), subject=str(spool)),
        ]
        for prefix, root in self.filter_settings.share_roots:
            probes.append(
                Probe(
                    f"share {prefix}",
                    functools.partial(writable_directory, root),
                    subject=str(root),  # a hung network mount
                )
            )
        smb = self.filter_settings.smb
        if smb is not None:
            for unc in smb.health_shares:
                probes.append(
                    Probe(f"smb {unc}", functools.partial(share_problem, smb, unc), subject=unc)
                )
        directory = self.directory
        if directory is not None:

            def bind() -> str | None:
                assert directory is not None
                try:
                    directory.connect().unbind()
                except Exception as exc:  # DirectoryError, ldap3's own: named in the answer
                    # Each line names the directory, also where the reason does not
                    # (refused credentials).
                    url, problem = directory.settings.url, str(exc)
                    return problem if problem.startswith(url) else f"{url}: {problem}"
                return None

            probes.append(Probe("directory", bind, essential=False, subject=directory.settings.url))
        mail = self.filter_settings
        if mail.smtp_configured:
            probes.append(
                Probe(
                    "smtp",
                    functools.partial(
                        smtp_accepts, mail.smtp_host, mail.smtp_port, min(5.0, mail.smtp_timeout)
                    ),
                    essential=False,
                    subject=f"relay {mail.smtp_host}:{mail.smtp_port}",
                )
            )
        return probes

    def current_health(self) -> Health | None:
        """The last result of the checks (never blocks; a refresh starts when it is old)."""
        return self.health.current()

    @property
    def web_headers(self) -> tuple[tuple[str, str], ...]:
        """Headers of every answer of the web endpoints (:data:`.statuspage.SECURITY_HEADERS`)."""
        from dsc_bindings.observe.statuspage import SECURITY_HEADERS

        return SECURITY_HEADERS

    def own_origins(self) -> frozenset[str]:
        """The origin whose pages may send requests here (:mod:`.cross_site`): that of the
        URL the server advertises."""
        own = origin_of(self.config.base_url)
        return frozenset({own}) if own is not None else frozenset()

    def answer_get(self, target: str, identity: str | None) -> Reply | StatusRequest | None:
        """A GET of the status page, its JSON, ``/metrics`` or ``/healthz``
        (:mod:`.statuspage`), or None for any other path (the binding answers 405).  Called
        in the core's owner context; reads memory only.  Where the administrator check needs
        the directory (R14: a member of ``admin_group``), a :class:`StatusRequest` that asks
        it off the loop, like a SOAP request's lookups."""
        from dsc_bindings.observe.statuspage import ADMIN_PATHS, PATHS
        from dsc_bindings.webconsole import page

        path = target.split("?", 1)[0]
        if path in page.PATHS:
            return page.page_reply(path)
        if path not in PATHS:
            return None
        if path in ADMIN_PATHS and self.directory is not None:
            info = RequestInfo(now=self.clock(), identity=identity)
            if not is_scan_admin(self.config, info) and identity:
                return StatusRequest(self, target, identity)
        return self.status_reply(target, identity, None)

    def open_api(self, head: ApiHead, identity: str | None, peer: Peer | None) -> ApiRequest:
        """A request for the web console's JSON API (``/api/``, .webconsole.api)."""
        from dsc_bindings.webconsole.api import ApiRequest

        return ApiRequest(self, head, identity, peer)

    def offload(self, function: Callable[[], object]) -> Ticket:
        """Run a blocking call (a directory lookup or bind) off the loop; see .writer."""
        return self._writer.offload(function)

    def job_record(self, token: str) -> Job | None:
        """The core's record of one job (its documents), read as the core's owner."""
        return self._core_call(lambda: self.server.jobs.get(token))

    def purgeable(self, before: datetime) -> list[str]:
        """The tokens PurgeJobHistory with ``before`` would remove now (the console's dry run)."""
        return self._core_call(lambda: [j.token for j in self.server.jobs.purgeable(before)])

    def status_reply(
        self, target: str, identity: str | None, answers: DirectoryAnswers | None
    ) -> Reply | None:
        """The GET's answer; the administrator check is the core's (``is_scan_admin``), with
        the directory's ``answers`` when it was asked."""
        from dsc_bindings.observe.statuspage import answer

        current = self.status_view(identity, answers)
        self.observer.metrics.subscriptions.set(len(current.subscriptions))
        return answer("GET", target, identity, current, self.observer)

    def status_view(self, identity: str | None, answers: DirectoryAnswers | None) -> View:
        """What the web endpoints show of the core and the service (.statuspage.View)."""
        from dsc_bindings.observe.statuspage import View, package_version

        def view() -> View:
            subscriptions = tuple(
                {
                    "id": sub.identifier,
                    "notify_to": sub.notify_to.address,
                    "expires": sub.expires.isoformat(timespec="seconds"),
                    "events": sorted(a.rsplit("/", 1)[-1] for a in sub.actions),
                }
                for sub in self.server.subscriptions.by_id.values()
            )
            info = RequestInfo(now=self.clock(), identity=identity, directory=answers)
            try:
                admin = is_scan_admin(self.config, info)
            except SoapFault:  # the directory could not be asked: not shown (logged there)
                admin = False
            return View(
                repository_state=self.server.repository_state.value,
                subscriptions=subscriptions,
                admin=admin,
                data_dir=self.data_dir,
                store_open=self._store is not None and not self._closed,
                health=self.health.current(),
                version=package_version(),
                stalled_after_seconds=self.config.stalled_after_seconds,
            )

        return self._core_call(view)

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

        commands = self._core_call(apply)
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
        return self._core_call(lambda: answer(self.server, data, self.clock()))

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
        """SendToScanUser's address comes from the directory when there is one (R14)."""
        if self.directory is None:
            return settings
        return dataclasses.replace(settings, directory_mail=self.directory.mail_of)

    # --- commands ------------------------------------------------------------------------------

    def _submit(
        self, commands: Sequence[Command], *, strict: bool, after: Ticket | None = None
    ) -> Ticket:
        """Hand a batch to the writer (module doc).  A batch of engine and delivery hand-offs
        only runs inline when nothing waits before it: those never block."""
        if not commands and (after is None or after.done):
            return Ticket.completed()
        if (after is None or after.done) and self._writer.run_inline(commands):
            return Ticket.completed()
        return self._writer.submit(commands, strict=strict, after=after)

    def _background(self, commands: Sequence[Command]) -> None:
        """Commands not tied to a request (engine reports, ticks, deliveries, reloads): a
        failure is logged and the rest still run (a later record of the same job supersedes
        the lost one, and the events still tell subscribers what happened)."""
        if commands:
            self._submit(commands, strict=False)

    def _require_store(self) -> JobStore:
        if self._store is None:
            raise StoreError("the scan service is not started", temporary=False)
        return self._store

    def _store_apply(self, command: Command) -> None:
        try:
            self._require_store().apply(command)  # type: ignore[arg-type]
        except StoreError as exc:
            self.observer.store_failed(exc.message)
            raise
        self.observer.applied(command)  # durable now: log it, count it, show it

    def _start_processing(self, command: StartProcessing) -> None:
        if self._engine is None:
            log.error("job %s cannot start: no processing engine", command.job.token)
        else:
            self._engine.start(command.job)

    def _stop_processing(self, command: StopProcessing) -> None:
        if self._engine is not None:
            self._engine.stop(command.token)

    def _deliver(self, command: Deliver) -> None:
        self._hub.deliver(command)

    # --- processing engine ------------------------------------------------------------------------

    def _documents_of(self, job: Job) -> list[tuple[Document, Path]]:
        store = self._require_store()
        return [
            (document, store.document_path(job.token, document.document_id))
            for document in job.documents
        ]

    def _engine_report(self, event: ProcessingEvent) -> None:
        """Called in an engine thread.  It returns only once the core has seen the report and
        the commands it caused were carried out: R6's "the first failure without
        ContinueOnError ends the run" is decided by the core alone, and its StopProcessing must
        reach the engine before the engine starts the next filter."""
        now = self.clock()
        ticket = self._core_call(
            lambda: self._submit(self.server.processing(event, now), strict=False)
        )
        if not ticket.wait(ENGINE_REPORT_WAIT_SECONDS):
            log.error(
                "job store did not take a processing report within %.0f s",
                ENGINE_REPORT_WAIT_SECONDS,
            )

    # --- deliveries ---------------------------------------------------------------------------

    def _delivery_report(self, subscription_id: str, ok: bool) -> None:
        if not ok:
            self.observer.event_delivery_failed()
        self._core_soon(lambda: self._background(self.server.delivery_result(subscription_id, ok)))

    def _delivery_give_up(self, subscription_id: str) -> None:
        self._core_soon(lambda: self._background(self.server.end_subscription(subscription_id)))

    # --- ticker -------------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        # In this thread, not on the event loop: the device book's DELETE waits for the disk.
        bound_devices_at = self.clock() + DEVICE_BOUNDS_INTERVAL
        while not self._stop.is_set():
            try:
                now = self.clock()
                if now >= bound_devices_at:
                    bound_devices_at = now + DEVICE_BOUNDS_INTERVAL
                    self.observer.bound_devices(now)
                deadline = self._core_call(self.server.next_deadline)
                wait = TICK_MAX_SECONDS
                if deadline is not None:
                    wait = (deadline - self.clock()).total_seconds()
                wait = min(TICK_MAX_SECONDS, max(TICK_MIN_SECONDS, wait))
                if self._stop.wait(wait):
                    return
                self._core_soon(lambda: self._background(self.server.tick(self.clock())))
            except Exception:  # a bug must not stop job timeouts for the rest of the run
                log.exception("tick failed")
                self._stop.wait(TICK_MAX_SECONDS)
