"""The one object holding server state, and the exchange that answers one HTTP request.

Usage (the whole contract; see README "Embedding the core")::

    server = ScanServer(ServerConfig(), new_id=new_guid)  # the binding supplies ids
    exchange = server.open_exchange(RequestInfo(now=now, content_type=ctype))
    for chunk in body_chunks:
        run(exchange.feed(chunk))          # image chunks leave as store commands
    outcome = exchange.end(now)            # now: when the body ended (optional)
    try:
        run(outcome.commands)              # in order, before sending the reply
        send(outcome.reply)
    except StoreFailure as e:
        failed = exchange.store_failed(temporary=e.temporary)   # R4 step 9
        run(failed.commands); send(failed.reply)

No I/O happens here: time comes in as ``now``, identifiers from ``new_id``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

from lxml import etree

from . import faults, names, soap
from .commands import (
    AbortDocument,
    AppendDocument,
    BeginDocument,
    Command,
    CreateJob,
    DiscardDocuments,
    DropJob,
    FilterFinished,
    FilterStarted,
    ProcessingEvent,
    ProcessingFinished,
    ProcessingStarted,
    StartProcessing,
    StopProcessing,
    UpdateJob,
)
from .config import ServerConfig
from .content_type import parse_content_type
from .eventing import Subscriptions
from .exchange_types import Outcome, Reply, RequestInfo, UsageError
from .jobs import JobTable
from .jobstate import JobInput, Refused, transition
from .jobxml import end_state, job_status
from .mime import MultipartError, MultipartReader, PartData, PartEnd, PartStart
from .model import (
    FilterState,
    FilterStateReason,
    FilterStatus,
    Job,
    JobState,
    JobStateReason,
    RepositoryState,
)
from .xmlread import Element, check_tree, parse_xml

SOAP_CONTENT_TYPE = "application/soap+xml; charset=utf-8"


@dataclass
class OpResult:
    """What an operation produced: the response payload and the commands to carry out."""

    action: str
    payload: Element
    nsmap: dict[str, str] = field(default_factory=dict)
    commands: list[Command] = field(default_factory=list)
    #: Undo the operation's state change if a store command fails (R4 step 9).
    undo: Callable[[], list[Command]] | None = None


@dataclass
class Call:
    """One request being handled: what operations see."""

    server: ScanServer
    envelope: soap.Envelope
    info: RequestInfo
    #: For SendImage: the attachment as received (None when there was none).
    attachment: Attachment | None = None

    @property
    def now(self) -> datetime:
        return self.info.now

    @property
    def config(self) -> ServerConfig:
        return self.server.config


@dataclass
class Attachment:
    """A SendImage attachment streaming through the exchange (R8)."""

    token: str
    document_id: int
    format: str
    href: str
    begun: bool = False
    complete: bool = False
    size: int = 0


Handler = Callable[[Call], OpResult]


class ScanServer:
    """Configuration, job table, subscriptions and repository state of one scan server."""

    def __init__(self, config: ServerConfig | None = None, *, new_id: Callable[[], str]) -> None:
        from . import bdsrr, dsp, metadata  # operation tables, imported here to avoid cycles

        self.config = config or ServerConfig()
        self.new_id = new_id
        self.jobs = JobTable(self.config.history_size)
        self.subscriptions = Subscriptions(self.config, new_id)
        self.stopped = False
        self._announced_state = RepositoryState.IDLE
        self.handlers: dict[str, tuple[str, Handler]] = {}
        for module in (dsp, bdsrr, metadata):
            self.handlers.update(module.HANDLERS)

    # --- requests -----------------------------------------------------------------------------

    def open_exchange(self, info: RequestInfo) -> Exchange:
        return Exchange(self, info)

    def handle(self, body: bytes, info: RequestInfo) -> Outcome:
        """One request whose body is all here: feed and end in one call."""
        exchange = self.open_exchange(info)
        early = exchange.feed(body)
        outcome = exchange.end()
        return replace(outcome, commands=tuple(early) + outcome.commands)

    # --- state ---------------------------------------------------------------------------------

    @property
    def repository_state(self) -> RepositoryState:
        if self.stopped:
            return RepositoryState.STOPPED
        if self.jobs.processing_count():
            return RepositoryState.PROCESSING
        return RepositoryState.IDLE

    def message_id(self) -> str:
        return f"urn:uuid:{self.new_id()}"

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
        if not new_state.is_active:
            updates["completed"] = now
            updates["filters"] = _cancel_unfinished(updates.get("filters", job.filters))  # type: ignore[arg-type]
        new = job.evolve(**updates)
        return new, self.record(job, new, now)

    def record(self, old: Job | None, new: Job, now: datetime) -> list[Command]:
        """Put ``new`` in the table; the store, engine and event commands this causes."""
        commands: list[Command] = [CreateJob(new) if old is None else UpdateJob(new)]
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
            if new.reasons == (JobStateReason.TIMED_OUT,):
                commands.append(DiscardDocuments(new.token))  # R6: its images are discarded
        commands.extend(DropJob(token) for token in dropped)
        commands.extend(self._job_events(old, new, now))
        commands.extend(self._repository_events(now))
        return commands

    def _job_events(self, old: Job | None, new: Job, now: datetime) -> list[Command]:
        if old is not None and _status_view(old) == _status_view(new):
            return []
        out: list[Command] = []
        for ns, action in (
            (names.DSP, names.Action.DSP_JOB_STATUS_EVENT),
            (names.DSC, names.Action.DSC_JOB_STATUS_EVENT),
        ):
            body = etree.Element(f"{{{ns}}}PostScanJobStatusEvent")
            job_status(body, ns, new)
            out.extend(self.subscriptions.notify(action, body, now))
        if not new.is_active and (old is None or old.is_active):
            for ns, action in (
                (names.DSP, names.Action.DSP_JOB_END_STATE_EVENT),
                (names.DSC, names.Action.DSC_JOB_END_STATE_EVENT),
            ):
                body = etree.Element(f"{{{ns}}}PostScanJobEndStateEvent")
                end_state(body, ns, new)
                out.extend(self.subscriptions.notify(action, body, now))
        return out

    def _repository_events(self, now: datetime) -> list[Command]:
        state = self.repository_state
        if state is self._announced_state:
            return []
        self._announced_state = state
        body = etree.Element(f"{{{names.DSC}}}RepositoryStatusSummaryEvent")
        summary = etree.SubElement(body, f"{{{names.DSC}}}StatusSummary")
        etree.SubElement(summary, f"{{{names.DSC}}}RepositoryState").text = state.value
        reasons = etree.SubElement(summary, f"{{{names.DSC}}}RepositoryStateReasons")
        etree.SubElement(reasons, f"{{{names.DSC}}}RepositoryStateReason").text = "None"
        return list(self.subscriptions.notify(names.Action.DSC_STATUS_SUMMARY_EVENT, body, now))

    def restore_job(self, old: Job | None, new: Job, now: datetime) -> list[Command]:
        """Undo a change whose store command failed: put ``old`` back (or forget ``new``)."""
        if old is None:
            self.jobs.remove(new.token)
        else:
            self.jobs.put(old)
        self._announced_state = self.repository_state
        return []

    # --- the processing engine ------------------------------------------------------------

    def processing(self, event: ProcessingEvent, now: datetime) -> list[Command]:
        """An input from the processing engine.  Inputs for unknown or finished jobs are stale
        (the job was canceled meanwhile) and ignored."""
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
                return self._filter_finished(job, event, now)
            if isinstance(event, ProcessingFinished):
                return self._finish(job, now)
        except (Refused, IndexError):
            return []
        raise UsageError(f"not a processing event: {event!r}")

    def _filter_finished(self, job: Job, event: FilterFinished, now: datetime) -> list[Command]:
        filters = _set_filter(job, event.index, event.state, event.reasons)
        if event.failed and not job.continue_on_error:
            # R6: the filters not yet run are Canceled and the job ends Aborted.
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
        failed = any(
            f.state in (FilterState.COMPLETED_WITH_ERRORS, FilterState.CANCELED) for f in ran
        )
        if failed and not job.continue_on_error:
            outcome = JobInput.FAIL
        elif failed or any(f.state is FilterState.CANCELED for f in filters):
            outcome = JobInput.COMPLETE_WITH_ERRORS
        elif any(f.state is FilterState.COMPLETED_WITH_WARNINGS for f in filters):
            outcome = JobInput.COMPLETE_WITH_WARNINGS
        else:
            outcome = JobInput.COMPLETE_SUCCESSFULLY
        return self.apply(job, outcome, now, filters=filters)[1]

    # --- time -----------------------------------------------------------------------------------

    def tick(self, now: datetime) -> list[Command]:
        """Expire subscriptions and time out idle Creating jobs (R6, R7)."""
        self.subscriptions.expire(now)
        commands: list[Command] = []
        for job in self.jobs.timed_out(now, self.config.job_timeout_seconds):
            commands += self.apply(job, JobInput.TIMEOUT, now)[1]
        return commands

    def next_deadline(self) -> datetime | None:
        """When :meth:`tick` next has something to do (aioquic's ``get_timer``)."""
        times = [
            t
            for t in (
                self.jobs.next_timeout(self.config.job_timeout_seconds),
                self.subscriptions.next_expiry(),
            )
            if t is not None
        ]
        return min(times) if times else None

    # --- deliveries, start and stop ----------------------------------------------------------

    def delivery_result(self, subscription_id: str, ok: bool) -> list[Command]:
        return list(self.subscriptions.delivery_result(subscription_id, ok))

    def restore(self, jobs: Iterable[Job], now: datetime) -> list[Command]:
        """Load the jobs a store kept across a restart.

        Decision (issue 3, crash consistency): a job that was Started or Processing when the
        server died ends Aborted with PostScanJobProcessingFailed, because re-running filters could
        deliver documents twice; a Pending job is handed to the engine again; a Creating job keeps
        its images and waits for more (the R6 timeout still applies).
        """
        commands: list[Command] = []
        for job in jobs:
            self.jobs.put(job)
        for job in self.jobs.active():
            if job.state in (JobState.STARTED, JobState.PROCESSING):
                filters = tuple(
                    _replace_filter(
                        f, FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,)
                    )
                    if f.state is FilterState.PROCESSING
                    else f
                    for f in job.filters
                )
                commands += self.apply(job, JobInput.INTERRUPTED, now, filters=filters)[1]
            elif job.state is JobState.PENDING:
                commands.append(StartProcessing(job))
        commands += self._repository_events(now)
        return commands

    def reconfigure(self, config: ServerConfig, now: datetime) -> list[Command]:
        """Apply a reloaded configuration.  Limits, users, timeouts and eventing take effect for
        the next request; a smaller history drops its oldest jobs; subscribers get a
        RepositoryElementsChangeEvent with the repository configuration (R7, bdsrr 3.2.4.6)."""
        from .bdsrr import repository_configuration

        self.config = config
        self.subscriptions.config = config
        self.jobs.history_size = config.history_size
        commands: list[Command] = [DropJob(token) for token in self.jobs.trim()]
        body = etree.Element(
            f"{{{names.DSC}}}RepositoryElementsChangeEvent",
            nsmap={"dsc": names.DSC, "ftr": names.FILTER},
        )
        repository_configuration(etree.SubElement(body, f"{{{names.DSC}}}ElementChanges"), config)
        commands += self.subscriptions.notify(names.Action.DSC_ELEMENTS_CHANGE_EVENT, body, now)
        return commands

    def shutdown(self, now: datetime) -> list[Command]:
        """The server is stopping: repository Stopped, SubscriptionEnd SourceShuttingDown."""
        self.stopped = True
        commands = self._repository_events(now)
        commands += self.subscriptions.end_all()
        return commands


