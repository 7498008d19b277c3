"""The file share filter across failover (issue 18 points 2 and 7): two real ``dsc serve``
instances on a PostgreSQL and a SeaweedFS of this module's own (two tests stop them), one
share folder both write to (a ``[shares]`` folder, and for the kill and freeze tests also a
share of a real Samba server: the SMB filter keeps the same records), jobs of three documents.

Caught in the middle, deterministically: the test holds, in an open transaction, the delivery
record of document 2 (an uncommitted ``filter_deliveries`` row with its key), so the running
instance has recorded document 1, placed document 2 under its final name (its temporary name
still linked to it) and waits in its INSERT of document 2's record, with document 3 unwritten,
until the test lets go.  Then an instance is killed or frozen, or PostgreSQL stopped; or S3 is
away when the run reads the documents.  Every time the job Completes with each document placed
once under its R9 name, with its bytes, and no temporary file left on the share.

A heartbeat every 0.3 s and a lease of 2 s keep each test to seconds."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from dsc_core.model import FileShareInstructions
from e2e_support import DEFAULT_SID, ServerProcess, Soap, Stream, started_servers, telling
from engines_support import pg_cluster, s3_server, shared_engine_config, spool_section
from test_e2e_serve import LOCAL_SHARE
from waiting import wait_for

if TYPE_CHECKING:
    from engines_support import PgCluster, S3Server
    from smb_support import SmbServer

MiB = 1 << 20
#: Three documents of different contents (a duplicate or a swap shows in the bytes).
DOCUMENTS = {1: (2 * MiB, 11), 2: (3 * MiB, 12), 3: (1 * MiB, 13)}


def content(document_id: int) -> bytes:
    size, seed = DOCUMENTS[document_id]
    return b"".join(Stream(size, seed=seed))


@dataclass(frozen=True)
class Target:
    """A UNC path of the instructions, the share folder it reaches as the filter names it in
    its records, and the same folder seen by the test (the Samba share's is local too)."""

    unc: str
    recorded: str
    folder: Path


class Pair:
    """Two instances (a, b) of one store, the share folders they both write to, and the
    store's engines (which a test may stop)."""

    def __init__(
        self,
        a: ServerProcess,
        b: ServerProcess,
        targets: dict[str, Target | str],
        dsn: str,
        pg: PgCluster,
        s3: S3Server,
    ) -> None:
        self.a, self.b = a, b
        self.targets = targets
        self.target = Target(LOCAL_SHARE, "", Path())  # each test's, set by the fixture
        self.dsn = dsn
        self.pg = pg
        self.s3 = s3

    def telling(self, lines: int = 60) -> AbstractContextManager[None]:
        """A failure inside shows the end of both instances' logs (e2e_support.telling)."""
        return telling({"a": self.a, "b": self.b}, lines)

    @property
    def folder(self) -> Path:
        """Where the jobs' files go: the user's sub-folder (R9)."""
        return self.target.folder

    def create(self, root_name: str, on: ServerProcess | None = None) -> tuple[Soap, str]:
        """A job created on ``on`` (a unless told): its filters run there."""
        client = Soap((on or self.a).url)
        instructions = FileShareInstructions((self.target.unc,))
        return client, client.create([instructions], root_name=root_name)

    @staticmethod
    def send(client: Soap, token: str) -> None:
        for document_id in DOCUMENTS:
            client.send_image(token, document_id, content(document_id))
        client.end(token)

    def hold_record(self, token: str, document_id: int) -> psycopg.Connection[Any]:
        """An open transaction holding the key of the delivery record of ``document_id``: an
        instance recording it waits (PostgreSQL's unique index) until it ends."""
        conn = psycopg.connect(self.dsn)
        conn.execute(
            "INSERT INTO filter_deliveries (token, filter_index, folder, document_id, counter, "
            "name) VALUES (%s, 0, %s, %s, 0, 'held by the test')",
            (token, self.target.recorded, document_id),
        )
        return conn

    def waiting_records(self) -> int:
        """Instances' statements waiting for the held record (their connections live or not)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%%INSERT INTO filter_deliveries%%'"
            ).fetchone()
        assert row is not None
        return int(row[0])

    def caught_mid_way(self, root_name: str, token: str, epoch_of: ServerProcess) -> None:
        """Document 1 placed and recorded, document 2 placed (its record waits), 3 unwritten."""
        wait_for(lambda: self.waiting_records() == 1, 30, "the record of document 2 to wait")
        names = sorted(os.listdir(self.folder))
        placed = [n for n in names if n.startswith(root_name)]
        temporary = [n for n in names if n.startswith(f".dsc-{token}-2-")]
        assert placed == [f"{root_name}_0001.png", f"{root_name}_0002.png"], names
        assert len(temporary) == 1 and os.stat(self.folder / temporary[0]).st_nlink == 2, names
        assert f"job {token} claimed" in epoch_of.log

    def delivered(self, root_name: str) -> dict[str, bytes]:
        """Every file of the share folder named after ``root_name``, and every temporary one."""
        return {
            name: (self.folder / name).read_bytes()
            for name in os.listdir(self.folder)
            if name.startswith(root_name) or name.startswith(".dsc-")
        }

    def assert_delivered_once(self, root_name: str) -> None:
        found = self.delivered(root_name)
        assert sorted(found) == [f"{root_name}_000{d}.png" for d in DOCUMENTS], sorted(found)
        for document_id in DOCUMENTS:
            assert found[f"{root_name}_000{document_id}.png"] == content(document_id)


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PgCluster]:
    """A PostgreSQL of this module's own: one test stops it."""
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def own_s3() -> Iterator[S3Server]:
    """A SeaweedFS of this module's own: one test stops it."""
    with s3_server() as server:
        yield server


def samba(request: pytest.FixtureRequest) -> SmbServer | str:
    """The session's Samba server, or why it cannot run here (its tests skip, saying so)."""
    try:
        server: SmbServer = request.getfixturevalue("smbd")
    except pytest.skip.Exception as exc:
        return str(exc)
    return server


@pytest.fixture(scope="module")
def started_pair(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    own_pg: PgCluster,
    own_s3: S3Server,
) -> Iterator[Pair]:
    folder = tmp_path_factory.mktemp("fileshare-failover")
    share = folder / "share"
    share.mkdir()
    targets: dict[str, Target | str] = {
        "local": Target(LOCAL_SHARE, str(share / DEFAULT_SID), share / DEFAULT_SID),
    }
    smbd = samba(request)
    smb_config = ""
    if isinstance(smbd, str):
        targets["smb"] = smbd
    else:
        smb_config = smbd.config() + "\n"
        below = ("failover", DEFAULT_SID)
        # As the filter names the folder (filters/smbfolder.py): the share's root, then below.
        root = PureWindowsPath(f"\\\\{smbd.address}\\scans\\")
        targets["smb"] = Target(
            rf"\\{smbd.address}\scans\failover",
            str(root.joinpath(*below)),
            smbd.scans.joinpath(*below),
        )
    dsn = own_pg.new_database()
    config = folder / "dsc.toml"
    config.write_text(
        "[cluster]\nheartbeat_seconds = 0.3\nlease_seconds = 2\n\n"
        f"[shares]\n'{LOCAL_SHARE}' = \"{share}\"\n\n"
        + smb_config
        + shared_engine_config(dsn, own_s3, own_s3.new_bucket(), folder)
    )
    with started_servers() as keep:
        a = keep(ServerProcess(folder / "a", config=config))
        b = keep(ServerProcess(folder / "b", config=config))
        yield Pair(a, b, targets, dsn, own_pg, own_s3)


@pytest.fixture(params=["local"])
def pair(started_pair: Pair, request: pytest.FixtureRequest) -> Iterator[Pair]:
    """Both instances up for each test (one killed by the test before is started again here,
    not after it: the kill tests come last, so the module restarts one instance, not two);
    the share its jobs go to."""
    target = started_pair.targets[request.param]
    if isinstance(target, str):
        pytest.skip(f"no Samba server for the SMB share: {target}")
    started_pair.target = target
    for server in (started_pair.a, started_pair.b):
        if not server.alive:
            server.start()
    yield started_pair
    for server in (started_pair.a, started_pair.b):
        if server.alive:
            os.kill(server.pid, signal.SIGCONT)  # a frozen one must hear SIGTERM


@pytest.mark.parametrize("pair", ["local", "smb"], indirect=True)
def test_a_frozen_instance_s_late_file_share_writes_are_refused(pair: Pair) -> None:
    """SIGSTOP past the lease mid-file-share, b rescues and completes the job, SIGCONT: the
    frozen run goes on with a record held since before the rescue, and places nothing."""
    with pair.telling():
        client, token = pair.create("frozen")
        held = pair.hold_record(token, 2)
        try:
            pair.send(client, token)
            pair.caught_mid_way("frozen", token, pair.a)
            os.kill(pair.a.pid, signal.SIGSTOP)
            wait_for(lambda: f"job {token} rescued from instance" in pair.b.log, 30, "b's rescue")
            wait_for(lambda: pair.waiting_records() == 2, 30, "b to record document 2")
        finally:
            held.rollback()
            held.close()
        ended = Soap(pair.b.url).wait_ended(token, 30)
        assert ended.state == "Completed", ended
        os.kill(pair.a.pid, signal.SIGCONT)
        # Said however a learns that the job is no longer its own: the heartbeat's renewal
        # before the engine's last report, or that report made nothing (the catch-up read
        # brought b's end first) or was refused (runtime/service.py ``_run_dropped``).
        wait_for(
            lambda: f"job {token}: the run of its filters here has ended" in pair.a.log,
            30,
            "the frozen instance's run to end",
        )
        # Refused by the heartbeat (the renewal finds the lease gone), by the file share's check
        # before a file takes its name, or by the fenced record write of its report.
        refusals = (
            f"job {token}: the lease was lost",
            f"of job {token} delivers nothing more",
            f"job {token}: a write of its filters was refused",
        )
        assert any(refusal in pair.a.log for refusal in refusals), pair.a.log[-3000:]
        pair.assert_delivered_once("frozen")
        for server in (pair.a, pair.b):
            view = Soap(server.url).in_history(token)
            assert view is not None and view.state == "Completed", view
            assert view.completed == ended.completed, (view, ended)


def test_postgresql_stopped_mid_file_share_interrupts_the_job_it_completes_later(
    pair: Pair,
) -> None:
    """PostgreSQL stops in the middle of the file share (document 2's record waiting): the
    run is interrupted while the database is down (no retry window to outlast, after which the
    job would end Aborted), and once it is back an instance resumes the job (R13) and places
    what was missing."""
    client, token = pair.create("outage")
    held = pair.hold_record(token, 2)
    pair.send(client, token)
    pair.caught_mid_way("outage", token, pair.a)
    try:
        pair.pg.stop("fast")  # ends every session, the test's held record too
        wait_for(
            lambda: f"job {token}: its filters were interrupted" in pair.a.log,
            30,
            "the run to be interrupted while the database is down",
        )
    finally:
        pair.pg.start()
    held.close()
    ended = Soap(pair.b.url).wait_ended(token, 60)
    assert ended.state == "Completed", ended
    assert [f.state for f in ended.filters] == ["CompletedSuccessfully"], ended
    pair.assert_delivered_once("outage")
    assert "PostScanJobProcessingFailed" not in pair.a.log + pair.b.log


def test_s3_away_while_the_run_reads_the_images_the_job_resumes(pair: Pair) -> None:
    """The images are stored; S3 stops before EndPostScanJob, so the run cannot read them:
    interrupted, not Aborted; resumed once S3 is back."""
    client, token = pair.create("nos3")
    for document_id in DOCUMENTS:
        client.send_image(token, document_id, content(document_id))
    pair.s3.stop()
    try:
        client.end(token)
        wait_for(
            lambda: f"job {token}: its filters were interrupted" in pair.a.log + pair.b.log,
            30,
            "the run to be interrupted while S3 is away",
        )
        view = client.dsp_job(token)
        assert view.state not in ("Aborted", "Completed"), view
    finally:
        pair.s3.start()
    ended = Soap(pair.b.url).wait_ended(token, 60)
    assert ended.state == "Completed", ended
    pair.assert_delivered_once("nos3")


def test_one_server_resumes_a_job_whose_images_s3_could_not_give(
    tmp_path: Path, own_s3: S3Server
) -> None:
    """One server (SQLite records, S3 images; no leases): the run that cannot read the images
    is interrupted and the server resumes the job itself, every RESUME_INTERRUPTED_SECONDS
    until S3 answers."""
    share = tmp_path / "share"
    config = tmp_path / "dsc.toml"
    config.write_text(
        f"[shares]\n'{LOCAL_SHARE}' = \"{share}\"\n\n"
        + spool_section(own_s3, own_s3.new_bucket(), tmp_path)
    )
    with started_servers() as keep:
        server = keep(ServerProcess(tmp_path / "data", config=config))
        client = Soap(server.url)
        token = client.create([FileShareInstructions((LOCAL_SHARE,))], root_name="alone")
        for document_id in DOCUMENTS:
            client.send_image(token, document_id, content(document_id))
        own_s3.stop()
        try:
            client.end(token)
            wait_for(
                lambda: f"job {token}: resumed in 5 s (R13)" in server.log,
                30,
                "the run to be interrupted while S3 is away",
            )
            view = client.dsp_job(token)
            assert view.state not in ("Aborted", "Completed"), view
        finally:
            own_s3.start()
        ended = client.wait_ended(token, 60)
        assert ended.state == "Completed", ended
        assert "PostScanJobProcessingFailed" not in server.log
    folder = share / DEFAULT_SID
    assert sorted(os.listdir(folder)) == [f"alone_000{d}.png" for d in DOCUMENTS]
    for document_id in DOCUMENTS:
        assert (folder / f"alone_000{document_id}.png").read_bytes() == content(document_id)


# Last in the module: each kills an instance (a, then b), the next test's set-up restarts it.
@pytest.mark.parametrize(("pair", "victim"), [("local", "a"), ("smb", "b")], indirect=["pair"])
def test_kill9_mid_file_share_the_rescuer_places_each_file_once(pair: Pair, victim: str) -> None:
    runner, rescuer = (pair.a, pair.b) if victim == "a" else (pair.b, pair.a)
    client, token = pair.create("killed", on=runner)
    held = pair.hold_record(token, 2)
    try:
        pair.send(client, token)
        pair.caught_mid_way("killed", token, runner)
        runner.kill9()
        wait_for(lambda: f"job {token} rescued from instance" in rescuer.log, 30, "the rescue")
        # The rescuer recorded document 1's file and, by its linked temporary name, document 2's.
        wait_for(lambda: pair.waiting_records() == 2, 30, "the rescuer to record document 2")
    finally:
        held.rollback()
        held.close()
    ended = Soap(rescuer.url).wait_ended(token, 30)
    assert ended.state == "Completed", ended
    assert [f.state for f in ended.filters] == ["CompletedSuccessfully"], ended
    pair.assert_delivered_once("killed")
