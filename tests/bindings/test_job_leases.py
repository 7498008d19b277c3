"""Job leases on a real PostgreSQL (issue 18 point 2, store/leases.py): one claimer wins, a
fenced write of a lost lease is refused, a renewal brings cancellations and losses, an expired
lease is rescued by one instance only, a live one by none, a job passed on by a busy instance is
taken by one with a free place; and the runtime's keeper (runtime/leasing.py) stops the filters
of what it lost and leases only what its engine runs."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import psycopg
import pytest

from cluster_support import lone_instance
from dsc_bindings.filters import FilterSettings, fileshare
from dsc_bindings.filters.interruption import Interrupted
from dsc_bindings.filters.sharejournal import DeliveryRefused
from dsc_bindings.runtime.catchup import JobCatchUp
from dsc_bindings.runtime.leasing import NO_LEASE, LeaseKeeper
from dsc_bindings.serve import compose
from dsc_bindings.store.errors import JobChanged, StoreError
from dsc_bindings.store.interface import VersionedWrite
from dsc_bindings.store.leases import JobLeases, Rescued
from dsc_bindings.store.pgdeliveries import PgDeliveryJournal
from dsc_bindings.store.postgresql import PostgresRecords
from dsc_bindings.store.sqlite import record_columns
from dsc_bindings.store.undecodable import UndecodableRecords
from dsc_core import ServerConfig
from dsc_core.commands import CreateJob, JobInput, UpdateJob
from dsc_core.model import FileShareInstructions, FilterState, JobState
from test_filters_support import make_documents
from test_filters_support import make_job as make_filter_job
from test_store import make_job
from waiting import wait_for

if TYPE_CHECKING:
    pass

LEASE = 30.0


@pytest.fixture
def records(dsn: str) -> Iterator[PostgresRecords]:
    r = PostgresRecords.open(dsn)
    try:
        yield r
    finally:
        r.close()


def leases_of(records: PostgresRecords, name: str, lease: float = LEASE) -> JobLeases:
    return JobLeases(records.database, f"instance-{name}", f"host:/data/{name}", lease)


def pending(records: PostgresRecords, token: str, state: JobState = JobState.PENDING) -> int:
    """A job waiting for an engine (written as the core writes it); its row version."""
    records.write(VersionedWrite(CreateJob(make_job(token, state=state)), None, 0))
    return 1


def expire(dsn: str, token: str) -> None:
    """The lease ends now (as if its holder had stopped renewing it long ago)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE jobs SET lease_until = now() - interval '1 s' WHERE token = %s", (token,)
        )


def end(records: PostgresRecords, token: str, version: int, state: JobState) -> None:
    job = make_job(token, state=state)
    records.write(VersionedWrite(UpdateJob(job, JobInput.CANCEL, ()), version, 0))


@dataclasses.dataclass(frozen=True)
class Places:
    """An engine's places as the keeper asks for them (runtime/leasing.py ``EnginePlaces``)."""

    free: Callable[[], int]
    slots: int

    def free_slots(self) -> int:
        return self.free()


def keeper_of(
    leases: JobLeases,
    *,
    stop: Callable[[str], None] = lambda token: None,
    resume: Callable[[list[Rescued]], None] = lambda rescued: None,
    free_slots: Callable[[], int],
    slots: int = 1,
) -> LeaseKeeper:
    """A LeaseKeeper of ``leases`` with the tests' heartbeat (a second), tokens named as
    themselves, an engine of ``slots`` places of which ``free_slots()`` are free, and nothing
    to stop or resume unless given."""
    return LeaseKeeper(
        leases,
        heartbeat_seconds=1.0,
        stop=stop,
        resume=resume,
        engine=Places(free_slots, slots),
        name_of=str,
    )


def test_one_claim_wins(records: PostgresRecords) -> None:
    pending(records, "j")
    a, b = leases_of(records, "a"), leases_of(records, "b")
    assert a.claim("j") == 1
    assert b.claim("j") is None  # held by a live lease
    assert a.claim("j") == 2  # its holder may claim again (a new epoch)


