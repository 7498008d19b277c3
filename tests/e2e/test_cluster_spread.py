"""Pending work spread over the instances (issue 18): two real ``dsc serve`` on one PostgreSQL +
S3 store, instance a with one engine place ([jobs] processing_slots = 1), b with two, idle.
Every job is ended on a, and its mail filter waits on a real SMTP relay (aiosmtpd, DATA left
unanswered) until the test lets it go, so where each job runs is fixed while it is held.

a leases only the job its engine runs and passes the others on; b, woken by the job feed's
doorbell (``<token>:claimable``), takes as many as it has places; the rest wait with no lease,
for whichever instance frees a place first.  The heartbeat is 300 s (the lease 900 s), far longer
than any wait here: what moves the jobs is the doorbell and the freed places, not a sweep."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from aiosmtpd.controller import Controller

from dsc_core.model import EmailInstructions
from e2e_support import HeldRelay, ServerProcess, Soap, free_port, on_threads, started_servers
from engines_support import shared_engine_config
from waiting import wait_for

if TYPE_CHECKING:
    from engines_support import PgCluster, S3Server

PNG = b"\x89PNG\r\n\x1a\n" + bytes(20_000)
MAIL = [EmailInstructions(False, ("bob@corp.example",))]
#: Jobs ended on a: one runs there, two on b, the rest wait for a free place.
JOBS = 7


@dataclass
class Pair:
    a: ServerProcess
    b: ServerProcess
    relay: HeldRelay
    dsn: str

    def instance_ids(self) -> dict[str, str]:
        """instances.id of each server's current run -> "a" or "b"."""
        names = {self.a.pid: "a", self.b.pid: "b"}
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute("SELECT id::text, pid FROM instances WHERE stopped IS NULL")
            return {id_: names[pid] for id_, pid in rows if pid in names}

    def leases(self) -> tuple[dict[str, int], int]:
        """Live leases of active jobs per instance ("a", "b"), and the active jobs nobody
        holds."""
        ids = self.instance_ids()
        held: dict[str, int] = {"a": 0, "b": 0}
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT lease_owner, lease_until > now() FROM jobs WHERE active"
            ).fetchall()
        free = 0
        for owner, live in rows:
            if live:
                held[ids.get(owner, owner)] = held.get(ids.get(owner, owner), 0) + 1
            else:
                free += 1
        return held, free

    def ran_by(self, tokens: list[str]) -> dict[str, str]:
        """token -> the instance whose lease ran it last ("a" or "b")."""
        ids = self.instance_ids()
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT token, lease_owner FROM jobs WHERE token = ANY(%s)", (tokens,)
            ).fetchall()
        return {token: ids.get(owner, owner) for token, owner in rows}


@pytest.fixture
def pair(tmp_path: Path, pg: PgCluster, s3: S3Server) -> Iterator[Pair]:
    relay = HeldRelay()
    smtp = Controller(relay, hostname="127.0.0.1", port=free_port())
    smtp.start()
    dsn = pg.new_database()
    common = (
        "[cluster]\nheartbeat_seconds = 300\nlease_seconds = 900\n\n"
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nfrom = "scans@corp.example"\n'
        "timeout = 60\n\n" + shared_engine_config(dsn, s3, s3.new_bucket(), tmp_path)
    )
    configs = {}
    for name, slots in (("a", 1), ("b", 2)):
        configs[name] = tmp_path / f"{name}.toml"
        configs[name].write_text(f"[jobs]\nprocessing_slots = {slots}\n\n" + common)
    try:
        with started_servers() as keep:
            a = keep(ServerProcess(tmp_path / "a", config=configs["a"]))
            b = keep(ServerProcess(tmp_path / "b", config=configs["b"]))
            yield Pair(a, b, relay, dsn)
            relay.release.set()  # nothing left held when the servers stop
    finally:
        relay.release.set()
        smtp.stop()


def end_jobs_on(server: ServerProcess, count: int) -> list[str]:
    """``count`` scans ended on ``server``, at once (each its own scanner)."""
    client = Soap(server.url)
    tokens: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def scan(n: int) -> None:
        try:
            token = client.create(MAIL, root_name=f"spread{n}")
            client.send_image(token, 1, PNG)
            client.end(token)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                tokens.append(token)

    on_threads(scan, ((n,) for n in range(count)))
    assert errors == [], errors
    return tokens


def test_a_busy_instance_s_pending_jobs_run_on_an_idle_one(pair: Pair) -> None:
    tokens = end_jobs_on(pair.a, JOBS)

    # a holds the one job its engine runs; b, idle, took two (its places); the rest wait
    # with no lease: nobody hoards them, a free place anywhere takes the oldest.
    def spread() -> tuple[dict[str, int], int] | None:
        held, free = pair.leases()
        return (held, free) if held == {"a": 1, "b": 2} and free == JOBS - 3 else None

    wait_for(spread, 30, "a to run one job, b two, and the rest to wait unleased")
    assert "waits for a free engine place" in pair.a.log
    assert "taken up from instance" in pair.b.log
    assert "rescued" not in pair.b.log  # taken as let go, no lease expired

    pair.relay.release.set()
    client = Soap(pair.b.url)
    for token in tokens:
        ended = client.wait_ended(token, 60)
        assert ended.state == "Completed", ended
    ran = pair.ran_by(tokens)
    assert sorted(ran) == sorted(tokens)
    assert list(ran.values()).count("b") >= 2, ran
    # Each job's message reached the relay once (exactly-once across the instances).
    names = sorted(
        name for i in range(len(pair.relay.messages)) for name, _ in pair.relay.attachments(i)
    )
    assert len(pair.relay.messages) == JOBS, names
    assert names == sorted(f"spread{n}_0001.png" for n in range(JOBS)), names
