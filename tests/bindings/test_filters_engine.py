"""The processing engine (R6): event order, ContinueOnError, cancel, queueing.

The engine decides nothing about a job; where the core's answer matters (R6: the first failure
stops the run), the reports go to a real ``ScanServer`` and its StopProcessing comes back to the
engine before the report returns, as ``ScanService`` does."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from dsc_bindings.filters import DEFAULT_RUNNERS, FilterOutcome, FilterSettings, ProcessingEngine
from dsc_bindings.filters.common import Deliveries, FilterRun, never_raises
from dsc_bindings.filters.interruption import Interrupted
from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.interruption import interrupting
from dsc_core import ScanServer, StartProcessing
from dsc_core.commands import (
    FilterFinished,
    FilterStarted,
    ProcessingEvent,
    ProcessingFinished,
    ProcessingStarted,
    StopProcessing,
)
from dsc_core.model import (
    Document,
    FileShareInstructions,
    FilterState,
    FilterStateReason,
    FilterStatus,
    Job,
    JobState,
    JobStateReason,
    SharePointInstructions,
)
from test_filters_support import (
    UploadServer,
    allow,
    make_documents,
    make_job,
    random_bytes,
    second_away,
)

BAD = FileShareInstructions((r"\\h\s\..\..\etc",))  # refused (R9): Canceled, denied
GOOD = FileShareInstructions((r"\\h\s",))


class Recorder:
    def __init__(self, fail_on: type | None = None, failure: BaseException | None = None) -> None:
        self.events: list[ProcessingEvent] = []
        #: The jobs the engine handed back interrupted, in order.
        self.interrupted: list[str] = []
        self.changed = threading.Condition()
        self.fail_on = fail_on
        #: What a report of a ``fail_on`` event raises (an Exception unless told).
        self.failure = failure

    def __call__(self, event: ProcessingEvent) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()
        if self.fail_on is not None and isinstance(event, self.fail_on):
            raise self.failure or RuntimeError("the core is unhappy")

    def interrupt(self, token: str) -> None:
        """The engine's ``interrupted`` hand-back."""
        with self.changed:
            self.interrupted.append(token)
            self.changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), self.events

    def wait_finished(self, *tokens: str) -> None:
        self.wait(lambda: all(ProcessingFinished(t) in self.events for t in tokens))

    def of(self, token: str) -> list[ProcessingEvent]:
        return [e for e in self.events if e.token == token]


class CoreReport(Recorder):
    """Records every report and hands it to a real core, carrying out the engine commands it
    returns (StopProcessing -> engine.stop) before returning, as ScanService does."""

    def __init__(self) -> None:
        super().__init__()
        self.server = ScanServer(new_id=lambda: str(uuid.uuid4()))
        self.engine: ProcessingEngine | None = None

    def adopt(self, job: Job) -> Job:
        """Put ``job`` (Pending) in the core's table, as if its EndPostScanJob had arrived."""
        assert self.server.restore([job], datetime.now(UTC)) == [StartProcessing(job)]
        return job

    def __call__(self, event: ProcessingEvent) -> None:
        super().__call__(event)
        assert self.engine is not None
        for command in self.server.processing(event, datetime.now(UTC)):
            if isinstance(command, StopProcessing):
                self.engine.stop(command.token)


def _engine(
    tmp_path: Path,
    recorder: Recorder,
    documents_of: Callable[[Job], list[tuple[Document, Path]]] | None = None,
    server: UploadServer | None = None,
    **kw: Any,
) -> ProcessingEngine:
    docs = make_documents(tmp_path / "spool", ("png", b"image one"), ("pdf-a", b"%PDF two"))
    settings = FilterSettings.embedded_default(
        tmp_path / "data",
        sharepoint_timeout=5,
        chunk_size=64 * 1024,
        sharepoint_sites=allow(server) if server else (),
    )
    kw.setdefault("interrupted", recorder.interrupt)
    return ProcessingEngine(settings, documents_of or (lambda job: docs), recorder, **kw)