def test_concurrent_claims_never_both_win(records: PostgresRecords) -> None:
    tokens = [f"j{i}" for i in range(20)]
    for token in tokens:
        pending(records, token)
    claimers = [leases_of(records, str(n)) for n in range(4)]
    won: dict[str, list[str]] = {t: [] for t in tokens}
    start = threading.Barrier(len(claimers))

    def claim_all(leases: JobLeases) -> None:
        start.wait()
        for token in tokens:
            if leases.claim(token) is not None:
                won[token].append(leases.owner)

    threads = [threading.Thread(target=claim_all, args=(c,)) for c in claimers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(owners) == 1 for owners in won.values()), won


def test_no_claim_of_a_job_not_waiting_for_an_engine(records: PostgresRecords) -> None:
    pending(records, "c", JobState.CREATING)
    pending(records, "done", JobState.COMPLETED)
    a = leases_of(records, "a")
    assert a.claim("c") is None
    assert a.claim("done") is None


def test_a_fenced_write_of_a_lost_lease_is_refused(dsn: str, records: PostgresRecords) -> None:
    version = pending(records, "j")
    a, b = leases_of(records, "a"), leases_of(records, "b")
    epoch = a.claim("j")
    assert epoch is not None
    started = make_job("j", state=JobState.STARTED)
    records.write(
        VersionedWrite(
            UpdateJob(started, JobInput.ENGINE_STARTED, ()), version, 0, lease=(a.owner, epoch)
        )
    )
    version += 1
    expire(dsn, "j")
    [rescued] = b.rescue(5)
    assert rescued == Rescued("j", a.owner, epoch + 1)
    late = make_job("j", state=JobState.PROCESSING)
    with pytest.raises(JobChanged):  # same row version, but the lease is b's now
        records.write(
            VersionedWrite(
                UpdateJob(late, JobInput.FILTER_STARTED, ()), version, 0, lease=(a.owner, epoch)
            )
        )
    records.write(
        VersionedWrite(
            UpdateJob(late, JobInput.FILTER_STARTED, ()), version, 0, lease=(b.owner, rescued.epoch)
        )
    )


def test_renewal_brings_cancellation_and_loss(dsn: str, records: PostgresRecords) -> None:
    for token in ("run", "canceled", "taken"):
        pending(records, token)
    a, b = leases_of(records, "a"), leases_of(records, "b")
    held = {t: a.claim(t) for t in ("run", "canceled", "taken")}
    assert None not in held.values()
    end(records, "canceled", 1, JobState.CANCELED)  # CancelPostScanJob on another instance
    expire(dsn, "taken")
    assert [r.token for r in b.rescue(5)] == ["taken"]
    renewal = a.renew({t: e for t, e in held.items() if e is not None})
    assert renewal.held == {"run"}
    assert renewal.ended == {"canceled"}
    assert renewal.lost == {"taken"}
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT lease_until > now() + interval '20 s' FROM jobs WHERE token = 'run'"
        ).fetchone()
    assert row == (True,)


def test_rescue_takes_expired_and_unclaimed_jobs_once(dsn: str, records: PostgresRecords) -> None:
    for token in ("live", "expired", "unclaimed"):
        pending(records, token)
    pending(records, "creating", JobState.CREATING)
    a, b, c = (leases_of(records, n) for n in "abc")
    assert a.claim("live") is not None and a.claim("expired") is not None
    expire(dsn, "expired")
    rescued = b.rescue(10)
    assert sorted((r.token, r.previous) for r in rescued) == [
        ("expired", a.owner),
        ("unclaimed", None),
    ]
    assert c.rescue(10) == []  # taken, and the live lease is nobody else's
    expire(dsn, "live")
    assert [r.token for r in c.rescue(0)] == []  # no free engine place: nothing taken
    assert [r.token for r in c.rescue(1)] == ["live"]


