"""The PostgreSQL job feed and compare-and-set writes (issue 18 point 1, store/postgresql.py) on a
real PostgreSQL: a writer that commits late is still read, deleted rows leave tombstones, a
write from an outdated version is refused, uploads in flight are seen by the other instances;
and the runtime's catch-up (runtime/catchup.py) over it."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import boto3
import psycopg
import pytest
from botocore.config import Config

from dsc_bindings.console.main import main
from dsc_bindings.runtime.catchup import JobCatchUp
from dsc_bindings.settings import load_settings
from dsc_bindings.store.backends import open_job_store
from dsc_bindings.store.errors import JobChanged, StoreError
from dsc_bindings.store.interface import (
    Announcement,
    EventsWrite,
    JobChanges,
    Rang,
    StoredRecord,
    VersionedWrite,
)
from dsc_bindings.store.jobcodec import decode_job
from dsc_bindings.store.postgresql import PostgresRecords
from dsc_bindings.store.s3spool import S3Spool
from dsc_bindings.store.split import QUARANTINE_NAME, SplitStore
from dsc_bindings.store.sqlite import record_columns
from dsc_bindings.store.undecodable import discard_set_aside, set_aside
from dsc_core import ScanServer, ServerConfig
from dsc_core.commands import (
    AnnounceRepositoryState,
    AppendDocument,
    BeginDocument,
    CreateJob,
    Deliver,
    DiscardDocuments,
    DropJob,
    FinishDocument,
    JobInput,
    Removal,
    StartProcessing,
    StopProcessing,
    UpdateJob,
)
from dsc_core.model import Document, JobState, RepositoryState
from engines_support import shared_engine_config
from test_store import make_job
from waiting import wait_for

if TYPE_CHECKING:
    from engines_support import PgCluster, S3Server


def create(records: PostgresRecords, token: str) -> None:
    records.write(VersionedWrite(CreateJob(make_job(token)), None, 0))


def test_a_writer_that_commits_late_is_still_read(
    dsn: str, two: tuple[PostgresRecords, ...]
) -> None:
    """The late writer takes its transaction id first and commits last: a cursor over
    increasing numbers would have read past it."""
    a, b = two
    first = a.changes(0, frozenset())
    assert first.rows == ()
    late = psycopg.connect(dsn)
    try:
        with late.transaction():
            token, state, active, created, completed, text = record_columns(make_job("late"))
            late.execute(
                "INSERT INTO jobs (token, state, active, created, completed, job) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (token, state, active, created, completed, text),
            )  # its xid is taken now, below every xid of what follows
            create(b, "early")  # committed at once
            seen = a.changes(first.cursor, frozenset())
            assert [row[0] for row in seen.rows] == ["early"]
        # The late transaction commits now, after the reader passed "early".
        after = a.changes(seen.cursor, frozenset())
        assert "late" in [row[0] for row in after.rows]
    finally:
        late.close()


def test_versions_are_compare_and_set(two: tuple[PostgresRecords, ...]) -> None:
    a, b = two
    create(a, "j")
    with pytest.raises(JobChanged):
        create(b, "j")  # the token is taken: a new job is an INSERT
    updated = make_job("j", 1, state=JobState.PENDING)
    a.write(VersionedWrite(UpdateJob(updated, JobInput.END, ()), 1, 0))
    with pytest.raises(JobChanged) as lost:  # b decided from version 1 too
        b.write(VersionedWrite(UpdateJob(make_job("j", 2), JobInput.IMAGE, ()), 1, 0))
    assert lost.value.temporary
    [(token, version, text, documents)] = b.changes(0, frozenset()).rows
    assert (token, version, decode_job(text, documents)) == ("j", 2, updated)  # the winner's


def test_deleted_rows_leave_tombstones(two: tuple[PostgresRecords, ...]) -> None:
    a, b = two
    create(a, "gone")
    cursor = b.changes(0, frozenset()).cursor
    a.write(VersionedWrite(DropJob("gone", Removal.PURGED), None, 0))
    changed = b.changes(cursor, frozenset())
    assert changed.rows == () and changed.dropped == ("gone",)


def _shared_config(folder: Path, dsn: str, s3: S3Server, bucket: str) -> Path:
    """An instance's configuration file on PostgreSQL + S3 (the records and documents
    shared), in ``folder``."""
    folder.mkdir()
    config = folder / "dsc.toml"
    config.write_text(shared_engine_config(dsn, s3, bucket, folder), encoding="utf-8")
    return config


def _shared_store(folder: Path, dsn: str, s3: S3Server, bucket: str) -> SplitStore:
    """An instance's job store on PostgreSQL + S3, as ``dsc serve`` opens it from its
    configuration (its own data folder)."""
    settings = load_settings(_shared_config(folder, dsn, s3, bucket), data_dir=folder / "data")
    return open_job_store(settings.data_dir, settings.storage)


def _receive(store: SplitStore, token: str, image: bytes) -> None:
    """The job ``token`` with one document, written as a shared store's instance writes it."""
    store.apply(VersionedWrite(CreateJob(make_job(token)), None, 0))
    store.apply(BeginDocument(token, 1, "png"))
    store.apply(AppendDocument(token, 1, image))
    store.apply(FinishDocument(token, 1, len(image)))
    received = make_job(token, 1).evolve(documents=(Document(1, "png", len(image)),))
    store.apply(VersionedWrite(UpdateJob(received, JobInput.IMAGE, ()), 1, 0))