def _third_party(act: Callable[[Job], FilterOutcome]) -> dict[type, FilterRun]:
    """The engine's runners with ``act`` standing in for the file share filter as a third
    party's runner would (not guarded by never_raises): what it raises reaches the engine.
    These tests vary only on the job, so ``act`` gets only that."""

    def run(
        job: Job,
        index: int,
        documents: list[tuple[Document, Path]],
        settings: FilterSettings,
        cancelled: threading.Event,
    ) -> FilterOutcome:
        return act(job)

    return {FileShareInstructions: run}


def _raising_for(job: Job, raised: BaseException) -> dict[type, FilterRun]:
    """A third party's file share runner that raises ``raised`` for ``job`` and succeeds for
    every other job."""

    def act(running: Job) -> FilterOutcome:
        if running.token == job.token:
            raise raised
        return FilterOutcome.success()

    return _third_party(act)


def _guarded(act: Callable[[Deliveries], FilterOutcome]) -> dict[type, FilterRun]:
    """The same, guarded by never_raises as the project's filters are: ``act`` records what it
    delivers in the run's Deliveries (its outcome keeps them, whatever way it ends)."""

    @never_raises
    def run(
        job: Job,
        index: int,
        documents: list[tuple[Document, Path]],
        settings: FilterSettings,
        cancelled: threading.Event,
        delivered: Deliveries,
    ) -> FilterOutcome:
        return act(delivered)

    return {FileShareInstructions: run}


def _failed_run(token: str) -> list[ProcessingEvent]:
    """The reports of a run whose one filter failed (R9: UnknownError) and that finished."""
    return [
        ProcessingStarted(token),
        FilterStarted(token, 0),
        FilterFinished(
            token, 0, FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,)
        ),
        ProcessingFinished(token),
    ]


def _delivered(tmp_path: Path) -> list[str]:
    folder = tmp_path / "data/shares/h/s/alice@corp.example"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _written(tmp_path: Path) -> tuple[str, ...]:
    """The paths the file share filter reports for the two documents of :func:`_engine`."""
    folder = tmp_path / "data/shares/h/s/alice@corp.example"
    return (str(folder / "Scan_0001.png"), str(folder / "Scan_0002.pdf"))


def test_successful_job_reports_in_order(tmp_path: Path) -> None:
    recorder = Recorder()
    engine = _engine(tmp_path, recorder)
    job = make_job(GOOD)
    engine.start(job)
    recorder.wait_finished(job.token)
    engine.close(5)
    t = job.token
    # The report names the files written (issue 19), for the core to keep with the job.
    written = _written(tmp_path)
    assert recorder.events == [
        ProcessingStarted(t),
        FilterStarted(t, 0),
        FilterFinished(t, 0, FilterState.COMPLETED_SUCCESSFULLY, (), written),
        ProcessingFinished(t),
    ]
    assert _delivered(tmp_path) == ["Scan_0001.png", "Scan_0002.pdf"]


def test_failure_without_continue_on_error_stops(tmp_path: Path) -> None:
    """R6: the core ends the job at the first failure; its StopProcessing keeps the engine from
    starting the next filter, which delivers nothing."""
    recorder = CoreReport()
    engine = recorder.engine = _engine(tmp_path, recorder)
    job = recorder.adopt(make_job(BAD, GOOD, continue_on_error=False))
    engine.start(job)
    recorder.wait_finished(job.token)
    engine.close(5)
    t = job.token
    assert recorder.events == [
        ProcessingStarted(t),
        FilterStarted(t, 0),
        FilterFinished(t, 0, FilterState.CANCELED, (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)),
        ProcessingFinished(t),
    ]
    assert _delivered(tmp_path) == []
    ended = recorder.server.jobs.get(t)
    assert ended is not None and ended.state is JobState.ABORTED
    assert ended.reasons == (JobStateReason.PROCESSING_FAILED,)
    assert [f.state for f in ended.filters] == [FilterState.CANCELED, FilterState.CANCELED]


def test_the_engine_itself_runs_every_filter(tmp_path: Path) -> None:
    """Without a core to stop it, a failure does not end the run: the rule is not copied here."""
    recorder = Recorder()
    engine = _engine(tmp_path, recorder)
    job = make_job(BAD, GOOD, continue_on_error=False)
    engine.start(job)
    recorder.wait_finished(job.token)
    engine.close(5)
    assert [e.index for e in recorder.events if isinstance(e, FilterFinished)] == [0, 1]


