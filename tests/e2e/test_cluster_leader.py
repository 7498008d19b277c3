"""The leader's duties (issue 18 point 4): real ``dsc serve`` instances on one PostgreSQL store, a
real subscriber HTTP server, a real SMTP relay holding each job's mail filter (so a job stays
Processing until the test lets it go).

Only the leader announces the repository state, derived from every instance's rows, each change
once and in order, and a new leader after a kill -9 neither repeats nor skips one; only the
leader ends an expired subscription; the count of a subscription's failed deliveries is stored,
so a new delivery owner ends it at the third failure overall (R7), not at its own third.

Short settings (test_cluster.cluster_config): a heartbeat every 0.2 s, leases of 1.5 s.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from aiosmtpd.controller import Controller
from lxml import etree

from dsc_bindings.store.instances import LEADER, LOCK_WITHOUT_TERM, NO_TERM
from dsc_core import client as dc
from dsc_core import names
from dsc_core.model import EmailInstructions
from e2e_support import Relay, ServerProcess, Soap, dsc, free_port
from test_cluster import PNG, by_pid, cluster_config, instances, metric_values, read, start
from test_cluster_events import Subscriber, delivery_owner, manage, serving
from test_delivery import Failing, Healthy
from waiting import wait_for

if TYPE_CHECKING:
    from engines_support import PgCluster

__all__ = ["instances"]  # the fixture, used by name

A = names.Action
MAIL = [EmailInstructions(False, ("bob@corp.example",))]


class Turnstile(Relay):
    """An SMTP relay that holds each message's DATA until the test lets one through
    (:meth:`let_one_through`): a job's mail filter waits there, so the job stays Processing."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self.waiting = 0
        self._lock = threading.Lock()
        self._passes = threading.Semaphore(0)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.waiting += 1
        while not self._passes.acquire(blocking=False):
            await asyncio.sleep(0.05)
        with self._lock:
            self.waiting -= 1
        answer: str = await super().handle_DATA(server, session, envelope)
        return answer

    def let_one_through(self) -> None:
        self._passes.release()


@pytest.fixture
def relay() -> Iterator[Turnstile]:
    held = Turnstile()
    smtp = Controller(held, hostname="127.0.0.1", port=free_port())
    smtp.start()
    held.port = smtp.port
    yield held
    for _ in range(held.waiting):
        held.let_one_through()
    smtp.stop()


@pytest.fixture
def sink() -> Iterator[Subscriber]:
    with serving(Subscriber()) as subscriber:
        yield subscriber


def config_with_relay(tmp_path: Path, dsn: str, relay: Turnstile) -> Path:
    return cluster_config(
        tmp_path,
        dsn,
        f'[smtp]\nhost = "127.0.0.1"\nport = {relay.port}\nfrom = "scans@corp.example"\n',
    )


def subscribe(
    client: Soap,
    notify_to: str,
    *,
    actions: str = A.DSC_STATUS_SUMMARY_EVENT,
    expires: str = "PT1H",
    end_to: str | None = None,
) -> str:
    """A subscription to ``actions`` (DPWS Action filter); its wse:Identifier."""
    request = etree.Element(f"{{{names.WSE}}}Subscribe")
    if end_to is not None:
        end = etree.SubElement(request, f"{{{names.WSE}}}EndTo")
        etree.SubElement(end, f"{{{names.WSA}}}Address").text = end_to
    delivery = etree.SubElement(request, f"{{{names.WSE}}}Delivery", Mode=names.PUSH_MODE)
    target = etree.SubElement(delivery, f"{{{names.WSE}}}NotifyTo")
    etree.SubElement(target, f"{{{names.WSA}}}Address").text = notify_to
    etree.SubElement(request, f"{{{names.WSE}}}Expires").text = expires
    etree.SubElement(
        request, f"{{{names.WSE}}}Filter", Dialect=names.DEVPROF_ACTION_DIALECT
    ).text = actions
    response = client.call(A.SUBSCRIBE, request)
    assert response.payload is not None
    identifier = response.payload.findtext(f".//{{{names.WSE}}}Identifier")
    assert identifier
    return identifier


def announced(sink: Subscriber) -> tuple[list[str], int]:
    """The repository states announced, in the order received, each message once (a failover
    of the delivery owner may send the one in flight again, with its MessageID); and how many
    messages arrived in all."""
    with sink.lock:
        bodies = [body for _, body in sink.received]
    seen: set[str] = set()
    states = []
    for body in bodies:
        root = etree.fromstring(body)
        message_id = root.findtext(f".//{{{names.WSA}}}MessageID") or ""
        assert root.findtext(f".//{{{names.WSA}}}Action") == A.DSC_STATUS_SUMMARY_EVENT
        if message_id in seen:
            continue
        seen.add(message_id)
        state = root.findtext(f".//{{{names.DSC}}}RepositoryState")
        assert state is not None, body
        states.append(state)
    return states, len(bodies)