def _known_elsewhere(store: SplitStore, *tokens: str) -> tuple[JobCatchUp, ScanServer]:
    """The jobs ``tokens`` received (:func:`_receive`) and read by another instance's
    catch-up into its core: that instance's catch-up and core."""
    for token in tokens:
        _receive(store, token, f"image of {token}".encode())
    elsewhere = JobCatchUp(store.job_changes)
    core = ScanServer(ServerConfig(), new_id=lambda: "unused")
    elsewhere.absorb(core, elsewhere.read())
    return elsewhere, core


#: A record of a later codec than this server's (a newer server wrote it during a rolling
#: upgrade): jobcodec refuses its version.
_NEWER_RECORD = '{"v": 99, "token": "new"}'


def test_an_undecodable_record_at_a_start_is_left_for_the_other_instances(
    tmp_path: Path, pg: PgCluster, s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    """On a shared store, a record this instance cannot decode (a newer server's) is not
    quarantined at its start: the row, its documents in S3 and the other instances' copy of the
    job stay; this instance does not serve it and says once what it means and what to do
    (store/undecodable.py).  Quarantined, it was deleted for every instance (its tombstone)
    and its documents moved into the starting instance's own folder."""
    dsn, bucket = pg.new_database(), s3.new_bucket()
    serving = _shared_store(tmp_path / "a", dsn, s3, bucket)
    try:
        elsewhere, core = _known_elsewhere(serving, "new", "old")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE jobs SET job = %s WHERE token = 'new'", (_NEWER_RECORD,))
        upgrading = _shared_store(tmp_path / "b", dsn, s3, bucket)
        try:
            # As dsc serve starts (runtime/service.py _load_jobs): the seed read, then the load.
            here = JobCatchUp(upgrading.job_changes, undecodable=upgrading.undecodable)
            with caplog.at_level("WARNING", logger="dsc.store"):
                seed = here.read()
                loaded = upgrading.load_jobs()
                again = here.read()  # the next round reads the same record: no new line
            assert [job.token for job in loaded] == ["old"]
            assert [job.token for job, _ in seed.jobs] == ["old"]
            assert again.jobs == seed.jobs
            assert not (upgrading.data_dir / QUARANTINE_NAME).exists()
            assert upgrading.documents("new") != []
        finally:
            upgrading.close()
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, warnings
        assert (
            "job new: the stored record does not decode (job record: unknown codec "
            in (warnings[0])
        )
        assert "newer server? upgrade this instance" in warnings[0]
        assert "`dsc db quarantine new`" in warnings[0]
        # The row, its document and the other instance's job are as they were.
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT job FROM jobs WHERE token = 'new'").fetchone()
        assert row == (_NEWER_RECORD,)
        assert serving.documents("new")[0].read_bytes() == b"image of new"
        elsewhere.absorb(core, elsewhere.read())
        kept = core.jobs.get("new")
        assert kept is not None and kept.documents == (Document(1, "png", 12),)
        assert serving.load_jobs()[0].token == "old"  # the serving instance's own restart
    finally:
        serving.close()


def test_a_server_starting_on_an_undecodable_shared_record_says_so_once(
    tmp_path: Path, pg: PgCluster, s3: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole start (create_app's service: the seed read of the catch-up, then the load)
    leaves the record for the others and logs it once: the two share what was logged
    (SplitStore.undecodable)."""
    import asyncio

    from dsc_bindings.asgi import create_app

    dsn, bucket = pg.new_database(), s3.new_bucket()
    serving = _shared_store(tmp_path / "a", dsn, s3, bucket)
    try:
        _receive(serving, "new", b"image of new")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE jobs SET job = %s WHERE token = 'new'", (_NEWER_RECORD,))
        config = _shared_config(tmp_path / "b", dsn, s3, bucket)
        app = create_app(config, data_dir=tmp_path / "b" / "data", port=5362)

        async def start_and_stop() -> None:
            async with app.running():
                pass

        with caplog.at_level("WARNING", logger="dsc.store"):
            asyncio.run(start_and_stop())
        said = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith("job new: the stored record"), said
        assert not (tmp_path / "b" / "data" / QUARANTINE_NAME).exists()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT job FROM jobs").fetchall() == [(_NEWER_RECORD,)]
        assert serving.documents("new")[0].read_bytes() == b"image of new"
    finally:
        serving.close()


def test_an_undecodable_record_is_logged_again_at_its_next_version(
    dsn: str, two: tuple[PostgresRecords, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """Once per record: reads that begin before the last one is absorbed (RequestReads, each
    from the same cursor) read the same record again and say nothing more of it; a newer
    record of the job that does not decode either is logged again."""
    a, b = two
    here = JobCatchUp(b.changes)
    create(a, "new")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs SET job = %s WHERE token = 'new'", (_NEWER_RECORD,))
        with caplog.at_level("WARNING", logger="dsc.store"):
            for _ in range(3):
                assert here.read().jobs == ()
            conn.execute(
                "UPDATE jobs SET job = %s, version = version + 1, xid = pg_current_xact_id() "
                "WHERE token = 'new'",
                ('{"v": 99, "token": "new", "more": 1}',),
            )
            assert here.read().jobs == ()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert all(w.startswith("job new: the stored record does not decode") for w in warnings)


def test_a_job_rewritten_by_a_newer_server_is_forgotten_not_answered_stale(
    dsn: str, two: tuple[PostgresRecords, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling upgrade: this instance knew the jobs, then a newer server wrote their rows in
    a format this one cannot decode.  It kept its old copies and answered from them (listings,
    GetJob, its leader's history trimming and sweeps; its writes refused as temporary errors).
    Now it forgets them, as it never knew a job it cannot read: not taken up, said once.  A job
    its engine was running stops there (an instance that can read it takes it up: the lease is
    let go when the run ends); no event is sent for either (the writer announced its change)."""
    a, b = two
    here = JobCatchUp(b.changes)
    core = ScanServer(ServerConfig(), new_id=lambda: "unused")
    create(a, "waiting")
    a.write(VersionedWrite(CreateJob(make_job("running", state=JobState.PROCESSING)), None, 0))
    create(a, "kept")
    assert here.absorb(core, here.read()) == []
    assert {j.token for j in core.jobs.active()} == {"waiting", "running", "kept"}
    with psycopg.connect(dsn, autocommit=True) as conn, caplog.at_level("WARNING", "dsc.store"):
        for token in ("waiting", "running"):
            conn.execute(
                "UPDATE jobs SET job = %s, version = version + 1, xid = pg_current_xact_id() "
                "WHERE token = %s",
                (f'{{"v": 99, "token": "{token}"}}', token),
            )
        commands = here.absorb(core, here.read())
        assert here.absorb(core, here.read()) == []  # read again: nothing more, nothing said
    assert commands == [StopProcessing("running")]
    assert not any(isinstance(c, Deliver) for c in commands)
    assert [j.token for j in core.jobs.active()] == ["kept"]
    assert core.jobs.get("waiting") is None and core.jobs.get("running") is None
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sorted(m.split(":")[0] for m in said) == ["job running", "job waiting"], said
    # The other way to learn it: a write decided from the old copy is refused (the row moved
    # on), and the read after it forgets the copy all the same.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE jobs SET job = %s, version = version + 1, xid = pg_current_xact_id() "
            "WHERE token = 'kept'",
            ('{"v": 99, "token": "kept"}',),
        )
    [write] = here.stamp([UpdateJob(make_job("kept", 1), JobInput.IMAGE, ())])
    assert isinstance(write, VersionedWrite)
    with pytest.raises(JobChanged):
        b.write(write)
    here.settled(write, JobChanged("kept"))
    assert here.absorb(core, here.read()) == []
    assert core.jobs.active() == []


@pytest.mark.parametrize("gone", ["rewritten by a newer server", "deleted"])
def test_an_older_read_absorbed_late_does_not_bring_back_a_forgotten_job(
    dsn: str, two: tuple[PostgresRecords, ...], gone: str
) -> None:
    """Reads are absorbed by whichever request or tick waited for them, so an older read can
    be absorbed after a newer one (the version of each record decides, module doc).  The newer
    read forgot a job: a newer server rewrote it in a record this instance cannot decode, or
    another instance deleted it (its tombstone); the older one, absorbed after, held its last
    readable record, whose version was above the one the table had forgotten: the job came
    back into the table, answered from a stale record (a deleted one for ever)."""
    a, b = two
    here = JobCatchUp(b.changes)
    core = ScanServer(ServerConfig(), new_id=lambda: "unused")
    create(a, "job")
    assert here.absorb(core, here.read()) == []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE jobs SET job = %s, version = version + 1, xid = pg_current_xact_id() "
            "WHERE token = 'job'",
            (record_columns(make_job("job", 1))[-1],),
        )
        older = here.read()
        assert [job.token for job, _ in older.jobs] == ["job"]
        if gone == "deleted":
            a.drop("job")
        else:
            conn.execute(
                "UPDATE jobs SET job = %s, version = version + 1, xid = pg_current_xact_id() "
                "WHERE token = 'job'",
                ('{"v": 99, "token": "job"}',),
            )
        newer = here.read()
    assert (newer.left_out or newer.dropped) and not newer.jobs
    here.absorb(core, newer)
    assert core.jobs.get("job") is None
    here.absorb(core, older)
    assert core.jobs.get("job") is None


def test_a_request_for_a_job_this_instance_cannot_read_is_answered_temporary(
    tmp_path: Path, dsn: str
) -> None:
    """A real ScanService on PostgreSQL, during a rolling upgrade: a CancelPostScanJob for a job
    whose record a newer server wrote.  Answered ClientErrorJobTokenNotFound, which a scanner
    takes as final, it dropped a job that exists; ServerErrorTemporaryError makes it ask again,
    and an instance that reads the job answers (Exchange.rows_unreadable).  A token that is
    nowhere is still not found.  A record no server reads (corrupt: not a newer codec's,
    store/undecodable.newer_codec) is ServerErrorInternalError (R4 step 9: a retry cannot
    succeed until an operator moves it aside): answered temporary, a scanner asked forever."""
    from dsc_bindings.filters.settings import FilterSettings
    from dsc_bindings.serve import compose
    from dsc_bindings.store.backends import StorageSettings
    from dsc_core import client, names

    service = compose(
        ServerConfig(),
        tmp_path / "data",
        FilterSettings.embedded_default(tmp_path),
        storage=StorageSettings(store_kind="postgresql", dsn=dsn),
    ).service
    service.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            token, state, active, created, completed, _ = record_columns(make_job("newer"))
            conn.execute(
                "INSERT INTO jobs (token, state, active, created, completed, job) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (token, state, active, created, completed, '{"v": 99, "token": "newer"}'),
            )
            token, state, active, created, completed, _ = record_columns(make_job("corrupt"))
            conn.execute(
                "INSERT INTO jobs (token, state, active, created, completed, job) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (token, state, active, created, completed, '{"v": 3, "token": "corrupt"}'),
            )

        def cancel(token: str) -> bytes:
            body = client.envelope(
                names.Action.DSP_CANCEL,
                client.token_request(names.DSP, "CancelPostScanJobRequest", token),
                message_id=f"urn:uuid:{token}",
            )
            return service.handle(body, content_type=client.SOAP_XML).body

        assert b"ServerErrorTemporaryError" in cancel("newer")
        assert b"ServerErrorInternalError" in cancel("corrupt")
        assert b"ClientErrorJobTokenNotFound" in cancel("nowhere")
    finally:
        service.shutdown(5.0)


def test_a_corrupt_shared_record_is_quarantined_on_purpose_and_every_instance_forgets_it(
    tmp_path: Path,
    pg: PgCluster,
    s3: S3Server,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``dsc db quarantine TOKEN`` does for a shared store what the embedded store's start
    does: the record to DATA/quarantine, its documents from S3 next to it, the row deleted
    with a tombstone, so that an instance holding the job forgets it at its next catch-up; the
    other jobs stay.  A record that decodes, or a newer server's, or one written while the
    operator was asked, is refused untouched."""
    dsn, bucket = pg.new_database(), s3.new_bucket()
    serving = _shared_store(tmp_path / "a", dsn, s3, bucket)
    config = _shared_config(tmp_path / "admin", dsn, s3, bucket)
    data = tmp_path / "admin" / "data"

    def dsc_db_quarantine(token: str, *more: str) -> tuple[int, str]:
        code = main(
            ["db", "quarantine", "--config", str(config), "--data", str(data), *more, token]
        )
        out, err = capsys.readouterr()
        return code, out + err

    try:
        elsewhere, core = _known_elsewhere(serving, "bad", "good")
        assert dsc_db_quarantine("good", "--yes") == (
            1,
            "dsc: db quarantine: the record of job good decodes: it is not corrupt, and this "
            "command moves aside only a record no server can read (to end a job, `dsc cancel "
            "good`; to remove an ended one, `dsc purge`)\n",
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE jobs SET job = %s WHERE token = 'bad'",
                (_NEWER_RECORD.replace("new", "bad"),),
            )
            code, said = dsc_db_quarantine("bad", "--yes")
            assert code == 1 and "written by a newer server (job codec version 99)" in said
            assert "nothing was changed" in said
            # Damaged: the current codec's version, a field missing.
            conn.execute("""UPDATE jobs SET job = '{"v": 3, "token": "bad"}' WHERE token = 'bad'""")
            code, said = dsc_db_quarantine("bad")  # no terminal to ask on, no --yes
            assert code == 2 and "give --yes" in said
            assert not (data / QUARANTINE_NAME).exists()

            def rewritten(question: str, yes: bool) -> None:
                """The operator takes a while to answer; a server writes the job meanwhile."""
                conn.execute("UPDATE jobs SET job = job || ' ' WHERE token = 'bad'")

            with monkeypatch.context() as answering:
                answering.setattr("dsc_bindings.console.db.confirm", rewritten)
                code, said = dsc_db_quarantine("bad", "--yes")
            assert code == 1 and "changed meanwhile" in said and "nothing was changed" in said
            assert not (data / QUARANTINE_NAME).exists()
            conn.execute("""UPDATE jobs SET job = '{"v": 3, "token": "bad"}' WHERE token = 'bad'""")
            code, said = dsc_db_quarantine("bad", "--yes")
            assert code == 0, said
            assert "job bad: moved to " in said and "every instance forgets the job" in said
            assert conn.execute("SELECT token FROM jobs").fetchall() == [("good",)]
        (record,) = (data / QUARANTINE_NAME).glob("job-*.json")
        kept = json.loads(record.read_text())
        assert (kept["token"], kept["record"]) == ("bad", '{"v": 3, "token": "bad"}')
        assert kept["documents"] == [[1, "png", 12]]
        spooled = record.with_suffix(".spool") / "1"
        assert spooled.read_bytes() == b"image of bad"
        assert serving.documents("bad") == []  # out of S3
        assert serving.documents("good") != []
        elsewhere.absorb(core, elsewhere.read())
        assert core.jobs.get("bad") is None
        assert core.jobs.get("good") is not None
        assert dsc_db_quarantine("bad", "--yes")[0] == 1  # gone: "no job bad in ..."
    finally:
        serving.close()


def test_quarantine_deletes_only_the_version_it_read(
    tmp_path: Path,
    pg: PgCluster,
    s3: S3Server,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another instance writes the job after ``dsc db quarantine`` last read it (the read
    hooked): the delete is compare-and-set on the version read, so it deletes nothing, moves
    nothing aside, and says to run again (exit 1); run again, it quarantines the new record."""
    dsn, bucket = pg.new_database(), s3.new_bucket()
    serving = _shared_store(tmp_path / "a", dsn, s3, bucket)
    config = _shared_config(tmp_path / "admin", dsn, s3, bucket)
    data = tmp_path / "admin" / "data"
    try:
        _receive(serving, "bad", b"image of bad")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("""UPDATE jobs SET job = '{"v": 3, "token": "bad"}' WHERE token = 'bad'""")
            read = PostgresRecords.versioned_row
            reads: list[int] = []

            def then_written(records: PostgresRecords, token: str) -> object:
                """The second read (the last before the delete), then another instance's write
                of the row, as the store writes: its version bumped, in a transaction of its
                own."""
                found = read(records, token)
                reads.append(1)
                if len(reads) == 2:
                    conn.execute(
                        "UPDATE jobs SET job = job || ' ', version = version + 1, "
                        "xid = pg_current_xact_id() WHERE token = 'bad'"
                    )
                return found

            monkeypatch.setattr(PostgresRecords, "versioned_row", then_written)
            code = main(["db", "quarantine", "--config", str(config), "--data", str(data),
                         "--yes", "bad"])  # fmt: skip
            said = "".join(capsys.readouterr())
            assert code == 1 and len(reads) == 2, said
            assert said.endswith(
                "dsc: db quarantine: the record of job bad changed since it was read (another "
                "instance wrote it); nothing was changed, run the command again\n"
            ), said
            assert not any((data / QUARANTINE_NAME).glob("*"))
            assert serving.spool.documents("bad") == [1]  # still in S3
            assert conn.execute("SELECT job FROM jobs").fetchall() == [
                ('{"v": 3, "token": "bad"} ',)
            ]
            code = main(["db", "quarantine", "--config", str(config), "--data", str(data),
                         "--yes", "bad"])  # fmt: skip
            said = "".join(capsys.readouterr())
            assert code == 0 and "job bad: moved to " in said, said
            assert conn.execute("SELECT token FROM jobs").fetchall() == []
        (record,) = (data / QUARANTINE_NAME).glob("job-*.json")
        assert json.loads(record.read_text())["record"] == '{"v": 3, "token": "bad"} '
        assert serving.spool.documents("bad") == []
    finally:
        serving.close()


#: A stored record of the current codec with a field missing: corrupt, what quarantine moves.
_CORRUPT_RECORD = '{"v": 3, "token": "bad"}'


def _corrupt(dsn: str, token: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE jobs SET job = %s WHERE token = %s", (_CORRUPT_RECORD, token))


def _a_corrupt_job(serving: SplitStore, dsn: str, token: str) -> tuple[StoredRecord, int]:
    """The job ``token`` received by ``serving``, its record then corrupted: its row and the
    version a quarantine reads (``PostgresRecords.versioned_row``)."""
    _receive(serving, token, b"image of " + token.encode())
    _corrupt(dsn, token)
    found = cast("PostgresRecords", serving.records).versioned_row(token)
    assert found is not None
    return found


def test_quarantine_holds_the_row_so_a_write_meanwhile_waits_and_finds_it_gone(
    tmp_path: Path, pg: PgCluster, s3: S3Server
) -> None:
    """The real race the version compare alone does not close: another instance writes the row
    (compare-and-set on the version, as the store writes) after ``remove_unchanged`` compared
    it and while its record and documents are being set aside.  The row is locked (``FOR
    UPDATE``): that write waits for the quarantine's commit, then finds the row gone and changes
    nothing; without the lock it would commit first and its record would be deleted unseen."""
    dsn, bucket = pg.new_database(), s3.new_bucket()
    serving = _shared_store(tmp_path / "a", dsn, s3, bucket)
    data = tmp_path / "admin"
    records = cast("PostgresRecords", serving.records)
    written: list[int] = []
    try:
        row, version = _a_corrupt_job(serving, dsn, "bad")

        def another_instance_writes() -> None:
            with psycopg.connect(dsn, autocommit=True, application_name="dsc-writer") as conn:
                cur = conn.execute(
                    "UPDATE jobs SET job = job || ' ', version = version + 1, "
                    "xid = pg_current_xact_id() WHERE token = 'bad' AND version = %s",
                    (version,),
                )
                written.append(cur.rowcount)

        writer = threading.Thread(target=another_instance_writes)

        def set_aside_while_written() -> str:
            writer.start()
            with psycopg.connect(dsn, autocommit=True) as watch:
                wait_for(
                    lambda: watch.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'dsc-writer' "
                        "AND wait_event_type = 'Lock'"
                    ).fetchone(),
                    what="the other instance's write waiting for the row",
                )
            return set_aside(data, serving.spool, row, "corrupt")

        moved = records.remove_unchanged(row[0], version, set_aside_while_written)
        writer.join(timeout=30)
        assert not writer.is_alive()
        assert moved is not None and moved.endswith(f"job-{row[0]}.spool")
        assert written == [0]  # it waited, then found the row gone: nothing written
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT token FROM jobs").fetchall() == []
        (record,) = (data / QUARANTINE_NAME).glob("job-*.json")
        assert json.loads(record.read_text())["record"] == _CORRUPT_RECORD
        assert (data / QUARANTINE_NAME / f"job-{row[0]}.spool" / "1").read_bytes() == (
            b"image of bad"
        )
    finally:
        serving.close()


def test_a_spool_that_fails_while_documents_are_set_aside_deletes_nothing(
    tmp_path: Path, pg: PgCluster, s3: S3Server
) -> None:
    """S3 refuses the listing of the job's documents (here: a wrong secret key, a real refusal
    of the real server) while ``dsc db quarantine`` sets them aside: the command fails and the
    row stays, with its documents in S3.  ``set_aside`` took any StoreError for "a token that
    cannot be a folder" and went on: the row was deleted, the documents were left in S3 under a
    token without a row, which every instance's debris sweep deletes (lost)."""
    dsn, bucket = pg.new_database(), s3.new_bucket()
    serving = _shared_store(tmp_path / "a", dsn, s3, bucket)
    data = tmp_path / "admin"
    data.mkdir()
    records = cast("PostgresRecords", serving.records)
    settings = cast("S3Spool", serving.spool).settings
    refused = S3Spool(
        settings,
        boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key="not-the-secret",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        ),
        data,
    )
    try:
        row, version = _a_corrupt_job(serving, dsn, "bad")
        with pytest.raises(StoreError, match="listing"):
            records.remove_unchanged(
                row[0], version, lambda: set_aside(data, refused, row, "corrupt")
            )
        assert records.versioned_row("bad") == (row, version)  # the row stays, as it was
        assert serving.spool.documents("bad") == [1]  # and its documents
        # Once S3 answers, it is quarantined whole.
        moved = records.remove_unchanged(
            row[0], version, lambda: set_aside(data, serving.spool, row, "corrupt")
        )
        assert moved is not None and moved.endswith(f"job-{row[0]}.spool")
        assert records.versioned_row("bad") is None
        assert (data / QUARANTINE_NAME / f"job-{row[0]}.spool" / "1").read_bytes() == (
            b"image of bad"
        )
    finally:
        refused.close()
        serving.close()


def test_a_quarantine_cut_off_before_its_commit_leaves_the_documents_in_the_spool(
    tmp_path: Path, pg: PgCluster, s3: S3Server
) -> None:
    """The quarantine's connection dies after the record and documents were copied aside and
    before the delete commits (a crash, a network cut: here its backend terminated for real):
    the row stays, and so do its documents in S3, the shared spool, as they were; run again,
    the quarantine completes.  The documents left S3 inside the transaction: a row without
    its documents was left behind, for every instance."""
    dsn, bucket = pg.new_database(), s3.new_bucket()
    serving = _shared_store(tmp_path / "a", dsn, s3, bucket)
    data = tmp_path / "admin"
    records = cast("PostgresRecords", serving.records)
    try:
        row, version = _a_corrupt_job(serving, dsn, "bad")

        def set_aside_then_cut_off() -> str:
            where = set_aside(data, serving.spool, row, "corrupt")
            with psycopg.connect(dsn, autocommit=True) as admin:
                (killed,) = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'SELECT version, token FROM jobs WHERE seq%%' "
                    "AND pid <> pg_backend_pid()"
                ).fetchall()
                assert killed == (True,)
            return where

        with pytest.raises(StoreError):
            records.remove_unchanged(row[0], version, set_aside_then_cut_off)
        assert records.versioned_row("bad") == (row, version)  # the row stays, as it was
        assert serving.spool.documents("bad") == [1]  # with its documents
        moved = records.remove_unchanged(
            row[0], version, lambda: set_aside(data, serving.spool, row, "corrupt")
        )
        assert moved is not None
        assert records.versioned_row("bad") is None
        discard_set_aside(serving.spool, "bad")  # the delete committed: they leave S3
        assert serving.spool.documents("bad") == []
        assert (data / QUARANTINE_NAME / f"job-{row[0]}.spool" / "1").read_bytes() == (
            b"image of bad"
        )
    finally:
        serving.close()


