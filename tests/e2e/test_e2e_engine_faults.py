"""Faults of the engines are answered, not suffered (issue 17 point 4), with a real ``dsc serve``
on a real PostgreSQL and a real SeaweedFS: the request that meets the fault gets
``ServerErrorTemporaryError`` (R4 step 9) and the core's undo, the server recovers by itself
when the engine is back, nothing acknowledged is lost; a frozen database blocks neither the
event loop nor the requests that need no database.

These tests stop, restart and freeze their engines, so they have engines of their own (not the
session's, which other tests share)."""

from __future__ import annotations

import os
import re
import signal
import threading
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from dsc_core import client as dc
from dsc_core.model import FileShareInstructions
from e2e_support import Soap, dsc_here, file_sha256
from engines_support import (
    PgCluster,
    S3Server,
    pg_cluster,
    s3_server,
    shared_engine_config,
)
from test_e2e_serve import LOCAL_SHARE, StartServer, start_server, user_folder, write
from waiting import wait_for

__all__ = ["start_server"]  # the fixture, used by name below

TEMPORARY = "dsp:ServerErrorTemporaryError"
#: [store] pool_timeout_seconds where a request is meant to meet the fault: answered in 1 s.
SHORT = 1.0


@pytest.fixture
def backend() -> object:
    from engines_support import Backend

    return Backend()  # these tests write their own [store] and [spool]


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PgCluster]:
    with pg_cluster() as cluster:
        yield cluster


@pytest.fixture
def own_s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


def config_for(
    tmp_path: Path, pg: PgCluster, s3: S3Server, *, pool_timeout_seconds: float = 5.0
) -> Path:
    """The engines' settings; /healthz checks again once its result is half a second old, and
    a request (and the /healthz store check) waits ``pool_timeout_seconds`` for a connection:
    the tests that wait for a fault to show, and for its end, set it short (:data:`SHORT`)."""
    config = tmp_path / "dsc.toml"
    config.write_text(
        "[server]\nhealth_max_age_seconds = 0.5\n\n"
        + shared_engine_config(
            pg.new_database(),
            s3,
            s3.new_bucket(),
            tmp_path,
            pool_timeout_seconds=pool_timeout_seconds,
        )
    )
    return config


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def share() -> list[FileShareInstructions]:
    return [FileShareInstructions((LOCAL_SHARE,))]


def test_postgresql_restarted_mid_scan(
    start_server: StartServer, tmp_path: Path, own_pg: PgCluster, s3: S3Server
) -> None:
    server = start_server(config=config_for(tmp_path, own_pg, s3, pool_timeout_seconds=SHORT))
    client = Soap(server.url)
    token = client.create(share())
    first, second = os.urandom(100_000), os.urandom(120_000)
    client.send_image(token, 1, first)  # acknowledged: committed in PostgreSQL

    own_pg.stop("immediate")  # as after a crash: connections cut, no checkpoint
    try:
        with pytest.raises(dc.ClientFault) as caught:
            client.send_image(token, 2, second)
        assert caught.value.subcode == TEMPORARY, caught.value.line()
        # /healthz answers from its last check and starts a new one when that is old.
        text = wait_for(
            lambda: (h := get(server.port, "/healthz"))[0] == 503 and h[1], 20, "/healthz 503"
        )
        assert "store: PostgreSQL at " in text, text
    finally:
        own_pg.start()

    # The server reconnects by itself (/healthz sees it: its store check gets a connection);
    # then the scanner's retry of the same document succeeds (the core undid the failed one,
    # so it is no duplicate).
    wait_for(lambda: get(server.port, "/healthz")[0] == 200, 15, "/healthz to be ok again")
    client.send_image(token, 2, second)
    client.end(token)
    ended = client.wait_ended(token, 30)
    assert ended.state == "Completed" and ended.images_received == 2, ended
    folder = user_folder(server.data)
    assert (folder / "scan_0001.png").read_bytes() == first
    assert (folder / "scan_0002.png").read_bytes() == second

    # The history answers from the core as soon as it has ended the job; its record is written
    # right after on the writer thread (runtime/writer.py).  The kill comes once it is written:
    # what a kill may lose before that is the crash tests' subject, not this one's.
    dsn = tomllib.loads(server.config.read_text())["store"]["dsn"]
    wait_for(lambda: recorded_state(dsn, token) == "Completed", 30, "the Completed record")
    server.kill9()
    again = start_server(config=server.config, data=server.data)
    history = dsc_here("history", "--server", again.url, "--json")
    assert [(e["token"], e["state"], e["images_received"]) for e in history.json()] == [
        (token, "Completed", 2)
    ]