def test_failure_with_continue_on_error_goes_on(tmp_path: Path) -> None:
    recorder = CoreReport()
    engine = recorder.engine = _engine(tmp_path, recorder)
    job = recorder.adopt(make_job(BAD, GOOD, continue_on_error=True))
    engine.start(job)
    recorder.wait_finished(job.token)
    engine.close(5)
    t = job.token
    assert recorder.events == [
        ProcessingStarted(t),
        FilterStarted(t, 0),
        FilterFinished(t, 0, FilterState.CANCELED, (FilterStateReason.FILE_SHARE_ACCESS_DENIED,)),
        FilterStarted(t, 1),
        FilterFinished(t, 1, FilterState.COMPLETED_SUCCESSFULLY, (), _written(tmp_path)),
        ProcessingFinished(t),
    ]
    assert _delivered(tmp_path) == ["Scan_0001.png", "Scan_0002.pdf"]
    ended = recorder.server.jobs.get(t)
    assert ended is not None and ended.reasons == (JobStateReason.COMPLETED_WITH_ERRORS,)
    # The core kept the names with the filter that wrote them, none with the refused one.
    assert [f.delivered for f in ended.filters] == [(), _written(tmp_path)]


def test_settled_filters_are_skipped(tmp_path: Path) -> None:
    recorder = Recorder()
    engine = _engine(tmp_path, recorder)
    job = make_job(GOOD, GOOD)
    # The core already canceled filter 0 (say, its instructions did not parse).
    job = job.evolve(
        filters=(
            FilterStatus(
                job.filters[0].dialect,
                FilterState.CANCELED,
                (FilterStateReason.INVALID_ARGS,),
                None,
            ),
            job.filters[1],
        )
    )
    engine.start(job)
    recorder.wait_finished(job.token)
    engine.close(5)
    t = job.token
    assert recorder.events == [
        ProcessingStarted(t),
        FilterStarted(t, 1),
        FilterFinished(t, 1, FilterState.COMPLETED_SUCCESSFULLY, (), _written(tmp_path)),
        ProcessingFinished(t),
    ]


def test_cancel_mid_run_stops_the_job(tmp_path: Path) -> None:
    """A slow SharePoint server keeps the first filter busy; stop() ends it at the next chunk,
    the later file share filter never starts, and the server keeps no partial upload."""
    recorder = Recorder()
    size = 16 * 1024 * 1024
    big = make_documents(tmp_path / "big", ("pdf-a", random_bytes(size)))
    with UploadServer(slow_receive_buffer=True) as server:
        engine = _engine(tmp_path, recorder, documents_of=lambda job: big, server=server)
        job = make_job(
            SharePointInstructions(False, (server.url("/slow/site"),)), GOOD, continue_on_error=True
        )
        engine.start(job)
        path = "/slow/site/Scan_0001.pdf"
        assert server.wait(lambda: server.received.get(path, 0) >= 256 * 1024)
        engine.stop(job.token)
        recorder.wait_finished(job.token)
        # Prompt: seen at a next chunk, the upload ends short of its 16 MiB (the slow server
        # takes ~5 s for all of it), measured in bytes, not seconds: a loaded machine may
        # take a while to get there.
        assert server.wait(lambda: path in server.incomplete)
        assert path not in server.stored and server.received[path] < size
    engine.close(5)
    t = job.token
    assert recorder.events == [
        ProcessingStarted(t),
        FilterStarted(t, 0),
        FilterFinished(t, 0, FilterState.CANCELED),
        ProcessingFinished(t),
    ]
    assert server.stored == {}
    assert _delivered(tmp_path) == []


def test_jobs_beyond_the_limit_wait_their_turn(tmp_path: Path) -> None:
    recorder = Recorder()
    engine = _engine(tmp_path, recorder, max_jobs=1)
    jobs = [make_job(GOOD) for _ in range(3)]
    for job in jobs:
        engine.start(job)
    recorder.wait_finished(*(j.token for j in jobs))
    engine.close(5)
    # One at a time, in order: each job's events form one uninterrupted block.
    assert [e.token for e in recorder.events] == [j.token for j in jobs for _ in range(4)]
    assert len(_delivered(tmp_path)) == 6


