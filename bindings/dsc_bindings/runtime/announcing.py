"""The leader's term for announcing the repository state (issue 18 point 4, docs/architecture.md
"Several instances").

Of several instances on one PostgreSQL store only the leader (the holder of the advisory lock,
runtime/cluster.py) announces the repository state, derived from every instance's rows: its core
leads (``ScanServer.lead``), the others' follow (``ScanServer.follow``).  Which state subscribers
last heard is a row (``repository_announced``) naming the leader's *term*, a number bumped at
each takeover.  Each announcement is written compare-and-set on that row, in the transaction of
its events (store/postgresql.py ``_announce``): only while the row names this term and says the
state it replaces.  So:

- a leader that lost the lock (its heartbeat failed) and still has announcements queued is
  refused once another instance took a term: no repeat;
- a new leader starts from the row: the core announces the difference between the state the
  rows make and the one heard last, so what the old leader decided but never wrote is not
  skipped;
- an announcement that was not written (its transaction failed, or the row said another
  state) makes the leader take a new term at its next tick, which announces the difference
  again from the row;
- a term is taken only while this instance holds the lock, asked in the statement that takes
  it (store/postgresql.py ``_TAKE_LEAD``): a leader deposed without noticing yet (its lock
  connection died, another instance took the lock, its heartbeat has not run since) is
  refused and follows at once, and drops the lock it no longer holds (``lock_lost``) so that
  nothing shows it as the leader and its heartbeat tries the lock again; without that check it
  took a term over the new leader's, whose announcements were refused until it took yet
  another.  The last instance stopping takes its term for Stopped (R7) lock or not, but not
  over an instance up that holds the lock (one started since it counted the others): that
  one leads, and the stopping one follows, announcing no Stopped;
- an instance that holds the lock but cannot take a term (the database failed the statement,
  or another transaction holds the row of the term: the take does not wait for it in the
  ticker, store/postgresql.py ``_TERM_ROW_NOWAIT``) follows until a later tick takes one: its core neither sweeps nor announces meanwhile
  (``ScanServer.follow``).  Of the two consistent choices this is the safe one.  Leading
  without a term, its announcements would be dropped unwritten (no term to stamp) or, under
  the old term, refused by the compare-and-set, while its core counts them as heard: the
  change would reach subscribers only at the next takeover, if ever.  Its sweeps would be
  tolerated (job writes are compare-and-set on the row version, ending an expired
  subscription twice is ending it once), but they write to the database that just failed;
  following, they are only late: the tick that takes the term runs every deadline passed, and
  ``lead`` announces the difference from the row.  The failure is logged at each attempt, in
  one WARNING line that says what it means and what to do, and the views show it
  (:attr:`LeaderTerm.failing`, store/instances.py ``term_failing``).  A row of the term
  held by another transaction is no failure until it stays held :data:`TERM_ROW_BUSY_SECONDS`
  (store/errors.py ``TermRowBusy``): for a moment it is ordinary contention (another
  instance's take, a leader's announcement in flight, this leader's own writer while its
  ticker takes a new term after a refusal), which a WARNING and the failure colour would
  page an operator for; meanwhile the holder follows, is shown taking the lead, and tries
  again at each tick.  Before its first attempt
  (the lock was just taken: at start, or from a leader gone, its term comes at the next tick)
  nothing failed: the holder is shown taking the lead, and nothing is logged.

"is now the leader" is logged when a term is taken, not when the lock is (runtime/cluster.py):
until then the holder does not lead.

:class:`LeaderTerm` keeps this instance's term for the runtime (runtime/service.py): the ticker
asks :meth:`LeaderTerm.change` at each wake-up, off the core's owner (it may take a term in
SQL), and hands the answer to the owner with the tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dsc_bindings.store.errors import StoreError, TermRowBusy, one_line
from dsc_core import RepositoryState

__all__ = ["FOLLOW", "TERM_ROW_BUSY_SECONDS", "LeaderTerm", "NewTerm"]

log = logging.getLogger("dsc.cluster")


@dataclass(frozen=True, slots=True)
class NewTerm:
    """This instance leads from now on: the state subscribers last heard, and its term."""

    announced: RepositoryState
    term: int


#: This instance no longer leads: its core follows.
FOLLOW = "follow"

#: How long the row of the term may stay held by another transaction before a holder that
#: cannot take a term for it is failing (module doc): a leader's announcement or another
#: instance's take holds it for a statement's time, one left open (an operator's psql) for good.
TERM_ROW_BUSY_SECONDS = 3.0
#: What to do about a row of the term held past TERM_ROW_BUSY_SECONDS: the database answers,
#: a transaction left open (an operator's psql, a client stuck) holds the row.
_TERM_ROW_HELD = (
    f"another transaction has held the row of the term (table repository_announced) for over "
    f"{TERM_ROW_BUSY_SECONDS:g} s: end the transaction that holds it (pg_stat_activity, "
    f"pg_locks; an idle in transaction session)"
)


class LeaderTerm:
    """This instance's term, if it leads (module doc).  ``current`` is read and set by the
    core's owner; ``refused`` is called by the writer."""

    def __init__(
        self,
        me: str,
        take_lead: Callable[[str, bool], tuple[str, int] | None],
        *,
        name: Callable[[], str] | None = None,
        lock_lost: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._me = me
        #: How the log names this instance (``ClusterMember.name``; it follows the address).
        self._name = name
        self._take_lead = take_lead
        #: Told when a term was refused because this instance no longer holds the lock
        #: (``ClusterMember.lock_lost``).
        self._lock_lost = lock_lost
        #: Monotonic seconds: how long the row of the term has been busy (TERM_ROW_BUSY_SECONDS).
        self._clock = clock
        #: When a take first found the row of the term busy, of the attempts that found it
        #: so since (None: the last attempt did not).
        self._busy_since: float | None = None
        #: (this instance's id, its term) while its core leads; None while it follows.
        self.current: tuple[str, int] | None = None
        self._refused = threading.Event()
        #: The next term is the last instance's (:meth:`retake`), taken lock or not.
        self._last = False
        #: The last attempt to take a term failed (the database refused the statement): the
        #: views show the holder as failing, not taking the lead (module doc).  Written by
        #: the ticker, read by the heartbeat and the web endpoints: one bool, swapped whole.
        self.failing = False

    def _shown_as(self) -> str:
        """Its name and id for the log, as runtime/cluster.py names it."""
        return self._me if self._name is None else f"{self._name()} ({self._me})"

    def refused(self) -> None:
        """An announcement was not written (module doc): take a new term at the next tick."""
        self._refused.set()

    def retake(self) -> None:
        """Take a new term at the next :meth:`change` even if one is held, as after a
        refusal: the last instance's stop, whose held term may be stale (runtime/service.py
        ``shutdown``); taken whether this instance holds the lock or not (nobody else is up
        to lead: store/interface.py ``take_lead``)."""
        self._last = True
        self._refused.set()

    def _busy_for_a_moment(self) -> bool:
        """A take found the row of the term busy: whether that is contention still (the row
        held for less than TERM_ROW_BUSY_SECONDS since the first attempt that found it so), not
        a failure.  The last instance's stop has no next tick: busy is a failure at once."""
        now = self._clock()
        if self._busy_since is None:
            self._busy_since = now
        return not self._last and now - self._busy_since < TERM_ROW_BUSY_SECONDS

    def _warn_failing(self, exc: StoreError) -> None:
        """The attempt failed (module doc): logged with what to do, and shown failing until
        one succeeds."""
        self.failing = True
        log.warning(
            "cluster: %s holds the leader's lock but cannot take the lead for "
            "announcements: %s; it does not lead meanwhile (no repository state "
            "announcements, no job timeouts, no end of expired subscriptions) and tries "
            "again each second: %s",
            self._shown_as(),
            one_line(exc.message),
            _TERM_ROW_HELD
            if isinstance(exc, TermRowBusy)
            else "make the database answer this statement",
        )

    def change(self, leader: bool) -> NewTerm | str | None:
        """Off the owner, at a tick: a :class:`NewTerm` when this instance must take one (it
        became the leader, or an announcement of its term was refused), :data:`FOLLOW` when
        it no longer leads or no term could be taken (module doc: it follows until one is;
        the next tick asks again), None when nothing changes."""
        if not leader:
            self.failing = False
            self._busy_since = None
            return FOLLOW if self.current is not None else None
        if self.current is not None and not self._refused.is_set():
            return None
        self._refused.clear()
        # Without a term: follow (module doc), and ask again at the next tick (``current``
        # None while it follows).
        follow = FOLLOW if self.current is not None else None
        try:
            taken = self._take_lead(self._me, self._last)
        except TermRowBusy as exc:
            if self._busy_for_a_moment():
                log.debug(
                    "cluster: %s waits for the row of the term, held by another transaction "
                    "(%s): it tries again at the next tick",
                    self._shown_as(),
                    one_line(exc.message),
                )
                return follow  # ``failing`` as it was: this attempt neither failed nor took
            self._warn_failing(exc)
            return follow
        except StoreError as exc:
            self._busy_since = None
            self._warn_failing(exc)
            return follow
        self._busy_since = None
        self.failing = False
        if taken is None and self._last:
            log.info(
                "cluster: %s stops as the last instance, but an instance started since holds "
                "the leader's lock and leads: this one announces no Stopped",
                self._shown_as(),
            )
            return follow
        if taken is None:
            log.warning(
                "cluster: %s no longer holds the leader's lock (its lock connection is gone; "
                "another instance may lead now): it takes no term and follows; its heartbeat "
                "tries the lock again",
                self._shown_as(),
            )
            self._lock_lost()
            return follow
        state, term = taken
        try:
            announced = RepositoryState(state)
        except ValueError:
            announced = RepositoryState.IDLE  # a state this server does not know: say it again
        if self._last:
            log.info(
                "cluster: %s, the last instance, takes a term for its last announcements, "
                "announcing the repository state (term %d)",
                self._shown_as(),
                term,
            )
        elif self.current is None:
            log.info(
                "cluster: %s is now the leader, announcing the repository state (term %d)",
                self._shown_as(),
                term,
            )
        else:
            log.info(
                "cluster: %s takes a new term, announcing the repository state (term %d)",
                self._shown_as(),
                term,
            )
        return NewTerm(announced, term)

    def apply(self, change: NewTerm | str) -> None:
        """As the owner, with the core's ``lead``/``follow``: the term stamped from now on."""
        self.current = (self._me, change.term) if isinstance(change, NewTerm) else None