def recorded_state(dsn: str, token: str) -> str | None:
    """The state of ``token``'s record in PostgreSQL (None: no record)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT state FROM jobs WHERE token = %s", (token,)).fetchone()
    return None if row is None else str(row[0])


def test_frozen_database_blocks_no_request_that_needs_none(
    start_server: StartServer, tmp_path: Path, own_pg: PgCluster, s3: S3Server
) -> None:
    """SIGSTOP on every PostgreSQL process: a SendImage waits for its commit, while requests
    answered from the core's memory (GetRepositoryElements, GetActiveJobs) and /metrics are
    answered meanwhile: the database is never waited for on the event loop; a job-addressed
    request for a job it does not know is answered temporary (Exchange.rows_unread)."""
    # The default pool timeout: the SendImage must still be waiting when the others answer.
    server = start_server(config=config_for(tmp_path, own_pg, s3))
    client = Soap(server.url)
    token = client.create(share())
    client.send_image(token, 1, os.urandom(50_000))

    frozen = own_pg.processes()
    outcome: list[object] = []
    waiting = threading.Thread(
        target=lambda: outcome.append(_attempt(client, token, 2, os.urandom(60_000)))
    )
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        waiting.start()
        wait_for(
            lambda: "dsc_store_pool_connections" in get(server.port, "/metrics")[1],
            10,
            "/metrics while the database is frozen",
        )
        repo = dsc_here("repo", "--server", server.url, "--json")
        assert repo.code == 0, repo
        assert repo.json()["state"] in ("Idle", "Processing"), repo.json()
        jobs = dsc_here("jobs", "--server", server.url, "--json")
        assert [j["token"] for j in jobs.json()] == [token], jobs
        # A job-addressed request cannot read the shared rows: a token this instance does not
        # know may be another instance's job, so it is temporary, not JobTokenNotFound.
        with pytest.raises(dc.ClientFault) as unread:
            client.dsp_cancel(str(uuid.uuid4()))
        assert unread.value.subcode == TEMPORARY, unread.value.line()
        # Those answers came while the SendImage still waited for the frozen database.
        assert waiting.is_alive() and outcome == [], outcome
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    waiting.join(60)
    assert not waiting.is_alive()
    # Thawed: the waiting SendImage was committed (or, had the pool given up first, answered
    # as temporary and then sent again, which is what a scanner does).
    [result] = outcome
    if result != "ok":
        assert result == TEMPORARY, result
        assert _attempt(client, token, 2, os.urandom(60_000)) == "ok"
    client.end(token)
    ended = client.wait_ended(token, 30)
    assert ended.state == "Completed" and ended.images_received == 2, ended


def _attempt(client: Soap, token: str, document_id: int, data: bytes) -> str:
    try:
        client.send_image(token, document_id, data)
    except dc.ClientFault as exc:
        return exc.subcode or exc.code
    return "ok"


def test_s3_unreachable_then_back(
    start_server: StartServer, tmp_path: Path, own_pg: PgCluster, own_s3: S3Server
) -> None:
    server = start_server(config=config_for(tmp_path, own_pg, own_s3, pool_timeout_seconds=SHORT))
    client = Soap(server.url)
    token = client.create(share())
    first, second = os.urandom(80_000), os.urandom(90_000)
    client.send_image(token, 1, first)

    own_s3.stop()
    try:
        assert _attempt(client, token, 2, second) == TEMPORARY
        # The job is intact: the acknowledged image counted, the failed one undone.
        view = client.dsp_job(token)
        assert view.state == "Creating" and view.images_received == 1, view
        text = wait_for(
            lambda: (h := get(server.port, "/healthz"))[0] == 503 and h[1], 20, "/healthz 503"
        )
        assert f"store: s3 {own_s3.endpoint_url}" in text, text
        _, metrics = get(server.port, "/metrics")
        errors = next(
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("dsc_s3_errors_total ")
        )
        assert errors >= 1, metrics
    finally:
        own_s3.start()

    client.send_image(token, 2, second)  # the same document again, now stored
    client.end(token)
    ended = client.wait_ended(token, 30)
    assert ended.state == "Completed" and ended.images_received == 2, ended
    folder = user_folder(server.data)
    assert (folder / "scan_0001.png").read_bytes() == first
    assert file_sha256(folder / "scan_0002.png") == file_sha256(write(tmp_path / "second", second))


def test_s3_full_answers_500_and_the_upload_is_undone(
    start_server: StartServer, tmp_path: Path, own_pg: PgCluster
) -> None:
    """SeaweedFS with room for one volume of 16 MiB: once it is full every part is answered
    500 InternalError (its "disk full").  The SendImage gets ServerErrorTemporaryError, the
    multipart upload is aborted, the job keeps what was acknowledged."""
    with s3_server(volume_max=1) as full:
        server = start_server(config=config_for(tmp_path, own_pg, full, pool_timeout_seconds=SHORT))
        client = Soap(server.url)
        token = client.create(share())
        first = os.urandom(100_000)
        client.send_image(token, 1, first)
        assert _attempt(client, token, 2, os.urandom(40 << 20)) == TEMPORARY
        view = client.dsp_job(token)
        assert view.state == "Creating" and view.images_received == 1, view
        bucket = next(iter(full.buckets))
        assert full.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        _, metrics = get(server.port, "/metrics")
        assert re.search(r"^dsc_s3_errors_total [1-9]", metrics, re.M), metrics
        assert "InternalError" in server.log
        client.dsp_cancel(token)
        server.stop_cleanly()


def test_the_job_doorbell_listens_again_after_a_postgresql_restart(
    start_server: StartServer, tmp_path: Path, own_pg: PgCluster, s3: S3Server
) -> None:
    """Two instances; PostgreSQL restarts, cutting every listener (runtime/catchup.py,
    store/pgdoorbell.py): the instance says so, listens again by itself, and a job created on
    the other instance right after the restart (perhaps before it listened again: then no
    notification ever reaches it) is in its listings and takes its images."""
    config = config_for(tmp_path, own_pg, s3)
    here = start_server(config=config)
    there = start_server(config=config, data=tmp_path / "there")
    own_pg.stop("immediate")
    try:
        wait_for(lambda: "the job doorbell is not heard" in here.log, 20, "the lost listener")
    finally:
        own_pg.start()
    token = wait_for(lambda: _created_or_none(Soap(there.url)), 30, "a job made after restart")
    wait_for(lambda: "listening to the job doorbell again" in here.log, 30, "the listener back")
    client = Soap(here.url)
    wait_for(lambda: token in [j.token for j in client.active()], 10, "the job in the listing")
    client.send_image(token, 1, os.urandom(10_000))
    client.dsp_cancel(token)


def _created_or_none(client: Soap) -> str | None:
    """A new job, or None while the instance still answers ServerErrorTemporaryError (its
    pool reconnecting after the restart)."""
    try:
        return client.create(share())
    except dc.ClientFault as fault:
        if fault.subcode != TEMPORARY:
            raise
        return None