def _status_view(job: Job) -> tuple[object, ...]:
    return (job.state, job.reasons, job.filters, job.images_received)


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


def _cancel_unfinished(filters: tuple[FilterStatus, ...]) -> tuple[FilterStatus, ...]:
    """R6: when a job ends, Pending filters become Canceled (running ones are told to stop
    and end Canceled too)."""
    return tuple(
        f if f.state.is_final else _replace_filter(f, FilterState.CANCELED, ()) for f in filters
    )


class Exchange:
    """One HTTP request: feed the body in chunks of any size, then end it.

    States: feeding -> ended -> (optionally) store_failed.  Misuse raises :class:`UsageError`.
    """

    def __init__(self, server: ScanServer, info: RequestInfo) -> None:
        self.server = server
        self.info = info
        self._limits = server.config.limits
        self._buffer = bytearray()
        self._overflow = False
        self._fault: faults.SoapFault | None = None
        self._ended = False
        self._result: OpResult | None = None
        self._envelope: soap.Envelope | None = None
        #: Addressing headers of an envelope refused before it was read (RelatesTo, R4).
        self._salvaged: soap.Addressing | None = None
        self._reply_id = ""
        self._multipart: MultipartReader | None = None
        self._part = 0  # index of the current MIME part (1 = root)
        self._attachment: Attachment | None = None
        self._in_attachment = False
        ctype = parse_content_type(info.content_type or "")
        if ctype.media_type == "multipart/related":
            boundary = ctype.param("boundary")
            if not boundary:
                self._fault = faults.malformed("The multipart request has no boundary.")
            else:
                try:
                    self._multipart = MultipartReader(
                        boundary,
                        max_header_bytes=self._limits.max_part_header_bytes,
                        max_preamble_bytes=self._limits.max_part_header_bytes,
                    )
                except MultipartError as exc:  # a boundary the reader refuses (R4 step 1)
                    self._fault = faults.malformed(f"The MIME body is malformed: {exc.reason}")

    # --- feeding ------------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Command]:
        if self._ended:
            raise UsageError("feed() after end()")
        if not data:
            return []
        if self._multipart is None:
            if self._fault is None:
                self._keep(data)
            return []
        if self._fault is not None and not self._in_attachment:
            return []
        try:
            events = self._multipart.feed(data)
        except MultipartError as exc:
            # Parts completed before the error count, as they would with smaller chunks.
            commands = self._on_parts(exc.events)
            return commands + self._fail(
                faults.malformed(f"The MIME body is malformed: {exc.reason}")
            )
        return self._on_parts(events)

    def _keep(self, data: bytes) -> None:
        if self._overflow:
            return
        if len(self._buffer) + len(data) > self._limits.max_envelope_bytes:
            # R12: stop buffering at once; the fault is given at end().
            self._overflow = True
            self._buffer.clear()
            return
        self._buffer += data

    def _on_parts(self, events: list[PartStart | PartData | PartEnd]) -> list[Command]:
        commands: list[Command] = []
        for event in events:
            if isinstance(event, PartStart):
                self._part += 1
                att = self._attachment
                if (
                    self._part > 1
                    and att is not None
                    and not att.begun
                    and event.content_id == att.href
                ):
                    att.begun = True
                    self._in_attachment = True
                    commands.append(BeginDocument(att.token, att.document_id, att.format))
            elif isinstance(event, PartData):
                if self._part == 1:
                    self._keep(event.data)
                elif self._in_attachment and self._attachment is not None:
                    att = self._attachment
                    att.size += len(event.data)
                    if att.size > self._limits.max_image_bytes:
                        return commands + self._fail(
                            faults.malformed(
                                f"The image exceeds the limit of {self._limits.max_image_bytes} "
                                "bytes.",
                                http_status=413,
                            )
                        )
                    commands.append(AppendDocument(att.token, att.document_id, event.data))
            elif isinstance(event, PartEnd):
                if self._part == 1:
                    self._root_part_done()
                elif self._in_attachment and self._attachment is not None:
                    self._attachment.complete = True
                    self._in_attachment = False
        return commands

    def _root_part_done(self) -> None:
        """The root part is complete: read the envelope now, so that a SendImage can stream its
        attachment straight to the store (R8)."""
        try:
            self._envelope = self._read()
            # While Stopped nothing is streamed: _dispatch refuses the request (R4 step 8).
            if (
                self._envelope.addressing.action == names.Action.DSP_SEND_IMAGE
                and not self.server.stopped
            ):
                from .dsp import prepare_send_image

                self._attachment = prepare_send_image(Call(self.server, self._envelope, self.info))
        except faults.SoapFault as fault:
            self._fault = fault

    def _fail(self, fault: faults.SoapFault) -> list[Command]:
        """Refuse the request; an upload in progress is dropped (no debris)."""
        commands: list[Command] = []
        if self._fault is None:
            self._fault = fault
        att = self._attachment
        if att is not None:
            # Received completely or not, a refused image was never finished: drop it.
            if att.begun:
                commands.append(AbortDocument(att.token, att.document_id))
            self.server.jobs.uploads.discard((att.token, att.document_id))
            self._attachment = None
        self._in_attachment = False
        return commands

    # --- ending ---------------------------------------------------------------------------------

    def end(self, now: datetime | None = None) -> Outcome:
        """The body is complete.  ``now`` is when (default: ``RequestInfo.now``, the start): the
        operation takes effect then, so that an image that took long to arrive is activity at
        its end, not at its start (R6 timeout)."""
        if self._ended:
            raise UsageError("end() called twice")
        if now is not None:
            self.info = replace(self.info, now=now)  # RequestInfo refuses a naive time
        self._ended = True
        self._reply_id = self.server.message_id()
        early: list[Command] = []
        if self._multipart is not None and self._fault is None:
            try:
                early += self._on_parts(self._multipart.close())
            except MultipartError as exc:
                early += self._fail(faults.malformed(f"The MIME body is malformed: {exc.reason}"))
            if self._fault is None and self._envelope is None:
                early += self._fail(faults.malformed("The multipart request has no root part."))
        if self._fault is not None:
            return self._fault_outcome(self._fault, early + self._fail(self._fault))
        try:
            envelope = self._envelope or self._read()
            self._envelope = envelope
            result = self._dispatch(envelope)
        except faults.SoapFault as fault:
            return self._fault_outcome(fault, early + self._fail(fault))
        self._result = result
        body = soap.reply_envelope(
            envelope.addressing, result.action, self._reply_id, result.payload, result.nsmap
        )
        return Outcome(Reply(200, SOAP_CONTENT_TYPE, body), tuple(early + result.commands))

    def _read(self) -> soap.Envelope:
        if self._overflow:
            raise faults.malformed(
                f"The SOAP envelope exceeds the limit of {self._limits.max_envelope_bytes} bytes."
            )
        root = parse_xml(bytes(self._buffer), self._limits)
        self._buffer.clear()
        try:
            check_tree(root, self._limits)
            return soap.read_envelope(root)
        except faults.SoapFault:
            self._salvaged = soap.salvage_addressing(root)
            raise

    def _dispatch(self, envelope: soap.Envelope) -> OpResult:
        action = envelope.addressing.action
        if not action:
            raise faults.action_required(envelope.addressing.wsa_ns)
        entry = self.server.handlers.get(action)
        if entry is None:
            raise faults.action_not_supported(envelope.addressing.wsa_ns, action)
        service_ns, handler = entry
        if self.server.stopped and service_ns in (names.DSP, names.DSC):
            raise faults.operation_failed(service_ns)  # R4 step 8: repository Stopped
        return handler(Call(self.server, envelope, self.info, self._attachment))

    def _fault_outcome(self, fault: faults.SoapFault, commands: list[Command]) -> Outcome:
        addressing = (
            self._envelope.addressing if self._envelope else self._salvaged or soap.Addressing()
        )
        body = soap.fault_envelope(fault, addressing, self._reply_id)
        subcode = fault.subcode[1] if fault.subcode else "-"
        return Outcome(
            Reply(fault.http_status, SOAP_CONTENT_TYPE, body),
            tuple(commands),
            f"{fault.code}/{subcode}: {fault.reason}",
        )

    def store_failed(self, *, temporary: bool) -> Outcome:
        """A command of this exchange failed: undo its change and answer with the fault of
        R4 step 9 instead (ServerErrorTemporaryError when a retry may succeed)."""
        if not self._ended:
            # A chunk could not be written while feeding: refuse the request now.
            fault = faults.store_failed(names.DSP, temporary=temporary)
            self._ended = True
            self._reply_id = self.server.message_id()
            return self._fault_outcome(fault, self._fail(fault))
        commands: list[Command] = []
        result, self._result = self._result, None
        if result is not None and result.undo is not None:
            commands += result.undo()
        att = self._attachment
        if att is not None and att.begun:
            commands.append(AbortDocument(att.token, att.document_id))
            self.server.jobs.uploads.discard((att.token, att.document_id))
        entry = (
            self.server.handlers.get(self._envelope.addressing.action or "")
            if self._envelope
            else None
        )
        ns = entry[0] if entry and entry[0] in (names.DSP, names.DSC) else names.DSC
        return self._fault_outcome(faults.store_failed(ns, temporary=temporary), commands)

    def abort(self) -> list[Command]:
        """The connection was lost before end(): drop any upload in progress."""
        if self._ended:
            return []
        self._ended = True
        return self._fail(faults.malformed("The request was not received completely."))
