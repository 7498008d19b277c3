"""The embedded job store (SQLite records, local spool): what only it does - its files and
columns, the local spool's part files, disk errors (R4 step 9), debris, crashes, memory.  What
every backend does is the contract's (test_store_contract.py), which runs on this one too."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from dsc_bindings.store import sqlite as store_mod
from dsc_bindings.store.jobcodec import encode_job
from dsc_bindings.store.localspool import LocalSpool
from dsc_bindings.store.split import SplitStore, open_parts
from dsc_bindings.store.sqlite import JobStore, SqliteRecords, StoreError, is_temporary
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
from dsc_core.model import (
    Document,
    FileShareInstructions,
    FilterStatus,
    Job,
    JobState,
    JobStateReason,
)

T0 = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=timezone(timedelta(hours=2)))


def make_job(token: str, n: int = 0, **changes: object) -> Job:
    job = Job(
        token=token,
        state=JobState.CREATING,
        reasons=(JobStateReason.NONE,),
        filters=(FilterStatus("urn:fs", instructions=FileShareInstructions(("\\\\s\\x",))),),
        psp_identifier="psp",
        psp_display_name="PSP",
        user_name="alice@example.com",
        owner="alice",
        created=T0,
        last_activity=T0 + timedelta(seconds=n),
    )
    return job.evolve(**changes) if changes else job


def content(i: int, size: int = 100_000) -> bytes:
    return random.Random(i).randbytes(size + i)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = JobStore.open(tmp_path / "data")
    yield s
    s.close()


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def put_document(store: JobStore, token: str, doc_id: int, data: bytes, chunk: int = 7000) -> None:
    store.apply(BeginDocument(token, doc_id, "pdf-a"))
    for i in range(0, len(data), chunk):
        store.apply(AppendDocument(token, doc_id, data[i : i + chunk]))
    store.apply(FinishDocument(token, doc_id, len(data)))


# --- opening, schema, records -----------------------------------------------------------------


def test_open_creates_layout_wal_full_and_schema_version(tmp_path: Path) -> None:
    data = tmp_path / "new" / "dir"
    with JobStore.open(data) as s:
        assert (data / "jobs.sqlite3").is_file() and (data / "spool").is_dir()
        conn = s._db()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION
        cols = [r[1] for r in conn.execute("PRAGMA table_info(jobs)")]
        assert cols == ["token", "seq", "state", "active", "created", "completed", "job"]


def test_a_job_row_keeps_its_state_and_times_in_columns(store: JobStore) -> None:
    store.apply(CreateJob(make_job("b")))
    done = make_job(
        "b",
        5,
        state=JobState.COMPLETED,
        completed=T0 + timedelta(minutes=1),
        reasons=(JobStateReason.COMPLETED_SUCCESSFULLY,),
        documents=(Document(1, "pdf-a", 10),),
    )
    store.apply(UpdateJob(done, JobInput.COMPLETE_SUCCESSFULLY))
    row = (
        store._db()
        .execute("SELECT state, active, created, completed FROM jobs WHERE token='b'")
        .fetchone()
    )
    assert row == ("Completed", 0, T0.isoformat(), (T0 + timedelta(minutes=1)).isoformat())


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    JobStore.open(data).close()
    with sqlite3.connect(data / "jobs.sqlite3") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer") as info:
        JobStore.open(data)
    assert info.value.temporary is False


def test_corrupt_row_is_quarantined_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    with JobStore.open(data) as s:
        for token in ("a", "t", "u"):
            s.apply(CreateJob(make_job(token)))
        s._db().execute("UPDATE jobs SET job = '{\"v\": 1}' WHERE token = 't'")
        s._db().execute("UPDATE jobs SET job = ? WHERE token = 'u'", (encode_job(make_job("x")),))
        with caplog.at_level("ERROR", logger="dsc.store"):
            assert s.load_jobs() == [make_job("a")]
        # Moved aside, once: the next start does not see them again.
        assert s.load_jobs() == [make_job("a")]
    quarantined = sorted((data / "quarantine").glob("job-*.json"))
    assert len(quarantined) == 2
    records = [json.loads(p.read_text()) for p in quarantined]
    assert (records[0]["token"], records[0]["record"]) == ("t", '{"v": 1}')
    assert "token x" in records[1]["error"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "job t: the stored record does not decode" in errors[0]


# --- documents --------------------------------------------------------------------------------


def test_a_document_is_a_part_file_until_finished(store: JobStore) -> None:
    store.apply(BeginDocument("t", 2, "pdf-a"))
    part = store.spool_dir / "t" / ".2.part"
    assert part.is_file()
    store.apply(AppendDocument("t", 2, bytearray(b"abc")))  # type: ignore[arg-type]
    store.apply(FinishDocument("t", 2, 3))
    assert not part.exists()
    put_document(store, "t", 10, content(10))
    assert files(store.spool_dir) == ["t/10", "t/2"]
    assert store.documents("t") == [store.document_path("t", 2), store.document_path("t", 10)]


def test_what_fails_or_is_removed_leaves_no_file(store: JobStore) -> None:
    store.apply(BeginDocument("t", 1, "png"))
    store.apply(AppendDocument("t", 1, b"12345"))
    with pytest.raises(StoreError, match="5 bytes stored, 6 expected"):
        store.apply(FinishDocument("t", 1, 6))
    store.apply(BeginDocument("t", 2, "png"))
    store.apply(AppendDocument("t", 2, b"x" * 1000))
    store.apply(AbortDocument("t", 2))
    assert files(store.spool_dir) == []
    for token in ("..", "../x", "a/b"):
        with pytest.raises(StoreError):
            store.apply(BeginDocument(token, 1, "png"))
    assert files(store.data_dir / "spool") == []
    for token in ("a", "b"):
        store.apply(CreateJob(make_job(token)))
        put_document(store, token, 1, content(1))
    store.apply(DiscardDocuments("a"))
    assert not (store.spool_dir / "a").exists()
    store.apply(DropJob("b", Removal.PURGED))
    assert files(store.spool_dir) == []


def test_open_removes_debris_but_keeps_documents(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with JobStore.open(data) as s:
        s.apply(CreateJob(make_job("kept")))
        put_document(s, "kept", 1, content(1))
    spool = data / "spool"
    (spool / "kept" / ".2.part").write_bytes(b"half an image")
    (spool / "orphan").mkdir()  # e.g. a DropJob interrupted between row and folder
    (spool / "orphan" / "1").write_bytes(b"x")
    (spool / "orphan" / ".2.part").write_bytes(b"x")
    with JobStore.open(data) as s:
        assert files(spool) == ["kept/1"]
        assert s.document_path("kept", 1).read_bytes() == content(1)


def test_a_failed_open_closes_what_it_opened_and_frees_the_data_folder(tmp_path: Path) -> None:
    """SplitStore.assemble and ``dsc db quarantine`` open their parts with open_parts: a step
    that fails after the records are open closes them and releases DATA/lock."""
    data = tmp_path / "data"
    opened: list[SqliteRecords] = []

    def records() -> SqliteRecords:
        opened.append(SqliteRecords.open(data))
        return opened[-1]

    def no_spool() -> LocalSpool:
        raise StoreError("the spool cannot be opened", temporary=False)

    with pytest.raises(StoreError, match="the spool cannot be opened"):
        SplitStore.assemble(data, records, no_spool)
    with pytest.raises(StoreError, match="closed"):
        opened[-1].rows()
    with JobStore.open(data) as held:  # the lock was released
        # Unlocked (a shared store's quarantine): opens beside the running server.
        with ExitStack() as stack:
            parts = open_parts(stack, data, records, lambda: LocalSpool.open(data), lock=False)
            assert (parts.lock_fd, parts.records.rows()) == (None, [])
        with pytest.raises(StoreError, match="closed"):
            parts.records.rows()
        assert held.records.rows() == []


# --- errors: R4 step 9 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, temporary",
    [
        (errno.ENOSPC, True),
        (errno.EDQUOT, True),
        (errno.ENOMEM, True),
        (errno.EIO, False),
        (errno.EACCES, False),
    ],
)
def test_write_error_is_store_error_and_abort_cleans_up(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, code: int, temporary: bool
) -> None:
    store.apply(BeginDocument("t", 1, "png"))
    store.apply(AppendDocument("t", 1, b"first chunk"))

    def full_disk(fd: int, data: object) -> int:
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as m:
        m.setattr(os, "write", full_disk)
        with pytest.raises(StoreError) as info:
            store.apply(AppendDocument("t", 1, b"second chunk"))
    assert info.value.temporary is temporary
    assert isinstance(info.value.__cause__, OSError)  # the cause is kept for the log
    store.apply(AbortDocument("t", 1))
    assert files(store.spool_dir) == []
    put_document(store, "t", 1, b"retry works")  # the device sends it again
    assert store.document_path("t", 1).read_bytes() == b"retry works"


def test_short_writes_are_completed(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:3]))
    put_document(store, "t", 1, b"0123456789" * 10)
    monkeypatch.undo()
    assert store.document_path("t", 1).read_bytes() == b"0123456789" * 10


def test_fsync_failure_at_finish_leaves_nothing(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.apply(BeginDocument("t", 1, "png"))
    store.apply(AppendDocument("t", 1, b"abc"))

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", no_space)
        with pytest.raises(StoreError) as info:
            store.apply(FinishDocument("t", 1, 3))
    assert info.value.temporary is True
    assert files(store.spool_dir) == []


def test_database_busy_is_temporary(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with JobStore.open(data, busy_timeout=0.05) as s:
        s.apply(CreateJob(make_job("t")))
        other = sqlite3.connect(data / "jobs.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        try:
            with pytest.raises(StoreError, match="locked") as info:
                s.apply(UpdateJob(make_job("t", 1), JobInput.IMAGE))
            assert info.value.temporary is True
        finally:
            other.execute("ROLLBACK")
            other.close()
        s.apply(UpdateJob(make_job("t", 2), JobInput.IMAGE))  # the retry succeeds
        assert s.load_jobs() == [make_job("t", 2)]


def test_error_classification() -> None:
    assert is_temporary(OSError(errno.ENOSPC, "full"))
    assert is_temporary(MemoryError())
    assert not is_temporary(OSError(errno.EROFS, "read-only"))
    assert is_temporary(sqlite3.OperationalError("database is locked"))
    assert is_temporary(sqlite3.OperationalError("database or disk is full"))
    assert not is_temporary(sqlite3.DatabaseError("database disk image is malformed"))
    assert not is_temporary(ValueError("x"))


def test_not_a_store_command(store: JobStore) -> None:
    with pytest.raises(TypeError):
        store.apply("CreateJob")  # type: ignore[arg-type]


# --- memory -----------------------------------------------------------------------


def test_appending_200_mib_does_not_grow_memory(store: JobStore) -> None:
    chunk = b"\x5a" * (1 << 20)
    store.apply(BeginDocument("big", 1, "tiff-multi-g4"))
    store.apply(AppendDocument("big", 1, chunk))  # warm up
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(199):
            store.apply(AppendDocument("big", 1, chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 256 * 1024, f"store held {peak - base} bytes while appending"
    store.apply(FinishDocument("big", 1, 200 << 20))
    assert store.document_path("big", 1).stat().st_size == 200 << 20


# --- crash safety: a real process, killed with SIGKILL ----------------------------------------

CHILD = textwrap.dedent("""
    import random, sys, time
    from datetime import datetime, timedelta, timezone
    from pathlib import Path
    from dsc_bindings.store.sqlite import JobStore
    from dsc_core.commands import *
    from dsc_core.model import *

    T0 = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=timezone(timedelta(hours=2)))
    def make_job(n, docs=()):
        return Job(token="crash", state=JobState.CREATING, reasons=(JobStateReason.NONE,),
                   filters=(FilterStatus("urn:fs", instructions=FileShareInstructions(("s",))),),
                   psp_identifier="psp", psp_display_name="PSP", user_name="alice@example.com",
                   owner="alice", created=T0, last_activity=T0 + timedelta(seconds=n),
                   documents=tuple(docs))
    def content(i, size=100_000):
        return random.Random(i).randbytes(size + i)
    def say(text):
        print(text, flush=True)
    def put(store, i):
        data = content(i)
        store.apply(BeginDocument("crash", i, "png"))
        for k in range(0, len(data), 16384):
            store.apply(AppendDocument("crash", i, data[k:k + 16384]))
        store.apply(FinishDocument("crash", i, len(data)))

    store = JobStore.open(Path(sys.argv[1]))
    scenario = sys.argv[2]
    store.apply(CreateJob(make_job(0)))
    if scenario == "before-finish":
        store.apply(BeginDocument("crash", 1, "png"))
        store.apply(AppendDocument("crash", 1, content(1)[:5000]))
        say("ready")
    elif scenario == "after-finish":
        put(store, 1)
        store.apply(
            UpdateJob(make_job(1, [Document(1, "png", len(content(1)))]), JobInput.IMAGE)
        )
        store.apply(BeginDocument("crash", 2, "png"))
        store.apply(AppendDocument("crash", 2, content(2)[:5000]))
        say("1")
    elif scenario == "update-loop":
        n = 0
        while True:
            n += 1
            store.apply(UpdateJob(make_job(n), JobInput.IMAGE))
            say(n)
    elif scenario == "document-loop":
        docs = []
        i = 0
        while True:
            i += 1
            put(store, i)
            docs.append(Document(i, "png", len(content(i))))
            store.apply(UpdateJob(make_job(i, docs), JobInput.IMAGE))
            say(i)
    time.sleep(30)  # killed long before
