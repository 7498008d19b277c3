"""Job leases on the PostgreSQL store (issue 18 point 2, cluster-design.md lesson 2 and 3.3):
a job's filters run on exactly one instance, the holder of its lease.

A lease is three columns of the job's row: ``lease_owner`` (the holder's incarnation id,
``instances.id``: new at each start, so a restarted server never passes for its dead
predecessor), ``lease_epoch`` (+1 by every claim) and ``lease_until`` (database time: the hosts'
clocks never decide).  ``lease_home`` is the holder's host and data folder, so that a new run
from the same folder (it holds the folder's lock: the earlier run is dead) takes back the jobs
of the earlier one at once (:meth:`JobLeases.take_home`, R13 as on SQLite) instead of waiting
for their leases to expire and the sweep to rescue them a few per heartbeat.

- **Claim** (:meth:`JobLeases.claim`): one conditional UPDATE, so two instances never both
  hold a job: it succeeds only while nobody holds a live lease on the active job.
- **Pass on** (:meth:`JobLeases.pass_on`): an instance with no free engine place lets go of
  the job its write just made Pending (the lease that write took for its claim), so the job
  waits for the first instance with a free place, not for this one's queue.  A job of an
  engine state left with no lease rings ``NOTIFY dsc_jobs`` with ``<token>:claimable``
  (a trigger, postgresql.py schema 12): the idle instances take it at once
  (runtime/leasing.py).
- **Fencing**: every write of the job caused by the holder's engine carries ``lease_owner``
  and ``lease_epoch`` (``VersionedWrite.lease``; postgresql.py's compare-and-set UPDATE checks
  them), and so does every delivery record (filter_deliveries); a refused write means the
  lease was lost.
- **Renew** (:meth:`JobLeases.renew`): one UPDATE for every job this instance runs, at each
  heartbeat; it also tells which of them ended elsewhere (a CancelPostScanJob answered by
  another instance) and which are no longer this instance's (rescued).
- **Rescue** (:meth:`JobLeases.rescue`): active jobs in Pending, Started or Processing whose
  lease expired (or that nobody holds: passed on, handed back, never claimed) are claimed by
  the sweeping instance, oldest first, ``FOR UPDATE SKIP LOCKED``, so that each is taken by
  one instance only.  The runtime then applies R13 to each (``ScanServer.resume``).  Never a
  job whose record the sweeping instance cannot decode (a newer server's, during a rolling
  upgrade: store/undecodable.py): it could not run it, and took it only to keep its lease
  until it ran out, a lease period's delay each time.  Left to the instances that can; a
  record none can decode (corrupt) waits, unclaimed, for an operator (``dsc db quarantine``,
  and the WARNING of each instance that read it).

Lease columns are not part of the record: writing them bumps neither ``version`` nor ``xid``,
so renewals are not changes the other instances read.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the PostgreSQL client is an extra: imported where it is chosen
    from dsc_bindings.store.postgresql import PgDatabase

__all__ = ["JobLeases", "Renewal", "Rescued"]

#: The states in which a job belongs to an engine (R6: Pending until the engine starts it).
_ENGINE_STATES = "('Pending', 'Started', 'Processing')"

_CLAIM = f"""
    UPDATE jobs SET lease_owner = %(me)s, lease_home = %(home)s, lease_epoch = lease_epoch + 1,
        lease_until = now() + make_interval(secs => %(lease)s)
    WHERE token = %(token)s AND active AND state IN {_ENGINE_STATES}
      AND (lease_until IS NULL OR lease_until < now() OR lease_owner = %(me)s)
    RETURNING lease_epoch
"""

#: The jobs this instance holds (by token and epoch) get ``lease`` more seconds; the answer
#: says, for each of them still held, whether it is still active (not canceled elsewhere).
_RENEW = """
    UPDATE jobs j SET lease_until = now() + make_interval(secs => %(lease)s)
    FROM unnest(%(tokens)s::text[], %(epochs)s::bigint[]) AS held(token, epoch)
    WHERE j.token = held.token AND j.lease_owner = %(me)s AND j.lease_epoch = held.epoch
    RETURNING j.token, j.active