def test_the_engine_tells_when_a_place_is_free(tmp_path: Path) -> None:
    """``freed`` is told once per job, after its last report and once the job has left the
    engine, so that the place it counts as free takes the next job waiting for any instance
    (runtime/leasing.py); the job's own report came first."""
    recorder = Recorder()
    seen: list[tuple[int, int]] = []
    engine: ProcessingEngine | None = None

    def freed() -> None:
        assert engine is not None
        seen.append((engine.free_slots(), len(recorder.events)))

    engine = _engine(tmp_path, recorder, max_jobs=1, freed=freed)
    jobs = [make_job(GOOD) for _ in range(2)]
    for job in jobs:
        engine.start(job)
    recorder.wait_finished(*(j.token for j in jobs))
    engine.close(5)
    # After the first job the second was still queued (no place yet); after it, one free.
    assert seen == [(0, 4), (1, 8)], seen


def test_stop_while_queued_reports_only_the_end(tmp_path: Path) -> None:
    recorder = Recorder()
    gate = threading.Event()
    docs = make_documents(tmp_path / "spool", ("png", b"x"))

    def documents_of(job: Job) -> list[tuple[Document, Path]]:
        gate.wait(5)  # holds the only worker on the first job
        return docs

    engine = _engine(tmp_path, recorder, documents_of=documents_of, max_jobs=1)
    first, second = make_job(GOOD), make_job(GOOD)
    engine.start(first)
    engine.start(second)
    engine.stop(second.token)
    gate.set()
    recorder.wait_finished(first.token, second.token)
    engine.close(5)
    assert recorder.of(second.token) == [ProcessingFinished(second.token)]
    assert len(recorder.of(first.token)) == 4


def test_failing_report_does_not_stop_the_worker(tmp_path: Path) -> None:
    recorder = Recorder(fail_on=FilterStarted)
    engine = _engine(tmp_path, recorder)
    job = make_job(GOOD)
    engine.start(job)
    recorder.wait_finished(job.token)
    engine.close(5)
    assert len(recorder.events) == 4
    assert _delivered(tmp_path) == ["Scan_0001.png", "Scan_0002.pdf"]


def test_missing_documents_fail_the_filters(tmp_path: Path) -> None:
    recorder = Recorder()

    def documents_of(job: Job) -> list[tuple[Document, Path]]:
        raise FileNotFoundError("spool gone")

    engine = _engine(tmp_path, recorder, documents_of=documents_of)
    job = make_job(GOOD, GOOD, continue_on_error=True)
    engine.start(job)
    recorder.wait_finished(job.token)
    engine.close(5)
    finished = [e for e in recorder.events if isinstance(e, FilterFinished)]
    assert [(e.index, e.state, e.reasons) for e in finished] == [
        (0, FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,)),
        (1, FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,)),
    ]


def test_raising_runner_is_contained(tmp_path: Path) -> None:
    recorder = Recorder()
    job = make_job(GOOD)
    engine = _engine(tmp_path, recorder, runners=_raising_for(job, ValueError("bug")))
    engine.start(job)
    recorder.wait_finished(job.token)
    engine.close(5)
    assert (
        FilterFinished(
            job.token, 0, FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,)
        )
        in recorder.events
    )


def test_close_cancels_running_jobs(tmp_path: Path) -> None:
    recorder = Recorder()
    big = make_documents(tmp_path / "big", ("pdf-a", random_bytes(16 * 1024 * 1024)))
    with UploadServer(slow_receive_buffer=True) as server:
        engine = _engine(tmp_path, recorder, documents_of=lambda job: big, server=server)
        job = make_job(SharePointInstructions(False, (server.url("/slow/site"),)))
        engine.start(job)
        assert server.wait(lambda: server.received.get("/slow/site/Scan_0001.pdf", 0) > 0)
        engine.close(5)
        assert ProcessingFinished(job.token) in recorder.events
        engine.start(make_job(GOOD))  # ignored after close
    assert len(recorder.events) == 4