def test_asked_rows_come_whatever_the_cursor(two: tuple[PostgresRecords, ...]) -> None:
    a, b = two
    create(a, "old")
    cursor = b.changes(0, frozenset()).cursor
    assert b.changes(cursor, frozenset()).rows == ()
    assert [r[0] for r in b.changes(cursor, frozenset({"old"})).rows] == ["old"]


def test_uploads_in_flight_are_seen_by_the_others_only(two: tuple[PostgresRecords, ...]) -> None:
    a, b = two
    create(a, "j")
    a.upload_began("j", 1, "host-a:/data")
    assert b.changes(0, frozenset()).uploads_elsewhere == (("j", 1),)
    assert a.changes(0, frozenset()).uploads_elsewhere == ()
    with pytest.raises(StoreError) as taken:
        b.upload_began("j", 1, "host-b:/data")
    assert taken.value.temporary
    # Recording the image in the job ends its upload, in the same statement.
    received = make_job("j", 1).evolve(documents=(Document(1, "png", 3),))
    a.write(VersionedWrite(UpdateJob(received, JobInput.IMAGE, ()), 1, 0))
    assert b.changes(0, frozenset()).uploads_elsewhere == ()
    # A run that died mid-upload: the next run from its home releases the row at start.
    a.upload_began("j", 2, "host-a:/data")
    assert b.release_uploads("host-a:/data") == [("j", 2)]
    b.upload_began("j", 2, "host-b:/data")


