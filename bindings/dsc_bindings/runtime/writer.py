"""Carries out the core's commands off the event loop, in the order the core gave them.

The core runs on one thread (the event loop of the async binding, or under the service's core
lock); nothing it hands out may block that thread.  :class:`CommandWriter` takes each ordered
list of commands (a *batch*) and returns a :class:`Ticket` at once; the caller waits for the
ticket (a worker thread in the blocking binding, an awaited event in the async one) and only
then sends its reply, so R4 step 9 holds unchanged: a reply goes out after its commands are
durable, or it becomes the fault of a failed one.

Two lanes, because they have different ordering needs:

- **Records** (CreateJob/UpdateJob/DropJob/DiscardDocuments) and everything after the first of
  them in a batch run on ONE writer thread, batch after batch in submission order, so a later
  UpdateJob of a job can never be overwritten by an earlier one, and engine and delivery
  commands are released only after the records before them are durable.
- **Document bytes** (Begin/Append/Finish/AbortDocument) at the head of a batch concern one
  upload of one exchange only.  They run at once on a small thread pool, so uploads of
  different jobs are written (and fsynced) side by side and do not wait behind a slow SQLite
  write.  A batch with record commands behind them keeps its place in the record lane: the
  writer thread waits for the batch's document part before it runs the rest.  One exchange
  submits its next batch only after the previous one completed (or names it as ``after``), so
  an exchange's own commands never overtake each other.

Known limit: between the core producing a batch and the writer carrying it out, other requests
may already see (and build on) its change; if the batch then fails, the core undoes the change
(R4 step 9) although a later exchange's record of the same job may already be queued.  Under the
old single lock this could not happen; it needs a failing store and two requests on one job at
that moment.

Store commands that fail stop a *strict* batch there (the ticket says which command and why; the
remaining commands are skipped, as the core expects); in a non-strict batch (engine reports,
ticks, undo commands) the failure is logged and the rest still runs, but for the
DiscardDocuments of a job whose record write was refused as changed by another instance
(JobChanged): that instance may be running the job now, on those documents.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from dsc_bindings.runtime.ticket import Ticket
from dsc_bindings.store.errors import JobChanged
from dsc_bindings.store.interface import EventsWrite, VersionedWrite
from dsc_core import (
    AbortDocument,
    AnnounceRepositoryState,
    AppendDocument,
    BeginDocument,
    Command,
    Deliver,
    DiscardDocuments,
    FinishDocument,
    StartProcessing,
    StopProcessing,
)

__all__ = ["DOCUMENT_COMMANDS", "CommandWriter", "Routes", "Writable"]

log = logging.getLogger("dsc.writer")

#: What the writer carries out: the core's commands, and record commands with the row version
#: they replace and notifications in one transaction (a shared store, runtime/catchup.py).
Writable = Command | VersionedWrite | EventsWrite

DOCUMENT_COMMANDS = (BeginDocument, AppendDocument, FinishDocument, AbortDocument)
#: Document writes running at once (each one is one upload's chunk or fsync).
DOCUMENT_WORKERS = 8


class Routes:
    """Where commands go.  ``store`` is looked up at each command (tests may replace
    ``apply``); the others must not block (the engine queues, the delivery hub queues)."""

    def __init__(
        self,
        store: Callable[[Writable], None],
        start_processing: Callable[[StartProcessing], None],
        stop_processing: Callable[[StopProcessing], None],
        deliver: Callable[[Deliver], None],
    ) -> None:
        self.store = store
        self.start_processing = start_processing
        self.stop_processing = stop_processing
        self.deliver = deliver

    def run(self, command: Writable) -> None:
        if isinstance(command, Deliver):
            self.deliver(command)
        elif isinstance(command, AnnounceRepositoryState):
            # One server records no announcement: its events go to the hub like any other.  A
            # shared store's reach the writer inside an Announcement (runtime/catchup.py); the
            # record lane runs both (never ``run_inline``: the service stamps it first).
            for event in command.events:
                self.deliver(event)
        elif isinstance(command, StartProcessing):
            self.start_processing(command)
        elif isinstance(command, StopProcessing):
            self.stop_processing(command)
        else:
            self.store(command)


class _Batch:
    __slots__ = ("commands", "documents", "strict", "ticket")

    def __init__(
        self, commands: Sequence[Writable], strict: bool, documents: Ticket | None
    ) -> None:
        self.commands = commands
        self.strict = strict
        #: The document part of this batch, running on the pool (None: there is none).
        self.documents = documents
        self.ticket = Ticket()


class CommandWriter:
    """The record lane (one thread) and the document lane (a pool); see the module doc."""

    def __init__(self, routes: Routes, *, document_workers: int = DOCUMENT_WORKERS) -> None:
        self._routes = routes
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(document_workers, thread_name_prefix="dsc-documents")
        #: Other blocking calls (directory lookups): their own threads, so that a slow LDAP
        #: server never holds up image writes.
        self._offload_pool = ThreadPoolExecutor(4, thread_name_prefix="dsc-offload")
        self._thread = threading.Thread(target=self._run, name="dsc-writer", daemon=True)
        self._started = False
        self._closed = False
        #: Batches submitted to the record lane and not yet completed.
        self._backlog = 0
        self._backlog_lock = threading.Lock()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    @property
    def idle(self) -> bool:
        """Nothing waits in the record lane: a batch without store commands may run inline."""
        return self._backlog == 0

    def submit(
        self, commands: Sequence[Writable], *, strict: bool, after: Ticket | None = None
    ) -> Ticket:
        """Queue ``commands`` (in order); the ticket completes when all ran (or one failed a
        strict batch).  ``after``: an earlier ticket of the same exchange that must complete
        first (it may have been abandoned by a cancelled waiter)."""
        if not commands and (after is None or after.done):
            return Ticket.completed()
        split = 0
        while split < len(commands) and isinstance(commands[split], DOCUMENT_COMMANDS):
            split += 1
        documents: Ticket | None = None
        if split:
            documents = Ticket()
            head = commands[:split]
            if after is not None and not after.done:
                # Rare (a waiter was cancelled): wait for the earlier batch in a thread of its
                # own, so that pool workers never block on the record lane.
                threading.Thread(
                    target=self._documents,
                    args=(head, strict, after, documents),
                    name="dsc-documents-after",
                    daemon=True,
                ).start()
            else:
                try:
                    self._pool.submit(self._documents, head, strict, None, documents)
                except RuntimeError:  # the pool is shut down (closing): run here
                    self._documents(head, strict, None, documents)
            if split == len(commands):
                return documents
        elif after is not None and not after.done:
            # Only record commands, but the exchange's document part still runs: the record
            # lane waits for it like for a batch's own document part.
            documents = after
        batch = _Batch(commands[split:], strict, documents)
        if self._closed or not self._started:
            self._execute(batch)  # after close (shutdown's last reports) or before start
            return batch.ticket
        with self._backlog_lock:
            self._backlog += 1
        self._queue.put(batch)
        return batch.ticket

    def offload(self, function: Callable[[], object]) -> Ticket:
        """Run a blocking call that is not a command (a directory lookup, R14) on the pool;
        the ticket carries its result in ``value`` (or its exception in ``error``)."""
        ticket = Ticket()

        def run() -> None:
            try:
                ticket.value = function()
            except Exception as exc:
                ticket._complete(exc)
            else:
                ticket._complete(None)

        try:
            self._offload_pool.submit(run)
        except RuntimeError:  # closing: run here
            run()
        return ticket

    def run_inline(self, commands: Sequence[Writable]) -> bool:
        """Run a batch that has no store commands (engine and delivery hand-offs only) in the
        calling thread, if nothing waits in the record lane (so order is kept).  Returns False
        when it must be submitted instead."""
        if not self.idle or any(
            not isinstance(c, (Deliver, StartProcessing, StopProcessing)) for c in commands
        ):
            return False
        for command in commands:
            try:
                self._routes.run(command)
            except Exception:
                log.exception("%s failed", type(command).__name__)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop the thread and the pool.  Later submits run inline."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            self._queue.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the command writer did not finish in %.1f s", timeout)
        self._pool.shutdown(wait=True)
        self._offload_pool.shutdown(wait=True)

    # --- the lanes ------------------------------------------------------------------------------

    def _documents(
        self, commands: Sequence[Writable], strict: bool, after: Ticket | None, ticket: Ticket
    ) -> None:
        if after is not None:
            after.wait()
        ticket._complete(self._apply(commands, strict))

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                self._execute(batch)
            finally:
                with self._backlog_lock:
                    self._backlog -= 1

    def _execute(self, batch: _Batch) -> None:
        error: BaseException | None = None
        if batch.documents is not None:
            batch.documents.wait()
            error = batch.documents.error
        if error is None or not batch.strict:
            changed: set[str] = set()
            error = self._apply(batch.commands, batch.strict, changed) or error
            batch.ticket.refused = frozenset(changed)
        batch.ticket._complete(error if batch.strict else None)

    def _apply(
        self, commands: Sequence[Writable], strict: bool, changed: set[str] | None = None
    ) -> BaseException | None:
        """Run ``commands``; ``changed`` gets the jobs whose record write another instance's
        change refused in this batch (non-strict: the rest still runs)."""
        if changed is None:
            changed = set()
        for command in commands:
            if isinstance(command, DiscardDocuments) and command.token in changed:
                # The job's end was not recorded here: the instance that changed it (took it
                # over when this one's lease lapsed, or ended it) keeps or discards its
                # documents.  Deleted here, its rescued run found a document gone and the
                # job Aborted (issue 18: filters run once, wherever).
                log.info(
                    "job %s: its documents are kept for the instance that changed it", command.token
                )
                continue
            try:
                self._routes.run(command)
            except Exception as exc:
                if strict:
                    return exc
                what = command.command if isinstance(command, VersionedWrite) else command
                if isinstance(exc, JobChanged):
                    # Every instance ticks: the R6 timeout of one job is decided by all, the
                    # first write stands and the others' are refused (issue 18).
                    log.info("%s not recorded: %s", type(what).__name__, exc.message)
                    changed.add(exc.token)
                else:
                    log.error("job store: %s failed: %s", type(what).__name__, exc)
        return None