def test_an_interrupted_filter_fails_nothing_and_hands_the_job_back(tmp_path: Path) -> None:
    """The store did not answer inside the filter (Interrupted, filters/interruption.py):
    nothing more of the run is reported (no FilterFinished, no ProcessingFinished: the job
    does not fail), the job leaves the engine and is handed back, and a resume of it starts
    at once (R13)."""
    recorder = Recorder()
    runs: list[Deliveries] = []

    def once_interrupted(delivered: Deliveries) -> FilterOutcome:
        runs.append(delivered)
        if len(runs) == 1:
            delivered.add("fileshare", "/srv/scans/Scan_0001.png")
            raise Interrupted("recording a delivery: the database does not answer")
        return FilterOutcome.success()

    engine = _engine(tmp_path, recorder, runners=_guarded(once_interrupted))
    job = make_job(GOOD)
    engine.start(job)
    recorder.wait(lambda: recorder.interrupted == [job.token])
    assert recorder.of(job.token) == [ProcessingStarted(job.token), FilterStarted(job.token, 0)]
    engine.start(job)  # the resume: the interrupted run is out of the engine
    recorder.wait_finished(job.token)
    engine.close(5)
    assert recorder.of(job.token)[2:] == [
        ProcessingStarted(job.token),
        FilterStarted(job.token, 0),
        FilterFinished(job.token, 0, FilterState.COMPLETED_SUCCESSFULLY),
        ProcessingFinished(job.token),
    ]
    assert recorder.interrupted == [job.token]


@pytest.mark.parametrize("kind", ["fileshare", "sharepoint"])
def test_an_interruption_deep_in_a_filter_leaves_no_outcome_and_the_worker_goes_on(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The store stops answering inside a real filter, its first document delivered
    (test_filters_support.second_away): nothing more of that run is reported, the job is
    handed back, nothing is logged as a failure, and the engine's one worker (max_jobs 1)
    runs the next job (a worker that died would keep its place and the job would wait)."""
    recorder = Recorder()
    caplog.set_level(logging.WARNING)
    with UploadServer() as server:
        instructions = GOOD
        if kind == "sharepoint":
            instructions = SharePointInstructions(False, (server.url("/site"),))
        docs = make_documents(tmp_path / "spool", ("png", b"image one"), ("pdf-a", b"%PDF two"))
        away, following = make_job(instructions), make_job(instructions)
        engine = _engine(
            tmp_path,
            recorder,
            documents_of=lambda job: second_away(docs) if job is away else docs,
            server=server,
            max_jobs=1,
        )
        engine.start(away)
        engine.start(following)
        recorder.wait_finished(following.token)
        engine.close(5)
    assert recorder.interrupted == [away.token]
    assert recorder.of(away.token) == [ProcessingStarted(away.token), FilterStarted(away.token, 0)]
    [finished] = [e for e in recorder.of(following.token) if isinstance(e, FilterFinished)]
    assert finished.state is FilterState.COMPLETED_SUCCESSFULLY
    assert [r.levelname for r in caplog.records if r.levelno > logging.WARNING] == []
    assert any("were interrupted" in r.getMessage() for r in caplog.records)


def test_a_filters_own_catch_all_does_not_swallow_an_interruption(tmp_path: Path) -> None:
    """A filter written the way R9's failure mapping invites, as a third party might: its
    work in ``try``, any ``except Exception`` an UnknownError.  Its store call meets a store
    that does not answer (store/interruption.py): Interrupted, a BaseException, passes its
    catch-all and the engine's, so the job is handed back, not failed (as an Exception it
    became CompletedWithErrors, which aborts the job for good)."""
    recorder = Recorder()
    runs: list[str] = []

    def third_party(job: Job) -> FilterOutcome:
        runs.append(job.token)
        try:
            if len(runs) == 1:
                with interrupting():
                    raise StoreError("recording a delivery: the database does not answer", True)
        except Exception:
            return FilterOutcome.errors(FilterStateReason.UNKNOWN_ERROR)
        return FilterOutcome.success()

    engine = _engine(tmp_path, recorder, runners=_third_party(third_party), max_jobs=1)
    job, following = make_job(GOOD), make_job(GOOD)
    engine.start(job)
    engine.start(following)
    recorder.wait_finished(following.token)
    engine.close(5)
    assert recorder.interrupted == [job.token]
    assert recorder.of(job.token) == [ProcessingStarted(job.token), FilterStarted(job.token, 0)]
    assert FilterFinished(following.token, 0, FilterState.COMPLETED_SUCCESSFULLY) in recorder.events


#: BaseExceptions other than Interrupted a filter may raise: each is a failed filter, not an
#: interruption nor the end of the worker (a SystemExit in a worker thread ends only that thread,
#: so it never did what its raiser meant; KeyboardInterrupt raised by hand, as a real one only
#: reaches the main thread).
OTHER_BASE_EXCEPTIONS = [SystemExit(3), GeneratorExit(), KeyboardInterrupt()]


@pytest.mark.parametrize("raised", OTHER_BASE_EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_another_base_exception_in_a_filter_fails_it_and_the_worker_goes_on(
    tmp_path: Path, raised: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine takes Interrupted by name; any other BaseException a filter raises (a third
    party's runner, not guarded by never_raises) is a failed filter (R9: UnknownError), logged
    at ERROR with its traceback: the job gets its FilterFinished and ProcessingFinished, it is
    not handed back as interrupted, the engine's one worker (max_jobs 1) runs the next job, no
    thread dies, and the place is free again (a dead worker stayed counted and the job never
    left the engine)."""
    recorder = Recorder()
    died: list[type[BaseException] | None] = []
    freed = threading.Semaphore(0)
    failing, following = make_job(GOOD), make_job(GOOD)
    engine = _engine(
        tmp_path,
        recorder,
        runners=_raising_for(failing, raised),
        max_jobs=1,
        freed=freed.release,
    )
    previous = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_type)
    try:
        engine.start(failing)
        engine.start(following)
        recorder.wait_finished(failing.token, following.token)
        assert freed.acquire(timeout=10) and freed.acquire(timeout=10)
        assert engine.free_slots() == 1
        engine.close(5)
    finally:
        threading.excepthook = previous
    assert died == []
    assert recorder.interrupted == []
    assert recorder.of(failing.token) == _failed_run(failing.token)
    assert FilterFinished(following.token, 0, FilterState.COMPLETED_SUCCESSFULLY) in (
        recorder.events
    )
    [logged] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged.levelno == logging.ERROR and failing.token in logged.getMessage()
    assert logged.exc_info is not None and logged.exc_info[1] is raised


