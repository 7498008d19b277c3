"""What the server tells its administrators: the job log, metrics, the device book and the live
state behind the status page, all fed from one place.

The :class:`Observer` watches what the service already does, and decides nothing:

- ``request_commands`` (the core's owner, when an exchange ends): remembers which client asked
  for a CreateJob, so that the job's log line and device record name it;
- ``applied`` (the command writer, after a store command was carried out, so only what is
  durable is reported): job records, images and drops become log lines (logger ``dsc.jobs``,
  one INFO line per job event), metric updates, device records, and the jobs the status page
  shows.  A job's change is found by comparing its new record with the previous one;
- ``request_ended`` / ``http_refused`` / ``delivery_failed`` / connections: counters.

Log lines carry their fields as ``extra`` (``event``, ``job``, ...) so that ``--log-format
json`` (:class:`JsonFormatter`) gives log collectors structured records.
"""

from __future__ import annotations

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

from dsc_core import Command, CreateJob, DropJob, Job, UpdateJob
from dsc_core.commands import BeginDocument, FinishDocument
from dsc_core.model import (
    EmailInstructions,
    FileShareInstructions,
    FilterState,
    FilterStatus,
    JobState,
    JobStateReason,
    SharePointInstructions,
)

from .devices import DeviceBook
from .metrics import Metrics

__all__ = ["JsonFormatter", "Observer", "destinations_of", "filter_name"]

log = logging.getLogger("dsc.jobs")


def filter_name(dialect: str) -> str:
    """``.../filter/fileshare`` or ``ftr:fileshare`` -> ``fileshare``."""
    return dialect.rsplit("/", 1)[-1].split(":")[-1]


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


@dataclass
class _Known:
    """What the observer remembers of one job."""

    job: Job
    address: str = ""
    identity: str = ""
    bytes_received: int = 0
    #: When the device ended the scan (Creating -> Pending), for the processing time.
    ended: datetime | None = None
    uploading: dict[int, _Upload] = field(default_factory=dict)


