"""Which engines keep the server's state: ``[store]`` and ``[spool]`` (issue 17), and the one
function that opens the job store they name.

Either may be used without the other (PostgreSQL with the local spool is a valid single-machine
setup); the defaults are the embedded SQLite records and the local spool in the data folder.
The PostgreSQL and S3 clients are imported only when chosen (extras ``postgresql`` and ``s3``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.interface import JobRecords, Spool
from dsc_bindings.store.localspool import LocalSpool
from dsc_bindings.store.split import SplitStore
from dsc_bindings.store.sqlite import SqliteRecords

__all__ = [
    "POOL_TIMEOUT_SECONDS",
    "S3SpoolSettings",
    "StorageSettings",
    "describe",
    "open_job_store",
    "open_records",
    "open_spool",
]


#: ``[store] pool_timeout_seconds`` unless set.
POOL_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class S3SpoolSettings:
    endpoint_url: str
    bucket: str
    region: str
    access_key_id: str
    secret_access_key_file: Path
    ca_file: Path | None = None
    part_size: int = 8 << 20
    max_part_buffers: int = 16


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """``[store]`` and ``[spool]``."""

    store_kind: Literal["sqlite", "postgresql"] = "sqlite"
    dsn: str = ""
    password_file: Path | None = None
    #: ``[store] pool_timeout_seconds``: how long a request waits for a pooled PostgreSQL
    #: connection before it is answered ServerErrorTemporaryError (and the /healthz check with
    #: it; a check gets health.CHECK_SECONDS at most).
    pool_timeout_seconds: float = POOL_TIMEOUT_SECONDS
    spool_kind: Literal["local", "s3"] = "local"
    s3: S3SpoolSettings | None = None


def describe(storage: StorageSettings, data_dir: Path) -> str:
    """One line for the start log (no password)."""
    if storage.store_kind == "postgresql":
        from dsc_bindings.store.postgresql import redacted

        records = f"PostgreSQL {redacted(storage.dsn)}"
    else:
        records = f"SQLite in {data_dir}"
    if storage.s3 is not None and storage.spool_kind == "s3":
        spool = f"S3 {storage.s3.endpoint_url} bucket {storage.s3.bucket}"
    else:
        spool = f"spool in {data_dir}"
    return f"{records} + {spool}"


def open_records(storage: StorageSettings, data_dir: Path) -> JobRecords:
    """The job records ``storage`` names (PostgreSQL: schema created or upgraded)."""
    if storage.store_kind == "postgresql":
        from dsc_bindings.store.postgresql import PostgresRecords

        return PostgresRecords.open(
            storage.dsn,
            password_file=storage.password_file,
            pool_timeout=storage.pool_timeout_seconds,
        )
    return SqliteRecords.open(data_dir)


def open_spool(storage: StorageSettings, data_dir: Path) -> Spool:
    """The spool ``storage`` names (S3: the bucket must answer)."""
    if storage.spool_kind != "s3":
        return LocalSpool.open(data_dir)
    assert storage.s3 is not None
    from dsc_bindings.store.s3spool import S3Settings, S3Spool

    s3 = storage.s3
    try:
        secret = s3.secret_access_key_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise StoreError(
            f"[spool] secret_access_key_file {s3.secret_access_key_file}: {exc.strerror}",
            temporary=False,
        ) from exc
    return S3Spool.open(
        S3Settings(
            endpoint_url=s3.endpoint_url,
            bucket=s3.bucket,
            access_key_id=s3.access_key_id,
            secret_access_key=secret,
            region=s3.region,
            ca_file=s3.ca_file,
            part_size=s3.part_size,
            max_part_buffers=s3.max_part_buffers,
        ),
        data_dir,
    )


def open_job_store(data_dir: Path, storage: StorageSettings) -> SplitStore:
    """Open the job store ``storage`` names (schema created or upgraded, debris removed)."""
    return SplitStore.assemble(
        data_dir, lambda: open_records(storage, data_dir), lambda: open_spool(storage, data_dir)
    )