""")


def run_and_kill(data: Path, scenario: str, after_lines: int, extra_delay: float) -> list[str]:
    """Start the child, read ``after_lines`` acknowledgements, wait a little, SIGKILL it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), scenario],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        while len(lines) < after_lines:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                err = proc.stderr.read()  # type: ignore[union-attr]
                raise AssertionError(f"child ended early: {err}")
            lines.append(line.strip())
        time.sleep(extra_delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    return lines


def check_after_crash(data: Path) -> tuple[JobStore, Job]:
    s = JobStore.open(data)  # decodes nothing yet: cleans debris
    assert not list((data / "spool").rglob("*.part")), "debris after reopen"
    jobs = s.load_jobs()  # every row decodes
    assert [j.token for j in jobs] == ["crash"]
    # Whatever was renamed into place is whole (the rename is the commit point).
    for path in s.documents("crash"):
        i = int(path.name)
        assert path.read_bytes() == content(i), f"document {i} damaged"
    # Every document the job lists is there.
    for doc in jobs[0].documents:
        assert s.document_path("crash", doc.document_id).stat().st_size == doc.size
    return s, jobs[0]


def test_crash_before_finish(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_and_kill(data, "before-finish", 1, 0)
    assert (data / "spool" / "crash" / ".1.part").exists()  # the debris the crash left
    s, job = check_after_crash(data)
    with s:
        assert s.documents("crash") == [] and job == _job(0)


def test_crash_after_finish(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run_and_kill(data, "after-finish", 1, 0)
    s, job = check_after_crash(data)
    with s:
        assert s.documents("crash") == [s.document_path("crash", 1)]
        assert [d.document_id for d in job.documents] == [1]


@pytest.mark.parametrize("delay", [0.0, 0.003, 0.02])
def test_crash_during_update_loop(tmp_path: Path, delay: float) -> None:
    data = tmp_path / "data"
    acked = int(run_and_kill(data, "update-loop", 20, delay)[-1])
    s, job = check_after_crash(data)
    with s:
        stored = int((job.last_activity - T0).total_seconds())
        assert stored >= acked  # every acknowledged update is there
        assert job == _job(stored)


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.005, 0.013])
def test_crash_during_document_loop(tmp_path: Path, delay: float) -> None:
    data = tmp_path / "data"
    acked = int(run_and_kill(data, "document-loop", 3, delay)[-1])
    s, job = check_after_crash(data)
    with s:
        listed = [d.document_id for d in job.documents]
        assert listed[:acked] == list(range(1, acked + 1))
        assert len(s.documents("crash")) >= acked


def _job(n: int) -> Job:
    job = make_job("crash", n)
    return job.evolve(filters=(FilterStatus("urn:fs", instructions=FileShareInstructions(("s",))),))


def test_abort_after_finish_removes_the_unacknowledged_document(tmp_path: Path) -> None:
    """SendImage whose UpdateJob failed after FinishDocument: the core answers the R4 step 9
    fault and sends AbortDocument, which must not leave the finished file behind."""
    from dsc_core import AbortDocument, AppendDocument, BeginDocument, FinishDocument

    with JobStore.open(tmp_path) as store:
        store.apply(BeginDocument("tok-1", 3, "png"))
        store.apply(AppendDocument("tok-1", 3, b"abc"))
        store.apply(FinishDocument("tok-1", 3, 3))
        assert store.document_path("tok-1", 3).read_bytes() == b"abc"
        store.apply(AbortDocument("tok-1", 3))
        assert not store.document_path("tok-1", 3).exists()
