"""Rescue after an instance's death, and event delivery across instances (issue 18 point 8).

    python3 bench/cluster_latency.py [--quick] [--kills 5] [--events 100] [--json out.json]

Two ``dsc serve`` instances (tests/cluster_support.py: one PostgreSQL, one SeaweedFS, the test
cluster's ``[cluster] heartbeat_seconds = 0.5``, ``lease_seconds = 1``), addressed directly.

Rescue: a job's mail filter is held mid-delivery on a real SMTP relay (aiosmtpd, the DATA
command left unanswered) on instance A, then A is killed (SIGKILL) and the relay let go.
Measured from the kill: the job's lease taken by the other instance (its ``lease_owner`` in
PostgreSQL, polled every 10 ms) and the job Completed (asked of the survivor every 10 ms).  A
is started again before the next kill, so each kill has a survivor.

Event delivery: a subscriber (a real HTTP server) whose delivery owner is one instance; jobs
created and then canceled on the other instance, one at a time.  Measured per job change: from
the moment the request is sent (its commit is inside it) to the first notification of that
job after it received by the subscriber; the requests' own round trips are printed beside, so
the part the outbox adds shows.  Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The tests' helpers, as pytest's pythonpath (pyproject.toml) finds them.
sys.path[:0] = [str(HERE)] + [str(HERE.parent / "tests" / p) for p in ("", "bindings", "e2e")]

from asgi import spread  # noqa: E402

from cluster_support import (  # noqa: E402
    HEARTBEAT_SECONDS,
    LEASE_SECONDS,
    HAProxyCluster,
    haproxy_cluster,
    missing_parts,
)
from dsc_core.model import EmailInstructions  # noqa: E402
from e2e_support import HeldRelay, Soap, free_port  # noqa: E402
from engines_support import pg_cluster, s3_server  # noqa: E402
from test_cluster_events import Subscriber, delivery_owner, subscribe  # noqa: E402
from waiting import wait_for  # noqa: E402

POLL = 0.01
PNG = b"\x89PNG\r\n\x1a\n" + bytes(20_000)
MAIL = [EmailInstructions(False, ("bob@corp.example",))]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def lease_owner(conn: Any, token: str) -> str | None:
    """The name of the instance holding ``token``'s lease now, if any."""
    row = conn.execute(
        "SELECT i.name FROM jobs j JOIN instances i ON i.id::text = j.lease_owner "
        "WHERE j.token = %s AND j.lease_until > now()",
        (token,),
    ).fetchone()
    return None if row is None else str(row[0])


def rescue(cluster: HAProxyCluster, relay: HeldRelay, victim: int) -> tuple[float, float]:
    """Seconds from the kill of the instance running a job's filter to the job's lease taken
    by the other one, and to the job Completed."""
    import psycopg

    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        return _rescue(cluster, relay, victim, conn)


def _rescue(
    cluster: HAProxyCluster, relay: HeldRelay, victim: int, conn: Any
) -> tuple[float, float]:
    dead, alive = cluster.instances[victim], cluster.instances[1 - victim]
    relay.release.clear()
    relay.arrived.clear()
    client = Soap(dead.url)
    token = client.create(MAIL, root_name="rescue")
    client.send_image(token, 1, PNG)
    client.end(token)
    if not relay.arrived.wait(30):
        raise RuntimeError(f"the mail filter of {token} never reached the relay")
    if lease_owner(conn, token) != dead.name:
        raise RuntimeError(f"{token} is not leased by {dead.name}")
    killed = time.monotonic()
    dead.kill9()
    relay.release.set()  # the dead instance's SMTP session is gone; the rescuer's passes
    # The deadlines bound a failing run only (the lease is 1 s): without them it would spin
    # until the smoke test's timeout and say nothing.
    wait_for(
        lambda: lease_owner(conn, token) == alive.name,
        60,
        f"{alive.name} to take the lease of {token}",
        interval=POLL,
    )
    rescued = time.monotonic() - killed
    survivor = Soap(alive.url)
    ended = wait_for(
        lambda: survivor.in_history(token), 60, f"{token} ended on {alive.name}", interval=POLL
    )
    completed = time.monotonic() - killed
    if ended.state != "Completed":
        raise RuntimeError(f"the rescued job {token} ended {ended.state}: {ended.reasons}")
    cluster.restart(victim)
    return rescued, completed


