"""The observer, fed with the commands the real core gives (issue 15): the job log's lines, the
metrics and the page's jobs follow from what each command says happened (CreateJob, UpdateJob's
cause and ended filters, DropJob's cause, the reply's fault subcode), never from comparing a
record with an earlier one.  The core is played in process (requests, engine, clock); the
observer sees the store commands in order, as the command writer hands them over once durable."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from lxml import etree

from core_support import DSC, FS, cancel_job, create_job, end_job, envelope, ok, send_image
from dsc_bindings.inprocess import InProcessTransport
from dsc_bindings.observe.observer import Observer
from dsc_bindings.observe.statuspage import View, snapshot
from dsc_core import (
    CreateJob,
    Deliver,
    FilterFinished,
    FilterStarted,
    ProcessingStarted,
    ServerConfig,
    StartProcessing,
    StopProcessing,
    names,
)
from dsc_core.model import FileShareInstructions, FilterState, FilterStateReason
from test_scenarios import FILESHARE, FILTER, filter_xml, raw_create

OTHER = FileShareInstructions((r"\\host\other",))
FAILED = (FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,))
DEVICE = "192.0.2.7"
SHARE = FS.shares[0]


class Watched:
    """A core in process and an observer fed with its store commands."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.t = InProcessTransport(config)
        self.observer = Observer()
        self._fed = 0

    def feed(self) -> None:
        for command in self.t.commands[self._fed :]:
            if isinstance(command, CreateJob):  # the core's owner, at the exchange's end
                self.observer.request_commands([command], DEVICE, "scanner-1")
            if not isinstance(command, (StartProcessing, StopProcessing, Deliver)):
                self.observer.applied(command)
        self._fed = len(self.t.commands)

    def sample(self, name: str, **labels: str) -> float:
        value = self.observer.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def history(self) -> list[dict[str, object]]:
        return self.observer.history(50)[0]


@pytest.fixture
def w() -> Iterator[Watched]:
    watched = Watched()
    yield watched
    watched.observer.close()


@pytest.fixture(autouse=True)
def job_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dsc.jobs")


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The job log's lines so far, each with its level."""
    return [f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.name == "dsc.jobs"]


def test_a_scan_that_succeeds(w: Watched, caplog: pytest.LogCaptureFixture) -> None:
    token = create_job(w.t, FS)
    ok(send_image(w.t, token, 1, b"12345"))
    ok(end_job(w.t, token))
    w.t.process(token)
    w.feed()
    assert logged(caplog)[:3] == [
        f"INFO job {token} created: user S-1-5-21-1000, device {DEVICE} (scanner-1), "
        f"process PSP-1, to fileshare {SHARE}",
        f"INFO job {token} image 1 received: 5 bytes (png)",
        f"INFO job {token} ended by the device: 1 image(s), 5 bytes",
    ]
    assert logged(caplog)[3] == (
        f"INFO job {token} filter fileshare CompletedSuccessfully: delivered to {SHARE}"
    )
    assert logged(caplog)[4].startswith(
        f"INFO job {token} completed (PostScanJobCompletedSuccessfully) after "
    )
    assert len(logged(caplog)) == 5
    assert w.sample("dsc_jobs_created_total") == 1
    assert w.sample("dsc_jobs_ended_total", outcome="succeeded") == 1
    assert w.sample("dsc_filter_results_total", filter="fileshare", state="CompletedSuccessfully")
    assert w.sample("dsc_processing_seconds_count") == 1  # from the device's end to the job's
    assert w.sample("dsc_active_jobs") == 0 and w.observer.active(0.0, 60.0) == []
    (row,) = w.history()
    assert (row["token"], row["outcome"], row["device"], row["bytes"]) == (
        token,
        "succeeded",
        DEVICE,
        5,
    )


