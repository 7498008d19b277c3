"""The runtime glue around the one core: job store, processing engine, clock and event delivery.

Both HTTP bindings (:mod:`.http_async`, :mod:`.http_blocking`) talk to a :class:`ScanService`
only; they never touch the core.  The service owns:

- the :class:`~dsc_core.ScanServer` and ONE lock around it.  The core is not thread-safe, and
  job-record writes must reach the store in the order the core produced them (a later
  UpdateJob must never be overwritten by an earlier one), so every core call *and the execution
  of the commands it returns* happens under that lock.  The one exception: the AppendDocument
  commands returned by ``Exchange.feed`` are written outside it, so that uploads of different
  jobs do not serialize on the disk (R8: image bytes stream straight to the spool).
- the :class:`~dsc_bindings.store.JobStore` (commands are carried out in order before the reply
  is sent; a failure becomes the R4 step 9 fault through ``Exchange.store_failed``);
- the :class:`~dsc_bindings.filters.ProcessingEngine` (StartProcessing / StopProcessing; its
  reports go back into the core);
- a ticker thread (``ScanServer.tick`` at ``next_deadline()``, at least once a second: R6 job
  timeouts, R7 subscription expiry);
- a delivery thread (R7 notifications: one-way SOAP POSTs, results reported back so that
  repeated failures end the subscription).

Usage::

    service = ScanService(ServerConfig(), Path("data"), FilterSettings.embedded_default("data"))
    service.start()
    request = service.open_request("application/soap+xml", None, "/ScanServer")
    request.feed(body)            # any number of times, chunks of any size
    reply = request.finish()      # dsc_core.Reply: send it
    ...
    service.shutdown()
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import queue
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from dsc_core import (
    AppendDocument,
    Command,
    Deliver,
    Document,
    Exchange,
    Job,
    ProcessingEvent,
    Reply,
    RequestInfo,
    ScanServer,
    ServerConfig,
    StartProcessing,
    StopProcessing,
)

from .filters.engine import ProcessingEngine
from .filters.settings import FilterSettings
from .store import JobStore, StoreError

if TYPE_CHECKING:
    from .directory import Directory

__all__ = [
    "DELIVERY_TIMEOUT",
    "SHUTDOWN_DELIVERY_SECONDS",
    "ScanService",
    "ServiceRequest",
    "local_now",
]

log = logging.getLogger("dsc.service")

#: Seconds one notification POST may take (connect + send + answer).
DELIVERY_TIMEOUT = 10.0
#: At shutdown, SubscriptionEnd (SourceShuttingDown, R7) deliveries get at most this long.
SHUTDOWN_DELIVERY_SECONDS = 2.0
#: The ticker wakes at least this often, and never more often than the minimum below (the core
#: may report a deadline in the past while a job is receiving an image: the R6 timeout does not
#: run during an upload, so the deadline stays put until the upload ends).
TICK_MAX_SECONDS = 1.0
TICK_MIN_SECONDS = 0.05


def local_now() -> datetime:
    """Aware local time (R6: times carry an explicit UTC offset)."""
    return datetime.now().astimezone()


class ServiceRequest:
    """One HTTP request on its way through the core: ``feed`` the body, then ``finish``.

    Used by one connection at a time (not shared between threads).  ``feed`` and ``finish``
    block on the disk, so async bindings run them in a worker thread.
    """

    def __init__(self, service: ScanService, exchange: Exchange) -> None:
        self._service = service
        self._exchange = exchange
        #: The R4 step 9 fault once a store command of this exchange failed.
        self._failed: Reply | None = None
        self._reply: Reply | None = None
        self._done = False

    def feed(self, data: bytes) -> None:
        """Pass a piece of the body to the core and write the image bytes it returns.

        After a store failure the rest of the body is discarded: the answer is already decided
        (the fault of R4 step 9) and ``finish`` returns it.
        """
        if self._done or self._failed is not None or not data:
            return
        service = self._service
        with service._lock:
            commands = self._exchange.feed(data)
            position = self._run_locked(commands, 0)
        # Image chunks leave the lock: another job's upload or status change need not wait for
        # this disk write.  One exchange's commands still run in the order the core gave them.
        while position is not None and position < len(commands):
            position = self._run_appends(commands, position)
            if position is not None and position < len(commands):
                with service._lock:
                    position = self._run_locked(commands, position)

    def finish(self) -> Reply:
        """End the request: the core's reply, after its commands were carried out in order
        (so an acknowledged image is durable), or the R4 step 9 fault if one failed."""
        if self._reply is not None:
            return self._reply
        if self._failed is not None:
            self._done = True
            self._reply = self._failed
            return self._failed
        service = self._service
        answers = None
        if service.directory is not None:
            # R14: what the request needs from the directory is asked here, in the worker
            # thread that carries out the request and outside the lock (LDAP may be slow).
            with service._lock:
                needs = self._exchange.lookups()
            if needs:
                answers = service.directory.answer(needs)
        with service._lock:
            self._done = True
            outcome = self._exchange.end(self._service.clock(), directory=answers)
            if outcome.fault is not None:
                # R12: every limit exceeded (and every other refusal) is logged.
                log.info(
                    "request to %s answered with HTTP %d, %s",
                    self._exchange.info.path,
                    outcome.reply.status,
                    outcome.fault,
                )
            try:
                service._carry_out(outcome.commands, strict=True)
                reply = outcome.reply
            except Exception as exc:
                reply = self._store_failed_locked(exc)
        self._reply = reply
        return reply

    def abort(self) -> None:
        """The connection was lost before ``finish``: drop any upload in progress, so that no
        ``.part`` debris remains and the device may send the same DocumentId again."""
        if self._done:
            return
        self._done = True
        if self._failed is not None:
            return  # store_failed already ended the exchange and dropped the upload
        with self._service._lock:
            self._service._carry_out(self._exchange.abort(), strict=False)

    # --- internals ------------------------------------------------------------------------------

    def _run_locked(self, commands: Sequence[Command], start: int) -> int | None:
        """Run commands from ``start`` up to the next AppendDocument (lock held).  Returns
        where to continue, or None when a store command failed (the fault is then decided)."""
        index = start
        try:
            while index < len(commands) and not isinstance(commands[index], AppendDocument):
                self._service._carry_out((commands[index],), strict=True)
                index += 1
        except Exception as exc:
            self._failed = self._store_failed_locked(exc)
            return None
        return index

    def _run_appends(self, commands: Sequence[Command], start: int) -> int | None:
        """Write consecutive AppendDocument commands from ``start`` (lock NOT held)."""
        index = start
        store = self._service._require_store()
        try:
            while index < len(commands):
                command = commands[index]
                if not isinstance(command, AppendDocument):
                    break
                store.apply(command)
                index += 1
        except Exception as exc:
            with self._service._lock:
                self._failed = self._store_failed_locked(exc)
            return None
        return index

    def _store_failed_locked(self, exc: Exception) -> Reply:
        """R4 step 9: tell the core, carry out its undo commands, answer with its fault."""
        temporary = isinstance(exc, StoreError) and exc.temporary
        if isinstance(exc, StoreError):
            log.error(
                "job store failed (%s): %s", "temporary" if temporary else "permanent", exc.message
            )
        else:
            log.exception("job store raised an unexpected error; answering InternalError")
        outcome = self._exchange.store_failed(temporary=temporary)
        self._service._carry_out(outcome.commands, strict=False)
        return outcome.reply


class ScanService:
    """The scan server at run time: core, store, engine, ticker and deliveries (see module)."""

    def __init__(
        self,
        config: ServerConfig,
        data_dir: Path,
        filter_settings: FilterSettings,
        *,
        clock: Callable[[], datetime] = local_now,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
        delivery_ssl_context: ssl.SSLContext | None = None,
        max_processing_jobs: int = 2,
        directory: Directory | None = None,
    ) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        #: The user directory (R14), or None: the core's tables are used.
        self.directory = directory
        self.filter_settings = self._with_directory(filter_settings)
        self.clock = clock
        self.server = ScanServer(config, new_id=new_id)
        self._delivery_ssl_context = delivery_ssl_context
        self._max_processing_jobs = max_processing_jobs
        self._lock = threading.Lock()
        self._store: JobStore | None = None
        self._engine: ProcessingEngine | None = None
        self._deliveries: queue.Queue[Deliver | None] = queue.Queue()
        #: time.monotonic() after which queued deliveries are dropped (set at shutdown).
        self._delivery_deadline: float | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._closed = False

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Open the store, restore the jobs it kept, start the engine, ticker and deliveries."""
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
            jobs = store.load_jobs()
            self._engine = ProcessingEngine(
                self.filter_settings,
                self._documents_of,
                self._engine_report,
                max_jobs=self._max_processing_jobs,
            )
            with self._lock:
                commands = self.server.restore(jobs, self.clock())
                self._carry_out(commands, strict=False)
        except BaseException:
            log.exception("starting the scan service failed")
            if self._engine is not None:
                self._engine.close(1.0)
            store.close()
            raise
        active = sum(1 for job in jobs if job.is_active)
        log.info(
            "restored %d job(s): %d active, %d in the history",
            len(jobs),
            active,
            len(jobs) - active,
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
        for target, name in (
            (self._tick_loop, "dsc-ticker"),
            (self._delivery_loop, "dsc-delivery"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop: repository Stopped and SubscriptionEnd SourceShuttingDown (R7; deliveries get at
        most ~2 s), the engine (its last reports still reach the store), threads, the store.

        Stop the HTTP bindings first: requests arriving afterwards get the core's answer for a
        Stopped repository, or a store fault once the store is closed.
        """
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        began = time.monotonic()
        self._delivery_deadline = began + min(SHUTDOWN_DELIVERY_SECONDS, max(0.0, timeout))
        with self._lock:
            self._carry_out(self.server.shutdown(self.clock()), strict=False)
        if self._engine is not None:
            self._engine.close(max(0.0, timeout - (time.monotonic() - began)))
        self._stop.set()
        self._deliveries.put(None)
        for thread in self._threads:
            thread.join(
                max(0.1, self._delivery_deadline + 0.5 - time.monotonic())
                if thread.name == "dsc-delivery"
                else 2.0
            )
            if thread.is_alive():
                log.warning("thread %s did not stop in time", thread.name)
        with self._lock:
            if self._store is not None:
                self._store.close()
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

    # --- requests -------------------------------------------------------------------------------

    def open_request(
        self, content_type: str | None, identity: str | None, path: str
    ) -> ServiceRequest:
        """Begin one HTTP request.  ``identity`` is the authenticated TLS client identity
        (R10), None without one; ``path`` is informational (R1)."""
        with self._lock:
            exchange = self.server.open_exchange(
                RequestInfo(
                    now=self.clock(), content_type=content_type, identity=identity, path=path
                )
            )
        return ServiceRequest(self, exchange)

    def reconfigure(
        self, config: ServerConfig, filter_settings: FilterSettings | None = None
    ) -> None:
        """Apply a reloaded configuration (SIGHUP): the core's settings and its
        RepositoryElementsChangeEvent (R7), and the filters' settings for jobs started next."""
        with self._lock:
            self.config = config
            commands = self.server.reconfigure(config, self.clock())
            if filter_settings is not None:
                filter_settings = self._with_directory(filter_settings)
                self.filter_settings = filter_settings
                if self._engine is not None:
                    self._engine.set_settings(filter_settings)
            self._carry_out(commands, strict=False)
        log.info("configuration reloaded")

    def answer_datagram(
        self, data: bytes, answer: Callable[[ScanServer, bytes, datetime], bytes | None]
    ) -> bytes | None:
        """Run a UDP discovery datagram through the core (dsc_core.discovery), under the lock."""
        with self._lock:
            return answer(self.server, data, self.clock())

    def handle(
        self,
        body: bytes,
        *,
        content_type: str | None = None,
        identity: str | None = None,
        path: str = "/",
    ) -> Reply:
        """A whole request in one call (tools and tests)."""
        request = self.open_request(content_type, identity, path)
        request.feed(body)
        return request.finish()

    def _with_directory(self, settings: FilterSettings) -> FilterSettings:
        """SendToScanUser's address comes from the directory when there is one (R14)."""
        if self.directory is None:
            return settings
        return dataclasses.replace(settings, directory_mail=self.directory.mail_of)

    # --- command routing (lock held) -------------------------------------------------------------

    def _require_store(self) -> JobStore:
        if self._store is None:
            raise StoreError("the scan service is not started", temporary=False)
        return self._store

    def _carry_out(self, commands: Iterable[Command], *, strict: bool) -> None:
        """Route commands in order: store -> JobStore.apply, StartProcessing/StopProcessing ->
        engine, Deliver -> delivery queue.  ``strict``: a store failure propagates (an exchange
        turns it into the R4 step 9 fault and stops there); otherwise it is logged and the
        remaining commands still run (a later record of the same job supersedes the lost one,
        and the events still tell subscribers what happened)."""
        for command in commands:
            if isinstance(command, Deliver):
                if (
                    self._delivery_deadline is not None
                    and time.monotonic() > self._delivery_deadline
                ):
                    log.warning("dropping notification to %s: shutting down", command.address)
                    continue
                self._deliveries.put(command)
            elif isinstance(command, StartProcessing):
                if self._engine is None:
                    log.error("job %s cannot start: no processing engine", command.job.token)
                else:
                    self._engine.start(command.job)
            elif isinstance(command, StopProcessing):
                if self._engine is not None:
                    self._engine.stop(command.token)
            else:
                try:
                    self._require_store().apply(command)
                except Exception as exc:
                    if strict:
                        raise
                    log.error("job store: %s failed: %s", type(command).__name__, exc)

    # --- processing engine ------------------------------------------------------------------------

    def _documents_of(self, job: Job) -> list[tuple[Document, Path]]:
        store = self._require_store()
        return [
            (document, store.document_path(job.token, document.document_id))
            for document in job.documents
        ]

    def _engine_report(self, event: ProcessingEvent) -> None:
        with self._lock:
            self._carry_out(self.server.processing(event, self.clock()), strict=False)

    # --- ticker -------------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    deadline = self.server.next_deadline()
                wait = TICK_MAX_SECONDS
                if deadline is not None:
                    wait = (deadline - self.clock()).total_seconds()
                wait = min(TICK_MAX_SECONDS, max(TICK_MIN_SECONDS, wait))
                if self._stop.wait(wait):
                    return
                with self._lock:
                    self._carry_out(self.server.tick(self.clock()), strict=False)
            except Exception:  # a bug must not stop job timeouts for the rest of the run
                log.exception("tick failed")
                self._stop.wait(TICK_MAX_SECONDS)

    # --- deliveries ----------------------------------------------------------------------------

    def _delivery_loop(self) -> None:
        """One thread, so one subscriber's notifications arrive in the order they were raised."""
        while True:
            command = self._deliveries.get()
            if command is None:
                return
            timeout = DELIVERY_TIMEOUT
            if self._delivery_deadline is not None:
                timeout = min(timeout, self._delivery_deadline - time.monotonic())
                if timeout <= 0:
                    log.warning("dropping notification to %s: shutting down", command.address)
                    continue
            ok = self._post(command, timeout)
            if command.final:
                continue  # SubscriptionEnd: nothing to report
            try:
                with self._lock:
                    self._carry_out(
                        self.server.delivery_result(command.subscription_id, ok), strict=False
                    )
            except Exception:
                log.exception("reporting a delivery result failed")

    def _post(self, command: Deliver, timeout: float) -> bool:
        """One notification: HTTP(S) POST, 2xx = delivered (R7)."""
        try:
            url = urllib.parse.urlsplit(command.address)
            if url.scheme not in ("http", "https") or not url.hostname:
                log.error("cannot deliver to %r: not an http(s) address", command.address)
                return False
            connection: http.client.HTTPConnection
            if url.scheme == "https":
                context = self._delivery_ssl_context or ssl.create_default_context()
                connection = http.client.HTTPSConnection(
                    url.hostname, url.port, timeout=timeout, context=context
                )
            else:
                connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
            target = url.path or "/"
            if url.query:
                target += "?" + url.query
            try:
                connection.request(
                    "POST",
                    target,
                    body=command.body,
                    headers={
                        "Content-Type": command.content_type,
                        "Content-Length": str(len(command.body)),
                        "User-Agent": "dsc-server",
                    },
                )
                response = connection.getresponse()
                response.read()
                status = response.status
            finally:
                connection.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            log.warning("notification to %s failed: %s", command.address, exc)
            return False
        if 200 <= status < 300:
            return True
        log.warning("notification to %s answered HTTP %d", command.address, status)
        return False
