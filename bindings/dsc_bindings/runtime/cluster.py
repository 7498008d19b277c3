"""This server as one instance of a cluster on a PostgreSQL store (issue 18 points 4 and 6).

A :class:`ClusterMember` keeps one connection of its own (not the store's pool) and, in its own
thread (never the event loop):

- writes this incarnation's row in ``instances`` at start (a new UUID each start) and renews
  its heartbeat every ``[cluster] heartbeat_seconds`` with the database's clock;
- at start, marks every earlier incarnation of its home (host and data folder) down, replaced
  by this one: this run holds the folder's lock, so they are dead (store/instances.py), and
  ``dsc cluster status`` and a clean stop's count of the others (R7) see no ghost of them;
- tries ``pg_try_advisory_lock`` at each heartbeat: the holder is the **leader**, and keeps
  the lock while its connection lives, so a dead leader's lock is released by PostgreSQL
  and the next heartbeat of another instance takes it (failover within a heartbeat of the
  connection's end).  The holder *leads* (sweeps, announces) once its core took a term
  (runtime/announcing.py): :attr:`ClusterMember.leads` asks the core (``core_leads``), and
  the row says it (``leads``, written at each heartbeat and by :meth:`publish_leading`
  within a tick of a change), so that no view shows a holder that cannot take a term as the
  leader; nor one that has just taken the lock as failing: the row says whether its last try
  for a term failed (``term_failing``, store/instances.py);
- as holder of the lock, prunes the rows of incarnations dead for ``prune_after_seconds``;
- keeps a snapshot of every instance, with the job leases it holds and the outbox rows of the
  subscriptions it delivers, and of the whole outbox (status page, /metrics: read there
  without I/O).

A heartbeat that fails drops leadership at once (the lock may be gone with the connection;
two leaders are worse than none for a few seconds), logs it, and reconnects at the next beat;
so does a term refused because the lock is gone (:meth:`ClusterMember.lock_lost`).
After ``lease_seconds`` without a heartbeat the instance says so in /healthz (503: the other
instances consider it down, so the load balancer must drop it too).

What the leader alone does is decided by the runtime (runtime/service.py ``_tick_loop``): R6
job timeouts, the spool retention sweep, ending expired subscriptions, and announcing the
repository state (runtime/announcing.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from dsc_bindings.store.errors import StoreError, as_store_error, one_line
from dsc_bindings.store.instances import (
    HEARTBEAT,
    INSERT,
    LEADER_LOCK,
    LEADING,
    OTHERS_ALIVE,
    PRUNE,
    REPLACE_EARLIER,
    STOPPED,
    TRY_LEADER,
    ClusterSettings,
    InstanceRow,
    Leadership,
    OutboxLag,
    list_instances,
    outbox_lag,
)
from dsc_bindings.store.postgresql import connection_kwargs, is_temporary_pg, redacted

__all__ = ["ClusterMember"]

log = logging.getLogger("dsc.cluster")


class ClusterMember:
    """This incarnation's row, heartbeat and leadership (module doc).  Thread-safe."""

    def __init__(
        self,
        dsn: str,
        settings: ClusterSettings,
        *,
        address: Callable[[], str],
        password_file: Path | None = None,
        suffix: str = "",
        home: str | None = None,
    ) -> None:
        self.settings = settings
        #: Host and data folder (SplitStore.home), held locked by this run; None: unknown.
        self.home = home
        #: This incarnation: new at each start, never reused (cluster-design.md lesson 2).
        self.id = str(uuid.uuid4())
        self._suffix = suffix
        self._dsn = dsn
        self._password_file = password_file
        self._address = address
        self._conn: psycopg.Connection[Any] | None = None
        #: The connection is used by the heartbeat thread and by shutdown's last questions.
        self._lock = threading.Lock()
        #: Holds the leader's lock as of the last heartbeat.
        self._leader = False
        #: Whether this instance's core leads (``ScanServer.leads``), told by the runtime
        #: (runtime/service.py); None: no core to ask (the lock alone says).
        self.core_leads: Callable[[], bool] | None = None
        #: Whether this instance's last try for a term failed (``LeaderTerm.failing``), told
        #: by the runtime; what the views show of a holder that does not lead (module doc).
        self.term_failing: Callable[[], bool] = lambda: False
        #: What the row says of :attr:`leads` and :attr:`term_failing` (None: nothing yet).
        self._published: tuple[bool, bool | None] | None = None
        self._last_beat = time.monotonic()
        self._failing: str | None = None
        #: Every instance as last read, and when (monotonic: their ages grow from there); one
        #: reference swapped by the heartbeat thread, read whole by the web endpoints.
        self._seen: tuple[tuple[InstanceRow, ...], OutboxLag, float] = (
            (),
            OutboxLag(),
            time.monotonic(),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsc-cluster", daemon=True)
        #: Called in the heartbeat thread after each beat (True: it worked), outside the
        #: connection's lock: the job leases are renewed and rescued there (runtime/leasing.py).
        self.after_beat: Callable[[bool], None] | None = None

    @property
    def name(self) -> str:
        """``[cluster] instance_name``, else host name and the advertised port (a worker of
        ``dsc serve --workers`` adds its number)."""
        if self.settings.instance_name:
            return self.settings.instance_name + self._suffix
        port = urlsplit(self._address()).port
        return f"{socket.gethostname()}:{port}{self._suffix}"

    # --- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Write this incarnation's row and try for the lead; then beat in a thread.
        StoreError when the database cannot be reached now (the server does not start)."""
        with self._lock:
            try:
                self._connect()
                self._beat()
            except psycopg.Error as exc:
                self._close_connection()
                raise as_store_error(
                    f"joining the cluster at {redacted(self._dsn)}", exc, is_temporary_pg(exc)
                ) from exc
        log.info(
            "cluster: instance %s (%s) joined, %d instance(s) up, %s",
            self.name,
            self.id,
            sum(1 for i in self.instances if i.state == "up"),
            "holds the leader's lock" if self._leader else "not the leader",
        )
        self._thread.start()

    def stop(self) -> None:
        """Mark this incarnation stopped and close the connection (the lock goes with it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute(STOPPED, (self.id,))
                except psycopg.Error as exc:
                    log.warning(
                        "cluster: could not mark %s stopped: %s", self.name, one_line(str(exc))
                    )
            self._close_connection()
            if self._leader:
                log.info("cluster: %s leaves the lead", self.name)
            self._leader = False

    # --- what the runtime asks ------------------------------------------------------------------

    @property
    def holds_lock(self) -> bool:
        """Whether this instance holds the leader's lock as of its last heartbeat (it should
        lead: runtime/service.py takes a term then)."""
        return self._leader

    @property
    def leads(self) -> bool:
        """Whether this instance leads: it holds the lock and its core leads (it took a term;
        module doc).  What /metrics, the status page and the web console show as the leader."""
        return self.standing().leads

    def standing(self) -> Leadership:
        """How this instance stands as to the lead now: the lock, the core and the term's flag
        each read once (the heartbeat thread and the ticker change them meanwhile), so that
        everything one view shows is of one moment (store/instances.py ``Leadership``)."""
        holds_lock = self._leader
        core_leads = self.core_leads
        leads = holds_lock and (core_leads is None or core_leads())
        return Leadership(leads=leads, holds_lock=holds_lock, term_failing=self.term_failing())

    def lock_lost(self) -> None:
        """The statement that takes a term found that this instance no longer holds the lock
        (runtime/announcing.py): it is not shown holding it from now on, and the next
        heartbeat tries the lock again (if its connection lives and the lock is free it is
        this instance's again; a connection that died fails the beat, which reconnects).
        Not under the connection's lock: a heartbeat in progress may hold it for a statement's
        time; one that took the lock just before this call takes it again at the next beat
        (the lock is re-entrant on its connection)."""
        self._leader = False

    def publish_leading(self) -> None:
        """Write :attr:`leads` and :attr:`term_failing` in this instance's row if they changed
        since they were last written (``dsc cluster status`` reads them there): the runtime
        calls this at each tick, so the row follows a change within a tick, not at the next
        heartbeat.  A failure is left to the heartbeat, which writes them too and says what is
        wrong."""
        standing = self.standing()
        leading = (standing.leads, standing.term_failing)
        if leading == self._published:
            return
        with self._lock:
            if self._conn is None:
                return
            try:
                self._conn.execute(LEADING, (*leading, self.id))
            except psycopg.Error as exc:
                log.warning(
                    "cluster: cannot write whether %s leads: %s", self.name, one_line(str(exc))
                )
                return
            self._published = leading

    @property
    def instances(self) -> tuple[InstanceRow, ...]:
        """Every instance as of the last heartbeat (no I/O)."""
        return self._seen[0]

    @property
    def heartbeat_age(self) -> float:
        """Seconds since this instance's last successful heartbeat (no I/O)."""
        return max(0.0, time.monotonic() - self._last_beat)

    def snapshot(self) -> tuple[InstanceRow, ...]:
        """Every instance as of the last heartbeat, their heartbeat ages grown by the time
        since it (no I/O: the status page, the console and /metrics read this)."""
        rows, _, at = self._seen
        since = max(0.0, time.monotonic() - at)
        return tuple(
            dataclasses.replace(
                r, heartbeat_age=r.heartbeat_age + since, outbox_lag=r.outbox_lag.aged(since)
            )
            for r in rows
        )

    def outbox(self) -> OutboxLag:
        """The whole outbox as of the last heartbeat, its oldest row aged since (no I/O)."""
        _, lag, at = self._seen
        return lag.aged(max(0.0, time.monotonic() - at))

    def as_json(self) -> dict[str, object]:
        """This instance and every other, for /status.json and ``GET /api/cluster``: its
        leadership from one :meth:`standing` (one moment), ``fails_to_lead`` its one rule
        (the web console shows it, ruling nothing again)."""
        standing = self.standing()
        return {
            "instance": self.name,
            "id": self.id,
            "leader": standing.leads,
            "leader_lock": standing.holds_lock,
            "leadership": standing.shown,
            "term_failing": standing.term_failing,
            "fails_to_lead": standing.fails_to_lead,
            "heartbeat_age": round(self.heartbeat_age, 1),
            "lease_seconds": self.settings.lease_seconds,
            "problem": self.problem(),
            "outbox": self.outbox().as_json(),
            "instances": [row.as_json() for row in self.snapshot()],
        }

    def problem(self) -> str | None:
        """None while the heartbeat works; else why the others consider this instance down
        (/healthz answers 503 after ``lease_seconds`` without a heartbeat)."""
        silent = time.monotonic() - self._last_beat
        if silent < self.settings.lease_seconds:
            return None
        return (
            f"no heartbeat for {silent:.0f} s (lease {self.settings.lease_seconds:g} s): the "
            f"other instances consider {self.name} down: "
            f"{self._failing or 'the database does not answer'}"
        )

    def others_alive(self) -> bool | None:
        """Whether another instance is up (its heartbeat within its lease, not stopped); None
        when the database cannot say."""
        with self._lock:
            try:
                if self._conn is None:
                    self._connect()
                assert self._conn is not None
                row = self._conn.execute(OTHERS_ALIVE, (self.id,)).fetchone()
            except psycopg.Error as exc:
                log.warning("cluster: cannot see the other instances: %s", one_line(str(exc)))
                self._close_connection()
                return None
        return row is not None and int(row[0]) > 0

    # --- the heartbeat thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            ok = True
            with self._lock:
                try:
                    if self._conn is None:
                        self._connect()
                    self._beat()
                except (psycopg.Error, StoreError) as exc:
                    ok = False
                    self._failed(exc)
            hook = self.after_beat
            if hook is not None:
                try:
                    hook(ok)
                except Exception:  # a bug there must not stop the heartbeat
                    log.exception("cluster: the after-heartbeat work failed")

    def _connect(self) -> None:
        kwargs = connection_kwargs(self._password_file)
        kwargs["application_name"] = f"dsc cluster {self.name}"[:63]
        self._conn = psycopg.connect(self._dsn, **kwargs)
        row = self._conn.execute("SELECT 1 FROM instances WHERE id = %s", (self.id,)).fetchone()
        if row is None:
            self._conn.execute(
                INSERT,
                (
                    self.id,
                    self.name,
                    self._address(),
                    socket.gethostname(),
                    os.getpid(),
                    self.settings.lease_seconds,
                    self.home,
                ),
            )
            self._replace_earlier()
        else:  # a new connection: the leader's lock is tied to it (pg_locks)
            self._conn.execute(
                "UPDATE instances SET lock_backend = pg_backend_pid() WHERE id = %s", (self.id,)
            )

    def _replace_earlier(self) -> None:
        """Every earlier incarnation of this home is down now, not after its lease (module
        doc): the take-back of its jobs (runtime/leasing.py ``LeaseKeeper.start``) follows."""
        if self.home is None:
            return
        assert self._conn is not None
        for ident, name in self._conn.execute(
            REPLACE_EARLIER, {"me": self.id, "home": self.home}
        ).fetchall():
            log.info(
                "cluster: %s (%s), the earlier run from this data folder, is down: this run "
                "holds the folder's lock",
                name,
                ident,
            )

    def _beat(self) -> None:
        assert self._conn is not None
        if not self._leader:
            row = self._conn.execute(TRY_LEADER, (LEADER_LOCK,)).fetchone()
            if row is not None and row[0]:
                self._leader = True
                # It leads once the runtime took a term, at its next tick: "is now the
                # leader" is logged then, and a WARNING at each tick while it cannot take one
                # (runtime/announcing.py); meanwhile it is shown taking the lead.
                log.debug("cluster: %s (%s) took the leader's lock", self.name, self.id)
        # After the lock: the row says whether this instance leads as of now.
        standing = self.standing()
        leading = (standing.leads, standing.term_failing)
        self._conn.execute(HEARTBEAT, (self.name, self._address(), *leading, self.id))
        self._published = leading
        self._last_beat = time.monotonic()
        if self._failing is not None:
            log.info("cluster: heartbeat of %s restored", self.name)
            self._failing = None
        if self._leader:
            self._conn.execute(PRUNE, (self.settings.prune_after_seconds,))
        self._seen = (
            tuple(list_instances(self._conn)),
            outbox_lag(self._conn),
            time.monotonic(),
        )

    def _failed(self, exc: BaseException) -> None:
        why = one_line(str(exc)) or type(exc).__name__
        if self._failing is None:
            log.error(
                "cluster: heartbeat of %s failed: %s (retrying every %g s)",
                self.name,
                why,
                self.settings.heartbeat_seconds,
            )
        self._failing = why
        if self._leader:
            # The lock may have gone with the connection: another instance may lead by now.
            log.warning("cluster: %s is no longer the leader (heartbeat failed)", self.name)
            self._leader = False
        self._close_connection()

    def _close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None