def test_an_upload_end_that_failed_is_done_by_the_next_read(pg: PgCluster, dsn: str) -> None:
    """An upload that ends while the database is away (an AbortDocument of a SendImage cut by a
    PostgreSQL restart) leaves its row, which the other instances would count as in flight for
    UPLOAD_ROW_SECONDS: the job never idle (no R6 timeout), the scanner's retry refused.  The
    next read of the feed deletes it; a new upload of the same image keeps its row."""
    a = PostgresRecords.open(dsn, pool_timeout=1.0)
    b = PostgresRecords.open(dsn)
    name = dsn.rsplit("/", 1)[-1].split("?")[0]
    try:
        create(a, "j")
        for document_id in (1, 2):
            a.upload_began("j", document_id, "host-a:/data")
        with psycopg.connect(pg.dsn(), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            try:
                for document_id in (1, 2):
                    with pytest.raises(StoreError) as away:
                        a.upload_ended("j", document_id)
                    assert away.value.temporary
            finally:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        seen = wait_for(lambda: _uploads_seen(b), 20, "b to read the feed again")
        assert seen == (("j", 1), ("j", 2))  # a has not read since: both still count
        # The scanner's retry, here: a new upload (once a's pool has reconnected).
        wait_for(lambda: _done(lambda: a.upload_began("j", 2, "host-a:/data")), 20, "a's retry")
        wait_for(lambda: _uploads_seen(a) is not None, 20, "a to read the feed again")
        assert _uploads_seen(b) == (("j", 2),)
    finally:
        a.close()
        b.close()


def _done(call: Callable[[], None]) -> bool:
    try:
        call()
    except StoreError:
        return False
    return True


def _uploads_seen(records: PostgresRecords) -> tuple[tuple[str, int], ...] | None:
    """The uploads of other instances one read of the feed finds; None while it fails (the
    pool reconnects after a failure)."""
    try:
        return tuple(sorted(records.changes(0, frozenset()).uploads_elsewhere))
    except StoreError:
        return None


def test_catch_up_absorbs_what_others_wrote_and_refuses_writes_from_a_lost_race(
    two: tuple[PostgresRecords, ...],
) -> None:
    a, b = two
    core = ScanServer(ServerConfig(), new_id=lambda: "unused")
    catch_up = JobCatchUp(b.changes)
    catch_up.seed(catch_up.read())
    create(a, "j")
    catch_up.absorb(core, catch_up.read())
    assert core.jobs.get("j") == make_job("j")
    # This instance decides from version 1 while the other one writes version 2.
    [stamped] = catch_up.stamp([UpdateJob(make_job("j", 5), JobInput.IMAGE, ())])
    assert isinstance(stamped, VersionedWrite) and stamped.expected == 1
    winner = make_job("j", 9, state=JobState.PENDING)
    a.write(VersionedWrite(UpdateJob(winner, JobInput.END, ()), 1, 0))
    later = catch_up.stamp([UpdateJob(make_job("j", 6), JobInput.IMAGE, ())])[0]
    with pytest.raises(JobChanged) as lost:
        catch_up.check(stamped)
        b.write(stamped)
    catch_up.settled(stamped, lost.value)
    with pytest.raises(JobChanged):  # decided before the failure: refused without asking
        assert isinstance(later, VersionedWrite)
        catch_up.check(later)
    catch_up.settled(later, JobChanged("j"))
    # The next catch-up reads the job again and the core gets the winner's record.
    catch_up.absorb(core, catch_up.read())
    assert core.jobs.get("j") == winner
    [again] = catch_up.stamp([UpdateJob(make_job("j", 10), JobInput.IMAGE, ())])
    assert isinstance(again, VersionedWrite) and again.expected == 2
    catch_up.check(again)
    b.write(again)


class Listening:
    """A catch-up with its doorbell on ``records``: each ring is also queued, so the test
    knows when one was heard (and waits for it, never for a time)."""

    def __init__(self, records: PostgresRecords, *, fresh_seconds: float = 3600.0) -> None:
        self.catch_up = JobCatchUp(
            records.changes, lambda: records.instance, fresh_seconds=fresh_seconds
        )
        self.rings: queue.Queue[Rang | None] = queue.Queue()
        self.states: queue.Queue[bool] = queue.Queue()
        self.doorbell = records.listen(self._ring, self._heard)
        assert self.states.get(timeout=30) is True  # listening before the seed read
        self.core = ScanServer(ServerConfig(), new_id=lambda: "unused")
        self.catch_up.seed(self.catch_up.read())

    def _ring(self, rang: Rang | None) -> None:
        self.catch_up.ring(rang)
        self.rings.put(rang)

    def _heard(self, listening: bool) -> None:
        self.catch_up.heard(listening)
        self.states.put(listening)

    def ring_for(self, token: str) -> Rang | None:
        while True:
            rang = self.rings.get(timeout=30)
            if rang is not None and rang.token == token:
                return rang

    def catch_up_now(self) -> None:
        self.catch_up.absorb(self.core, self.catch_up.read())


def test_the_doorbell_skips_the_read_until_another_instance_writes(
    two: tuple[PostgresRecords, ...],
) -> None:
    a, b = two
    here = Listening(b)
    try:
        assert here.catch_up.fresh()  # nothing changed since the seed read
        # This instance's own write rings too, but is no news: it holds what it wrote.
        [stamped] = here.catch_up.stamp([CreateJob(make_job("mine"))])
        assert isinstance(stamped, VersionedWrite)
        b.write(stamped)
        here.catch_up.settled(stamped, None)
        assert here.ring_for("mine") == Rang("mine", version=1)
        assert here.catch_up.fresh()
        # Another instance's write is news until a read that began after its ring.
        create(a, "theirs")
        assert here.ring_for("theirs") == Rang("theirs", version=1)
        assert not here.catch_up.fresh()
        here.catch_up_now()
        assert here.catch_up.fresh()
        assert here.core.jobs.get("theirs") == make_job("theirs")
        # So are their uploads and their drops; this instance's uploads are not.
        b.upload_began("mine", 1, "host-b:/data")
        assert here.ring_for("mine") == Rang("mine", upload_instance=b.instance)
        assert here.catch_up.fresh()
        a.upload_began("theirs", 1, "host-a:/data")
        assert here.ring_for("theirs") == Rang("theirs", upload_instance=a.instance)
        assert not here.catch_up.fresh()
        here.catch_up_now()
        a.write(VersionedWrite(DropJob("theirs", Removal.PURGED), None, 0))
        assert here.ring_for("theirs") == Rang("theirs", dropped=True)
        assert not here.catch_up.fresh()
        here.catch_up_now()
        assert here.catch_up.fresh() and here.core.jobs.get("theirs") is None
    finally:
        here.doorbell.close()


def test_a_job_asked_for_again_that_does_not_decode_is_not_read_at_every_round(
    dsn: str, two: tuple[PostgresRecords, ...], caplog: pytest.LogCaptureFixture
) -> None:
    """A write of a job fails here because a newer server rewrote it (a record this instance
    cannot decode): the next read asks for its row whatever the cursor, leaves it out, and stops
    asking; the listings skip their read again, and the row, once written anew, comes with the
    cursor.  Asked for at every round, no listing skipped a read for the rest of the run."""
    a, b = two
    here = Listening(b)
    try:
        create(a, "j")
        here.ring_for("j")
        here.catch_up_now()
        assert here.core.jobs.get("j") == make_job("j")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE jobs SET job = %s, version = 2, xid = pg_current_xact_id() "
                "WHERE token = 'j'",
                (_NEWER_RECORD.replace("new", "j"),),
            )
        here.ring_for("j")
        [lost] = here.catch_up.stamp([UpdateJob(make_job("j", 1), JobInput.IMAGE, ())])
        assert isinstance(lost, VersionedWrite)
        with pytest.raises(JobChanged) as refused:
            b.write(lost)
        here.catch_up.settled(lost, refused.value)
        assert not here.catch_up.fresh()
        with caplog.at_level("WARNING", logger="dsc.store"):
            here.catch_up_now()
            assert here.catch_up.fresh()
            here.catch_up_now()
        # The table forgot its copy, as if it never knew a job it cannot read: nothing is
        # answered from a stale record (runtime/catchup.py, absorb).
        assert here.core.jobs.get("j") is None
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and warnings[0].startswith("job j: the stored record")
        # A newer server's next write of the job, one this instance reads, comes as news.
        updated = make_job("j", 3, state=JobState.PENDING)
        a.write(VersionedWrite(UpdateJob(updated, JobInput.END, ()), 2, 0))
        here.ring_for("j")
        assert not here.catch_up.fresh()
        here.catch_up_now()
        assert here.core.jobs.get("j") == updated
    finally:
        here.doorbell.close()


