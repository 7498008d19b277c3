"""The job store's contract, the same on every backend (issue 17 point 1): SQLite or PostgreSQL
records, with the local spool or S3.  Backend-specific behaviour (WAL, flock, quarantine files,
S3 parts) is tested beside each backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dsc_bindings.store import split
from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.interface import JobRecords, Spool
from dsc_bindings.store.localspool import LocalSpool
from dsc_bindings.store.split import SplitStore
from dsc_bindings.store.sqlite import SqliteRecords
from dsc_core.commands import (
    AbortDocument,
    AppendDocument,
    BeginDocument,
    CreateJob,
    DiscardDocuments,
    DropJob,
    FinishDocument,
    JobInput,
    Removal,
    UpdateJob,
)
from dsc_core.model import Document, JobState, JobStateReason
from test_store import T0, content, make_job, put_document

if TYPE_CHECKING:
    from engines_support import PgCluster, S3Server

BACKENDS = [("sqlite", "local"), ("postgresql", "local"), ("postgresql", "s3"), ("sqlite", "s3")]


class Backend:
    """Opens stores on one (records, spool) pair; reopening finds the same state."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path, records: str, spool: str):
        self.records_kind, self.spool_kind = records, spool
        self.data_dir = tmp_path / "data"
        self.dsn = ""
        self.bucket = ""
        if records == "postgresql":
            cluster: PgCluster = request.getfixturevalue("pg")
            self.dsn = cluster.new_database()
        if spool == "s3":
            self.s3: S3Server = request.getfixturevalue("s3")
            self.bucket = self.s3.new_bucket()

    def open_records(self) -> JobRecords:
        if self.records_kind == "sqlite":
            return SqliteRecords.open(self.data_dir)
        from dsc_bindings.store.postgresql import PostgresRecords

        return PostgresRecords.open(self.dsn)

    def open_spool(self) -> Spool:
        if self.spool_kind == "local":
            return LocalSpool.open(self.data_dir)
        from dsc_bindings.store.s3spool import S3Settings, S3Spool
        from engines_support import S3_ACCESS_KEY, S3_SECRET_KEY

        return S3Spool.open(
            S3Settings(
                endpoint_url=self.s3.endpoint_url,
                bucket=self.bucket,
                access_key_id=S3_ACCESS_KEY,
                secret_access_key=S3_SECRET_KEY,
                part_size=5 << 20,
            ),
            self.data_dir,
        )

    def open(self) -> SplitStore:
        return SplitStore.assemble(self.data_dir, self.open_records, self.open_spool)


@pytest.fixture(params=BACKENDS, ids=["-".join(b) for b in BACKENDS])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    records, spool = request.param
    return Backend(request, tmp_path, records, spool)


@pytest.fixture
def store(backend: Backend) -> Iterator[SplitStore]:
    s = backend.open()
    yield s
    s.close()


def test_create_update_load_oldest_first_and_reopen(backend: Backend) -> None:
    with backend.open() as s:
        for token in ("b", "a", "c"):
            s.apply(CreateJob(make_job(token)))
        done = make_job(
            "b",
            5,
            state=JobState.COMPLETED,
            completed=T0,
            reasons=(JobStateReason.COMPLETED_SUCCESSFULLY,),
            documents=(Document(1, "pdf-a", 10),),
        )
        s.apply(UpdateJob(done, JobInput.COMPLETE_SUCCESSFULLY))  # an update keeps the job's place
        s.apply(
            UpdateJob(make_job("d"), JobInput.IMAGE)
        )  # UpdateJob of an unknown token inserts (upsert)
        assert s.load_jobs() == [done, make_job("a"), make_job("c"), make_job("d")]
        assert s.quick_check() is None
    with backend.open() as s:
        assert s.load_jobs() == [done, make_job("a"), make_job("c"), make_job("d")]


#: The records' own reads: the spool plays no part, so each engine once.
RECORDS_ONLY = [("sqlite", "local"), ("postgresql", "local")]


@pytest.mark.parametrize("backend", RECORDS_ONLY, ids=["sqlite", "postgresql"], indirect=True)
def test_row_reads_the_one_record_of_a_token(backend: Backend) -> None:
    backend.data_dir.mkdir()
    records = backend.open_records()
    try:
        scanned = make_job("scanned", 2, documents=(Document(0, "png", 3), Document(1, "pdf-a", 4)))
        for job in (make_job("first"), scanned, make_job("dropped")):
            records.put(job)
        records.drop("dropped")
        every = {row[1]: row for row in records.rows()}
        assert records.row("scanned") == every["scanned"]
        assert records.row("first") == every["first"]
        seq, token, _, documents = every["scanned"]
        assert (token, [list(d) for d in documents]) == (
            "scanned",
            [[0, "png", 3], [1, "pdf-a", 4]],
        )
        assert seq > every["first"][0]  # the record's own place in creation order
        assert records.row("dropped") is None
        assert records.row("never-created") is None
    finally:
        records.close()
    with pytest.raises(StoreError, match="closed"):
        records.row("first")


def test_one_store_per_data_folder(backend: Backend) -> None:
    with backend.open(), pytest.raises(StoreError, match="in use"):
        backend.open()
    backend.open().close()  # released by close()


def test_closed_store_refuses(backend: Backend) -> None:
    s = backend.open()
    s.close()
    s.close()  # idempotent
    for command in (
        CreateJob(make_job("t")),
        BeginDocument("t", 1, "png"),
        DropJob("t", Removal.PURGED),
    ):
        with pytest.raises(StoreError, match=r"closed|not open"):
            s.apply(command)
    with pytest.raises(StoreError, match="closed"):
        s.load_jobs()