@pytest.mark.parametrize(
    "raised",
    [ValueError("bug after the first document"), *OTHER_BASE_EXCEPTIONS],
    ids=lambda e: type(e).__name__,
)
def test_a_guarded_filter_that_breaks_after_delivering_keeps_what_it_delivered(
    tmp_path: Path, raised: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """never_raises (R9 failure mapping) turns a bug after a delivery, an Exception or any other
    BaseException but Interrupted, into UnknownError and keeps the names the run had reported:
    the file written before the bug is in the job record, not only in the log (past
    never_raises, the engine's catch-all would fail the filter without them)."""
    recorder = Recorder()

    def half(delivered: Deliveries) -> FilterOutcome:
        delivered.add("fileshare", "/srv/scans/Scan_0001.png")
        raise raised

    engine = _engine(tmp_path, recorder, runners=_guarded(half))
    job = make_job(GOOD)
    engine.start(job)
    recorder.wait_finished(job.token)
    engine.close(5)
    assert recorder.interrupted == []
    assert (
        FilterFinished(
            job.token,
            0,
            FilterState.COMPLETED_WITH_ERRORS,
            (FilterStateReason.UNKNOWN_ERROR,),
            ("/srv/scans/Scan_0001.png",),
        )
        in recorder.events
    )
    [logged] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged.exc_info is not None and logged.exc_info[1] is raised


class StoppedWhileRunning(threading.Event):
    """A ``cancelled`` the filter asks at its first check (fileshare: before each share), where
    the program is stopped: ``stop`` runs there, on the filter's thread."""

    def __init__(self, stop: Callable[[], None]) -> None:
        super().__init__()
        self._stop = stop

    def is_set(self) -> bool:
        self._stop()
        return False


def _ctrl_c() -> None:
    """A real Ctrl-C: SIGINT, which Python's handler turns into KeyboardInterrupt on the main
    thread."""
    signal.raise_signal(signal.SIGINT)


def _hand_raised_ctrl_c() -> None:
    raise KeyboardInterrupt


def _exit() -> None:
    sys.exit(3)


@pytest.mark.parametrize(
    ("on_main", "in_worker", "expected"),
    [(_ctrl_c, _hand_raised_ctrl_c, KeyboardInterrupt), (_exit, _exit, SystemExit)],
    ids=["KeyboardInterrupt", "SystemExit"],
)
def test_a_ctrl_c_or_exit_in_a_filter_on_the_main_thread_stops_the_program_not_the_filter(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    on_main: Callable[[], None],
    in_worker: Callable[[], None],
    expected: type[BaseException],
) -> None:
    """A filter is a plain function a program may call on its main thread (DEFAULT_RUNNERS;
    bench/smb.py calls fileshare.run so): a Ctrl-C or sys.exit there is the program's and goes
    on to it, not a filter CompletedWithErrors after which the program went on
    (filters/interruption.Contained).  The same filter in another thread, as the engine's
    workers run it, still contains it: a failed filter, logged at ERROR."""
    run = DEFAULT_RUNNERS[FileShareInstructions]
    job = make_job(GOOD)
    docs = make_documents(tmp_path / "spool", ("png", b"image one"))
    settings = FilterSettings.embedded_default(tmp_path / "data")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(expected):
            run(job, 0, docs, settings, StoppedWhileRunning(on_main))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []

    outcomes: list[FilterOutcome] = []
    worker = threading.Thread(
        target=lambda: outcomes.append(run(job, 0, docs, settings, StoppedWhileRunning(in_worker)))
    )
    worker.start()
    worker.join(10)
    assert outcomes == [FilterOutcome.errors(FilterStateReason.UNKNOWN_ERROR)]
    [logged] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged.exc_info is not None and isinstance(logged.exc_info[1], expected)


def test_documents_the_spool_cannot_give_now_interrupt_the_run(tmp_path: Path) -> None:
    """Reading the documents met a spool that does not answer (S3 unreachable): no filter
    runs or fails, the job is handed back."""
    recorder = Recorder()

    def documents_of(job: Job) -> list[tuple[Document, Path]]:
        raise Interrupted("reading spool/j/1: the S3 endpoint does not answer")

    engine = _engine(tmp_path, recorder, documents_of=documents_of)
    job = make_job(GOOD, GOOD)
    engine.start(job)
    recorder.wait(lambda: recorder.interrupted == [job.token])
    engine.close(5)
    assert recorder.of(job.token) == [ProcessingStarted(job.token)]
    assert _delivered(tmp_path) == []


@pytest.mark.parametrize("temporary", [True, False])
def test_only_a_temporary_store_error_interrupts_the_run(tmp_path: Path, temporary: bool) -> None:
    """The one rule (store/interruption.py): a store that may answer on a retry (R4 step 9)
    interrupts the run; a lasting fault (a document gone from the spool) fails the filters as
    before (UnknownError), since resuming would meet it again."""
    recorder = Recorder()

    def documents_of(job: Job) -> list[tuple[Document, Path]]:
        with interrupting():
            raise StoreError("reading spool/j/1: the store says no", temporary)

    engine = _engine(tmp_path, recorder, documents_of=documents_of)
    job = make_job(GOOD)
    engine.start(job)
    if temporary:
        recorder.wait(lambda: recorder.interrupted == [job.token])
        assert recorder.of(job.token) == [ProcessingStarted(job.token)]
    else:
        recorder.wait_finished(job.token)
        assert (
            FilterFinished(
                job.token, 0, FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,)
            )
            in recorder.events
        )
        assert recorder.interrupted == []
    engine.close(5)