def test_without_a_recent_read_nothing_is_skipped(two: tuple[PostgresRecords, ...]) -> None:
    """The bound on staleness (FRESH_SECONDS; 0 here): a quiet doorbell alone is not enough."""
    _, b = two
    here = Listening(b, fresh_seconds=0.0)
    try:
        here.catch_up_now()
        assert not here.catch_up.fresh()
    finally:
        here.doorbell.close()


def test_a_lost_listener_skips_nothing_and_its_return_forces_a_full_read(
    dsn: str, two: tuple[PostgresRecords, ...]
) -> None:
    """The listener's connection is killed (as a PostgreSQL restart would): while it is away
    every request reads; once it listens again, the next read brings what was missed."""
    a, b = two
    here = Listening(b)
    try:
        assert here.catch_up.fresh()
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
            )
        assert here.states.get(timeout=30) is False
        assert not here.catch_up.fresh()
        create(a, "missed")  # committed while the listener is away (or just back)
        assert here.states.get(timeout=30) is True
        assert not here.catch_up.fresh()  # the reconnect counts as a ring
        here.catch_up_now()
        assert here.catch_up.fresh() and here.core.jobs.get("missed") == make_job("missed")
    finally:
        here.doorbell.close()


def _deliver(n: int) -> Deliver:
    return Deliver("urn:uuid:s", "http://sink.example/n", (str(n).encode(),))