def test_document_lifecycle(store: SplitStore) -> None:
    store.apply(CreateJob(make_job("t")))
    store.apply(BeginDocument("t", 2, "pdf-a"))
    assert store.documents("t") == []  # not visible until finished
    put_document(store, "t", 10, content(10))  # type: ignore[arg-type]
    store.apply(AppendDocument("t", 2, b"abc"))
    store.apply(AppendDocument("t", 2, b""))
    store.apply(AppendDocument("t", 2, b"def"))
    store.apply(FinishDocument("t", 2, 6))
    assert store.document_path("t", 2).read_bytes() == b"abcdef"
    assert store.document_path("t", 10).read_bytes() == content(10)
    assert store.spool.documents("t") == [2, 10]
    assert store.spool.documents("nothing") == []


def test_large_document_in_several_parts(store: SplitStore) -> None:
    data = content(3, 11 << 20)  # more than two S3 parts of 5 MiB
    put_document(store, "t", 1, data, chunk=1 << 20)  # type: ignore[arg-type]
    assert store.document_path("t", 1).read_bytes() == data


def test_finish_with_wrong_size_fails_and_leaves_nothing(store: SplitStore) -> None:
    store.apply(BeginDocument("t", 1, "png"))
    store.apply(AppendDocument("t", 1, b"12345"))
    with pytest.raises(StoreError, match="5 bytes stored, 6 expected") as info:
        store.apply(FinishDocument("t", 1, 6))
    assert info.value.temporary is False
    assert store.spool.documents("t") == []
    store.apply(AbortDocument("t", 1))  # the core's cleanup afterwards is harmless


def test_abort_is_idempotent_and_removes_an_unacknowledged_document(store: SplitStore) -> None:
    store.apply(BeginDocument("t", 1, "png"))
    store.apply(AppendDocument("t", 1, b"x" * 1000))
    store.apply(AbortDocument("t", 1))
    store.apply(AbortDocument("t", 1))
    store.apply(AbortDocument("never", 3))
    put_document(store, "t", 2, b"finished, record failed")  # type: ignore[arg-type]
    store.apply(AbortDocument("t", 2))  # R4 step 9: never acknowledged
    assert store.spool.documents("t") == []


def test_commands_on_documents_not_open(store: SplitStore) -> None:
    for command in (AppendDocument("t", 1, b"x"), FinishDocument("t", 1, 1)):
        with pytest.raises(StoreError, match="not open") as info:
            store.apply(command)
        assert info.value.temporary is False
    store.apply(BeginDocument("t", 1, "png"))
    with pytest.raises(StoreError, match="already open"):
        store.apply(BeginDocument("t", 1, "png"))


@pytest.mark.parametrize("token", ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "a\0b"])
def test_unusable_tokens_are_refused(store: SplitStore, token: str) -> None:
    with pytest.raises(StoreError) as info:
        store.apply(BeginDocument(token, 1, "png"))
    assert info.value.temporary is False
    with pytest.raises(StoreError):
        store.document_path(token, 1)


def test_discard_and_drop(store: SplitStore) -> None:
    for token in ("a", "b"):
        store.apply(CreateJob(make_job(token)))
        put_document(store, token, 1, content(1))  # type: ignore[arg-type]
    store.apply(BeginDocument("a", 2, "png"))  # still open: discarded too
    store.apply(AppendDocument("a", 2, b"zz"))
    store.apply(DiscardDocuments("a"))
    assert store.spool.documents("a") == []
    assert [j.token for j in store.load_jobs()] == ["a", "b"]  # R6: the job stays
    store.apply(DiscardDocuments("a"))  # nothing left: fine
    store.apply(DropJob("b", Removal.PURGED))
    assert [j.token for j in store.load_jobs()] == ["a"]
    assert store.spool.documents("b") == []
    store.apply(DropJob("b", Removal.PURGED))  # gone already: fine


def test_open_removes_debris_but_keeps_documents(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    with backend.open() as s:
        shared = s.shared
        s.apply(CreateJob(make_job("kept")))
        put_document(s, "kept", 1, content(1))  # type: ignore[arg-type]
        s.apply(BeginDocument("kept", 2, "png"))  # a crash mid-upload: never finished
        s.apply(AppendDocument("kept", 2, b"half"))
        put_document(s, "orphan", 1, b"x")  # documents of a job whose row never committed
        s.records.close()  # the "crash": nothing else is cleaned up
        s.spool = _Forgetful(s.spool)
    if shared:
        # Issue 18: with shared records the orphan may be a job another instance has just
        # created; only debris older than SHARED_DEBRIS_SECONDS goes.
        with backend.open() as s:
            assert s.spool.documents("orphan") == [1]
            s.spool = _Forgetful(s.spool)
        monkeypatch.setattr(split, "SHARED_DEBRIS_SECONDS", 0)
    with backend.open() as s:
        assert s.spool.documents("kept") == [1]
        assert s.spool.documents("orphan") == []
        assert s.document_path("kept", 1).read_bytes() == content(1)


class _Forgetful:
    """A spool whose close() does not clean up (as after kill -9)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        return getattr(self._spool, name)


def test_threads_share_one_store(store: SplitStore) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            token = f"job-{t}"
            job = make_job(token)
            store.apply(CreateJob(job))
            for d in range(3):
                put_document(store, token, d, content(t * 10 + d, 20_000), chunk=3000)  # type: ignore[arg-type]
                job = job.evolve(documents=job.documents + (Document(d, "png", 1),))
                store.apply(UpdateJob(job, JobInput.IMAGE))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    jobs = store.load_jobs()
    assert sorted(j.token for j in jobs) == [f"job-{t}" for t in range(6)]
    assert all(len(j.documents) == 3 for j in jobs)
    for t in range(6):
        for d in range(3):
            assert store.document_path(f"job-{t}", d).read_bytes() == content(t * 10 + d, 20_000)
