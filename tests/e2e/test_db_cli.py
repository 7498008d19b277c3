"""``dsc db upgrade`` and ``dsc db migrate`` (issue 17 point 5) against a real PostgreSQL and a
real SeaweedFS: an installation that ran on SQLite and the local spool (a finished job in the
history, an active job with spooled images, a device) is moved, verified, and served by a real
``dsc serve`` on the engines."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dsc_bindings.runtime.installation import IDENTITY_FILE, UUID_KEYS
from dsc_bindings.store import backends
from dsc_bindings.store.interface import JobRecords
from dsc_bindings.store.postgresql import SCHEMA_VERSION, PostgresRecords
from dsc_bindings.store.split import lock_data_dir
from dsc_bindings.store.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA
from dsc_bindings.store.sqlite import JobStore
from dsc_core.model import FileShareInstructions
from e2e_support import Soap, dsc_here
from engines_support import (
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    Backend,
    PgCluster,
    S3Server,
    secret_file,
    shared_engine_config,
)
from test_e2e_serve import LOCAL_SHARE, StartServer, start_server, user_folder, write
from waiting import wait_for

__all__ = ["start_server"]  # the fixture, used by name below


@pytest.fixture
def backend() -> Backend:
    return Backend()  # the installation starts embedded; the test writes the engines' config


def test_upgrade_creates_then_leaves_the_schema(pg: PgCluster, tmp_path: Path) -> None:
    dsn = pg.new_database()
    first = dsc_here("db", "upgrade", "--store", dsn)
    assert first.code == 0, first
    assert re.fullmatch(
        rf"job store schema {SCHEMA_VERSION} created at PostgreSQL .*dbname=t\d+.*\n", first.out
    )
    again = dsc_here("db", "upgrade", "--store", dsn)
    assert again.code == 0 and "already current, nothing to do" in again.out, again
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT version FROM dsc_schema").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM installation").fetchone() == (0,)
    embedded = dsc_here("db", "upgrade", "--data", str(tmp_path / "data"))
    assert (
        embedded.code == 0 and f"job store schema {SQLITE_SCHEMA} created at SQLite" in embedded.out
    )

    unreachable = dsc_here("db", "upgrade", "--store", "postgresql://dsc@127.0.0.1:1/none")
    assert unreachable.code == 1 and unreachable.out == "", unreachable
    assert unreachable.err.startswith("dsc: db upgrade: connecting to PostgreSQL"), unreachable
    assert unreachable.err.count("\n") == 1 and "Traceback" not in unreachable.err


def test_migrate_a_sqlite_installation_to_postgresql_and_s3(
    start_server: StartServer, tmp_path: Path, pg: PgCluster, s3: S3Server
) -> None:
    # An embedded installation: one job in the history, one active with two spooled images
    # (the second larger than a part: a true multipart upload), one device.
    server = start_server()
    page = write(tmp_path / "in" / "done.png", os.urandom(30_000))
    assert dsc_here("scan", "--server", server.url, "--quiet", str(page)).code == 0
    client = Soap(server.url)
    active = client.create([FileShareInstructions((LOCAL_SHARE,))], root_name="moved")
    images = [os.urandom(200_000), os.urandom(6 << 20)]
    for number, image in enumerate(images, start=1):
        client.send_image(active, number, image)
    devices_before = dsc_here("devices", "--server", server.url, "--json").json()
    assert len(devices_before) == 1

    dsn, bucket = pg.new_database(), s3.new_bucket()
    secret = secret_file(tmp_path, S3_SECRET_KEY)
    s3_options = [
        "--endpoint-url",
        s3.endpoint_url,
        "--bucket",
        bucket,
        "--access-key-id",
        S3_ACCESS_KEY,
        "--secret-access-key-file",
        str(secret),
    ]
    migrate = ["db", "migrate", "--data", str(server.data), "--to-store", dsn]
    running = dsc_here(*migrate, "--to-spool", "s3", *s3_options)
    assert running.code == 1, running
    assert "stop dsc serve on this data folder first" in running.err, running
    server.stop_cleanly()
    with sqlite3.connect(server.data / "jobs.sqlite3") as conn:
        source_totals = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    assert source_totals["jobs_created"] == 2 and source_totals["images_received"] == 3

    moved = dsc_here(*migrate, "--to-spool", "s3", *s3_options)
    assert moved.code == 0, moved
    table = {
        line.split()[0]: line.split()[1:3]
        for line in moved.out.splitlines()
        if re.match(r"^\s*(jobs|active|history|documents|devices|ongoing|totals)\s", line)
    }
    assert table == {
        "jobs": ["2", "2"],
        "active": ["1", "1"],
        "history": ["1", "1"],
        "documents": ["2", "2"],
        # The device book and the page's totals moved too (issue 17): the device, the active
        # job it created (so its end counts for it), every counter the server kept.
        "devices": ["1", "1"],
        "ongoing": ["1", "1"],
        "totals": [str(len(source_totals))] * 2,
    }, moved.out
    assert "SHA-256 equal" in moved.out and f"image bytes: {sum(map(len, images)):,}" in moved.out
    # The installation identity moved too: the same device, its counter carried over.
    source_identity = json.loads((server.data / IDENTITY_FILE).read_text(encoding="utf-8"))
    assert source_identity["starts"] >= 1
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (2,)
        assert dict(conn.execute("SELECT name, value FROM counters").fetchall()) == source_totals
        assert conn.execute("SELECT address, jobs, completed FROM devices").fetchall() == [
            (devices_before[0]["address"], 2, 1)
        ]
        row = conn.execute(
            "SELECT device_uuid, dsp_service_uuid, dsc_service_uuid, starts FROM installation"
        ).fetchall()
    assert row == [tuple(source_identity[k] for k in (*UUID_KEYS, "starts"))]
    assert re.search(
        rf"^identity +1 +1  device {source_identity['device_uuid']}, UUIDs equal, "
        rf"starts {source_identity['starts']} ",
        moved.out,
        re.MULTILINE,
    ), moved.out
    keys = s3.client().list_objects_v2(Bucket=bucket, Prefix="spool/")["Contents"]
    assert sorted(k["Key"] for k in keys) == [f"spool/{active}/1", f"spool/{active}/2"]

    again = dsc_here(*migrate, "--to-spool", "s3", *s3_options)
    assert again.code == 1 and "already holds 2 job(s)" in again.err, again

    # The server on the engines serves the moved installation: the active job goes on.
    config = tmp_path / "engines.toml"
    config.write_text(shared_engine_config(dsn, s3, bucket, tmp_path))
    (server.data / IDENTITY_FILE).unlink()  # the server on PostgreSQL reads the database's
    engines = start_server(config=config, data=server.data)
    assert " + S3 " in engines.log
    assert not (server.data / IDENTITY_FILE).exists()
    with psycopg.connect(dsn) as conn:
        started = conn.execute("SELECT device_uuid, starts FROM installation").fetchone()
    assert started == (source_identity["device_uuid"], source_identity["starts"] + 1)
    history = dsc_here("history", "--server", engines.url, "--json").json()
    assert [e["state"] for e in history] == ["Completed"]
    client = Soap(engines.url)
    view = client.dsp_job(active)
    assert view.state == "Creating" and view.images_received == 2, view
    client.end(active)
    ended = client.wait_ended(active, 30)
    assert ended.state == "Completed", ended
    folder = user_folder(engines.data)
    for number, image in enumerate(images, start=1):
        assert (folder / f"moved_{number:04d}.png").read_bytes() == image
    # The job created before the move counts for its device when it ends after it.
    [device] = dsc_here("devices", "--server", engines.url, "--json").json()
    assert (device["address"], device["jobs"]) == (devices_before[0]["address"], 2)
    wait_for(
        lambda: dsc_here("devices", "--server", engines.url, "--json").json()[0]["completed"] == 2,
        what="the moved job's end counted for its device",
    )
    engines.stop_cleanly()


def test_migrate_says_what_is_missing(tmp_path: Path) -> None:
    nothing = dsc_here("db", "migrate", "--data", str(tmp_path / "empty"), "--to-store", "x")
    assert nothing.code == 2 and "does not exist: nothing to migrate" in nothing.err, nothing
    no_dest = dsc_here("db", "migrate", "--data", str(tmp_path))
    assert no_dest.code == 2 and "--to-store DSN" in no_dest.err, no_dest
    no_s3 = dsc_here("db", "migrate", "--to-store", "postgresql://x/y", "--to-spool", "s3")
    assert no_s3.code == 2, no_s3
    assert "--to-spool s3 needs --endpoint-url, --bucket, --access-key-id" in no_s3.err, no_s3


def test_migrate_whose_destination_spool_does_not_open_closes_the_records_and_the_lock(
    tmp_path: Path, pg: PgCluster, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination's records open (the schema is made), then its spool does not (a bucket
    that is not there): the records' connections are closed, and the data folder's lock is
    free for a server (store/split.open_parts closes what it opened)."""
    data = tmp_path / "data"
    JobStore.open(data).close()  # an embedded installation, no job yet
    dsn = pg.new_database()
    # Held here, so that only a close, not the garbage collector, can end its connections.
    opened: list[PostgresRecords] = []
    really_open = backends.open_records

    def open_records(*args: Any) -> JobRecords:
        records = really_open(*args)
        assert isinstance(records, PostgresRecords)
        opened.append(records)
        return records

    monkeypatch.setattr("dsc_bindings.store.backends.open_records", open_records)
    failed = dsc_here(
        "db", "migrate", "--data", str(data), "--to-store", dsn, "--to-spool", "s3",
        "--endpoint-url", s3.endpoint_url, "--bucket", "dsc-no-such-bucket",
        "--access-key-id", S3_ACCESS_KEY,
        "--secret-access-key-file", str(secret_file(tmp_path, S3_SECRET_KEY)),
    )  # fmt: skip
    assert failed.code == 1 and failed.out.count("\n") == 2, failed  # from:, to:
    assert failed.err.startswith("dsc: db migrate: ") and "dsc-no-such-bucket" in failed.err
    (records,) = opened
    assert records.database.closed
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT version FROM dsc_schema").fetchall() == [(SCHEMA_VERSION,)]
        others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        assert conn.execute(others + "AND pid <> pg_backend_pid()").fetchone() == (0,)
    lock = lock_data_dir(data)  # StoreError "in use" while the source is still open
    assert lock is not None
    os.close(lock)