def test_stamp_puts_every_notification_of_a_batch_in_the_transaction_of_a_write() -> None:
    """Issue 18 points 3 and 4 (no database: the stamping rules alone).  Notifications ride
    on the batch's job write; without one on its drop; without either in one EventsWrite;
    the repository state's announcement brings its own events, under the leader's term, and
    is left out with them when this instance does not lead."""
    catch_up = JobCatchUp(lambda cursor, tokens: JobChanges(cursor, (), (), ()))

    def announce(*events: Deliver) -> AnnounceRepositoryState:
        return AnnounceRepositoryState(RepositoryState.PROCESSING, RepositoryState.IDLE, events)

    job = make_job("j")
    [write, start] = catch_up.stamp(
        [CreateJob(job), StartProcessing(job), _deliver(1), announce(_deliver(2))], ("A", 3)
    )
    assert isinstance(write, VersionedWrite) and start == StartProcessing(job)
    assert write.events == (_deliver(1),)
    # After the write's one event: stored after it (the order the core emitted them in).
    assert write.announcement == Announcement("Processing", "Idle", "A", 3, (_deliver(2),), 1)
    # A reload trimming the history: the event commits with the drop.
    [drop] = catch_up.stamp([DropJob("old", Removal.HISTORY_FULL), _deliver(3)])
    assert isinstance(drop, VersionedWrite) and drop.events == (_deliver(3),)
    # A state the leader derived from other instances' rows: one transaction of its own; a
    # notification after it rides along, outside the announcement.
    [alone] = catch_up.stamp([announce(_deliver(4), _deliver(5)), _deliver(8)], ("A", 3))
    assert alone == EventsWrite(
        (_deliver(8),), Announcement("Processing", "Idle", "A", 3, (_deliver(4), _deliver(5)))
    )
    # Two announcements in one batch: one write each (a write records one).
    first, second = catch_up.stamp([announce(_deliver(9)), announce()], ("A", 3))
    assert isinstance(first, EventsWrite) and isinstance(second, EventsWrite)
    assert first.announcement is not None and first.announcement.events == (_deliver(9),)
    assert second.announcement is not None and second.announcement.events == ()
    # Not the leader: neither the announcement nor its events; a job's own events stay.
    stamped = catch_up.stamp([announce(_deliver(6)), DiscardDocuments("j"), _deliver(7)])
    assert stamped == [DiscardDocuments("j"), EventsWrite((_deliver(7),))]
    # A SubscriptionEnd goes to the hub directly (its subscription is gone from the store).
    end = Deliver("urn:uuid:s", "http://sink.example/e", (b"end",), final=True)
    assert catch_up.stamp([end]) == [end]