def test_a_new_run_from_the_same_folder_takes_back_every_job_of_the_old_run(
    records: PostgresRecords,
) -> None:
    """R13 as on SQLite: all of the dead run's jobs, queued or running, at once (however many
    the engine can start), each with a new epoch; nobody else's, nothing twice."""
    for token in ("queued1", "queued2", "queued3", "running", "elsewhere", "creating"):
        pending(records, token, JobState.CREATING if token == "creating" else JobState.PENDING)
    old, other = leases_of(records, "a"), leases_of(records, "b")
    epochs = {t: old.claim(t) for t in ("queued1", "queued2", "queued3", "running")}
    assert other.claim("elsewhere") is not None
    new = JobLeases(records.database, "instance-a2", old.home, LEASE)
    assert other.rescue(5) == []  # the old run's leases are live: nobody else may take them
    taken = new.take_home()
    assert [(r.token, r.previous) for r in taken] == [
        (t, old.owner) for t in ("queued1", "queued2", "queued3", "running")
    ]
    assert all(r.epoch == (epochs[r.token] or 0) + 1 for r in taken)
    assert new.take_home() == [] and other.rescue(5) == []  # held by the new run now
    # The dead run's epoch is fenced off: its renewal loses them all.
    assert old.renew({t: e or 0 for t, e in epochs.items()}).lost == frozenset(epochs)


def test_the_write_that_makes_a_job_pending_holds_it_for_its_claim(
    records: PostgresRecords,
) -> None:
    """Between the write that makes a job Pending and the writer's claim, no sweep takes it."""
    records.write(VersionedWrite(CreateJob(make_job("j")), None, 0))
    records.instance = "instance-a"
    records.write(
        VersionedWrite(UpdateJob(make_job("j", state=JobState.PENDING), JobInput.END, ()), 1, 0)
    )
    a, b = leases_of(records, "a"), leases_of(records, "b")
    assert b.rescue(5) == [] and b.claim("j") is None
    assert a.claim("j") == 1


def make_pending(records: PostgresRecords, token: str, maker: str) -> None:
    """A job made Pending by instance ``maker``'s write (EndPostScanJob), as the core writes
    it: the write holds it for that instance's claim."""
    records.write(VersionedWrite(CreateJob(make_job(token)), None, 0))
    records.instance = f"instance-{maker}"
    records.write(
        VersionedWrite(UpdateJob(make_job(token, state=JobState.PENDING), JobInput.END, ()), 1, 0)
    )


