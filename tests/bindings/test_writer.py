"""The command writer (runtime/writer.py): what one server hands its delivery hub keeps the
core's order, whichever lane a batch takes.  Unit tests: a real CommandWriter and Routes, the
store a function that can hold a record write, the hub a list."""

from __future__ import annotations

import threading

from dsc_bindings.runtime.writer import CommandWriter, Routes, Writable
from dsc_bindings.store.errors import JobChanged
from dsc_bindings.store.interface import VersionedWrite
from dsc_core import AnnounceRepositoryState, Deliver, DiscardDocuments, RepositoryState, UpdateJob
from dsc_core.commands import JobInput, StartProcessing, StopProcessing
from test_store import make_job


def _event(name: str) -> Deliver:
    return Deliver("urn:uuid:s", "http://sink.example/events", (name.encode(),))


def _announce(name: str) -> AnnounceRepositoryState:
    """An announcement whose one event (a RepositoryStatusSummaryEvent) is ``name``."""
    return AnnounceRepositoryState(
        RepositoryState.PROCESSING, RepositoryState.IDLE, (_event(name),)
    )


def test_an_announcement_s_events_keep_their_place_among_one_server_s_notifications() -> None:
    """One server (no stamping, runtime/service.py ``submit``): an AnnounceRepositoryState's
    events go to the hub where the announcement stood among the batch's commands (before the
    events rode inside it they were the Delivers right after it), a batch of hand-offs only
    submitted while that batch waits in the record lane does not overtake it, and an
    announcement never runs inline (a shared store must record it first: the service stamps
    what it submits, ``run_inline`` would carry it out unstamped)."""
    delivered: list[Deliver] = []
    entered, release = threading.Event(), threading.Event()

    def store(command: Writable) -> None:
        entered.set()
        assert release.wait(10), "the test never released the store"

    def hand_off(command: StartProcessing | StopProcessing) -> None:
        raise AssertionError(f"no engine command here: {command}")

    writer = CommandWriter(Routes(store, hand_off, hand_off, delivered.append))
    writer.start()
    try:
        job = make_job("j")
        first = writer.submit(
            [
                UpdateJob(job, JobInput.IMAGE),
                _event("job 1"),
                _announce("summary"),
                _event("job 2"),
            ],
            strict=False,
        )
        assert entered.wait(10)
        assert not writer.run_inline([_event("job 3")])  # the record lane is busy: queued
        second = writer.submit([_event("job 3")], strict=False)
        assert delivered == []  # nothing overtook the record write
        release.set()
        assert first.wait(10) and second.wait(10)
        assert delivered == [_event("job 1"), _event("summary"), _event("job 2"), _event("job 3")]
        assert writer.idle
        assert not writer.run_inline([_announce("again")])
        assert writer.run_inline([_event("job 4")])
        assert delivered[-1] == _event("job 4")
    finally:
        release.set()
        writer.close()


def test_a_job_changed_elsewhere_keeps_its_documents() -> None:
    """An engine report's batch (not strict) whose record write is refused because another
    instance changed the job (JobChanged: it took the job over when this instance's lease
    lapsed, or ended it) does not discard the job's documents: the other instance may be
    running it on them (a rescued job found a document gone and was Aborted, bench/cluster.py
    under load).  The batch's other commands still run, another job's discard too; the
    ticket names the job whose write was refused."""
    applied: list[Writable] = []

    def store(command: Writable) -> None:
        if isinstance(command, VersionedWrite) and command.command.job.token == "lost":
            raise JobChanged("lost")
        applied.append(command)

    def hand_off(command: StartProcessing | StopProcessing) -> None:
        applied.append(command)

    writer = CommandWriter(Routes(store, hand_off, hand_off, applied.append))
    writer.start()
    try:
        lost = UpdateJob(make_job("lost"), JobInput.COMPLETE_SUCCESSFULLY)
        kept = UpdateJob(make_job("kept"), JobInput.COMPLETE_SUCCESSFULLY)
        batch: list[Writable] = [
            VersionedWrite(lost, expected=3, epoch=0),
            DiscardDocuments("lost"),
            VersionedWrite(kept, expected=5, epoch=0),
            DiscardDocuments("kept"),
            _event("after"),
        ]
        ticket = writer.submit(batch, strict=False)
        assert ticket.wait(10)
        assert applied == [batch[2], DiscardDocuments("kept"), _event("after")], applied
        # The engine's report learns from its ticket that the job's write was not recorded
        # (runtime/service.py says the run ended without it).
        assert ticket.refused == frozenset({"lost"})
    finally:
        writer.close()
