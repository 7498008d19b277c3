"""The scale run through HAProxy on one and on three instances, and failover (issue 18 point 8).

    python3 bench/cluster.py [--quick] [--scanners 200] [--rounds 3] [--json results.json]

One throwaway PostgreSQL and one SeaweedFS (tests/engines_support.py); HAProxy with
docs/operating.md's configuration (tests/cluster_support.py) in front of one instance, then of
three (both bindings), each run in turn, round by round, so a busy neighbour on this shared
machine hits both alike.  The scale run is bench/runtime.py's scanners (each: create, two 1 MB
images, end, poll to Completed, on one keep-alive connection), without its idle connections.
Printed per setting: jobs completed, seconds for all of them (median of the rounds) and the
ratio of three instances to one, each round against its own one-instance run (min/median/max).

Failover: a SendImage held in flight on one instance, that instance killed (SIGKILL), the same
DocumentId sent again through HAProxy every 50 ms until one is accepted: the time from the kill
to the acceptance (the dead instance's uploads row stops counting after its lease, ``[cluster]
lease_seconds``, here 1 s).  Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "tests" / "e2e")]

from asgi import spread  # noqa: E402
from runtime import _ScaleClients  # noqa: E402

from cluster_support import (  # noqa: E402
    CONNECTION_LOST,
    LEASE_SECONDS,
    HAProxyCluster,
    haproxy_cluster,
    missing_parts,
)
from dsc_core import client as dc  # noqa: E402
from dsc_core.model import FileShareInstructions  # noqa: E402
from e2e_support import Soap  # noqa: E402
from engines_support import pg_cluster, s3_server  # noqa: E402
from test_cluster_jobs import HeldUpload  # noqa: E402
from test_e2e_serve import LOCAL_SHARE  # noqa: E402
from waiting import wait_for  # noqa: E402

COUNTS = (1, 3)
#: The scanners are one user from one address (the balancer's, on this machine): the per-user
#: quota of Creating jobs (default 32) would refuse most of 200 at once with a SOAP fault.
CONFIG = "[limits]\nmax_creating_jobs_per_user = 1000\n"


def scale(cluster: HAProxyCluster, scanners: int) -> dict[str, Any]:
    import trio

    clients = _ScaleClients(cluster.port)
    image = os.urandom(1024 * 1024)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for number in range(scanners):
                nursery.start_soon(clients.scanner, number, image)

    began = time.monotonic()
    trio.run(main)
    seconds = time.monotonic() - began
    stats = clients.stats
    # A failed scan says why: the instances' errors (their logs go with the run's folder).
    errors = [
        f"{instance.name}: {line}"
        for instance in cluster.instances
        for line in instance.log.splitlines()
        if " ERROR " in line
    ]
    return {
        "scanners": scanners,
        "completed": stats["completed"],
        "failed": stats["failed"][:10],
        "errors_logged": errors[:20] if stats["failed"] else [],
        "refused_503": stats["refused"],
        "seconds": seconds,
    }


def accepted(client: Soap, token: str, image: bytes) -> bool:
    """Document 1 sent again: True once taken.  Refused while the killed instance's uploads
    row counts (docs/rulings.md, "A duplicate in flight on another instance":
    ServerErrorTemporaryError), or the connection lost (HAProxy sent it to the dead
    instance): False.  Any other fault is raised: retried, it would spin until the smoke
    test's timeout and say nothing."""
    try:
        client.send_image(token, 1, image)
    except CONNECTION_LOST:
        return False
    except dc.ClientFault as fault:
        if not str(fault.subcode).endswith(":ServerErrorTemporaryError"):
            raise
        return False
    return True


def failover(cluster: HAProxyCluster) -> float:
    """Seconds from the kill of the instance receiving an image to the same image accepted."""
    client = Soap(cluster.url)
    token = client.create([FileShareInstructions((LOCAL_SHARE,))], root_name="failover")
    held = HeldUpload(cluster, client, token, 1)  # type: ignore[arg-type]
    index = cluster.names.index(cluster.upload_owner(token, 1))
    image = os.urandom(200_000)
    killed = time.monotonic()
    cluster.kill9(index)
    try:
        held.release()
    except OSError:
        pass
    wait_for(
        lambda: accepted(client, token, image),
        60,  # a deadline for a failing run only; the lease is 1 s
        f"document 1 of {token} accepted by an instance other than the one killed",
        interval=0.05,
    )
    took = time.monotonic() - killed
    client.end(token)
    cluster.restart(index)
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the scale run through HAProxy, 1 vs 3 instances")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 scanners, 1 round")
    parser.add_argument("--scanners", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    args = parser.parse_args(argv)
    if args.quick:
        args.scanners, args.rounds = 20, 1
    missing = missing_parts()
    if missing is not None:
        print(f"skipped: {missing}")
        return 0
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in COUNTS}
    failovers: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="dsc-cluster-bench-") as tmp,
        pg_cluster() as pg,
        s3_server() as s3,
    ):
        for round_number in range(args.rounds):
            for count in COUNTS:
                folder = Path(tmp) / f"r{round_number}n{count}"
                folder.mkdir()
                with haproxy_cluster(folder, pg, s3, CONFIG, count) as cluster:
                    runs[count].append(scale(cluster, args.scanners))
                    if count > 1:
                        failovers.append(failover(cluster))
    print(f"\nscale run through HAProxy: {args.scanners} scanners, {args.rounds} round(s)")
    print("| instances | jobs completed | seconds (median) | jobs/s (median) | vs 1 instance |")
    print("| --- | --- | --- | --- | --- |")
    one = runs[1]
    for count, mine in runs.items():
        seconds = statistics.median(r["seconds"] for r in mine)
        done = sum(r["completed"] for r in mine)
        rate = statistics.median(r["completed"] / r["seconds"] for r in mine)
        ratio = spread(
            [
                (r["completed"] / r["seconds"]) / (o["completed"] / o["seconds"])
                for r, o in zip(mine, one, strict=True)
            ]
        )
        failed = sum(len(r["failed"]) for r in mine)
        flag = f" ({failed} failed!)" if failed else ""
        total = args.scanners * len(mine)
        print(f"| {count}{flag} | {done}/{total} | {seconds:.1f} | {rate:.1f} | {ratio}x |")
    for count, mine in runs.items():
        for run in mine:
            for failure in run["failed"]:
                print(f"failed on {count} instance(s): {failure}")
            for line in run["errors_logged"]:
                print(f"  logged: {line}")
    print(
        f"\nfailover: kill -9 to the same SendImage accepted elsewhere: {spread(failovers)} s "
        f"(min/median/max of {len(failovers)}; lease_seconds = {LEASE_SECONDS})",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "failover_s": failovers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