def test_concurrent_sweeps_share_waiting_jobs_oldest_first_never_one_twice(
    records: PostgresRecords,
) -> None:
    """The claim of waiting jobs (store/leases.py ``_RESCUE``, ``FOR UPDATE SKIP LOCKED``):
    four instances sweeping at once, two places each, over thirty jobs nobody holds: no job
    is taken twice, and each sweep takes the oldest jobs still free."""
    tokens = [f"w{i:02}" for i in range(30)]
    for token in tokens:
        pending(records, token)
    claimers = [leases_of(records, str(n)) for n in range(4)]
    taken: dict[str, list[list[str]]] = {c.owner: [] for c in claimers}
    start = threading.Barrier(len(claimers))

    def sweep(leases: JobLeases) -> None:
        start.wait()
        while True:
            found = [r.token for r in leases.rescue(2)]
            if not found:
                return
            taken[leases.owner].append(found)

    threads = [threading.Thread(target=sweep, args=(c,)) for c in claimers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [token for sweeps in taken.values() for found in sweeps for token in found]
    assert sorted(every) == tokens  # each once
    for sweeps in taken.values():
        # One instance's sweeps take ever younger jobs, each sweep oldest first.
        mine = [token for found in sweeps for token in found]
        assert mine == sorted(mine), sweeps


def test_a_busy_instance_passes_its_pending_job_on_to_one_with_a_free_place(
    dsn: str, records: PostgresRecords
) -> None:
    """A job made Pending on a busy instance is passed on: any instance's sweep takes it at
    once (not after the lease of its claim), as one let go, not rescued; the channel rings."""
    make_pending(records, "j", "a")
    a, b, c = (leases_of(records, n) for n in "abc")
    assert b.rescue(5) == []  # held for a's claim
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN dsc_jobs")
        assert a.pass_on("j")
        rang = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert rang == ["j:claimable"]
    assert not a.pass_on("j")  # nothing held any more
    [taken] = b.rescue(5)
    assert taken == Rescued("j", a.owner, 1, free=True)
    assert c.rescue(5) == [] and a.claim("j") is None  # b's now


def test_the_keeper_leases_only_what_its_engine_runs(records: PostgresRecords) -> None:
    """The runtime's keeper with one engine place: the first job is claimed, the second
    passed on (an idle instance takes it), and once the first finished, the keeper's sweep
    takes the oldest job waiting."""
    for token in ("first", "second", "third"):
        make_pending(records, token, "a")
    running: set[str] = set()
    resumed: list[list[str]] = []
    keeper = keeper_of(
        leases_of(records, "a"),
        resume=lambda rescued: resumed.append([r.token for r in rescued]),
        free_slots=lambda: 1 - len(running),
    )
    assert keeper.claim("first")
    running.add("first")
    assert not keeper.claim("second") and not keeper.claim("third")
    assert keeper.held() == {"first": 1}
    keeper.take_up()
    assert resumed == []  # no free place
    assert [r.token for r in leases_of(records, "b").rescue(1)] == ["second"]
    end(records, "first", 2, JobState.COMPLETED)  # the engine's last report
    running.discard("first")
    keeper.finished("first")
    keeper.take_up()
    assert resumed == [["third"]] and set(keeper.held()) == {"third"}


def test_a_finished_job_releases_its_lease(records: PostgresRecords) -> None:
    pending(records, "j")
    a, b = leases_of(records, "a"), leases_of(records, "b")
    epoch = a.claim("j")
    assert epoch is not None
    a.release("j", epoch)
    assert b.claim("j") == epoch + 1  # a retry may run anywhere at once


def test_the_keeper_stops_what_it_lost_and_writes_nothing_more(
    dsn: str, records: PostgresRecords
) -> None:
    pending(records, "j")
    stopped: list[str] = []
    keeper = keeper_of(leases_of(records, "a"), stop=stopped.append, free_slots=lambda: 1)
    assert keeper.claim("j")
    expire(dsn, "j")
    assert [r.token for r in leases_of(records, "b").rescue(1)] == ["j"]
    keeper.beat(True)
    assert stopped == ["j"] and not keeper.holds("j")
    # The engine's further reports carry no lease: refused without asking the database.
    write = VersionedWrite(UpdateJob(make_job("j"), JobInput.FILTER_STARTED, ()), 1, 0)
    [fenced] = keeper.fence([write], engine_token="j")
    assert isinstance(fenced, VersionedWrite) and fenced.lease == (keeper.owner, NO_LEASE)
    with pytest.raises(JobChanged):
        keeper.check(fenced)


def test_a_job_ended_here_as_the_leases_renew_is_not_logged_as_ended_elsewhere(
    records: PostgresRecords, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine's last report ended "done" here, and the heartbeat's renewal came before the
    engine let go of it (LeaseKeeper.finished): the renewal finds it inactive, as it finds
    "canceled", which another instance ended.  Only the second ended elsewhere: its filters
    stop; the first's lease just ends."""
    pending(records, "done")
    pending(records, "canceled")
    stopped: list[str] = []
    keeper = keeper_of(leases_of(records, "a"), stop=stopped.append, free_slots=lambda: 2, slots=2)
    assert keeper.claim("done") and keeper.claim("canceled")
    # The engine's last report, fenced with the lease and written as the writer does it.
    completed = make_job("done", state=JobState.COMPLETED)
    report = VersionedWrite(UpdateJob(completed, JobInput.COMPLETE_SUCCESSFULLY, ()), 1, 0)
    [fenced] = keeper.fence([report], engine_token="done")
    assert isinstance(fenced, VersionedWrite) and fenced.lease == (keeper.owner, 1)
    records.write(fenced)
    keeper.written(fenced)
    end(records, "canceled", 1, JobState.CANCELED)  # CancelPostScanJob on another instance
    with caplog.at_level(logging.INFO, logger="dsc.cluster"):
        keeper.beat(True)
    said = [r.getMessage() for r in caplog.records if r.name == "dsc.cluster"]
    assert "job done ended here: its lease ends with it" in said, said
    assert "job canceled ended on another instance (canceled): its filters stop" in said, said
    assert not any(m.startswith("job done ended on another instance") for m in said), said
    assert stopped == ["canceled"] and keeper.held() == {}
    keeper.finished("done")  # the engine lets go afterwards: nothing is left to release


def test_a_run_whose_job_ended_elsewhere_says_it_ended_though_it_still_held_the_lease(
    records: PostgresRecords, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A frozen instance goes on (SIGCONT) after another one rescued and completed its job:
    the catch-up read brought the job's end before the heartbeat found the lease lost, so the
    engine's last report comes while the lease is still held and the core makes nothing of
    it (tests/e2e/test_cluster_fileshare.py's frozen instance, under load).  The run's end is
    still said, as when the lease was lost before the report, and the lease let go."""
    from dsc_core.commands import ProcessingFinished

    pending(records, "j")
    keeper = keeper_of(leases_of(records, "a"), free_slots=lambda: 1)
    assert keeper.claim("j")
    data = tmp_path / "data"
    service = compose(ServerConfig(), data, FilterSettings.embedded_default(data)).service
    service._leases = keeper  # this instance's keeper, as ScanService.start makes it
    completed = make_job("j", 2, state=JobState.COMPLETED)
    assert service.owner.call(lambda: service.server.absorb([completed])) == []  # the catch-up
    with caplog.at_level(logging.INFO, logger="dsc.service"):
        service._engine_report(ProcessingFinished("j"))
    said = [r.getMessage() for r in caplog.records if r.name == "dsc.service"]
    assert said == [
        "job j: the run of its filters here has ended; the job had ended on another instance, "
        "so what it reported was dropped"
    ], said
    assert keeper.held() == {}


def test_the_keeper_of_a_new_run_resumes_its_folder_s_jobs_once_at_its_first_beat(
    records: PostgresRecords,
) -> None:
    """LeaseKeeper.start takes them back (held, renewed, fenced with the new epoch) whatever
    the engine's free places; the first beat hands them to R13, and no later beat again."""
    for token in ("j1", "j2", "j3"):
        pending(records, token)
    old = leases_of(records, "a")
    assert all(old.claim(t) == 1 for t in ("j1", "j2", "j3"))
    resumed: list[list[Rescued]] = []
    keeper = keeper_of(
        JobLeases(records.database, "instance-a2", old.home, LEASE),
        resume=resumed.append,
        free_slots=lambda: 0,  # the engine is full: the sweep alone would take nothing
        slots=3,
    )
    keeper.start()
    assert keeper.held() == {"j1": 2, "j2": 2, "j3": 2}
    keeper.beat(True)
    keeper.beat(True)
    assert resumed == [[Rescued(t, old.owner, 2) for t in ("j1", "j2", "j3")]]
    assert keeper.held() == {"j1": 2, "j2": 2, "j3": 2}  # renewed, not lost


def test_the_keeper_stops_its_filters_before_a_lease_it_cannot_renew_ends(
    records: PostgresRecords,
) -> None:
    pending(records, "j")
    stopped: list[str] = []
    leases = leases_of(records, "a", lease=2.0)
    keeper = keeper_of(leases, stop=stopped.append, free_slots=lambda: 1)
    assert keeper.claim("j")
    records.database.close()  # the database is out of reach from now on
    keeper.beat(False)
    assert stopped == [] and keeper.holds("j")  # one missed renewal: the lease still runs

    def beaten() -> bool:
        keeper.beat(False)
        return bool(stopped)

    # Once the next beat would come after the lease ended, the filters stop.
    wait_for(beaten, 10, "the filters to stop", interval=0.1)
    assert stopped == ["j"] and not keeper.holds("j")


def test_delivery_records_are_read_by_a_rescuer_and_fenced(
    dsn: str, records: PostgresRecords
) -> None:
    """The file share's journal in filter_deliveries: what a run recorded is what a rescuer
    on another host reads; a run whose lease was lost records and places nothing more."""
    pending(records, "j")
    a, b = leases_of(records, "a"), leases_of(records, "b")
    epoch = a.claim("j")
    assert epoch is not None
    first = PgDeliveryJournal(records.database, "j", 0, (a.owner, epoch))
    first.check()
    first.add(PurePath("/share/alice"), 1, 1, "scan_0001.png")
    expire(dsn, "j")
    [rescued] = b.rescue(1)
    with pytest.raises(DeliveryRefused):
        first.check()
    with pytest.raises(DeliveryRefused):
        first.add(PurePath("/share/alice"), 2, 2, "scan_0002.png")
    rescuer = PgDeliveryJournal(records.database, "j", 0, (b.owner, rescued.epoch))
    assert rescuer.get(PurePath("/share/alice"), 1) == (1, "scan_0001.png")
    assert rescuer.get(PurePath("/share/alice"), 2) is None  # the refused one left no record
    assert rescuer.names_in(PurePath("/share/alice")) == {"scan_0001.png"}
    assert (
        PgDeliveryJournal(records.database, "j", 1, None).get(PurePath("/share/alice"), 1) is None
    )
    with pytest.raises(DeliveryRefused):  # no lease held: nothing is delivered
        PgDeliveryJournal(records.database, "j", 0, None).check()
    records.drop("j")  # the records go with the job
    assert PgDeliveryJournal(records.database, "j", 0, None).done == {}


def test_a_delivery_record_while_postgresql_is_down_interrupts_the_run(tmp_path: Path) -> None:
    """A run that records a delivery while PostgreSQL is down is interrupted (Interrupted, not
    a failed filter, which would abort the job for good: seen in the failover test), at once
    and however long the outage (no retry window to outlast); the run after it, on a new
    lease, recognises the file the interrupted one placed and delivers the rest once.  Its own
    PostgreSQL: this one is stopped."""
    from engines_support import pg_cluster

    with pg_cluster() as own:
        records = PostgresRecords.open(own.new_database(), pool_timeout=1.0)
        try:
            pending(records, "j")
            keeper = leases_of(records, "a")
            first = keeper.claim("j")
            assert first is not None

            class DownAfterTheCheck(PgDeliveryJournal):
                """PostgreSQL stops between document 1's check and its record."""

                def check(self) -> None:
                    super().check()
                    if not self.done:
                        own.stop("immediate")

            journal = DownAfterTheCheck(records.database, "j", 0, (keeper.owner, first))

            docs = make_documents(tmp_path / "spool", ("png", b"one" * 5000), ("png", b"two"))
            job = make_filter_job(FileShareInstructions((r"\\h\s",)), document_root_name="inv")
            settings = FilterSettings(
                share_roots=((r"\\h\s", tmp_path / "out"),),
                journal_of=lambda job, documents, index: journal,
            )
            with pytest.raises(Interrupted):
                fileshare.run(job, 0, docs, settings, threading.Event())
            folder = tmp_path / "out" / "alice@corp.example"
            # Document 1 placed (its temporary name linked to it), its record not written.
            assert sorted(p.name for p in folder.iterdir()) == [
                fileshare._temporary(job.token, 1, first)[0],
                "inv_0001.png",
            ]
            own.start()
            claims: list[int | None] = []

            def claimed() -> bool:
                try:
                    claims.append(keeper.claim("j"))
                except StoreError:  # the pool is reconnecting
                    return False
                return True

            wait_for(claimed, 30, "the database back")
            second = claims[-1]
            assert second is not None and second > first
            settings = FilterSettings(
                share_roots=((r"\\h\s", tmp_path / "out"),),
                journal_of=lambda job, documents, index: PgDeliveryJournal(
                    records.database, "j", index, (keeper.owner, second)
                ),
            )
            outcome = fileshare.run(job, 0, docs, settings, threading.Event())
            assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY, outcome
            assert sorted(p.name for p in folder.iterdir()) == ["inv_0001.png", "inv_0002.png"]
            assert (folder / "inv_0001.png").read_bytes() == b"one" * 5000
            again = PgDeliveryJournal(records.database, "j", 0, None)
            assert sorted(again.names_in(folder)) == ["inv_0001.png", "inv_0002.png"]
        finally:
            records.close()


def test_a_stalled_run_going_on_after_the_rescuer_leaves_no_temporary_file(
    dsn: str, records: PostgresRecords, tmp_path: Path
) -> None:
    """SIGSTOP past the lease, then SIGCONT: the stalled run (its records read before the
    rescue) writes a document the rescuer already delivered; it is refused before the file
    takes a name, and takes its temporary file away (left, nobody would: the job has ended)."""
    pending(records, "j")
    a, b = leases_of(records, "a"), leases_of(records, "b")
    first = a.claim("j")
    assert first is not None
    stalled = PgDeliveryJournal(records.database, "j", 0, (a.owner, first))  # read, then frozen
    expire(dsn, "j")
    [rescued] = b.rescue(1)
    docs = make_documents(tmp_path / "spool", ("png", b"one" * 5000), ("png", b"two" * 5000))
    job = make_filter_job(FileShareInstructions((r"\\h\s",)), document_root_name="inv")

    def settings(journal: PgDeliveryJournal) -> FilterSettings:
        return FilterSettings(
            share_roots=((r"\\h\s", tmp_path / "out"),),
            journal_of=lambda job, documents, index: journal,
        )

    rescuer = PgDeliveryJournal(records.database, "j", 0, (b.owner, rescued.epoch))
    done = fileshare.run(job, 0, docs, settings(rescuer), threading.Event())
    assert done.state is FilterState.COMPLETED_SUCCESSFULLY, done
    late = fileshare.run(job, 0, docs, settings(stalled), threading.Event())
    assert late.state is FilterState.CANCELED, late
    folder = tmp_path / "out" / "alice@corp.example"
    assert sorted(p.name for p in folder.iterdir()) == ["inv_0001.png", "inv_0002.png"]


def test_a_rescuer_and_the_stalled_run_never_share_a_temporary_file(
    dsn: str, records: PostgresRecords, tmp_path: Path
) -> None:
    """A stalled instance whose lease was rescued may still be writing when the rescuer
    delivers the same documents to the same share: each run names its temporary files by its
    lease epoch (one shared name let the stalled run unlink the rescuer's file, which then
    failed the job).  The rescuer takes what the stalled run placed, unlinks its unfinished
    file (so it can place nothing), and delivers the rest once."""
    pending(records, "j")
    a, b = leases_of(records, "a"), leases_of(records, "b")
    first = a.claim("j")
    assert first is not None
    expire(dsn, "j")
    [rescued] = b.rescue(1)
    assert rescued.epoch > first
    settings = FilterSettings(
        share_roots=((r"\\h\s", tmp_path / "out"),),
        journal_of=lambda job, documents, index: PgDeliveryJournal(
            records.database, "j", index, (b.owner, rescued.epoch)
        ),
    )
    docs = make_documents(tmp_path / "spool", ("png", b"one" * 5000), ("png", b"two" * 5000))
    job = make_filter_job(FileShareInstructions((r"\\h\s",)), document_root_name="inv")
    folder = tmp_path / "out" / "alice@corp.example"
    folder.mkdir(parents=True)
    stalled = [fileshare._temporary(job.token, d, first)[0] for d in (1, 2)]
    mine = [fileshare._temporary(job.token, d, rescued.epoch)[0] for d in (1, 2)]
    assert not set(stalled) & set(mine)
    # The stalled run placed document 1 (not recorded: its lease was gone) and is writing 2.
    (folder / stalled[0]).write_bytes(b"one" * 5000)
    os.link(folder / stalled[0], folder / "inv_0001.png")
    (folder / stalled[1]).write_bytes(b"tw")
    outcome = fileshare.run(job, 0, docs, settings, threading.Event())
    assert outcome.state is FilterState.COMPLETED_SUCCESSFULLY, outcome
    assert sorted(p.name for p in folder.iterdir()) == ["inv_0001.png", "inv_0002.png"]
    assert (folder / "inv_0002.png").read_bytes() == b"two" * 5000
    journal = PgDeliveryJournal(records.database, "j", 0, None)
    assert sorted(journal.names_in(folder)) == ["inv_0001.png", "inv_0002.png"]


def test_an_older_instance_never_takes_up_a_job_it_cannot_decode(
    dsn: str, records: PostgresRecords
) -> None:
    """A rolling upgrade (store/undecodable.py): a job waiting for an engine whose record a
    newer server wrote.  The older instance's sweep took it up although it could not run it,
    kept its lease until it ran out, and the newer instance waited a lease period for it,
    again and again.  Now the older instance passes it over (and takes the next one it can
    run), and the newer instance takes it at once; a record nobody decodes stays unclaimed
    (an operator's: `dsc db quarantine`)."""
    for token in ("newer", "older"):
        pending(records, token)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE jobs SET job = %s, version = version + 1, xid = pg_current_xact_id() "
            "WHERE token = 'newer'",
            ('{"v": 99, "token": "newer"}',),
        )
    # The older instance read the rows as its start and catch-up read them.
    cannot_decode = UndecodableRecords()
    JobCatchUp(records.changes, undecodable=cannot_decode).read()
    assert cannot_decode.tokens() == {"newer"}
    taken: dict[str, list[str]] = {"old": [], "new": []}

    def keeper(name: str, undecodable: Callable[[], frozenset[str]]) -> LeaseKeeper:
        return LeaseKeeper(
            leases_of(records, name),
            heartbeat_seconds=1.0,
            stop=lambda token: None,
            resume=lambda rescued: taken[name].extend(r.token for r in rescued),
            engine=Places(lambda: 1, 1),
            name_of=str,
            undecodable=undecodable,
        )

    old = keeper("old", cannot_decode.tokens)
    old.take_up()
    assert taken["old"] == ["older"]  # oldest first, but not the one it cannot run
    keeper("new", frozenset).take_up()
    assert taken["new"] == ["newer"]
    # Nobody took the job: an instance that cannot decode it passes it over even when free.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs SET lease_until = NULL WHERE token = 'newer'")
    end(records, "older", 1, JobState.COMPLETED)  # the engine's last report
    old.finished("older")
    old.take_up()
    assert taken["old"] == ["older"] and old.held() == {}
    # Its tombstone (quarantined, purged elsewhere) ends what this instance knew of it.
    records.drop("newer")
    JobCatchUp(records.changes, undecodable=cannot_decode).read()
    assert cannot_decode.tokens() == frozenset()


def test_a_job_taken_up_before_its_undecodable_record_was_read_is_let_go_at_once(
    tmp_path: Path, dsn: str
) -> None:
    """A real ScanService in a cluster: a newer server's job appears and this instance's sweep
    takes it up before any catch-up read its record.  The read that comes with the take-up
    finds it undecodable: the lease is let go at once (it rings: an instance that can decode
    the job takes it), not kept until it runs out (a lease period's delay, two hours here),
    and this instance's sweeps pass the job over from then on."""
    service = lone_instance(tmp_path, dsn, "old")
    service.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            # As a newer server writes it: never a record this instance reads.
            token, state, active, created, completed, _ = record_columns(
                make_job("newer", state=JobState.PENDING)
            )
            conn.execute(
                "INSERT INTO jobs (token, state, active, created, completed, job) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (token, state, active, created, completed, '{"v": 99, "token": "newer"}'),
            )

            def lease() -> tuple[int, bool]:
                row = conn.execute(
                    "SELECT lease_epoch, lease_until IS NULL FROM jobs WHERE token = 'newer'"
                ).fetchone()
                assert row is not None
                return int(row[0]), bool(row[1])

            keeper = service._leases
            assert keeper is not None
            keeper.take_up()
            wait_for(lambda: lease() == (1, True), what="the lease taken once, then let go")
            keeper.take_up()
            assert lease() == (1, True) and keeper.held() == {}
    finally:
        service.shutdown(5.0)
