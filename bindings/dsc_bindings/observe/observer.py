"""What the server tells its administrators: the job log, metrics, the device book and the live
state behind the status page, all fed from one place.

The :class:`Observer` watches what the service already does, and decides nothing:

- ``request_commands`` (the core's owner, when an exchange ends): remembers which client asked
  for a CreateJob, so that the job's log line and device record name it;
- ``applied`` (the command writer, after a store command was carried out, so only what is
  durable is reported): job records, images and drops become log lines (logger ``dsc.jobs``,
  one INFO line per job event), metric updates, device records, and the jobs the status page
  shows.  What happened is the core's word: a CreateJob created the job (and ended it, when it
  was born Aborted), an UpdateJob names its cause (``dsc_core.JobInput``) and the filters it
  ended, a DropJob why the job left the history; no record is compared with an earlier one;
- ``request_ended`` (with the fault subcode the core put in the reply's Outcome) /
  ``http_refused`` / ``event_delivery_failed`` / connections: counters.

How a job turned out is :func:`dsc_core.outcomes.job_outcome`'s word, here as everywhere: a
failed filter and a job that ended as a failure are WARNING lines, ``dsc_jobs_ended_total`` is
labelled by outcome, and the page's totals (.tally) survive a restart.

Log lines carry their fields as ``extra`` (``event``, ``job``, ...) so that ``--log-format
json`` (:class:`JsonFormatter`) gives log collectors structured records.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from dsc_bindings.observe.devices import DeviceBook, DeviceLimits, open_device_book
from dsc_bindings.observe.metrics import Metrics
from dsc_bindings.store import tally
from dsc_bindings.store.backends import StorageSettings
from dsc_core import Command, CreateJob, DropJob, Job, JobInput, Removal, UpdateJob
from dsc_core.commands import AbortDocument, AppendDocument, BeginDocument, FinishDocument
from dsc_core.model import (
    EmailInstructions,
    FileShareInstructions,
    FilterState,
    FilterStatus,
    JobState,
    JobStateReason,
    SharePointInstructions,
)
from dsc_core.names import filter_name
from dsc_core.outcomes import JobOutcome

__all__ = ["JsonFormatter", "Observer", "destinations_of"]

log = logging.getLogger("dsc.jobs")


def destinations_of(status: FilterStatus, user_name: str = "") -> list[str]:
    """Where a filter was told to deliver (R9): folders, recipients, site URLs."""
    instructions = status.instructions
    if isinstance(instructions, FileShareInstructions):
        return list(instructions.shares)
    if isinstance(instructions, EmailInstructions):
        places = list(instructions.addresses)
        if instructions.send_to_scan_user:
            places.append(f"the scan user ({user_name})" if user_name else "the scan user")
        return places
    if isinstance(instructions, SharePointInstructions):
        places = list(instructions.site_urls)
        if instructions.save_to_my_site:
            places.append("the user's My Site")
        return places
    return []


def _reasons(reasons: Sequence[object]) -> str:
    text = ", ".join(str(getattr(r, "value", r)) for r in reasons if str(r) != "None")
    return f" ({text})" if text else ""


def _seconds(start: datetime, end: datetime | None) -> float:
    return max(0.0, ((end or start) - start).total_seconds())


@dataclass
class _Upload:
    format: str
    started: float
    #: Bytes written so far (durable or not: what the device has sent).
    received: int = 0


@dataclass
class _Known:
    """What the observer remembers of one job."""

    #: The job's last durable record: what the page and ``dsc jobs`` show (the core's table may
    #: be a step ahead of the store).  The same object the core made, never compared with the
    #: next one: each command says what changed.
    job: Job
    address: str = ""
    identity: str = ""
    bytes_received: int = 0
    #: When the device ended the scan (EndPostScanJob), for the processing time.
    ended: datetime | None = None
    uploading: dict[int, _Upload] = field(default_factory=dict)
    #: Wall-clock time (time.time()) of the job's last byte or request from its device: the
    #: page's "since the last byte" and "stalled" (ServerConfig.stalled_after_seconds).
    last_byte: float = 0.0


class Observer:
    """Job log, metrics, devices and live job state of one scan service (module doc)."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        metrics: Metrics | None = None,
        device_limits: DeviceLimits | None = None,
        storage: StorageSettings | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.devices: DeviceBook | None = None
        self._device_limits = device_limits or DeviceLimits()
        #: Where the device book and the totals are kept: beside the job records (issue 17).
        self._storage = storage or StorageSettings()
        #: The page's totals, durable once :meth:`open` found the store (in memory before).
        self.tally = tally.Tally()
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._jobs: dict[str, _Known] = {}
        #: The completed jobs' history keys (_history_key), sorted: oldest first.
        self._history: list[tuple[float, str]] = []
        #: Tokens of the active jobs: the page lists them without a pass over the history.
        self._active: set[str] = set()
        #: token -> (address, identity) of a CreateJob on its way to the store.
        self._creators: dict[str, tuple[str, str]] = {}
        #: (operation, outcome) -> its dsc_requests counter (a bounded set: metrics.py).
        self._request_counters: dict[tuple[str, str], Counter] = {}
        self.started = time.time()
        #: Open HTTP connections (also the dsc_connections gauge): the page's count.
        self.connections = 0
        self.store_failures = 0
        self.last_store_error = ""

    # --- life cycle -------------------------------------------------------------------------

    def open(self, jobs: Sequence[Job], now: datetime | None = None) -> None:
        """The store was opened: the device book beside it (its retention and cap applied at
        ``now``, the service's clock), and the jobs it kept."""
        if self._data_dir is not None:
            try:
                self.devices = open_device_book(self._data_dir, self._storage, self._device_limits)
                self.devices.apply_limits(now or datetime.now().astimezone())
            except Exception as exc:  # not worth refusing to start for: say so
                log.error("device records are not kept: %s", exc)
            try:
                self.tally = tally.open_tally(self._data_dir, self._storage)
            except Exception as exc:
                log.error("the status page's totals are not kept across restarts: %s", exc)
        with self._lock:
            for job in jobs:
                known = _Known(
                    job,
                    bytes_received=sum(d.size for d in job.documents),
                    last_byte=job.last_activity.timestamp(),
                )
                # Only an active job's device is still in the book (its end deletes it): one
                # look-up per active job, not per job of the history (a query each on PostgreSQL).
                device = self._device_of(job.token) if self.devices and job.is_active else None
                if device is not None:
                    known.address, known.identity = device
                self._jobs[job.token] = known
                if not job.is_active:
                    self._history.append(_history_key(job))
                else:
                    self._active.add(job.token)
            self._history.sort()
            self.metrics.active_jobs.set(len(self._jobs) - len(self._history))

    def _device_of(self, token: str) -> tuple[str, str] | None:
        assert self.devices is not None
        try:
            return self.devices.device_of(token)
        except Exception as exc:  # the job is shown without its device
            logging.getLogger("dsc.devices").error("device of job %s not read: %s", token, exc)
            return None

    def bound_devices(self, now: datetime) -> None:
        """The device book's retention and cap at ``now`` (the ticker, hourly: devices.py)."""
        if self.devices is None:
            return
        try:
            self.devices.apply_limits(now)
        except Exception as exc:  # the next hour tries again; the book itself is intact
            logging.getLogger("dsc.devices").error("device book not bounded: %s", exc)

    def close(self) -> None:
        if self.devices is not None:
            self.devices.close()
        self.tally.close()

    # --- requests (the core's owner) -----------------------------------------------------------

    def request_commands(
        self, commands: Sequence[Command], address: str | None, identity: str | None
    ) -> None:
        """``address``: the client's, as the core saw it (``RequestInfo.client_address``,
        from the binding's :class:`~dsc_bindings.runtime.peer.Peer`): one device, one address."""
        for command in commands:
            if isinstance(command, CreateJob):
                with self._lock:
                    self._creators[command.job.token] = (address or "?", identity or "")

    def request_ended(self, operation: str, fault_subcode: str | None) -> None:
        """``fault_subcode``: the reply's (``Outcome.fault_subcode``), None for a success."""
        key = (operation or "unknown", "ok" if fault_subcode is None else "fault")
        counter = self._request_counters.get(key)
        if counter is None:  # labels() takes a lock and builds a key: once per label pair
            counter = self._request_counters[key] = self.metrics.requests.labels(*key)
        counter.inc()
        if fault_subcode is not None:
            self.metrics.faults.labels(fault_subcode).inc()

    def http_refused(self, status: int) -> None:
        self.metrics.http_refusals.labels(str(status)).inc()

    def connection_opened(self) -> None:
        with self._lock:
            self.connections += 1
        self.metrics.connections.inc()

    def connection_closed(self) -> None:
        with self._lock:
            self.connections -= 1
        self.metrics.connections.dec()

    def event_delivery_failed(self) -> None:
        """A subscriber did not take an event notification (R7): not a scan's delivery."""
        self.metrics.event_delivery_failures.inc()
        self.tally.add(tally.EVENT_DELIVERY_FAILURES)

    def store_failed(self, message: str) -> None:
        with self._lock:
            self.store_failures += 1
            self.last_store_error = message

    # --- commands carried out (the writer's threads) ---------------------------------------------

    def applied(self, command: Command) -> None:
        """A store command was carried out (it is durable)."""
        try:
            if isinstance(command, UpdateJob):
                self._updated(command)
            elif isinstance(command, CreateJob):
                self._created(command.job)
            elif isinstance(command, AppendDocument):
                with self._lock:
                    known = self._jobs.get(command.token)
                    upload = known.uploading.get(command.document_id) if known else None
                    if known is not None and upload is not None:
                        upload.received += len(command.data)
                        known.last_byte = time.time()
            elif isinstance(command, BeginDocument):
                with self._lock:
                    known = self._jobs.get(command.token)
                    if known is not None:
                        known.uploading[command.document_id] = _Upload(
                            command.format, time.monotonic()
                        )
                        known.last_byte = time.time()
            elif isinstance(command, AbortDocument):
                with self._lock:
                    known = self._jobs.get(command.token)
                    if known is not None:
                        known.uploading.pop(command.document_id, None)
            elif isinstance(command, FinishDocument):
                self._image(command)
            elif isinstance(command, DropJob):
                with self._lock:
                    gone = self._jobs.pop(command.token, None)
                    self._active.discard(command.token)
                    if gone is not None and not gone.job.is_active:
                        self._history_remove(gone.job)
                if command.cause is Removal.PURGED:
                    log.debug("job %s purged from the history", command.token)
                else:
                    log.debug("job %s left the history (history_size)", command.token)
        except Exception:  # observing must never fail the server's work
            logging.getLogger("dsc.observe").exception("observing %r failed", type(command))

    def _history_remove(self, job: Job) -> None:
        """Take a completed job out of the sorted history (under the lock)."""
        key = _history_key(job)
        at = bisect.bisect_left(self._history, key)
        if at < len(self._history) and self._history[at] == key:
            del self._history[at]

    def _image(self, command: FinishDocument) -> None:
        with self._lock:
            known = self._jobs.get(command.token)
            upload = known.uploading.pop(command.document_id, None) if known else None
            if known is not None:
                known.bytes_received += command.size
                known.last_byte = time.time()
        self.metrics.images.inc()
        self.metrics.image_bytes.inc(command.size)
        self.tally.add(tally.IMAGES_RECEIVED)
        self.tally.add(tally.BYTES_RECEIVED, command.size)
        if upload is not None:
            self.metrics.upload_seconds.observe(time.monotonic() - upload.started)
        fmt = upload.format if upload is not None else "?"
        log.info(
            "job %s image %d received: %d bytes (%s)",
            command.token,
            command.document_id,
            command.size,
            fmt,
            extra={
                "event": "job.image",
                "job": command.token,
                "document_id": command.document_id,
                "bytes": command.size,
                "format": fmt,
            },
        )
        if known is not None and self.devices is not None and known.address:
            try:
                self.devices.contact(known.address, known.identity, datetime.now().astimezone())
            except Exception as exc:  # the database is away: one line, as for the other counts
                logging.getLogger("dsc.devices").error("device contact not recorded: %s", exc)

    def _index(self, known: _Known, before: Job | None) -> None:
        """Put ``known.job`` in the page's indexes (under the lock): ``before`` is the record
        the observer showed until now (None: new), whose history entry goes."""
        job = known.job
        if before is not None and not before.is_active:
            self._history_remove(before)  # retried: it is active again
        if job.is_active:
            self._active.add(job.token)
        else:
            bisect.insort(self._history, _history_key(job))
            self._active.discard(job.token)
        self.metrics.active_jobs.set(len(self._jobs) - len(self._history))

    def _created(self, job: Job) -> None:
        with self._lock:
            before = self._jobs.get(job.token)
            known = self._jobs[job.token] = _Known(job, last_byte=job.last_activity.timestamp())
            creator = self._creators.pop(job.token, None)
            if creator is not None:
                known.address, known.identity = creator
            self._index(known, before.job if before is not None else None)
        self.metrics.jobs_created.inc()
        self.tally.add(tally.JOBS_CREATED)
        self._created_line(known)
        if not job.is_active:  # R6: no usable filter, Aborted at once
            self._finished(known)

    def _updated(self, command: UpdateJob) -> None:
        job, cause = command.job, command.cause
        with self._lock:
            known = self._jobs.get(job.token)
            if known is None:  # not seen created (its CreateJob failed to apply): show it
                known = self._jobs[job.token] = _Known(job)
                before = None
            else:
                before, known.job = known.job, job
            if cause is JobInput.IMAGE:
                known.last_byte = max(known.last_byte, job.last_activity.timestamp())
            elif cause is JobInput.END:
                known.ended = job.last_activity
            self._index(known, before)
        if cause is JobInput.END:
            log.info(
                "job %s ended by the device: %d image(s), %d bytes",
                job.token,
                job.images_received,
                known.bytes_received,
                extra={
                    "event": "job.ended",
                    "job": job.token,
                    "images": job.images_received,
                    "bytes": known.bytes_received,
                },
            )
        elif cause is JobInput.RETRY:
            # A retry puts exactly the filters to run again back in Pending (lifecycle.retry).
            again = [filter_name(f.dialect) for f in job.filters if not f.state.is_final]
            log.info(
                "job %s retried: %s run again",
                job.token,
                ", ".join(again) or "no filter",
                extra={"event": "job.retried", "job": job.token, "filters": again},
            )
        elif job.is_active and cause is not JobInput.IMAGE:
            log.debug("job %s is %s (%s)", job.token, job.state.value, cause.value)
        for index in command.filters_ended:
            self._filter_result(job, index, job.filters[index])
        if command.ends_job:
            self._finished(known)

    def _created_line(self, known: _Known) -> None:
        job = known.job
        targets = "; ".join(
            f"{filter_name(f.dialect)} {', '.join(destinations_of(f, job.user_name)) or '-'}"
            for f in job.filters
        )
        device = known.address or "?"
        if known.identity:
            device += f" ({known.identity})"
        log.info(
            "job %s created: user %s, device %s, process %s, to %s",
            job.token,
            job.user_name or "-",
            device,
            job.psp_display_name or job.psp_identifier,
            targets or "(no filters)",
            extra={
                "event": "job.created",
                "job": job.token,
                "user": job.user_name,
                "device": known.address,
                "identity": known.identity,
                # Not "process": LogRecord has that field (the OS process id).
                "scan_process": job.psp_display_name or job.psp_identifier,
                "destinations": {
                    filter_name(f.dialect): destinations_of(f, job.user_name) for f in job.filters
                },
            },
        )
        if self.devices is not None and known.address:
            try:
                self.devices.job_created(job.token, known.address, known.identity, job.created)
            except Exception as exc:
                logging.getLogger("dsc.devices").error("device not recorded: %s", exc)

    def _filter_result(self, job: Job, index: int, status: FilterStatus) -> None:
        name = filter_name(status.dialect)
        places = destinations_of(status, job.user_name)
        self.metrics.filter_results.labels(name, status.state.value).inc()
        went = "delivered to" if status.state is FilterState.COMPLETED_SUCCESSFULLY else "for"
        # A filter that could not deliver (R6 failure) is a scan that did not arrive: WARNING.
        # A filter Canceled without a reason was stopped (the job canceled, or R6's first
        # failure ended the run): the job's own end line says why.
        failed = status.state is FilterState.COMPLETED_WITH_ERRORS or (
            status.state is FilterState.CANCELED and bool(status.reasons)
        )
        if failed:
            self.metrics.delivery_failures.inc()
            self.tally.add(tally.DELIVERY_FAILURES)
        log.log(
            logging.WARNING if failed else logging.INFO,
            "job %s filter %s %s%s: %s %s",
            job.token,
            name,
            status.state.value,
            _reasons(status.reasons),
            went,
            ", ".join(places) or "-",
            extra={
                "event": "job.filter",
                "job": job.token,
                "filter": name,
                "state": status.state.value,
                "reasons": [r.value for r in status.reasons],
                "destinations": places,
            },
        )

    def _finished(self, known: _Known) -> None:
        job = known.job
        outcome = job.outcome
        duration = _seconds(job.created, job.completed)
        self.metrics.jobs_ended.labels(outcome.value).inc()
        self.tally.add(tally.ended(outcome))
        if known.ended is not None and job.completed is not None:
            self.metrics.processing_seconds.observe(_seconds(known.ended, job.completed))
        extra = {
            "event": "job." + job.state.value.lower(),
            "job": job.token,
            "state": job.state.value,
            "outcome": outcome.value,
            "reasons": [r.value for r in job.reasons],
            "seconds": round(duration, 3),
        }
        if outcome.is_failure:
            # The line an administrator greps for: the outcome first, then every filter that
            # did not deliver, with where it was to deliver and why.
            failures = [
                f"{filter_name(f.dialect)} {f.state.value}{_reasons(f.reasons)} for "
                f"{', '.join(destinations_of(f, job.user_name)) or '-'}"
                for f in job.filters
                if f.state.is_failure and (f.reasons or f.state is not FilterState.CANCELED)
            ]
            log.warning(
                "job %s %s: %s%s after %.1f s%s",
                job.token,
                outcome.value,
                job.state.value,
                _reasons(job.reasons),
                duration,
                "; " + "; ".join(failures) if failures else "",
                extra=extra,
            )
        else:
            log.info(
                "job %s %s%s after %.1f s",
                job.token,
                job.state.value.lower(),
                _reasons(job.reasons),
                duration,
                extra=extra,
            )
        if self.devices is not None:
            if outcome is JobOutcome.CANCELED:
                column = "canceled"
            elif outcome is JobOutcome.SUCCEEDED:
                column = "completed"
            else:
                column = "failed"
            try:
                self.devices.job_ended(job.token, column)
            except Exception as exc:
                logging.getLogger("dsc.devices").error("device counts not updated: %s", exc)

    # --- what the status page shows ----------------------------------------------------------------

    def active(self, now: float, stalled_after: float) -> list[dict[str, Any]]:
        """The active jobs, newest first, with their progress (``now``: time.time())."""
        with self._lock:
            rows = [self._job_dict(self._jobs[t], now, stalled_after) for t in self._active]
        rows.sort(key=lambda row: row["created"], reverse=True)
        return rows

    def history(self, limit: int, cursor: str = "") -> tuple[list[dict[str, Any]], str, int]:
        """One page of the history, most recently completed first: at most ``limit`` jobs
        completed before ``cursor`` (the ``next`` of the page before; "" for the first page),
        the cursor of the next page ("" when this is the last), and the history's size.

        The history is kept sorted as jobs end (:meth:`_job_record`), so a page costs a
        binary search and ``limit`` records, however long the history is.
        """
        with self._lock:
            order = self._history
            end = len(order) if not cursor else bisect.bisect_left(order, _parse_cursor(cursor))
            start = max(0, end - limit)
            page = [self._job_dict(self._jobs[token]) for _, token in reversed(order[start:end])]
            size = len(order)
        next_cursor = _cursor(order[start]) if start > 0 and page else ""
        return page, next_cursor, size

    def job(self, token: str, now: float, stalled_after: float) -> dict[str, Any] | None:
        with self._lock:
            known = self._jobs.get(token)
            return None if known is None else self._job_dict(known, now, stalled_after)

    @staticmethod
    def _job_dict(known: _Known, now: float = 0.0, stalled_after: float = 0.0) -> dict[str, Any]:
        """A job as the page and ``dsc jobs`` show it (called under the lock)."""
        job = known.job
        row: dict[str, Any] = {
            "token": job.token,
            "state": job.state.value,
            "outcome": job.outcome.value,
            "active": job.is_active,
            "reasons": [r.value for r in job.reasons if r is not JobStateReason.NONE],
            "user": job.user_name,
            "process": job.psp_display_name or job.psp_identifier,
            "device": known.address,
            "identity": known.identity,
            "created": job.created.isoformat(timespec="seconds"),
            "completed": job.completed.isoformat(timespec="seconds") if job.completed else None,
            "seconds": round(_seconds(job.created, job.completed), 3) if job.completed else None,
            "images": job.images_received,
            "bytes": known.bytes_received + sum(u.received for u in known.uploading.values()),
            "uploading": sorted(known.uploading),
            "filters": [
                {
                    "filter": filter_name(f.dialect),
                    "dialect": f.dialect,
                    "state": f.state.value,
                    "reasons": [r.value for r in f.reasons],
                    "destinations": destinations_of(f, job.user_name),
                    # What it wrote (issue 19): the files, document URLs, Message-IDs.
                    "delivered": list(f.delivered),
                    "delivered_truncated": f.delivered_truncated,
                }
                for f in job.filters
            ],
        }
        if job.is_active:
            idle = max(0.0, now - known.last_byte)
            row["elapsed_seconds"] = round(max(0.0, now - job.created.timestamp()), 1)
            row["idle_seconds"] = round(idle, 1)
            # Only the device can be late while the job is Creating: afterwards the server's
            # own filters run, and they have their own timeouts.
            row["stalled"] = job.state is JobState.CREATING and idle >= stalled_after
        return row


def _history_key(job: Job) -> tuple[float, str]:
    """Where a completed job sorts in the history: by completion time, then token."""
    return ((job.completed or job.last_activity).timestamp(), job.token)


def _cursor(key: tuple[float, str]) -> str:
    return f"{key[0]!r}_{key[1]}"


def _parse_cursor(text: str) -> tuple[float, str]:
    """A cursor from :meth:`Observer.history`; ValueError when it is not one."""
    stamp, sep, token = text.partition("_")
    if not sep or not token:
        raise ValueError(f"not a history cursor: {text!r}")
    return float(stamp), token


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's fields
    (``extra``) for log collectors (``dsc serve --log-format json``)."""

    _STANDARD = frozenset(
        logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
    )

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created)
            .astimezone()
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
