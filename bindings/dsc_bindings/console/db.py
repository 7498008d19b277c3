"""``dsc db``: the job store's schema and moving an installation (issue 17 point 5).

``dsc db upgrade`` creates or upgrades the schema of the job store the configuration names, on
purpose (the server also does it at start, under an advisory lock).  ``dsc db migrate`` moves
the embedded store of a data folder (SQLite records, local spool) to PostgreSQL and, with
``--to-spool s3``, its documents to S3, then verifies the copy (store/migrate.py).
``dsc db quarantine TOKEN`` moves a job record no server can decode out of the way, on purpose:
a shared store's instances leave such a record where it is (store/undecodable.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dsc_bindings.console.confirm import add_yes_option, can_confirm, confirm
from dsc_bindings.console.output import Column, print_table
from dsc_bindings.console.support import EXIT_OK, EXIT_USAGE, CliError
from dsc_bindings.store.errors import StoreError, one_line

if TYPE_CHECKING:
    from dsc_bindings.observe.devices import DeviceRows
    from dsc_bindings.runtime.installation import Installation
    from dsc_bindings.store.interface import StoredRecord
    from dsc_bindings.store.postgresql import PostgresRecords


def _settings(args: argparse.Namespace) -> Any:
    from dsc_bindings.settings import ConfigError, load_settings

    # The pool logs each failed connection attempt; the command says once what failed.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

    try:
        return load_settings(args.config, data_dir=args.data)
    except ConfigError as exc:
        raise CliError(f"configuration: {exc}", EXIT_USAGE) from exc


def cmd_upgrade(args: argparse.Namespace) -> int:
    from dsc_bindings.store.errors import StoreError

    settings = _settings(args)
    storage = settings.storage
    if args.store is not None:
        storage = dataclasses.replace(storage, store_kind="postgresql", dsn=args.store)
    try:
        if storage.store_kind == "postgresql":
            before, now, where = _upgrade_postgresql(storage.dsn, storage.password_file)
        else:
            before, now, where = _upgrade_sqlite(settings.data_dir)
    except StoreError as exc:
        raise CliError(f"db upgrade: {one_line(exc.message)}") from exc
    if before == now:
        print(f"job store schema {now} at {where}: already current, nothing to do")
    elif before == 0:
        print(f"job store schema {now} created at {where}")
    else:
        print(f"job store schema upgraded {before} -> {now} at {where}")
    return EXIT_OK


def _upgrade_postgresql(dsn: str, password_file: Path | None) -> tuple[int, int, str]:
    import psycopg

    from dsc_bindings.store.errors import as_store_error
    from dsc_bindings.store.postgresql import connection_kwargs, is_temporary_pg, redacted, upgrade

    where = f"PostgreSQL {redacted(dsn)}"
    try:
        with psycopg.connect(dsn, **connection_kwargs(password_file)) as conn:
            before, now = upgrade(conn)
    except psycopg.Error as exc:
        raise as_store_error(f"connecting to {where}", exc, is_temporary_pg(exc)) from exc
    return before, now, where


def _upgrade_sqlite(data_dir: Path) -> tuple[int, int, str]:
    from dsc_bindings.store.sqlite import DB_NAME, SqliteRecords

    path = data_dir / DB_NAME
    before = 0
    if path.is_file():
        with sqlite3.connect(path) as conn:
            before = int(conn.execute("PRAGMA user_version").fetchone()[0])
    data_dir.mkdir(parents=True, exist_ok=True)
    records = SqliteRecords.open(data_dir)  # creates or migrates
    try:
        now = int(records.db().execute("PRAGMA user_version").fetchone()[0])
    finally:
        records.close()
    return before, now, f"SQLite {path.resolve()}"


def _destination(args: argparse.Namespace, settings: Any) -> Any:
    """The destination's StorageSettings: --config's [store]/[spool], the options over them."""
    from dsc_bindings.store.backends import S3SpoolSettings

    storage = settings.storage
    if args.to_store is not None:
        storage = dataclasses.replace(storage, store_kind="postgresql", dsn=args.to_store)
    if args.to_password_file is not None:
        storage = dataclasses.replace(storage, password_file=args.to_password_file)
    if storage.store_kind != "postgresql" or not storage.dsn:
        raise CliError(
            "db migrate: name the PostgreSQL destination with --to-store DSN "
            '(or [store] kind = "postgresql" in --config)',
            EXIT_USAGE,
        )
    flags = {
        "endpoint_url": args.endpoint_url,
        "bucket": args.bucket,
        "region": args.region,
        "access_key_id": args.access_key_id,
        "secret_access_key_file": args.secret_access_key_file,
        "ca_file": args.ca_file,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    spool_kind = args.to_spool or storage.spool_kind
    if spool_kind == "s3":
        s3 = storage.s3
        if s3 is None:
            missing = [
                f"--{k.replace('_', '-')}"
                for k in ("endpoint_url", "bucket", "access_key_id", "secret_access_key_file")
                if k not in given
            ]
            if missing:
                raise CliError(
                    f"db migrate: --to-spool s3 needs {', '.join(missing)} "
                    "(or a [spool] section in --config)",
                    EXIT_USAGE,
                )
            s3 = S3SpoolSettings(**{"region": "us-east-1", **given})
        else:
            s3 = dataclasses.replace(s3, **given)
        storage = dataclasses.replace(storage, spool_kind="s3", s3=s3)
    else:
        storage = dataclasses.replace(storage, spool_kind="local", s3=None)
    return storage


def _copy_identity(data_dir: Path, target: Any) -> tuple[Installation, Installation] | None:
    """Copy the data folder's identity.json into the destination database and read it back:
    (the source, the copy), or None when the data folder has none (the database then makes one
    at the first start).  The start counter never goes back (R11), so the copy's may be larger
    when the database already was this device."""
    from dsc_bindings.runtime.installation import IDENTITY_FILE, UUID_KEYS, load_installation
    from dsc_bindings.runtime.pgidentity import PostgresIdentity
    from dsc_bindings.store.errors import StoreError

    if not (data_dir / IDENTITY_FILE).exists():
        return None
    try:
        source = load_installation(data_dir)
    except ValueError as exc:
        raise CliError(f"db migrate: {exc}") from exc
    copied = PostgresIdentity(target.dsn, target.password_file).adopt(source)
    if any(getattr(copied, k) != getattr(source, k) for k in UUID_KEYS) or (
        copied.starts < source.starts
    ):
        raise StoreError(
            f"verification: the installation identity read back differs ({copied})",
            temporary=False,
        )
    return source, copied


def _copy_devices(data_dir: Path, target: Any) -> tuple[DeviceRows, dict[str, int]]:
    """Copy the data folder's device book and the status page's totals into the destination
    database (observe/pgdevices.py, store/pgtally.py) and read them back: what was copied.
    StoreError when the read-back differs or the destination already holds some."""
    from dsc_bindings.observe.devices import DeviceLimits, sqlite_rows
    from dsc_bindings.observe.pgdevices import PostgresDeviceBook
    from dsc_bindings.store.errors import StoreError
    from dsc_bindings.store.pgtally import PostgresTally
    from dsc_bindings.store.tally import sqlite_counters

    book, counters = sqlite_rows(data_dir), sqlite_counters(data_dir)
    devices = PostgresDeviceBook.open(
        target.dsn, DeviceLimits(), password_file=target.password_file
    )
    try:
        copied = devices.copy_in(book)
    finally:
        devices.close()

    def by_key(rows: DeviceRows) -> list[Any]:
        return sorted(rows.devices, key=lambda r: (r[0].address, r[0].identity))

    if by_key(copied) != by_key(book):
        raise StoreError(
            f"verification: the device book read back differs ({len(copied.devices)} device(s), "
            f"{len(book.devices)} copied)",
            temporary=False,
        )
    if sorted(copied.jobs) != sorted(book.jobs):
        raise StoreError(
            "verification: the devices of the jobs in progress read back differ", temporary=False
        )
    tally = PostgresTally.open(target.dsn, password_file=target.password_file)
    try:
        stored = tally.copy_in(counters)
    finally:
        tally.close()
    if {k: v for k, v in stored.items() if v} != {k: v for k, v in counters.items() if v}:
        raise StoreError("verification: the totals read back differ", temporary=False)
    return book, counters


def cmd_migrate(args: argparse.Namespace) -> int:
    from dsc_bindings.store.backends import describe, open_records, open_spool
    from dsc_bindings.store.errors import StoreError
    from dsc_bindings.store.migrate import migrate
    from dsc_bindings.store.split import open_parts
    from dsc_bindings.store.sqlite import DB_NAME, JobStore

    settings = _settings(args)
    data_dir: Path = settings.data_dir
    target = _destination(args, settings)
    if not (data_dir / DB_NAME).is_file():
        raise CliError(
            f"db migrate: {data_dir / DB_NAME} does not exist: nothing to migrate "
            "(name the installation's data folder with --data)",
            EXIT_USAGE,
        )
    print(f"from: SQLite + spool in {data_dir.resolve()}")
    print(f"to:   {describe(target, data_dir.resolve())}")
    # Documents are copied only to a spool elsewhere (S3): a local destination spool is the
    # data folder's own, where they are already.
    copies_documents = target.spool_kind == "s3"
    identity: tuple[Installation, Installation] | None = None
    try:
        with contextlib.ExitStack() as opened:
            # The source as a server opens it, the data folder's lock taken (store/migrate.py).
            source = opened.enter_context(JobStore.open(data_dir))
            # The identity first: a database that is already another device takes nothing.
            identity = _copy_identity(data_dir, target)
            # The destination as the server will open it once configured; the lock is held
            # above.  Whatever fails, what was opened is closed as the stack unwinds.
            destination = open_parts(
                opened,
                data_dir,
                lambda: open_records(target, data_dir),
                lambda: open_spool(target, data_dir),
                lock=False,
            )
            report = migrate(
                source,
                destination.records,
                destination.spool if copies_documents else None,
                print if args.verbose else lambda _: None,
            )
            book, counters = _copy_devices(data_dir, target)
    except StoreError as exc:
        raise _store_failed("db migrate", exc) from exc
    rows: list[tuple[str, int | str, int | str, str]] = [
        ("jobs", report.jobs, report.verified_jobs, "records equal"),
        ("  active", report.active, report.active, ""),
        ("  history", report.jobs - report.active, report.jobs - report.active, ""),
        (
            "documents",
            report.documents,
            report.verified_documents,
            "SHA-256 equal" if copies_documents else "stay in the data folder's spool",
        ),
    ]
    if identity is None:
        rows.append(("identity", "-", "-", "none in the data folder: created at the first start"))
    else:
        source_id, stored_id = identity
        rows.append(
            (
                "identity",
                1,
                1,
                f"device {stored_id.device_uuid}, UUIDs equal, "
                f"starts {stored_id.starts} (was {source_id.starts})",
            )
        )
    devices, tracked = len(book.devices), len(book.jobs)
    rows += [
        ("devices", devices, devices, "rows equal"),
        ("  ongoing", tracked, tracked, "jobs in progress, the device of each equal"),
        ("totals", len(counters), len(counters), "counters equal"),
    ]
    # Whole (wide): the device UUID is what an administrator compares.
    print_table(
        _REPORT_COLUMNS,
        [[what, str(copied), str(verified), check] for what, copied, verified, check in rows],
        wide=True,
    )
    print(f"image bytes: {report.image_bytes:,}")
    print(
        "The data folder is unchanged. Next: put the destination's [store] and [spool] in the "
        "configuration file and restart dsc serve."
    )
    return EXIT_OK


def cmd_quarantine(args: argparse.Namespace) -> int:
    from dsc_bindings.store.backends import describe, open_records, open_spool
    from dsc_bindings.store.errors import StoreError
    from dsc_bindings.store.split import open_parts
    from dsc_bindings.store.undecodable import (
        decode_stored,
        discard_set_aside,
        newer_codec,
        quarantine,
        set_aside,
    )

    settings = _settings(args)
    # The servers' own [store] and [spool]: the documents are where they keep them.
    storage = settings.storage
    data_dir: Path = settings.data_dir
    token: str = args.token
    can_confirm(args.yes, "db quarantine")
    try:
        with contextlib.ExitStack() as opened:
            # Not SplitStore.assemble: its spool cleanup must not run on a spool other servers
            # use.  Only the embedded store's data folder is locked: its server is stopped.
            parts = open_parts(
                opened,
                data_dir,
                lambda: open_records(storage, data_dir),
                lambda: open_spool(storage, data_dir),
                lock=storage.store_kind != "postgresql",
            )
            records, spool = parts.records, parts.spool
            # A shared store's row is read with its version: the delete is conditional on it.
            # (store/backends.open_records: PostgreSQL's records are PostgresRecords; psycopg
            # is not imported for an embedded store.)
            postgresql = storage.store_kind == "postgresql"
            shared = cast("PostgresRecords", records) if postgresql else None

            def read() -> tuple[StoredRecord, int | None] | None:
                if shared is not None:
                    return shared.versioned_row(token)
                row = records.row(token)
                return None if row is None else (row, None)

            where = describe(storage, data_dir.resolve())
            found = read()
            if found is None:
                raise CliError(f"db quarantine: no job {token} in {where}")
            row, version = found
            seq, _, text, documents = row
            try:
                decode_stored(token, text, documents)
            except ValueError as exc:
                why = str(exc)
            else:
                raise CliError(
                    f"db quarantine: the record of job {token} decodes: it is not corrupt, and "
                    "this command moves aside only a record no server can read (to end a job, "
                    f"`dsc cancel {token}`; to remove an ended one, `dsc purge`)"
                )
            newer = newer_codec(text)
            if newer is not None:
                raise CliError(
                    f"db quarantine: the record of job {token} was written by a newer server "
                    f"(job codec version {newer}): it is not corrupt, this dsc is too old to read "
                    "it. Upgrade this dsc and the instances that cannot serve the job; nothing was "
                    "changed"
                )
            print(f"job {token} in {where}: the record does not decode ({why})")
            confirm(
                f"Move job {token}'s record and documents to {data_dir.resolve()}/quarantine and "
                "delete the job for every instance?",
                args.yes,
            )
            # The answer may have taken minutes: a record written meanwhile is some server's.
            if read() != found:
                raise CliError(
                    f"db quarantine: the record of job {token} changed meanwhile (a server wrote "
                    "it: it may not be corrupt after all); nothing was changed, look again"
                )
            if shared is None or version is None:  # the data folder's lock keeps servers out
                moved = quarantine(data_dir, records, spool, row, why)
            else:
                # Another instance may write the row until the delete: compare-and-set.
                unchanged = shared.remove_unchanged(
                    seq, version, lambda: set_aside(data_dir, spool, row, why)
                )
                if unchanged is None:
                    raise CliError(
                        f"db quarantine: the record of job {token} changed since it was read "
                        "(another instance wrote it); nothing was changed, run the command again"
                    )
                moved = unchanged
                discard_set_aside(spool, token)
    except StoreError as exc:
        raise _store_failed("db quarantine", exc, " (it quarantines at start)") from exc
    print(f"job {token}: moved to {moved}; every instance forgets the job")
    return EXIT_OK


#: ``dsc db migrate``'s report: what was copied and read back.
_REPORT_COLUMNS = (
    Column("WHAT"),
    Column("COPIED", numeric=True),
    Column("VERIFIED", numeric=True),
    Column("CHECK"),
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "db",
        help="the job store: create/upgrade its schema, migrate to PostgreSQL and S3, "
        "quarantine a corrupt record",
        description="Manage the job store. The server creates and upgrades its schema at "
        "start by itself; these commands do it on purpose.",
    )
    commands = p.add_subparsers(dest="db_command", metavar="ACTION")
    commands.required = True

    up = commands.add_parser(
        "upgrade",
        help="create or upgrade the job store's schema",
        description="Create or upgrade the schema of the job store that --config names "
        "([store]; SQLite in --data by default). Safe to run again: a current schema is "
        "left alone. A schema newer than this dsc is refused.",
    )
    up.add_argument("--config", type=Path, help="TOML configuration file ([store])")
    up.add_argument("--data", type=Path, help="data folder of the SQLite store (default ./var)")
    up.add_argument("--store", metavar="DSN", help="a PostgreSQL DSN instead of [store]")
    up.set_defaults(func=cmd_upgrade)

    mig = commands.add_parser(
        "migrate",
        help="move a SQLite installation to PostgreSQL (and its images to S3), verified",
        description="Copy the jobs (active and history) of the data folder's SQLite store and "
        "its installation identity (identity.json: device UUIDs, start counter) into an empty "
        "PostgreSQL database, with the device book and the status page's totals, and, with "
        "--to-spool s3, its spooled images into an S3 bucket; then read everything back and "
        "compare (records, identity, devices and totals equal, SHA-256 of each "
        "image). Stop dsc serve first. The data folder is left unchanged. The destination "
        "comes from --config's [store]/[spool] (the file the server will use), the options "
        "override it.",
        epilog="Example: dsc db migrate --data /var/lib/dsc --to-store "
        "postgresql://dsc@db1/dsc --to-spool s3 --config /etc/dsc/dsc.toml",
    )
    mig.add_argument("--config", type=Path, help="TOML file with the destination's sections")
    mig.add_argument("--data", type=Path, help="the installation's data folder (default ./var)")
    mig.add_argument("--to-store", metavar="DSN", help="PostgreSQL DSN of the destination")
    mig.add_argument("--to-password-file", type=Path, help="file with the database password")
    mig.add_argument(
        "--to-spool",
        choices=("local", "s3"),
        help="s3: images to the bucket; local: they stay in the data folder",
    )
    for flag, text in (
        ("--endpoint-url", "S3 endpoint, e.g. https://s3.example.com:9000"),
        ("--bucket", "S3 bucket"),
        ("--region", "S3 region (default us-east-1)"),
        ("--access-key-id", "S3 access key id"),
    ):
        mig.add_argument(flag, help=text)
    mig.add_argument("--secret-access-key-file", type=Path, help="file with the S3 secret key")
    mig.add_argument("--ca-file", type=Path, help="CA file for the S3 endpoint's TLS")
    mig.add_argument("-v", "--verbose", action="store_true", help="one line per job copied")
    mig.set_defaults(func=cmd_migrate)

    qua = commands.add_parser(
        "quarantine",
        help="move aside a job record no server can decode (a shared store keeps it)",
        description="Move the stored record of job TOKEN, which does not decode, out of the "
        "job store: the record (with the decoding error and its document rows) to "
        "DATA/quarantine/job-SEQ.json, its documents (from the spool or S3) next to it, then "
        "the row is deleted and every instance forgets the job. The embedded store (SQLite) "
        "does this by itself at start; a shared store (PostgreSQL) never does, since the "
        "record may be a newer server's that other instances serve: its instances leave it "
        "where it is and log a WARNING naming the job. Run this only for a record that is "
        "truly corrupt. A record that decodes, or that a newer server wrote (a later job "
        "codec version), is refused and nothing is changed.",
        epilog="Example: dsc db quarantine --config /etc/dsc/dsc.toml --data /var/lib/dsc "
        "3f6c1a0e-...",
    )
    qua.add_argument("token", metavar="TOKEN", help="the job's token, as the WARNING names it")
    qua.add_argument(
        "--config", type=Path, help="the servers' TOML configuration file ([store], [spool])"
    )
    qua.add_argument(
        "--data", type=Path, help="data folder; the quarantine folder goes in it (default ./var)"
    )
    add_yes_option(qua)
    qua.set_defaults(func=cmd_quarantine)


def _store_failed(command: str, exc: StoreError, why_stop: str = "") -> CliError:
    """The one line a ``dsc db`` command fails with when the store refused; a data folder that
    a running server holds says what to do."""
    hint = ""
    if "in use by another job store" in exc.message:
        hint = f": stop dsc serve on this data folder first{why_stop}"
    return CliError(f"{command}: {one_line(exc.message)}{hint}")
