"""The installation identity in the data directory (R13 on R1/R11): generated at the first
start, kept across restarts, settable in the configuration; two data directories are two
devices; each start counts (the AppSequence InstanceId).  With the PostgreSQL store it is kept
in the database (issue 17): one device for every instance on it, the counter grows across them."""

from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from dsc_bindings.runtime.installation import (
    IDENTITY_FILE,
    Installation,
    installation_of,
    load_installation,
    record_start,
    record_start_of,
)
from dsc_bindings.runtime.pgidentity import PostgresIdentity
from dsc_bindings.settings import load_settings
from dsc_bindings.store.backends import StorageSettings
from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.postgresql import _MIGRATIONS, SCHEMA_VERSION
from engines_support import PgCluster, store_section


def test_generated_once_and_kept(tmp_path: Path) -> None:
    first = load_installation(tmp_path)
    again = load_installation(tmp_path)
    assert first == again
    assert len({first.device_uuid, first.dsp_service_uuid, first.dsc_service_uuid}) == 3
    for value in (first.device_uuid, first.dsp_service_uuid, first.dsc_service_uuid):
        uuid.UUID(value)
    assert first.starts == 0
    assert record_start(tmp_path).starts == 1
    assert record_start(tmp_path).starts == 2
    assert load_installation(tmp_path).device_uuid == first.device_uuid