def next_message(sink: Subscriber, token: str, after: int, timeout: float = 30) -> float:
    """When the first message about ``token`` past the ``after`` first ones arrived."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sink.lock:
            received = list(sink.received[after:])
        for at, body in received:
            if token.encode() in body:
                return at
        time.sleep(0.001)
    raise RuntimeError(f"no notification about {token} within {timeout} s")


def events(cluster: HAProxyCluster, count: int) -> dict[str, Any]:
    """``count`` job changes committed on one instance, delivered by the other (module doc)."""
    sink = Subscriber()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        identifier = subscribe(Soap(cluster.instances[1].url), sink.url)
        # The owner is whoever claimed the subscription's first rows: write on the other one.
        first = Soap(cluster.instances[0].url)
        warm = first.create(MAIL, root_name="warm")
        next_message(sink, warm, 0)
        first.dsp_cancel(warm)
        owner_pid = delivery_owner(cluster.dsn, identifier)
        [writer] = [i for i in cluster.instances if i.pid != owner_pid]
        [owner] = [i for i in cluster.instances if i.pid == owner_pid]
        client = Soap(writer.url)
        latencies: list[float] = []
        round_trips: list[float] = []
        while len(latencies) < count:
            for change in ("create", "cancel"):
                with sink.lock:
                    mark = len(sink.received)
                sent = time.monotonic()
                if change == "create":
                    token = client.create(MAIL, root_name="event")
                else:
                    client.dsp_cancel(token)
                round_trips.append(time.monotonic() - sent)
                latencies.append(next_message(sink, token, mark) - sent)
        return {
            "writer": writer.name,
            "owner": owner.name,
            "latency_s": latencies[:count],
            "round_trip_s": round_trips[:count],
        }
    finally:
        sink.shutdown()
        sink.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="rescue time and event latency across instances")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 kill, 10 events")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    if args.quick:
        args.kills, args.events = 1, 10
    missing = missing_parts()
    if missing is not None:
        print(f"skipped: {missing}")
        return 0
    from aiosmtpd.controller import Controller

    relay = HeldRelay()
    smtp = Controller(relay, hostname="127.0.0.1", port=free_port())
    smtp.start()
    config = (
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nfrom = "scans@corp.example"\n'
        "[limits]\nmax_creating_jobs_per_user = 1000\n"
    )
    kills: list[tuple[float, float]] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="dsc-cluster-latency-") as tmp,
            pg_cluster() as pg,
            s3_server() as s3,
            haproxy_cluster(Path(tmp), pg, s3, config, count=2) as cluster,
        ):
            for number in range(args.kills):
                kills.append(rescue(cluster, relay, number % 2))
            relay.release.set()
            delivered = events(cluster, args.events)
    finally:
        relay.release.set()
        smtp.stop()
    rescued = [k[0] for k in kills]
    completed = [k[1] for k in kills]
    print(
        f"\nrescue: kill -9 mid-filter, {len(kills)} kill(s), lease_seconds = {LEASE_SECONDS}, "
        f"heartbeat_seconds = {HEARTBEAT_SECONDS} (min/median/max, seconds)"
    )
    print("| from the kill to | seconds |")
    print("| --- | --- |")
    print(f"| the lease taken by the survivor | {spread(rescued)} |")
    print(f"| the job Completed on the survivor | {spread(completed)} |")
    latency = [s * 1000 for s in delivered["latency_s"]]
    trips = [s * 1000 for s in delivered["round_trip_s"]]
    print(
        f"\nevents: {len(latency)} job changes on {delivered['writer']}, delivered by "
        f"{delivered['owner']} (ms)"
    )
    print("| | p50 | p99 | max |")
    print("| --- | --- | --- | --- |")
    for label, values in (
        ("request sent -> notification received", latency),
        ("request round trip", trips),
    ):
        print(
            f"| {label} | {statistics.median(values):.1f} | {percentile(values, 0.99):.1f} "
            f"| {max(values):.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"kills": kills, "events": delivered}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