class Observer:
    """Job log, metrics, devices and live job state of one scan service (module doc)."""

    def __init__(self, data_dir: Path | None = None, *, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.devices: DeviceBook | None = None
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._jobs: dict[str, _Known] = {}
        #: token -> (address, identity) of a CreateJob on its way to the store.
        self._creators: dict[str, tuple[str, str]] = {}
        #: (operation, outcome) -> its dsc_requests counter (a bounded set: metrics.py).
        self._request_counters: dict[tuple[str, str], Counter] = {}
        self.started = time.time()
        self.store_failures = 0
        self.last_store_error = ""

    # --- life cycle -------------------------------------------------------------------------

    def open(self, jobs: Sequence[Job]) -> None:
        """The store was opened: the device book beside it, and the jobs it kept."""
        if self._data_dir is not None:
            try:
                self.devices = DeviceBook(self._data_dir)
            except Exception as exc:  # not worth refusing to start for: say so
                log.error("device records are not kept: %s", exc)
        with self._lock:
            for job in jobs:
                known = _Known(job, bytes_received=sum(d.size for d in job.documents))
                device = self.devices.device_of(job.token) if self.devices else None
                if device is not None:
                    known.address, known.identity = device
                self._jobs[job.token] = known
            self.metrics.active_jobs.set(sum(1 for k in self._jobs.values() if k.job.is_active))

    def close(self) -> None:
        if self.devices is not None:
            self.devices.close()

    # --- requests (the core's owner) -----------------------------------------------------------

    def request_commands(
        self, commands: Sequence[Command], address: str | None, identity: str | None
    ) -> None:
        """``address``: the client's, as the core saw it (``RequestInfo.client_address``,
        from the binding's :class:`~dsc_bindings.peer.Peer`): one device, one address."""
        for command in commands:
            if isinstance(command, CreateJob):
                with self._lock:
                    self._creators[command.job.token] = (address or "?", identity or "")

    def request_ended(self, operation: str, fault: str | None) -> None:
        key = (operation or "unknown", "fault" if fault else "ok")
        counter = self._request_counters.get(key)
        if counter is None:  # labels() takes a lock and builds a key: once per label pair
            counter = self._request_counters[key] = self.metrics.requests.labels(*key)
        counter.inc()
        if fault:
            # "code/subcode: reason" (dsc_core.exchange): the subcode without its prefix.
            subcode = fault.split(":", 1)[0].split("/", 1)[-1]
            self.metrics.faults.labels(subcode.split(":")[-1] or "-").inc()

    def http_refused(self, status: int) -> None:
        self.metrics.http_refusals.labels(str(status)).inc()

    def connection_opened(self) -> None:
        self.metrics.connections.inc()

    def connection_closed(self) -> None:
        self.metrics.connections.dec()

    def delivery_failed(self) -> None:
        self.metrics.delivery_failures.inc()

    def store_failed(self, message: str) -> None:
        with self._lock:
            self.store_failures += 1
            self.last_store_error = message

    # --- commands carried out (the writer's threads) ---------------------------------------------

    def applied(self, command: Command) -> None:
        """A store command was carried out (it is durable)."""
        try:
            if isinstance(command, (CreateJob, UpdateJob)):
                self._job_record(command.job, isinstance(command, CreateJob))
            elif isinstance(command, BeginDocument):
                with self._lock:
                    known = self._jobs.get(command.token)
                    if known is not None:
                        known.uploading[command.document_id] = _Upload(
                            command.format, time.monotonic()
                        )
            elif isinstance(command, FinishDocument):
                self._image(command)
            elif isinstance(command, DropJob):
                with self._lock:
                    self._jobs.pop(command.token, None)
                log.debug("job %s left the history", command.token)
        except Exception:  # observing must never fail the server's work
            logging.getLogger("dsc.observe").exception("observing %r failed", type(command))

    def _image(self, command: FinishDocument) -> None:
        with self._lock:
            known = self._jobs.get(command.token)
            upload = known.uploading.pop(command.document_id, None) if known else None
            if known is not None:
                known.bytes_received += command.size
        self.metrics.images.inc()
        self.metrics.image_bytes.inc(command.size)
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
            self.devices.contact(known.address, known.identity, datetime.now().astimezone())

    def _job_record(self, job: Job, created: bool) -> None:
        with self._lock:
            known = self._jobs.get(job.token)
            old = known.job if known is not None else None
            if known is None:
                known = self._jobs[job.token] = _Known(job)
                creator = self._creators.pop(job.token, None)
                if creator is not None:
                    known.address, known.identity = creator
            known.job = job
            if (
                old is not None
                and old.state is JobState.CREATING
                and job.state is not (JobState.CREATING)
            ):
                known.ended = job.last_activity
            active = sum(1 for k in self._jobs.values() if k.job.is_active)
        self.metrics.active_jobs.set(active)
        if old is None:
            if created:
                self._created(known)
            return
        if old.state is JobState.CREATING and job.state is JobState.PENDING:
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
        elif not old.is_active and job.is_active:
            again = [
                filter_name(f.dialect)
                for before, f in zip(old.filters, job.filters, strict=False)
                if before != f
            ]
            log.info(
                "job %s retried: %s run again",
                job.token,
                ", ".join(again) or "no filter",
                extra={"event": "job.retried", "job": job.token, "filters": again},
            )
        elif old.state is not job.state and job.is_active:
            log.debug("job %s is %s", job.token, job.state.value)
        for index, (before, after) in enumerate(zip(old.filters, job.filters, strict=False)):
            if after.state.is_final and not before.state.is_final:
                self._filter_result(job, index, after)
        if old.is_active and not job.is_active:
            self._finished(known)

    def _created(self, known: _Known) -> None:
        job = known.job
        self.metrics.jobs_created.inc()
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
        log.info(
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
        duration = _seconds(job.created, job.completed)
        self.metrics.jobs_ended.labels(job.state.value).inc()
        if known.ended is not None and job.completed is not None:
            self.metrics.processing_seconds.observe(_seconds(known.ended, job.completed))
        log.info(
            "job %s %s%s after %.1f s",
            job.token,
            job.state.value.lower(),
            _reasons(job.reasons),
            duration,
            extra={
                "event": "job." + job.state.value.lower(),
                "job": job.token,
                "state": job.state.value,
                "reasons": [r.value for r in job.reasons],
                "seconds": round(duration, 3),
            },
        )
        if self.devices is not None:
            if job.state is JobState.CANCELED:
                outcome = "canceled"
            elif job.succeeded:
                outcome = "completed"
            else:
                outcome = "failed"
            try:
                self.devices.job_ended(job.token, outcome)
            except Exception as exc:
                logging.getLogger("dsc.devices").error("device counts not updated: %s", exc)

    # --- what the status page shows ----------------------------------------------------------------

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the server keeps (active and history), newest first, as JSON-ready dicts."""
        with self._lock:
            known = list(self._jobs.values())
            uploading = {k.job.token: sorted(k.uploading) for k in known if k.uploading}
        known.sort(key=lambda k: k.job.created, reverse=True)
        return [self._job_dict(k, uploading.get(k.job.token, [])) for k in known]

    def job(self, token: str) -> dict[str, Any] | None:
        with self._lock:
            known = self._jobs.get(token)
            uploading = sorted(known.uploading) if known else []
        return None if known is None else self._job_dict(known, uploading)

    @staticmethod
    def _job_dict(known: _Known, uploading: list[int]) -> dict[str, Any]:
        job = known.job
        return {
            "token": job.token,
            "state": job.state.value,
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
            "bytes": known.bytes_received,
            "uploading": uploading,
            "filters": [
                {
                    "filter": filter_name(f.dialect),
                    "dialect": f.dialect,
                    "state": f.state.value,
                    "reasons": [r.value for r in f.reasons],
                    "destinations": destinations_of(f, job.user_name),
                }
                for f in job.filters
            ],
        }


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