def test_two_processes_creating_the_identity_at_once_both_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers started on one folder (`uvicorn --workers 2`) may both find no identity
    and write one; neither may fail on the other's temporary file (the refusal of a second
    worker on SQLite is tested in test_asgi.py and e2e/test_cluster.py).  Here the other
    process's whole write happens between this one's fsync and its rename."""
    from dsc_bindings.runtime import installation

    real_replace, other_wrote = os.replace, []

    def replace(source: str | Path, target: str | Path) -> None:
        if not other_wrote:
            other_wrote.append(True)
            monkeypatch.setattr(installation.os, "getpid", lambda: 999_999)
            try:
                load_installation(tmp_path)  # the other process: no file yet, it writes one
            finally:
                monkeypatch.undo()
                monkeypatch.setattr(installation.os, "replace", replace)
        real_replace(source, target)

    monkeypatch.setattr(installation.os, "replace", replace)
    mine = load_installation(tmp_path)  # before: FileNotFoundError (its .part renamed away)
    assert other_wrote and load_installation(tmp_path) == mine
    assert [p.name for p in tmp_path.iterdir()] == [IDENTITY_FILE]


def test_two_data_directories_are_two_devices(tmp_path: Path) -> None:
    one = load_settings(data_dir=tmp_path / "one").with_installation_identity().server
    two = load_settings(data_dir=tmp_path / "two").with_installation_identity().server
    assert one.device_uuid != two.device_uuid
    assert one.dsp_service_uuid != two.dsp_service_uuid
    same = load_settings(data_dir=tmp_path / "one").with_installation_identity().server
    assert same.device_uuid == one.device_uuid and same.dsc_url == one.dsc_url


def test_the_configuration_wins(tmp_path: Path) -> None:
    chosen = str(uuid.uuid4())
    config = tmp_path / "dsc.toml"
    config.write_text(f'[server]\ndevice_uuid = "{chosen}"\n', encoding="utf-8")
    server = load_settings(config, data_dir=tmp_path / "d").with_installation_identity().server
    stored = load_installation(tmp_path / "d")
    assert server.device_uuid == chosen
    assert server.dsp_service_uuid == stored.dsp_service_uuid  # the others still generated


def test_a_broken_file_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE).write_text(json.dumps({"device_uuid": "nope"}), encoding="utf-8")
    with pytest.raises(ValueError, match="identity file"):
        load_installation(tmp_path)


# --- the identity in PostgreSQL (issue 17 point 1), against a real server -----------------------


def _pg_storage(pg: PgCluster) -> StorageSettings:
    return StorageSettings(store_kind="postgresql", dsn=pg.new_database())


def test_postgresql_keeps_the_uuids_and_counts_every_start(pg: PgCluster, tmp_path: Path) -> None:
    storage = _pg_storage(pg)
    first = installation_of(tmp_path / "a", storage)
    assert first.starts == 0
    assert not (tmp_path / "a" / IDENTITY_FILE).exists()  # kept in the database, not the folder
    # Two instances with data folders of their own are one device; each start counts.
    assert record_start_of(tmp_path / "a", storage).starts == 1
    restarted = record_start_of(tmp_path / "b", storage)
    assert restarted.starts == 2
    assert (restarted.device_uuid, restarted.dsp_service_uuid, restarted.dsc_service_uuid) == (
        first.device_uuid,
        first.dsp_service_uuid,
        first.dsc_service_uuid,
    )
    config = tmp_path / "dsc.toml"
    config.write_text(store_section(storage.dsn), encoding="utf-8")
    server = load_settings(config, data_dir=tmp_path / "c").with_installation_identity().server
    assert server.device_uuid == first.device_uuid


def test_postgresql_starts_at_once_get_distinct_counts(pg: PgCluster, tmp_path: Path) -> None:
    storage = _pg_storage(pg)
    with ThreadPoolExecutor(8) as pool:
        counts = list(
            pool.map(lambda n: record_start_of(tmp_path / str(n), storage).starts, range(16))
        )
    assert sorted(counts) == list(range(1, 17))


def test_postgresql_adopts_the_data_folders_identity(pg: PgCluster, tmp_path: Path) -> None:
    # A server switched to PostgreSQL stays the device its clients know; its counter grows on.
    record_start(tmp_path)
    record_start(tmp_path)
    local = load_installation(tmp_path)
    storage = _pg_storage(pg)
    assert installation_of(tmp_path, storage) == local
    assert record_start_of(tmp_path, storage).starts == local.starts + 1


def test_postgresql_adopt_refuses_another_device(pg: PgCluster, tmp_path: Path) -> None:
    storage = _pg_storage(pg)
    identity = PostgresIdentity(storage.dsn)
    assert identity.stored() is None
    one = load_installation(tmp_path / "one")
    assert identity.adopt(one) == one
    record_start_of(tmp_path / "one", storage)
    assert identity.adopt(one).starts == 1  # the same device again: the counter never goes back
    with pytest.raises(StoreError, match="already the installation of device"):
        identity.adopt(load_installation(tmp_path / "two"))
    assert identity.stored() == Installation(
        one.device_uuid, one.dsp_service_uuid, one.dsc_service_uuid, starts=1
    )


def test_postgresql_schema_1_is_upgraded_keeping_its_jobs(pg: PgCluster, tmp_path: Path) -> None:
    storage = _pg_storage(pg)
    with psycopg.connect(storage.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE dsc_schema (version integer NOT NULL)")
        conn.execute("INSERT INTO dsc_schema VALUES (1)")
        for statement in _MIGRATIONS[0]:
            conn.execute(statement)  # type: ignore[arg-type]  # constant SQL
        conn.execute(
            "INSERT INTO jobs (token, state, active, created, job) VALUES ('t', 's', true, 'c', 'j')"
        )
        # Schema 9 copies an active record's origin (the quota's key) into its column.
        conn.execute(
            "INSERT INTO jobs (token, state, active, created, job) "
            """VALUES ('u', 'Creating', true, 'c', '{"origin": "10.0.0.7"}')"""
        )
    assert record_start_of(tmp_path, storage).starts == 1
    with psycopg.connect(storage.dsn) as conn:
        assert conn.execute("SELECT version FROM dsc_schema").fetchall() == [(SCHEMA_VERSION,)]
        assert conn.execute("SELECT token, origin FROM jobs ORDER BY token").fetchall() == [
            ("t", None),
            ("u", "10.0.0.7"),
        ]


def test_postgresql_unreachable_is_a_store_error(tmp_path: Path) -> None:
    storage = StorageSettings(store_kind="postgresql", dsn="postgresql://dsc@127.0.0.1:1/none")
    with pytest.raises(StoreError, match="reading the installation identity at PostgreSQL") as err:
        installation_of(tmp_path, storage)
    assert err.value.temporary