def hold_a_job(server: ServerProcess, relay: Turnstile) -> str:
    """A job made Pending on ``server``, whose mail filter now waits at the relay
    (Processing until ``relay.let_one_through``)."""
    before = relay.waiting
    client = Soap(server.url)
    token = client.create(MAIL)
    client.send_image(token, 1, PNG)
    client.end(token)
    wait_for(lambda: relay.waiting > before, timeout=20, what="the mail filter at the relay")
    return token


def ended_jobs(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM jobs WHERE NOT active").fetchone()
    assert row is not None
    return int(row[0])


def heard(sink: Subscriber, count: int) -> list[str]:
    return wait_for(
        lambda: (states := announced(sink)[0]) and len(states) >= count and states,
        timeout=20,
        what=f"{count} repository state event(s)",
    )


def test_each_repository_state_change_made_anywhere_is_announced_once_in_order(
    tmp_path: Path,
    pg: PgCluster,
    instances: list[ServerProcess],
    relay: Turnstile,
    sink: Subscriber,
) -> None:
    dsn = pg.new_database()
    config = config_with_relay(tmp_path, dsn, relay)
    a, b, c = (start(instances, tmp_path, config) for _ in range(3))
    subscribe(Soap(b.url), sink.url)
    # A follower's job, then the leader's (a, the first started): the leader announces what
    # the rows make, the others nothing.
    for round_, server in enumerate((b, a)):
        token = hold_a_job(server, relay)
        assert heard(sink, 2 * round_ + 1)[-1] == "Processing"
        relay.let_one_through()
        assert Soap(server.url).wait_ended(token).state == "Completed"
        assert heard(sink, 2 * round_ + 2)[-1] == "Idle"
    # Two followers' jobs at once: the repository is Processing until both ended, whichever
    # ends first (neither instance's view of its own job alone).
    tokens = [hold_a_job(b, relay), hold_a_job(c, relay)]
    assert heard(sink, 5)[-1] == "Processing"
    relay.let_one_through()
    wait_for(lambda: ended_jobs(dsn) == 3, timeout=20, what="one of the two jobs ended")
    relay.let_one_through()
    for server, token in zip((b, c), tokens, strict=True):
        assert Soap(server.url).wait_ended(token).state == "Completed"
    assert heard(sink, 6)[-1] == "Idle"
    states, messages = announced(sink)
    assert states == ["Processing", "Idle"] * 3
    assert messages == 6  # no repeat, no failover here: each message once
    assert "announcing the repository state" in a.log
    assert "announcing the repository state" not in b.log + c.log


def test_a_new_leader_after_a_kill9_neither_repeats_nor_skips_an_announcement(
    tmp_path: Path,
    pg: PgCluster,
    instances: list[ServerProcess],
    relay: Turnstile,
    sink: Subscriber,
) -> None:
    config = config_with_relay(tmp_path, pg.new_database(), relay)
    leader, b, c = (start(instances, tmp_path, config) for _ in range(3))
    subscribe(Soap(b.url), sink.url)
    token = hold_a_job(c, relay)
    assert heard(sink, 1) == ["Processing"]
    # The leader dies with the repository Processing announced; the job ends while nobody
    # leads (the next heartbeat of b or c takes the lock): the new leader announces Idle from
    # the row of what was heard last, and Processing is not said again.
    leader.kill9()
    relay.let_one_through()
    assert Soap(c.url).wait_ended(token).state == "Completed"
    assert heard(sink, 2) == ["Processing", "Idle"]
    new = wait_for(
        lambda: next((s for s in (b, c) if "announcing the repository state" in s.log), None),
        timeout=15,
        what="a new leader announcing",
    )
    # The new leader announces changes of any instance from here on.
    other = c if new is b else b
    token = hold_a_job(other, relay)
    assert heard(sink, 3)[-1] == "Processing"
    relay.let_one_through()
    assert Soap(other.url).wait_ended(token).state == "Completed"
    assert heard(sink, 4) == ["Processing", "Idle", "Processing", "Idle"]
    states, messages = announced(sink)
    assert states == ["Processing", "Idle", "Processing", "Idle"]
    # At most the message in flight at the kill again (the delivery owner may have died).
    assert messages <= 5, messages


def test_only_the_leader_ends_an_expired_subscription_once(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess], sink: Subscriber
) -> None:
    dsn = pg.new_database()
    config = cluster_config(tmp_path, dsn)
    leader, other = (start(instances, tmp_path, config) for _ in range(2))
    # The first started takes the lock; said here, so that a change of that fails as itself
    # rather than as a missing log line below.
    assert by_pid(config)[leader.pid]["leader"], by_pid(config)
    identifier = subscribe(Soap(other.url), sink.url, expires="PT2S")

    def row() -> tuple[bool, int]:
        with psycopg.connect(dsn) as conn:
            found = conn.execute(
                "SELECT ended, version FROM subscriptions WHERE id = %s", (identifier,)
            ).fetchone()
        assert found is not None
        return bool(found[0]), int(found[1])

    wait_for(lambda: row()[0], timeout=15, what="the subscription's row ended")
    assert row() == (True, 2)  # created, then ended once
    line = f"subscription {identifier} expired"
    wait_for(lambda: line in leader.log, timeout=30, what="the leader's log line")
    assert leader.log.count(line) == 1, leader.log
    assert line not in other.log, other.log
    for server in (leader, other):
        with pytest.raises(dc.ClientFault):
            manage(Soap(server.url), A.GET_STATUS, identifier, "GetStatus")