"""

_RESCUE = f"""
    WITH expired AS (
        SELECT token, lease_owner, lease_until IS NULL AS free FROM jobs
        WHERE active AND state IN {_ENGINE_STATES}
          AND (lease_until IS NULL OR lease_until < now())
          AND NOT token = ANY(%(undecodable)s::text[])
        ORDER BY seq
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs j SET lease_owner = %(me)s, lease_home = %(home)s,
        lease_epoch = j.lease_epoch + 1,
        lease_until = now() + make_interval(secs => %(lease)s)
    FROM expired
    WHERE j.token = expired.token
    RETURNING j.token, expired.lease_owner, j.lease_epoch, expired.free
"""

#: No free engine place here: the lease the write that made the job Pending took for this
#: instance's claim ends now, unclaimed (the epoch stays: nobody ran it), so the trigger of
#: schema 12 rings ``<token>:claimable`` and the first instance with a free place takes it.
_PASS_ON = f"""
    UPDATE jobs SET lease_until = NULL
    WHERE token = %(token)s AND active AND state IN {_ENGINE_STATES}
      AND lease_owner = %(me)s AND lease_until IS NOT NULL
    RETURNING token
"""

_RELEASE = """
    UPDATE jobs SET lease_until = NULL
    WHERE token = %(token)s AND lease_owner = %(me)s AND lease_epoch = %(epoch)s
"""

#: A new run from the same folder takes back, with a new epoch, every job the folder's earlier
#: run held: that run is dead (this one holds the folder's lock), so nothing else runs them.
#: Not the jobs it had let go (``lease_until`` NULL: passed on for want of an engine place,
#: handed back): those wait for any instance's free place, this run's sweep included.
#: ``FOR UPDATE`` without SKIP LOCKED: a job another instance's sweep is taking at this very
#: moment is waited for, then seen with its new ``lease_home`` and left to it.
_TAKE_HOME = f"""
    WITH earlier AS (
        SELECT token, lease_owner FROM jobs
        WHERE lease_home = %(home)s AND lease_owner IS DISTINCT FROM %(me)s
          AND lease_until IS NOT NULL AND active AND state IN {_ENGINE_STATES}
        ORDER BY seq
        FOR UPDATE
    )
    UPDATE jobs j SET lease_owner = %(me)s, lease_epoch = j.lease_epoch + 1,
        lease_until = now() + make_interval(secs => %(lease)s)
    FROM earlier
    WHERE j.token = earlier.token
    RETURNING j.token, earlier.lease_owner, j.lease_epoch, false
"""


@dataclass(frozen=True, slots=True)
class Renewal:
    """What one renewal learned about the jobs this instance runs."""

    #: Still held and active.
    held: frozenset[str]
    #: Still held, but the job ended on another instance (a cancel): stop its filters.
    ended: frozenset[str]
    #: No longer this instance's (rescued after this lease expired): stop its filters.
    lost: frozenset[str]


@dataclass(frozen=True, slots=True)
class Rescued:
    """A job taken over by :meth:`JobLeases.rescue`."""

    token: str
    #: The instance whose lease expired (None: nobody had claimed it).
    previous: str | None
    epoch: int
    #: Nobody held it (passed on for want of an engine place, handed back by a clean stop):
    #: ``previous`` let it go, its lease did not expire.
    free: bool = False


class JobLeases:
    """Claims, renewals, rescues and releases of one instance (module doc).  Thread-safe (the
    pool is); raises StoreError like every statement of the store."""

    def __init__(self, db: PgDatabase, owner: str, home: str, lease_seconds: float) -> None:
        self._db = db
        #: This incarnation (``instances.id``).
        self.owner = owner
        self.home = home
        self.lease_seconds = lease_seconds

    def _params(self, **more: object) -> dict[str, object]:
        return {"me": self.owner, "home": self.home, "lease": self.lease_seconds, **more}

    def claim(self, token: str) -> int | None:
        """The lease of ``token`` for this instance: its epoch, or None when another instance
        holds a live lease (or the job is not waiting for an engine any more)."""
        found = self._db.run(f"claiming job {token}", _CLAIM, self._params(token=token))
        return int(found[0][0]) if found else None

    def renew(self, held: dict[str, int]) -> Renewal:
        """Extend the leases of ``held`` (token -> epoch), in one statement."""
        if not held:
            return Renewal(frozenset(), frozenset(), frozenset())
        tokens = sorted(held)
        found = self._db.run(
            "renewing the job leases",
            _RENEW,
            self._params(tokens=tokens, epochs=[held[t] for t in tokens]),
        )
        active = {str(token): bool(is_active) for token, is_active in found}
        return Renewal(
            frozenset(t for t, a in active.items() if a),
            frozenset(t for t, a in active.items() if not a),
            frozenset(held) - frozenset(active),
        )

    def rescue(self, limit: int, undecodable: Collection[str] = ()) -> list[Rescued]:
        """Claim up to ``limit`` jobs whose lease expired (or was never taken), none of
        ``undecodable``: the jobs whose records this instance cannot decode (module doc)."""
        if limit <= 0:
            return []
        found = self._db.run(
            "rescuing jobs",
            _RESCUE,
            self._params(limit=limit, undecodable=sorted(undecodable)),
        )
        return _rescued(found)

    def pass_on(self, token: str) -> bool:
        """This instance will not run ``token`` now (no free engine place): its lease ends
        unclaimed, for any instance to take (module doc).  Whether it held one."""
        found = self._db.run(f"passing job {token} on", _PASS_ON, self._params(token=token))
        return bool(found)

    def release(self, token: str, epoch: int) -> None:
        """The engine finished ``token``: its lease ends now (a retry may be claimed at once)."""
        self._db.run(f"releasing job {token}", _RELEASE, self._params(token=token, epoch=epoch))

    def take_home(self) -> list[Rescued]:
        """At start: every job the earlier run from this folder held, claimed for this run
        with a new epoch (module doc), whatever the engine's free places: R13 resumes them
        all at once, as on SQLite.  Oldest first."""
        found = self._db.run("taking back the jobs of an earlier run", _TAKE_HOME, self._params())
        return _rescued(found)


def _rescued(found: list[tuple[Any, ...]]) -> list[Rescued]:
    """Rows of token, previous owner, epoch and whether nobody held it."""
    return [
        Rescued(str(token), None if previous is None else str(previous), int(epoch), bool(free))
        for token, previous, epoch, free in found
    ]