def test_the_first_failure_is_a_warning_and_the_filter_it_stopped_is_not(
    w: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    token = create_job(w.t, FS, OTHER)
    ok(end_job(w.t, token))
    w.t.engine(ProcessingStarted(token))
    w.t.engine(FilterStarted(token, 0))
    w.t.engine(FilterFinished(token, 0, *FAILED))
    w.feed()
    last = logged(caplog)[-3:]
    assert last[0] == (
        f"WARNING job {token} filter fileshare CompletedWithErrors (UnknownError): for {SHARE}"
    )
    # Canceled without a reason: R6's first failure stopped it; the job's line says why.
    assert last[1] == rf"INFO job {token} filter fileshare Canceled: for \\host\other"
    assert last[2].startswith(f"WARNING job {token} failed: Aborted (PostScanJobProcessingFailed)")
    assert last[2].endswith(f"; fileshare CompletedWithErrors (UnknownError) for {SHARE}")
    assert w.sample("dsc_delivery_failures_total") == 1
    assert w.sample("dsc_jobs_ended_total", outcome="failed") == 1
    assert w.observer.tally.values()["delivery_failures"] == 1


def test_a_job_canceled_while_scanning_had_no_processing_time(
    w: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    token = create_job(w.t, FS)
    ok(cancel_job(w.t, DSC, token))
    w.feed()
    assert logged(caplog)[-1].startswith(f"INFO job {token} canceled (PostScanJobCanceled) after ")
    assert w.sample("dsc_jobs_ended_total", outcome="canceled") == 1
    # The processing time runs from the device's EndPostScanJob, which never came.
    assert w.sample("dsc_processing_seconds_count") == 0
    assert w.history()[0]["outcome"] == "canceled"


def test_a_timed_out_job_is_aborted(caplog: pytest.LogCaptureFixture) -> None:
    w = Watched(ServerConfig(job_timeout_seconds=60))
    token = create_job(w.t, FS)
    w.t.advance(61)
    w.feed()
    assert logged(caplog)[-1].startswith(
        f"WARNING job {token} aborted: Aborted (PostScanJobTimedOut)"
    )
    assert w.sample("dsc_jobs_ended_total", outcome="aborted") == 1
    w.observer.close()


def test_a_job_born_aborted_is_created_and_ended(
    w: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    """R6: no usable filter: the one CreateJob creates and ends it.  Before issue 15 the
    observer counted it created but never ended (the page's totals did not add up)."""
    ok(w.t.post(raw_create(filter_xml(FILTER + "/fax", FILESHARE))))
    w.feed()
    created, ended = logged(caplog)
    assert " created: " in created
    assert ended.startswith("WARNING ") and " aborted: Aborted (NoValidPostScanInstructionsFound)"
    assert w.sample("dsc_jobs_created_total") == 1
    assert w.sample("dsc_jobs_ended_total", outcome="aborted") == 1
    assert w.sample("dsc_active_jobs") == 0
    assert [row["outcome"] for row in w.history()] == ["aborted"]


def test_a_retry_names_the_filters_run_again_and_the_job_is_shown_once(
    w: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    token = create_job(w.t, FS, OTHER, continue_on_error=True)
    ok(end_job(w.t, token))
    w.t.process(token, [(FilterState.COMPLETED_SUCCESSFULLY, ()), FAILED])
    w.feed()
    assert w.history()[0]["outcome"] == "partial"
    request = etree.Element(f"{{{names.EXT}}}RetryPostScanJobRequest")
    etree.SubElement(request, f"{{{names.EXT}}}JobToken").text = token
    ok(w.t.post(envelope(names.Action.EXT_RETRY_JOB, request)))
    w.feed()
    assert logged(caplog)[-1] == f"INFO job {token} retried: fileshare run again"
    assert w.history() == [] and [r["token"] for r in w.observer.active(0.0, 60.0)] == [token]
    w.t.process(token)
    w.feed()
    assert [(r["token"], r["outcome"]) for r in w.history()] == [(token, "succeeded")]
    assert w.sample("dsc_jobs_ended_total", outcome="partial") == 1
    assert w.sample("dsc_jobs_ended_total", outcome="succeeded") == 1


def test_a_job_that_leaves_the_history_leaves_the_page() -> None:
    w = Watched(ServerConfig(history_size=1))
    first = create_job(w.t, FS)
    ok(cancel_job(w.t, DSC, first))
    second = create_job(w.t, FS)
    ok(cancel_job(w.t, DSC, second))
    w.feed()
    assert [r["token"] for r in w.history()] == [second]
    assert w.observer.job(first, 0.0, 60.0) is None
    w.t.clock += timedelta(hours=1)
    request = etree.Element(f"{{{names.EXT}}}PurgeJobHistoryRequest")
    etree.SubElement(request, f"{{{names.EXT}}}Before").text = w.t.clock.isoformat()
    ok(w.t.post(envelope(names.Action.EXT_PURGE_JOB_HISTORY, request)))
    w.feed()
    assert w.history() == [] and w.observer.history(50)[2] == 0
    w.observer.close()


def test_faults_are_counted_by_the_subcode_the_reply_carries(w: Watched) -> None:
    w.observer.request_ended("CreatePostScanJob", None)
    w.observer.request_ended("EndPostScanJob", "ClientErrorJobTokenNotFound")
    w.observer.request_ended("", "-")  # R4 step 1: no operation, no subcode
    assert w.sample("dsc_requests_total", operation="CreatePostScanJob", outcome="ok") == 1
    assert w.sample("dsc_requests_total", operation="EndPostScanJob", outcome="fault") == 1
    assert w.sample("dsc_requests_total", operation="unknown", outcome="fault") == 1
    assert w.sample("dsc_faults_total", subcode="ClientErrorJobTokenNotFound") == 1
    assert w.sample("dsc_faults_total", subcode="-") == 1


def test_the_page_counts_connections_without_reading_metrics_back(
    w: Watched, tmp_path: Path
) -> None:
    for _ in range(3):
        w.observer.connection_opened()
    w.observer.connection_closed()
    view = View("Idle", (), True, tmp_path, True, "test")
    assert snapshot(view, w.observer)["counters"]["connections"] == 2 == w.observer.connections
    assert w.sample("dsc_connections") == 2


def test_a_device_book_whose_database_is_away_is_one_error_line(
    w: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    """A device write that fails (PostgreSQL restarting) is one ERROR line naming it, never a
    traceback, and the image is still logged: a failover test found the image's contact
    update logged with a traceback while the others were one line."""
    from dsc_bindings.store.errors import StoreError

    class DatabaseAway:
        def close(self) -> None:
            pass

        def __getattr__(self, name: str) -> object:
            def fail(*args: object) -> None:
                raise StoreError(f"{name}: PoolTimeout", temporary=True)

            return fail

    w.observer.devices = DatabaseAway()  # type: ignore[assignment]
    caplog.set_level(logging.INFO)
    token = create_job(w.t, FS)
    ok(send_image(w.t, token, 1, b"12345"))
    w.feed()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "device not recorded: job_created: PoolTimeout",
        "device contact not recorded: contact: PoolTimeout",
    ]
    assert all(r.exc_info is None for r in errors)
    assert any("image 1 received" in line for line in logged(caplog))