def test_the_failure_count_survives_a_change_of_delivery_owner(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    dsn = pg.new_database()
    config = cluster_config(tmp_path, dsn)
    servers = [start(instances, tmp_path, config) for _ in range(2)]
    failing, ends = Failing(), Healthy()
    for server in (failing, ends):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        identifier = subscribe(
            Soap(servers[0].url),
            failing.url,
            actions=A.DSP_JOB_STATUS_EVENT,
            end_to=ends.url,
        )

        def failures() -> int:
            with psycopg.connect(dsn) as conn:
                found = conn.execute(
                    "SELECT failures FROM subscriptions WHERE id = %s", (identifier,)
                ).fetchone()
            assert found is not None
            return int(found[0])

        # Two jobs created: two status events, both failed by the first delivery owner.
        for _ in range(2):
            Soap(servers[1].url).create(MAIL)
        wait_for(lambda: failures() == 2, timeout=20, what="two failures stored")
        owner_pid = delivery_owner(dsn, identifier)
        [owner] = [s for s in servers if s.pid == owner_pid]
        [survivor] = [s for s in servers if s is not owner]
        owner.kill9()
        # The next event is sent by the survivor once the lease lapses: its failure is the
        # third (R7: the subscription ends, SubscriptionEnd DeliveryFailure to its EndTo).
        Soap(survivor.url).create(MAIL)

        def ended() -> bytes | None:
            with ends.lock:
                return next((b for _, b in ends.received if b"SubscriptionEnd" in b), None)

        end = wait_for(ended, timeout=20, what="SubscriptionEnd after the third failure")
        assert b"DeliveryFailure" in end
        assert failing.count == 3
        with pytest.raises(dc.ClientFault):
            manage(Soap(survivor.url), A.GET_STATUS, identifier, "GetStatus")
    finally:
        for server in (failing, ends):
            server.shutdown()
            server.server_close()


def test_the_last_instance_stopping_announces_stopped_then_ends_the_subscriptions(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess], sink: Subscriber
) -> None:
    """R7 on a shared store: the last instance to stop announces the repository Stopped
    (runtime/service.py ``shutdown`` takes a term for it, leader or not), then ends its
    subscriptions (SubscriptionEnd SourceShuttingDown).  The Stopped event goes through the
    outbox and ending a subscription deletes its rows: written in one batch with the ends,
    it was recorded (``repository_announced`` said Stopped) and never sent."""
    config = cluster_config(tmp_path, pg.new_database())
    only = start(instances, tmp_path, config)
    subscribe(Soap(only.url), sink.url, end_to=sink.url)
    only.stop_cleanly()
    assert "the last instance stops" in only.log, only.log
    messages = sink.messages()
    assert [action for _, action, _, _ in messages] == [
        A.DSC_STATUS_SUMMARY_EVENT,
        A.SUBSCRIPTION_END,
    ], only.log
    with sink.lock:
        bodies = [body for _, body in sink.received]
    assert b"<dsc:RepositoryState>Stopped</dsc:RepositoryState>" in bodies[0]
    assert b"SourceShuttingDown" in bodies[1]


def test_the_last_instance_announces_stopped_under_a_fresh_term_not_the_one_it_held(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess], sink: Subscriber
) -> None:
    """The term the last instance holds may be stale when it stops: another instance took one
    while this one's lock lapsed unnoticed (a stalled process), then went away; nothing this
    instance announced since was refused, so it never took a new one.  Its Stopped under the
    stale term would be refused by the row's compare-and-set, and nobody is left to announce
    it: the last stop takes a fresh term for it (runtime/service.py ``shutdown``).  The other
    instance's takeover is the row's term moved on, as its take_lead moves it."""
    dsn = pg.new_database()
    only = start(instances, tmp_path, cluster_config(tmp_path, dsn))
    wait_for(lambda: "announcing the repository state (term 1)" in only.log, what="term 1")
    subscribe(Soap(only.url), sink.url, end_to=sink.url)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE repository_announced SET term = term + 1, leader = 'gone'")
    only.stop_cleanly()
    messages = sink.messages()
    assert [action for _, action, _, _ in messages] == [
        A.DSC_STATUS_SUMMARY_EVENT,
        A.SUBSCRIPTION_END,
    ], only.log
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT state, term FROM repository_announced").fetchone()
    assert row == ("Stopped", 3), only.log


