"""The in-process test transport: drives the core with bytes, carries out its commands against
an in-memory job store, and lets a test play the processing engine and the clock.

No sockets, no threads, no files: a whole job (create, send images, end, process, complete or
cancel) runs in a scenario test in microseconds.  Real sockets are tested elsewhere.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from dsc_core import (
    AbortDocument,
    AnnounceRepositoryState,
    AppendDocument,
    BeginDocument,
    Command,
    CreateJob,
    Deliver,
    DiscardDocuments,
    DropJob,
    FilterFinished,
    FilterStarted,
    FilterState,
    FilterStateReason,
    FinishDocument,
    Job,
    ProcessingEvent,
    ProcessingFinished,
    ProcessingStarted,
    Reply,
    RequestInfo,
    ScanServer,
    ServerConfig,
    StartProcessing,
    StopProcessing,
    UpdateJob,
)
from dsc_core import client as dsc_client


class MemoryStoreError(Exception):
    def __init__(self, temporary: bool) -> None:
        super().__init__("injected store failure")
        self.temporary = temporary


@dataclass
class MemoryStore:
    """Job records and documents in dicts.  ``fail_on`` injects a failure of the next command
    of that type (R4 step 9 tests)."""

    jobs: dict[str, Job] = field(default_factory=dict)
    documents: dict[tuple[str, int], bytes] = field(default_factory=dict)
    open_documents: dict[tuple[str, int], bytearray] = field(default_factory=dict)
    fail_on: type | None = None
    fail_temporary: bool = True

    def apply(self, command: Command) -> None:
        if self.fail_on is not None and isinstance(command, self.fail_on):
            self.fail_on = None
            raise MemoryStoreError(self.fail_temporary)
        if isinstance(command, (CreateJob, UpdateJob)):
            self.jobs[command.job.token] = command.job
        elif isinstance(command, BeginDocument):
            self.open_documents[(command.token, command.document_id)] = bytearray()
        elif isinstance(command, AppendDocument):
            self.open_documents[(command.token, command.document_id)] += command.data
        elif isinstance(command, FinishDocument):
            data = self.open_documents.pop((command.token, command.document_id))
            assert len(data) == command.size, "FinishDocument size mismatch"
            self.documents[(command.token, command.document_id)] = bytes(data)
        elif isinstance(command, AbortDocument):
            # Like the real store: an unacknowledged document goes, finished or not.
            self.open_documents.pop((command.token, command.document_id), None)
            self.documents.pop((command.token, command.document_id), None)
        elif isinstance(command, DiscardDocuments):
            for key in [k for k in self.documents if k[0] == command.token]:
                del self.documents[key]
        elif isinstance(command, DropJob):
            self.jobs.pop(command.token, None)
            for key in [k for k in self.documents if k[0] == command.token]:
                del self.documents[key]


class InProcessTransport:
    """A scan server with an in-memory store, a manual clock and a hand-played engine."""

    def __init__(
        self, config: ServerConfig | None = None, *, start: datetime | None = None
    ) -> None:
        counter = itertools.count(1)
        self.clock = start or datetime(2026, 11, 21, 9, 0, tzinfo=timezone(timedelta(hours=1)))
        self.server = ScanServer(
            config or ServerConfig(), new_id=lambda: str(uuid.UUID(int=next(counter)))
        )
        self.store = MemoryStore()
        self.started: list[Job] = []  # StartProcessing commands the engine received
        self.stopped: list[str] = []  # StopProcessing tokens
        self.deliveries: list[Deliver] = []
        self.commands: list[Command] = []  # every command, in order
        self._message = itertools.count(1)

    # --- the HTTP side ----------------------------------------------------------------------

    def post(
        self,
        body: bytes | Iterable[bytes],
        *,
        content_type: str = dsc_client.SOAP_XML,
        identity: str | None = None,
        chunk_size: int | None = None,
        path: str = "/ScanServer",
        client_address: str | None = None,
    ) -> Reply:
        """One request through a fresh exchange; commands are carried out like a binding does."""
        chunks: Iterable[bytes]
        if isinstance(body, bytes):
            if chunk_size:
                chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
            else:
                chunks = [body]
        else:
            chunks = body
        exchange = self.server.open_exchange(
            RequestInfo(
                now=self.clock,
                content_type=content_type,
                identity=identity,
                path=path,
                client_address=client_address,
            )
        )
        for chunk in chunks:
            try:
                self._run(exchange.feed(chunk))
            except MemoryStoreError as exc:
                # The exchange is over: the rest of the body is not read (R4 step 9).
                outcome = exchange.store_failed(temporary=exc.temporary)
                self._run(outcome.commands)
                return outcome.reply
        outcome = exchange.end()
        try:
            self._run(outcome.commands)
        except MemoryStoreError as exc:
            outcome = exchange.store_failed(temporary=exc.temporary)
            self._run(outcome.commands)
        return outcome.reply

    def call(self, action: str, payload: object, **kw: object) -> dsc_client.Response:
        """Build, post and parse; a fault raises ``dsc_client.ClientFault``."""
        body = self.envelope(action, payload)
        reply = self.post(body, **kw)  # type: ignore[arg-type]
        return dsc_client.parse_response(reply.body, reply.status)

    def envelope(self, action: str, payload: object) -> bytes:
        return dsc_client.envelope(
            action,
            payload,  # type: ignore[arg-type]
            message_id=f"urn:uuid:{uuid.UUID(int=2**64 + next(self._message))}",
        )

    def _run(self, commands: Iterable[Command]) -> None:
        for command in commands:
            self.commands.append(command)
            if isinstance(command, StartProcessing):
                self.started.append(command.job)
            elif isinstance(command, StopProcessing):
                self.stopped.append(command.token)
            elif isinstance(command, Deliver):
                self.deliveries.append(command)
            elif isinstance(command, AnnounceRepositoryState):
                self.deliveries.extend(command.events)  # one server: nothing to record
            else:
                self.store.apply(command)

    # --- the processing engine and the clock -------------------------------------------------

    def engine(self, event: ProcessingEvent) -> None:
        self._run(self.server.processing(event, self.clock))

    def process(
        self, token: str, outcomes: Iterable[tuple[FilterState, tuple[FilterStateReason, ...]]] = ()
    ) -> None:
        """Play the engine for a whole job: every runnable filter ends as ``outcomes`` says
        (default: all succeed)."""
        job = self.server.jobs.get(token)
        assert job is not None
        results = list(outcomes)
        self.engine(ProcessingStarted(token))
        for index, status in enumerate(job.filters):
            if status.instructions is None:
                continue
            state, reasons = results.pop(0) if results else (FilterState.COMPLETED_SUCCESSFULLY, ())
            self.engine(FilterStarted(token, index))
            self.engine(FilterFinished(token, index, state, reasons))
        self.engine(ProcessingFinished(token))

    def advance(self, seconds: float) -> None:
        self.clock += timedelta(seconds=seconds)
        self._run(self.server.tick(self.clock))
