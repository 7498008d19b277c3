"""The ``instances`` table of the PostgreSQL store (issue 18 point 4, 6): one row per incarnation
of a server on this database, and the advisory lock whose holder is the cluster's leader.

A row is written by its own instance only (runtime/cluster.py): created at start with a new
UUID (never reused: a restarted server is a new incarnation, cluster-design.md lesson 2),
renewed by each heartbeat with the database's clock (``now()``: the hosts' clocks never
decide), marked ``stopped`` at a clean stop.  An instance is *down* once its heartbeat is older
than its own ``lease_seconds``, or at once when a new run starts from its home (host and data
folder, a worker's own folder): the new run holds the folder's lock, so the earlier one is dead,
and it marks every earlier incarnation of its home ``replaced_by`` itself (:data:`REPLACE_EARLIER`,
beside the take-back of their jobs, store/leases.py) — the one row another instance writes.
Without that, a killed instance would show up for ``lease_seconds`` after its restart, and a
clean stop of the last live instance would count it and send no SubscriptionEnd (R7).  The
leader prunes rows dead for ``prune_after_seconds``.

The leader is whoever holds ``pg_try_advisory_lock(LEADER_LOCK)`` on a connection of its own:
PostgreSQL releases it with that connection, so a dead leader's lock goes by itself.  Who holds
it is read from ``pg_locks`` (the row's ``lock_backend`` is its lock connection's backend pid),
so ``dsc cluster status`` shows the truth, not what an instance last wrote.

Holding the lock is not yet leading: the holder leads once it took a term for its
announcements (runtime/announcing.py), and follows while it cannot take one (the database
refuses the statement).  Only the instance knows which, so it writes it in ``leads``, at each
heartbeat and within a tick of a change (runtime/cluster.py ``ClusterMember.publish_leading``):
a row is shown :data:`LEADER` while its instance holds the lock and says it leads.  A holder
that does not lead has either just taken the lock (at start, or from a leader gone; its term
comes at its next tick, within a second: nothing failed) or failed to take a term; it writes
which in ``term_failing``, and is shown :data:`TAKING_THE_LEAD` or :data:`LOCK_WITHOUT_TERM`
and why, so that a normal start or takeover never looks like a failure.  A server of an
earlier version (schema 17 or before) does not write ``term_failing`` (NULL): its holder
without a term is shown :data:`LOCK_WITHOUT_TERM`, as that version shows itself, so that a
failure of it is never hidden during a rolling upgrade.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the PostgreSQL client is an extra: imported only where it is chosen
    import psycopg

__all__ = [
    "GONE",
    "HOLDS_LEADER_LOCK",
    "INSTANCE_STATES",
    "LEADER",
    "LEADER_LOCK",
    "LOCK_WITHOUT_TERM",
    "NO_TERM",
    "REPLACE_EARLIER",
    "TAKING_THE_LEAD",
    "ClusterSettings",
    "InstanceRow",
    "Leadership",
    "OutboxLag",
    "list_instances",
    "outbox_lag",
]

#: The advisory lock of the leader (any number that no other lock of dsc uses: "dscl").
LEADER_LOCK = 0x6473636C

#: How the console, the status page and the web console show the instance that leads, and one
#: that holds the leader's lock without leading (module doc): the one wording of each.
LEADER = "leader"
LOCK_WITHOUT_TERM = "lock held, not leading"
#: Why, after :data:`LOCK_WITHOUT_TERM` where there is room (JSON; the console says it below
#: its table).
NO_TERM = "cannot take a term (see its log)"
#: A holder of the lock that has not tried to take its term yet, or whose last try worked
#: (module doc): the normal moment between the lock and the lead, no failure.
TAKING_THE_LEAD = "taking the lead"

InstanceState = Literal["up", "down", "stopped"]
#: Every state, in the order of /metrics and the console.
INSTANCE_STATES: tuple[InstanceState, ...] = ("up", "down", "stopped")


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """``[cluster]``: how this instance shows itself to the others (PostgreSQL store only)."""

    #: The name in ``dsc cluster status``; None: host name and port.
    instance_name: str | None = None
    heartbeat_seconds: float = 5.0
    #: An instance without a heartbeat this long is down (and /healthz answers 503).
    lease_seconds: float = 30.0
    #: Rows of instances stopped or down this long are deleted by the leader.
    prune_after_seconds: float = 86_400.0


@dataclass(frozen=True, slots=True)
class OutboxLag:
    """Notifications written and not yet answered by their subscriber (issue 18 point 6): how
    many rows wait in ``outbox``, and the age of the oldest (None: none waits), in database
    time.  A row leaves the outbox once its subscriber answered (store/pgoutbox.py), so a
    subscriber that is down keeps its rows here, and the age grows."""

    rows: int = 0
    oldest_seconds: float | None = None

    def aged(self, seconds: float) -> OutboxLag:
        """The same rows ``seconds`` later (a snapshot read again without I/O)."""
        if self.oldest_seconds is None:
            return self
        return OutboxLag(self.rows, self.oldest_seconds + seconds)

    def as_json(self) -> dict[str, object]:
        oldest = self.oldest_seconds
        return {"rows": self.rows, "oldest_seconds": None if oldest is None else round(oldest, 1)}


@dataclass(frozen=True, slots=True)
class Leadership:
    """How an instance stands as to the lead at one moment, and the one rule of how that
    reads (module doc): every view (``dsc cluster status``, /api/cluster, /status.json, the
    web console, /metrics) derives what it shows from one of these, read once, so that no
    answer mixes two moments (say "leader" beside "term failing") and no view rules again."""

    #: It leads: holds the lock and took a term.
    leads: bool
    #: It holds the leader's lock, leading or not.
    holds_lock: bool
    #: Its last attempt to take a term failed; None: an instance of an earlier version, which
    #: does not say.
    term_failing: bool | None

    @property
    def fails_to_lead(self) -> bool:
        """It holds the lock and does not lead because taking a term failed, or may have (an
        earlier version's holder, which does not say, is read as it shows itself: a rolling
        upgrade hides no failure).  Nobody sweeps nor announces meanwhile: the failure colour,
        ``dsc_cluster_term_failing`` and the line under ``dsc cluster status``'s table.  Not
        while it holds no lock: a flag left from a term refused before the lock was lost says
        nothing of leading."""
        return self.holds_lock and not self.leads and self.term_failing is not False

    @property
    def label(self) -> str:
        """What it is shown as, in a word or three (a table's column)."""
        if self.leads:
            return LEADER
        if not self.holds_lock:
            return ""
        return LOCK_WITHOUT_TERM if self.fails_to_lead else TAKING_THE_LEAD

    @property
    def shown(self) -> str:
        """:attr:`label`, with why where it failed."""
        return f"{LOCK_WITHOUT_TERM}: {NO_TERM}" if self.fails_to_lead else self.label


@dataclass(frozen=True, slots=True)
class InstanceRow:
    """One incarnation as ``dsc cluster status``, the status page and /metrics show it."""

    id: str
    name: str
    address: str
    host: str
    pid: int
    started: datetime
    #: Seconds since the last heartbeat, by the database's clock.
    heartbeat_age: float
    stopped: datetime | None
    state: InstanceState
    #: It leads: holds the leader's lock and took a term (module doc).
    leader: bool
    #: Jobs whose filters it runs now: its job leases not yet run out (store/leases.py).
    leases_held: int = 0
    #: The outbox rows of the subscriptions it is the delivery owner of (store/pgoutbox.py).
    outbox_lag: OutboxLag = OutboxLag()
    #: The incarnation started since from its home, which marked it down (module doc).
    replaced_by: str | None = None
    #: It holds the leader's lock (as ``pg_locks`` says now), leading or not.
    leader_lock: bool = False
    #: Its last attempt to take a term failed (module doc): it says so in its log.  None: an
    #: instance of an earlier version, which does not say.
    term_failing: bool | None = False

    @property
    def standing(self) -> Leadership:
        """How its leadership reads, from this row alone (one moment: module doc)."""
        return Leadership(
            leads=self.leader, holds_lock=self.leader_lock, term_failing=self.term_failing
        )

    @property
    def leadership(self) -> str:
        """:attr:`Leadership.shown`: :data:`LEADER`, :data:`TAKING_THE_LEAD`,
        :data:`LOCK_WITHOUT_TERM` and why, or empty."""
        return self.standing.shown

    @property
    def leadership_label(self) -> str:
        """:attr:`Leadership.label`: :attr:`leadership` without the reason (a table's
        column)."""
        return self.standing.label

    @property
    def fails_to_lead(self) -> bool:
        """:attr:`Leadership.fails_to_lead`."""
        return self.standing.fails_to_lead

    def as_json(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        standing = self.standing
        data["leadership"] = standing.shown
        data["fails_to_lead"] = standing.fails_to_lead
        data["started"] = self.started.isoformat()
        data["stopped"] = None if self.stopped is None else self.stopped.isoformat()
        data["heartbeat_age"] = round(self.heartbeat_age, 1)
        data["outbox_lag"] = self.outbox_lag.as_json()
        return data


INSERT = """
    INSERT INTO instances (id, name, address, host, pid, lease_seconds, home, lock_backend)
    VALUES (%s, %s, %s, %s, %s, %s, %s, pg_backend_pid())
"""

#: Every earlier incarnation of this home still counted alive is down (module doc): the id and
#: name of each.  One stopped cleanly stays ``stopped``.
REPLACE_EARLIER = """
    UPDATE instances SET replaced_by = %(me)s
    WHERE home = %(home)s AND id <> %(me)s AND stopped IS NULL AND replaced_by IS NULL
    RETURNING id::text, name
"""

#: The one rule of an instance known gone, on a row aliased ``i`` (stopped, replaced by a new
#: run from its home, or no heartbeat within its lease); its uploads rows block nothing
#: (store/postgresql.py) and it is not counted alive.
GONE = """(i.stopped IS NOT NULL OR i.replaced_by IS NOT NULL
           OR i.heartbeat < now() - make_interval(secs => i.lease_seconds))"""

HEARTBEAT = """
    UPDATE instances SET heartbeat = now(), name = %s, address = %s, leads = %s,
        term_failing = %s
    WHERE id = %s
"""

#: Whether the instance leads, and whether its last try for a term failed, written within a
#: tick of a change (module doc).
LEADING = "UPDATE instances SET leads = %s, term_failing = %s WHERE id = %s"

STOPPED = "UPDATE instances SET stopped = now() WHERE id = %s"

# Only the leader prunes, so two instances never race on it (it would be harmless anyway).
PRUNE = """
    DELETE FROM instances
    WHERE COALESCE(stopped, heartbeat) < now() - make_interval(secs => %s)
"""

TRY_LEADER = "SELECT pg_try_advisory_lock(%s)"

#: The one rule of whether the instance of a row aliased ``i`` holds the leader's lock now, as
#: ``pg_locks`` says (module doc): the views (:func:`list_instances`) and the taking of a term
#: (store/postgresql.py ``_TAKE_LEAD``: only the holder takes one) ask it.  A stopped or
#: replaced row never holds it: its lock connection's backend pid may have been reused by
#: another connection.
HOLDS_LEADER_LOCK = f"""(i.stopped IS NULL AND i.replaced_by IS NULL AND EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.pid = i.lock_backend
      AND l.classid = 0 AND l.objid = {LEADER_LOCK} AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())))"""

#: The instances alive besides ``id`` (not gone: :data:`GONE`).
OTHERS_ALIVE = f"SELECT count(*) FROM instances i WHERE i.id <> %s AND NOT {GONE}"

#: ``state`` follows :data:`GONE`, read here rather than ruled again in Python.
_LIST = f"""
    SELECT i.id::text, i.name, i.address, i.host, i.pid, i.started,
           EXTRACT(EPOCH FROM now() - i.heartbeat)::float8, i.stopped, {GONE},
           {HOLDS_LEADER_LOCK},
           (SELECT count(*) FROM jobs j
            WHERE j.lease_owner = i.id::text AND j.lease_until > now()),
           o.rows, EXTRACT(EPOCH FROM now() - o.oldest)::float8, i.replaced_by::text,
           i.leads, i.term_failing
    FROM instances i
    LEFT JOIN LATERAL (
        SELECT count(*) AS rows, min(b.created) AS oldest
        FROM outbox b JOIN subscriptions s ON s.id = b.subscription_id
        WHERE s.delivery_owner = i.id::text
    ) o ON true
    ORDER BY i.started, i.name
"""

#: Every outbox row, owned or not yet (a subscription's rows wait for an owner to claim them).
_OUTBOX = "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created))::float8 FROM outbox"


def list_instances(conn: psycopg.Connection[Any]) -> list[InstanceRow]:
    """Every instance row, oldest first.  One that holds the lock (:data:`HOLDS_LEADER_LOCK`)
    leads unless it says it does not (module doc; an earlier version's row says nothing)."""
    rows = []
    for (
        ident,
        name,
        address,
        host,
        pid,
        started,
        age,
        stopped,
        gone,
        locked,
        leases,
        waiting,
        oldest,
        replaced_by,
        leading,
        term_failing,
    ) in conn.execute(_LIST).fetchall():
        state: InstanceState
        if stopped is not None:
            state = "stopped"
        elif gone:
            state = "down"
        else:
            state = "up"
        holds_lock = bool(locked)
        rows.append(
            InstanceRow(
                id=str(ident),
                name=str(name),
                address=str(address),
                host=str(host),
                pid=int(pid),
                started=started,
                heartbeat_age=max(0.0, float(age)),
                stopped=stopped,
                state=state,
                leader=holds_lock and leading is not False,
                leases_held=int(leases),
                outbox_lag=_lag(waiting, oldest),
                replaced_by=None if replaced_by is None else str(replaced_by),
                leader_lock=holds_lock,
                term_failing=None if term_failing is None else bool(term_failing),
            )
        )
    return rows


def outbox_lag(conn: psycopg.Connection[Any]) -> OutboxLag:
    """The whole outbox: rows waiting on every instance, and for an owner yet."""
    row = conn.execute(_OUTBOX).fetchone()
    return OutboxLag() if row is None else _lag(row[0], row[1])


def _lag(rows: int | None, oldest: float | None) -> OutboxLag:
    count = int(rows or 0)
    if not count or oldest is None:
        return OutboxLag(count, None)
    return OutboxLag(count, max(0.0, float(oldest)))