@pytest.fixture
def thread_deaths() -> Iterator[list[type[BaseException] | None]]:
    """The exception types that ended a thread while the test ran (threading.excepthook)."""
    died: list[type[BaseException] | None] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: died.append(args.exc_type)
    try:
        yield died
    finally:
        threading.excepthook = previous


def _errors_raised(caplog: pytest.LogCaptureFixture) -> list[BaseException | None]:
    """What the ERROR records logged with their tracebacks raised, in order."""
    return [
        r.exc_info[1] if r.exc_info else None for r in caplog.records if r.levelno >= logging.ERROR
    ]


@pytest.mark.parametrize("raised", OTHER_BASE_EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_another_base_exception_in_a_report_leaves_the_job_to_finish(
    tmp_path: Path,
    raised: BaseException,
    caplog: pytest.LogCaptureFixture,
    thread_deaths: list[type[BaseException] | None],
) -> None:
    """A report that raises any BaseException but Interrupted is logged (ERROR, traceback) and
    the run goes on, as after an Exception: the job gets its ProcessingFinished and its files
    (before, it ended the run there, the job never finished and never left the engine)."""
    recorder = Recorder(fail_on=FilterStarted, failure=raised)
    engine = _engine(tmp_path, recorder, max_jobs=1)
    job, following = make_job(GOOD), make_job(GOOD)
    engine.start(job)
    engine.start(following)
    recorder.wait_finished(job.token, following.token)
    engine.close(5)
    assert recorder.of(job.token) == [
        ProcessingStarted(job.token),
        FilterStarted(job.token, 0),
        FilterFinished(job.token, 0, FilterState.COMPLETED_SUCCESSFULLY, (), _written(tmp_path)),
        ProcessingFinished(job.token),
    ]
    assert thread_deaths == [] and recorder.interrupted == []
    assert _errors_raised(caplog) == [raised, raised]  # one report of each job


@pytest.mark.parametrize("raised", OTHER_BASE_EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_another_base_exception_reading_the_spool_fails_the_filters(
    tmp_path: Path,
    raised: BaseException,
    caplog: pytest.LogCaptureFixture,
    thread_deaths: list[type[BaseException] | None],
) -> None:
    """The spool read raising any BaseException but Interrupted is the documents missing, as an
    Exception is: the filters fail (UnknownError) and the job finishes, not handed back."""
    recorder = Recorder()

    def documents_of(job: Job) -> list[tuple[Document, Path]]:
        raise raised

    engine = _engine(tmp_path, recorder, documents_of=documents_of)
    job = make_job(GOOD)
    engine.start(job)
    recorder.wait_finished(job.token)
    engine.close(5)
    assert recorder.of(job.token) == _failed_run(job.token)
    assert thread_deaths == [] and recorder.interrupted == []
    assert _errors_raised(caplog) == [raised]


@pytest.mark.parametrize(
    "raised", [*OTHER_BASE_EXCEPTIONS, Interrupted("late")], ids=lambda e: type(e).__name__
)
def test_callbacks_that_raise_leave_the_worker_to_run_the_next_job(
    tmp_path: Path,
    raised: BaseException,
    caplog: pytest.LogCaptureFixture,
    thread_deaths: list[type[BaseException] | None],
) -> None:
    """The ``interrupted`` hand-back and the ``freed`` notice raising anything (an Interrupted
    too: the job is out of the engine, no run is left to stop) are logged and the one worker
    (max_jobs 1) runs the next job; before, a BaseException there ended the worker, which stayed
    counted, so the engine's place was never free again."""
    recorder = Recorder()
    frees: list[str] = []

    def interrupted(token: str) -> None:
        recorder.interrupt(token)
        raise raised

    def freed() -> None:
        frees.append("freed")
        raise raised

    first, second = make_job(GOOD), make_job(GOOD)
    engine = _engine(
        tmp_path,
        recorder,
        runners=_raising_for(first, Interrupted("the database does not answer")),
        max_jobs=1,
        interrupted=interrupted,
        freed=freed,
    )
    engine.start(first)
    engine.start(second)
    recorder.wait_finished(second.token)
    recorder.wait(lambda: len(frees) == 2 and engine.free_slots() == 1)
    engine.close(5)
    assert recorder.interrupted == [first.token]
    assert FilterFinished(second.token, 0, FilterState.COMPLETED_SUCCESSFULLY) in recorder.events
    assert thread_deaths == []
    assert _errors_raised(caplog) == [raised, raised, raised]  # hand-back, freed twice
