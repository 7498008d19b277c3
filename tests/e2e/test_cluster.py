"""Several ``dsc serve`` instances on one PostgreSQL store (issue 18 points 4 and 6), real
processes on a real PostgreSQL: heartbeats, a killed instance shown down after its lease, the
leader failing over, the leader alone timing out jobs (R6), stopping one instance ends no
subscription while stopping the last does (R7), and ``dsc cluster status``.

Short settings keep each test to seconds: a heartbeat every 0.2 s, a lease of 1.5 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from aiosmtpd.controller import Controller

from dsc_core import client as dc
from dsc_core import names
from dsc_core.model import EmailInstructions, FileShareInstructions
from e2e_support import HeldRelay, ServerProcess, Soap, dsc, free_port
from engines_support import store_section
from test_delivery import Healthy, subscribe
from test_observe_e2e import get
from waiting import wait_for

if TYPE_CHECKING:
    from engines_support import PgCluster

LOCAL_SHARE = r"\\localhost\scans"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(20_000)


def cluster_config(tmp_path: Path, dsn: str, extra: str = "", lease: float = 1.5) -> Path:
    config = tmp_path / "dsc.toml"
    config.write_text(
        store_section(dsn)
        + f"[cluster]\nheartbeat_seconds = 0.2\nlease_seconds = {lease}\n\n"
        + extra
    )
    return config


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Servers a test starts (each its own data folder); killed at the end if still running."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.alive:
            server.kill9()


def start(instances: list[ServerProcess], tmp_path: Path, config: Path) -> ServerProcess:
    data = tmp_path / f"data{len(instances)}"
    data.mkdir()
    server = ServerProcess(data, config=config)
    instances.append(server)
    return server.start()


def status(config: Path) -> list[dict[str, Any]]:
    run = dsc("cluster", "status", "--config", str(config), "--json")
    assert run.code == 0, run
    result: list[dict[str, Any]] = json.loads(run.out)
    return result


def by_pid(config: Path) -> dict[int, dict[str, Any]]:
    return {row["pid"]: row for row in status(config)}


def test_heartbeats_a_killed_instance_goes_down_and_the_leader_fails_over(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    config = cluster_config(tmp_path, pg.new_database())
    first = start(instances, tmp_path, config)
    second = start(instances, tmp_path, config)
    rows = by_pid(config)
    assert rows[first.pid]["state"] == rows[second.pid]["state"] == "up", rows
    assert rows[first.pid]["leader"] and not rows[second.pid]["leader"], rows
    assert rows[first.pid]["address"] == first.url.removesuffix("/ScanServer"), rows
    assert rows[first.pid]["leases_held"] == 0, rows
    assert rows[first.pid]["outbox_lag"] == {"rows": 0, "oldest_seconds": None}, rows
    # The heartbeat goes on: its age stays within the lease while the rows are read again.
    ages = [by_pid(config)[second.pid]["heartbeat_age"] for _ in range(5)]
    assert all(age < 1.5 for age in ages), ages
    assert "is now the leader" in first.log and "is now the leader" not in second.log

    first.kill9()
    wait_for(
        lambda: by_pid(config)[second.pid]["leader"],
        timeout=15,
        what="the second instance to take the lead after the leader's kill -9",
    )
    wait_for(
        lambda: by_pid(config)[first.pid]["state"] == "down",
        timeout=15,
        what="the killed instance to show down after its lease",
    )
    assert re.search(r"cluster: \S+ \([0-9a-f-]+\) is now the leader", second.log), second.log
    second.stop_cleanly()
    rows = by_pid(config)
    assert rows[second.pid]["state"] == "stopped" and not rows[second.pid]["leader"], rows


def test_only_the_leader_times_a_job_out(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    config = cluster_config(tmp_path, pg.new_database(), "[jobs]\ntimeout_seconds = 2\n")
    leader = start(instances, tmp_path, config)
    token = Soap(leader.url).create([FileShareInstructions((LOCAL_SHARE,))])
    # Started after the job was created: it restores the job from the shared store and would
    # time it out too if it ran the sweeps (R6 once, by the leader).
    other = start(instances, tmp_path, config)
    assert "restored 1 job(s)" in other.log, other.log

    def timed_out(server: ServerProcess) -> list[str]:
        return [
            line
            for line in server.log.splitlines()
            if f"job {token} " in line and "TimedOut" in line
        ]

    wait_for(lambda: timed_out(leader), timeout=15, what="the leader to time the job out")
    assert Soap(leader.url).wait_ended(token).state == "Aborted"
    # The other instance's ticker ran meanwhile (it wakes at least once a second); a second
    # tick round on the leader's side is awaited, then neither logs it again.
    wait_for(lambda: by_pid(config)[other.pid]["heartbeat_age"] < 1.5, what="a heartbeat")
    assert len(timed_out(leader)) == 1, leader.log
    assert timed_out(other) == [], other.log


def test_stopping_one_instance_ends_no_subscription_stopping_the_last_does(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    """R7 across instances, after one was killed and restarted from its data folder: the new
    run marks the killed incarnation down at once (a lease of 60 s would show it up for a
    minute), so stopping the last live instance counts no ghost and ends every subscription."""
    config = cluster_config(tmp_path, pg.new_database(), lease=60)
    first = start(instances, tmp_path, config)
    second = start(instances, tmp_path, config)
    subscriber = Healthy()
    threading.Thread(target=subscriber.serve_forever, daemon=True).start()
    try:
        subscribe(Soap(first.url), subscriber.url)
        subscribe(Soap(second.url), subscriber.url)

        def ends() -> int:
            with subscriber.lock:
                return sum(b"SubscriptionEnd" in body for _, body in subscriber.received)

        killed = second.pid
        second.kill9()
        second.start()  # the same data folder
        rows = by_pid(config)
        assert rows[killed]["state"] == "down" and not rows[killed]["leader"], rows
        assert rows[killed]["replaced_by"] == rows[second.pid]["id"], rows
        assert rows[second.pid]["state"] == rows[first.pid]["state"] == "up", rows
        assert rows[first.pid]["replaced_by"] is None, rows
        assert f"({rows[killed]['id']}), the earlier run from this data folder, is down" in (
            second.log
        ), second.log
        table = dsc("cluster", "status", "--config", str(config))
        assert table.code == 0 and "2 of 3 instance(s) up" in table.out, table

        first.stop_cleanly()
        assert "other instances are up: leaving quietly" in first.log, first.log
        second.stop_cleanly()
        assert "the last instance stops" in second.log, second.log
        # The last one's SubscriptionEnds were sent before it stopped (shutdown waits for
        # them): one per subscription, both known to it (stored, issue 18 point 3); the first
        # one sent none.
        assert ends() == 2, subscriber.received
        assert b"SourceShuttingDown" in next(
            b for _, b in subscriber.received if b"SubscriptionEnd" in b
        )
    finally:
        subscriber.shutdown()
        subscriber.server_close()


def test_cluster_status_table_and_the_sqlite_refusal(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    config = cluster_config(tmp_path, pg.new_database(), "")
    config.write_text(
        config.read_text().replace("[cluster]\n", '[cluster]\ninstance_name = "dsc-a"\n')
    )
    server = start(instances, tmp_path, config)
    run = dsc("cluster", "status", "--config", str(config))
    assert run.code == 0, run
    header, _rule, line = run.out.splitlines()[:3]
    assert header.split() == [
        "Name",
        "Address",
        "Started",
        "Heartbeat",
        "State",
        "Leader",
        "Leases",
        "Outbox",
        "lag",
    ], run.out
    assert line.split()[:2] == ["dsc-a", server.url.removesuffix("/ScanServer")], run.out
    assert line.split()[-6:] == ["s", "ago", "up", "leader", "0", "0"], run.out
    assert "1 of 1 instance(s) up; leader: dsc-a" in run.out, run.out
    assert "outbox: 0 notification(s) waiting, every subscription" in run.out, run.out
    help_text = " ".join(dsc("cluster", "status", "--help").out.split())
    assert "the job leases it holds (jobs whose filters it runs now)" in help_text, help_text

    sqlite = dsc("cluster", "status", "--data", str(tmp_path / "plain"))
    assert sqlite.code == 1, sqlite
    assert sqlite.err.strip().endswith(
        "one instance: the store is SQLite in "
        f"{tmp_path / 'plain'}; cluster status needs [store] kind = postgresql"
    ), sqlite
    assert len(sqlite.err.strip().splitlines()) == 1, sqlite


def _listeners(port: int) -> set[int]:
    """The pids listening on ``port`` (ss -ltnp)."""
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def test_workers_share_one_port_as_two_instances(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    config = cluster_config(tmp_path, pg.new_database())
    data = tmp_path / "data"
    data.mkdir()
    server = ServerProcess(data, config=config, extra=["--workers", "2"])
    instances.append(server)
    server.start()

    def up() -> list[dict[str, Any]] | None:
        rows = [r for r in status(config) if r["state"] == "up"]
        return rows if len(rows) == 2 else None

    rows = wait_for(up, timeout=20, what="two workers up in the instances table")
    pids = {row["pid"] for row in rows}
    assert server.pid not in pids and len(pids) == 2, rows
    assert sorted(row["name"].rsplit("/", 1)[1] for row in rows) == ["w0", "w1"], rows
    # Both worker processes listen on the one port (SO_REUSEPORT), and both answer.
    wait_for(lambda: _listeners(server.port) == pids, what="both workers listening")
    assert (data / "workers" / "0" / "lock").exists() and (data / "workers" / "1" / "lock").exists()
    for _ in range(20):  # a fresh connection each: the kernel spreads them
        request = dc.repository_elements_request(["RepositoryConfiguration"])
        answer = Soap(server.url).call(names.Action.DSC_GET_REPOSITORY_ELEMENTS, request)
        assert answer.action.endswith("GetRepositoryElementsResponse"), answer
    server.stop_cleanly()
    assert {row["state"] for row in status(config)} == {"stopped"}


def test_workers_are_refused_on_sqlite(tmp_path: Path) -> None:
    run = dsc("serve", "--data", str(tmp_path / "data"), "--port", "5399", "--workers", "2")
    assert run.code == 2, run
    assert run.err.strip().splitlines() == [
        "dsc: --workers 2: the SQLite store is one process's (one server per data folder); "
        'use [store] kind = "postgresql" to run several workers'
    ], run


def test_two_instances_count_into_one_device_and_one_tally(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    """Issue 17: with the PostgreSQL store the device book and the page's totals are the
    database's, counted in SQL by each instance: a scan on each of two instances from the same
    device is one device with 2 jobs completed, and 2 jobs created, on both instances' pages
    (another instance's counts show once the copy is reloaded: store/refresh.py)."""
    config = cluster_config(tmp_path, pg.new_database())
    first = start(instances, tmp_path, config)
    second = start(instances, tmp_path, config)
    page = tmp_path / "page.png"
    page.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20_000))
    for server in (first, second):
        run = dsc("scan", "--server", server.url, "--quiet", "--json", str(page))
        assert run.code == 0 and run.json()["state"] == "Completed", run

    def seen(server: ServerProcess) -> tuple[object, ...]:
        listed = dsc("devices", "--server", server.url, "--json").json()
        totals = json.loads(get(server, "/status.json")[2])["counters"]
        return (
            [(d["address"], d["jobs"], d["completed"]) for d in listed],
            totals["jobs_created"],
            totals["jobs_ended"]["succeeded"],
        )

    for server in (first, second):

        def both(server: ServerProcess = server) -> bool:
            return seen(server) == ([("127.0.0.1", 2, 2)], 2, 2)

        wait_for(both, what=f"instance {server.port} showing both instances' counts")