def a_holder_without_a_term(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> tuple[ServerProcess, Path, str]:
    """An instance that holds the leader's lock and cannot take a term: the database fails the
    statement (its table renamed away, as in test_outbox_sql.py; rename it back to end it).
    The holder, its configuration and the database's DSN."""
    dsn = pg.new_database()
    config = cluster_config(tmp_path, dsn)
    first = start(instances, tmp_path, config)  # the schema, and a term, then a clean stop
    wait_for(lambda: "announcing the repository state (term 1)" in first.log, what="term 1")
    first.stop_cleanly()
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("ALTER TABLE repository_announced RENAME TO repository_announced_away")
    holder = start(instances, tmp_path, config)
    assert "cannot take the lead for announcements" in holder.log, holder.log
    return holder, config, dsn


def test_a_lock_holder_that_cannot_take_a_term_is_shown_so_not_as_the_leader(
    tmp_path: Path, pg: PgCluster, instances: list[ServerProcess]
) -> None:
    """Holding the leader's lock is not leading: the holder leads once it took a term
    (runtime/announcing.py), and follows (neither sweeps nor announces) while the database
    refuses the statement that takes one (its table renamed away here, as in
    test_outbox_sql.py).  ``dsc cluster status`` (table and --json), /metrics, /status.json and
    GET /api/cluster say so then (dsc_cluster_leader 0, dsc_cluster_leader_lock 1), not
    "leader"; once a term is taken, at the next tick, they all show the leader."""
    holder, config, dsn = a_holder_without_a_term(tmp_path, pg, instances)

    def shown() -> tuple[dict[str, Any], dict[str, float], dict[str, Any], dict[str, Any]]:
        row = by_pid(config)[holder.pid]
        metrics = metric_values(read(holder, "/metrics")[1])
        code, api = read(holder, "/api/cluster")
        assert code == 200, api
        code, page = read(holder, "/status.json")
        assert code == 200, page
        return row, metrics, json.loads(api), json.loads(page)["cluster"]

    row, metrics, api, page = shown()
    stuck = f"{LOCK_WITHOUT_TERM}: {NO_TERM}"
    assert (row["leader"], row["leader_lock"], row["leadership"]) == (False, True, stuck), row
    assert row["fails_to_lead"] is True, row  # the rule the console's failure colour shows
    assert (metrics["dsc_cluster_leader"], metrics["dsc_cluster_leader_lock"]) == (0, 1), metrics
    assert metrics["dsc_cluster_term_failing"] == 1, metrics  # the one to alert on
    for view in (api, page):
        assert (view["leader"], view["leader_lock"], view["leadership"]) == (
            False,
            True,
            stuck,
        ), view
        assert view["fails_to_lead"] is True, view
        [own] = [r for r in view["instances"] if r["pid"] == holder.pid]
        assert (own["leader"], own["leadership"], own["fails_to_lead"]) == (False, stuck, True)
    table = dsc("cluster", "status", "--config", str(config), "--wide")
    assert table.code == 0, table
    [line] = [line for line in table.out.splitlines() if f" {holder.pid} " in line]
    assert f" ago up {LOCK_WITHOUT_TERM} 0 " in " ".join(line.split()), table.out
    assert "instance(s) up; leader: none" in table.out, table.out
    assert f"{row['name']} holds the leader's lock but does not lead:" in table.out, table.out

    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("ALTER TABLE repository_announced_away RENAME TO repository_announced")
    wait_for(
        lambda: (lambda v: v[0]["leader"] and v[1]["dsc_cluster_leader"] == 1 and v[2]["leader"])(
            shown()
        ),
        what="the holder to take a term and be shown the leader",
    )
    row, metrics, api, page = shown()
    assert (row["leadership"], api["leadership"], page["leadership"]) == (LEADER,) * 3
    assert (row["fails_to_lead"], api["fails_to_lead"], page["fails_to_lead"]) == (False,) * 3
    assert (metrics["dsc_cluster_leader"], metrics["dsc_cluster_leader_lock"]) == (1, 1), metrics
    assert metrics["dsc_cluster_term_failing"] == 0, metrics
    table = dsc("cluster", "status", "--config", str(config))
    assert f"leader: {row['name']}" in table.out and "does not lead" not in table.out, table.out
    holder.stop_cleanly()