def read(server: ServerProcess, path: str) -> tuple[int, str]:
    """A GET's status and body text (test_observe_e2e.get)."""
    status, _, body, _ = get(server, path)
    return status, body.decode()


def metric_values(text: str) -> dict[str, float]:
    return {
        name: float(value)
        for name, value in re.findall(r"^(dsc_cluster_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)
    }


def test_metrics_status_json_and_the_console_api_show_the_instances(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    """Issue 18 point 6: /metrics, /status.json and GET /api/cluster on each of two instances,
    read from the heartbeat's memory."""
    config = cluster_config(tmp_path, pg.new_database())
    first = start(instances, tmp_path, config)
    second = start(instances, tmp_path, config)

    def two_up(server: ServerProcess) -> dict[str, float] | None:
        code, text = read(server, "/metrics")
        assert code == 200, text
        values = metric_values(text)
        return values if values.get('dsc_cluster_instances{state="up"}') == 2 else None

    names = {row["name"] for row in status(config)}
    assert len(names) == 2, names
    leader = wait_for(lambda: two_up(first), what="the first instance to see two up")
    other = wait_for(lambda: two_up(second), what="the second instance to see two up")
    for values in (leader, other):
        assert set(values) == {
            'dsc_cluster_instances{state="up"}',
            'dsc_cluster_instances{state="down"}',
            'dsc_cluster_instances{state="stopped"}',
            "dsc_cluster_leader",
            "dsc_cluster_leader_lock",
            "dsc_cluster_term_failing",
            "dsc_cluster_heartbeat_age_seconds",
        } | {f'dsc_cluster_leases_held{{name="{name}"}}' for name in names}, values
        assert values['dsc_cluster_instances{state="down"}'] == 0
        assert 0 <= values["dsc_cluster_heartbeat_age_seconds"] < 1.5  # within the lease
    assert (leader["dsc_cluster_leader"], other["dsc_cluster_leader"]) == (1, 0)
    assert (leader["dsc_cluster_leader_lock"], other["dsc_cluster_leader_lock"]) == (1, 0)
    assert (leader["dsc_cluster_term_failing"], other["dsc_cluster_term_failing"]) == (0, 0)

    code, text = read(second, "/status.json")
    assert code == 200, text
    cluster = json.loads(text)["cluster"]
    assert cluster["instance"].endswith(f":{second.port}") and not cluster["leader"], cluster
    assert cluster["problem"] is None and cluster["heartbeat_age"] < 1.5, cluster
    rows = {row["pid"]: row for row in cluster["instances"]}
    assert set(rows) == {first.pid, second.pid}, rows
    assert rows[first.pid]["leader"] and not rows[second.pid]["leader"], rows
    assert rows[first.pid]["address"] == first.url.removesuffix("/ScanServer"), rows
    assert {row["state"] for row in rows.values()} == {"up"}, rows
    assert all(row["started"] and row["heartbeat_age"] < 1.5 for row in rows.values()), rows

    code, text = read(first, "/api/cluster")
    assert code == 200, text
    api = json.loads(text)
    assert api["leader"] and api["instance"].endswith(f":{first.port}"), api
    assert [row["name"] for row in api["instances"]] == [r["name"] for r in cluster["instances"]]

    # The stopped instance is counted as such by the one that stays.
    second.stop_cleanly()
    wait_for(
        lambda: (
            metric_values(read(first, "/metrics")[1]).get('dsc_cluster_instances{state="stopped"}')
            == 1
        ),
        what="the stopped instance counted",
    )


class HeldSubscriber(Healthy):
    """An event sink that answers no notification until :attr:`release` is set: the rows of
    its subscription wait in the outbox, as for a subscriber that is down."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        handler = self.RequestHandlerClass
        outer = self

        class Held(handler):  # type: ignore[misc, valid-type]
            def do_POST(self) -> None:
                outer.release.wait(60)
                super().do_POST()

        self.RequestHandlerClass = Held


def test_leases_held_and_outbox_lag_in_status_metrics_and_status_json(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    """Issue 18 point 6: a job whose mail filter waits on the SMTP relay is a lease held by the
    instance running it; the notifications of a subscriber that does not answer wait in the
    outbox, counted against its delivery owner and cluster-wide, with the oldest one's age:
    in ``dsc cluster status`` (read from the database), /metrics and /status.json (read from
    the heartbeat's memory).  Once both are let go, every figure is back to 0."""
    relay = HeldRelay()
    smtp = Controller(relay, hostname="127.0.0.1", port=free_port())
    smtp.start()
    sink = HeldSubscriber()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        config = cluster_config(
            tmp_path,
            pg.new_database(),
            f'[smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nfrom = "scans@corp.example"\n'
            "[limits]\ndelivery_answer_timeout = 60\n",
        )
        first = start(instances, tmp_path, config)
        second = start(instances, tmp_path, config)
        subscribe(Soap(first.url), f"http://127.0.0.1:{sink.server_address[1]}/events")
        client = Soap(second.url)
        token = client.create([EmailInstructions(False, ("bob@corp.example",))])
        client.send_image(token, 1, PNG)
        client.end(token)
        assert relay.arrived.wait(20), "the mail filter never reached the relay"

        def held() -> list[dict[str, Any]] | None:
            rows = status(config)
            leases = sorted(row["leases_held"] for row in rows)
            waiting = [row for row in rows if row["outbox_lag"]["rows"]]
            return rows if leases == [0, 1] and waiting else None

        rows = wait_for(held, timeout=20, what="a lease held and outbox rows waiting")
        [runner] = [row for row in rows if row["leases_held"] == 1]
        [owner] = [row for row in rows if row["outbox_lag"]["rows"]]
        assert owner["outbox_lag"]["oldest_seconds"] >= 0, owner
        table = dsc("cluster", "status", "--config", str(config))
        assert table.code == 0, table
        # The two last columns: Leases, then Outbox lag ("0" or "11 (oldest 4 s)").
        cells = {}
        for line in table.out.splitlines()[2:4]:
            found = re.fullmatch(r"(\S+) .* (\d+) +(\d+(?: \(oldest \d+ (?:s|min)\))?)", line)
            assert found, table.out
            cells[found[1]] = (found[2], found[3])
        assert cells[runner["name"]][0] == "1", table.out
        assert re.fullmatch(r"\d+ \(oldest \d+ (s|min)\)", cells[owner["name"]][1]), table.out
        assert re.search(
            r"^outbox: \d+ \(oldest \d+ (s|min)\) notification\(s\) waiting", table.out, re.M
        ), table.out

        def figures(server: ServerProcess) -> tuple[dict[str, float], dict[str, Any]] | None:
            code, text = read(server, "/metrics")
            assert code == 200, text
            values = {
                name: float(value)
                for name, value in re.findall(
                    r"^(dsc_(?:cluster_leases_held|outbox_\w+)(?:\{[^}]*\})?) (\S+)$", text, re.M
                )
            }
            cluster = json.loads(read(server, "/status.json")[1])["cluster"]
            if values.get(f'dsc_cluster_leases_held{{name="{runner["name"]}"}}') != 1:
                return None
            if not values.get("dsc_outbox_rows") or not cluster["outbox"]["rows"]:
                return None
            return values, cluster

        for server in (first, second):
            values, cluster = wait_for(
                lambda server=server: figures(server), what=f"{server.port}'s figures"
            )
            assert values[f'dsc_outbox_owner_rows{{name="{owner["name"]}"}}'] >= 1, values
            assert values["dsc_outbox_oldest_seconds"] >= 0, values
            assert cluster["outbox"]["oldest_seconds"] is not None, cluster
            shown = {row["name"]: row for row in cluster["instances"]}
            assert shown[runner["name"]]["leases_held"] == 1, shown
            assert shown[owner["name"]]["outbox_lag"]["rows"] >= 1, shown

        relay.release.set()
        sink.release.set()
        client.wait_ended(token)

        def drained() -> bool:
            rows = status(config)
            return all(r["leases_held"] == 0 and r["outbox_lag"]["rows"] == 0 for r in rows)

        wait_for(drained, what="the lease let go and the outbox emptied")
        wait_for(
            lambda: (
                figures(first) is None
                and metric_line(read(first, "/metrics")[1], "dsc_outbox_rows") == 0
            ),
            what="the figures of /metrics back to 0",
        )
    finally:
        relay.release.set()
        sink.release.set()
        smtp.stop()
        sink.shutdown()
        sink.server_close()


def metric_line(text: str, name: str) -> float | None:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return None if found is None else float(found.group(1))


def test_healthz_answers_503_when_the_heartbeat_fails_past_the_lease(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    """The heartbeat blocked (the instances table locked by another session, as a database
    that no longer answers this connection would): past the lease /healthz answers 503 with the
    cluster check saying why, while the store's own check still passes; once the lock goes the
    heartbeat resumes and /healthz answers 200 again."""
    dsn = pg.new_database()
    server = start(instances, tmp_path, cluster_config(tmp_path, dsn))
    wait_for(lambda: read(server, "/healthz")[0] == 200, what="/healthz 200 at start")
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE instances IN ACCESS EXCLUSIVE MODE")

        def down() -> str | None:
            code, text = read(server, "/healthz")
            return text if code == 503 else None

        text = wait_for(
            down,
            timeout=20,
            what="/healthz 503 once the heartbeat is older than the lease",
        )
        assert "cluster" in text and "(lease 1.5 s): the other instances consider" in text, text
        assert "store" not in text, text  # the database itself still answers the pool
        values = metric_values(read(server, "/metrics")[1])
        assert values["dsc_cluster_heartbeat_age_seconds"] >= 1.5, values
        problem = json.loads(read(server, "/status.json")[1])["cluster"]["problem"]
        assert problem and "no heartbeat for" in problem, problem
        blocker.rollback()
    wait_for(
        lambda: read(server, "/healthz")[0] == 200,
        timeout=20,
        what="/healthz 200 again once the heartbeat goes through",
    )
    server.stop_cleanly()


def test_uvicorn_workers_are_instances_with_a_folder_each(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    """Issue 20 point 4: under ``uvicorn --workers 2`` on the PostgreSQL store each worker
    takes the first free DATA/workers/<n> and is an instance; a worker killed and restarted by
    uvicorn takes the slot its predecessor freed."""
    config = cluster_config(tmp_path, pg.new_database())
    data = tmp_path / "data"
    data.mkdir()
    server = ServerProcess(data, binding="uvicorn", config=config, extra=["--workers", "2"])
    instances.append(server)
    server.start()

    def up() -> dict[str, dict[str, Any]] | None:
        rows = {r["name"].rsplit("/", 1)[1]: r for r in status(config) if r["state"] == "up"}
        return rows if len(rows) == 2 else None

    rows = wait_for(up, timeout=30, what="two uvicorn workers up in the instances table")
    assert sorted(rows) == ["w0", "w1"], rows
    assert server.pid not in {row["pid"] for row in rows.values()}, rows
    assert (data / "workers" / "0" / "lock").exists() and (data / "workers" / "1" / "lock").exists()
    for _ in range(10):  # a fresh connection each: either worker answers
        request = dc.repository_elements_request(["RepositoryConfiguration"])
        answer = Soap(server.url).call(names.Action.DSC_GET_REPOSITORY_ELEMENTS, request)
        assert answer.action.endswith("GetRepositoryElementsResponse"), answer

    killed = rows["w1"]
    os.kill(killed["pid"], signal.SIGKILL)

    def replaced() -> dict[str, Any] | None:
        again = up()
        if again is None or again["w1"]["pid"] == killed["pid"]:
            return None
        return again["w1"]

    successor = wait_for(replaced, timeout=30, what="uvicorn's new worker taking slot 1")
    assert successor["id"] != killed["id"], successor  # a new incarnation in the same slot
    assert not (data / "workers" / "2").exists()
    server.stop_cleanly()
    assert {row["state"] for row in status(config) if row["state"] != "down"} == {"stopped"}
