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
- an instance that holds the lock but cannot take a term (the database failed the statement)
  follows until a later tick takes one: its core neither sweeps nor announces meanwhile
  (``ScanServer.follow``).  Of the two consistent choices this is the safe one.  Leading
  without a term, its announcements would be dropped unwritten (no term to stamp) or, under
  the old term, refused by the compare-and-set, while its core counts them as heard: the
  change would reach subscribers only at the next takeover, if ever.  Its sweeps would be
  tolerated (job writes are compare-and-set on the row version, ending an expired
  subscription twice is ending it once), but they write to the database that just failed;
  following, they are only late: the tick that takes the term runs every deadline passed, and
  ``lead`` announces the difference from the row.  The failure is logged at each attempt.

:class:`LeaderTerm` keeps this instance's term for the runtime (runtime/service.py): the ticker
asks :meth:`LeaderTerm.change` at each wake-up, off the core's owner (it may take a term in
SQL), and hands the answer to the owner with the tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from dsc_bindings.store.errors import StoreError
from dsc_core import RepositoryState

__all__ = ["FOLLOW", "LeaderTerm", "NewTerm"]

log = logging.getLogger("dsc.cluster")


@dataclass(frozen=True, slots=True)
class NewTerm:
    """This instance leads from now on: the state subscribers last heard, and its term."""

    announced: RepositoryState
    term: int


#: This instance no longer leads: its core follows.
FOLLOW = "follow"


class LeaderTerm:
    """This instance's term, if it leads (module doc).  ``current`` is read and set by the
    core's owner; ``refused`` is called by the writer."""

    def __init__(self, me: str, take_lead: Callable[[str], tuple[str, int]]) -> None:
        self._me = me
        self._take_lead = take_lead
        #: (this instance's id, its term) while its core leads; None while it follows.
        self.current: tuple[str, int] | None = None
        self._refused = threading.Event()

    def refused(self) -> None:
        """An announcement was not written (module doc): take a new term at the next tick."""
        self._refused.set()

    def retake(self) -> None:
        """Take a new term at the next :meth:`change` even if one is held, as after a
        refusal: the last instance's stop, whose held term may be stale (runtime/service.py
        ``shutdown``)."""
        self._refused.set()

    def change(self, leader: bool) -> NewTerm | str | None:
        """Off the owner, at a tick: a :class:`NewTerm` when this instance must take one (it
        became the leader, or an announcement of its term was refused), :data:`FOLLOW` when
        it no longer leads or no term could be taken (module doc: it follows until one is;
        the next tick asks again), None when nothing changes."""
        if not leader:
            return FOLLOW if self.current is not None else None
        if self.current is not None and not self._refused.is_set():
            return None
        self._refused.clear()
        try:
            state, term = self._take_lead(self._me)
        except StoreError as exc:
            log.warning("cluster: cannot take the lead for announcements: %s", exc.message)
            # Without a term: follow (module doc), and take one at the next tick (``current``
            # None while it follows).
            return FOLLOW if self.current is not None else None
        try:
            announced = RepositoryState(state)
        except ValueError:
            announced = RepositoryState.IDLE  # a state this server does not know: say it again
        log.info("cluster: announcing the repository state (term %d)", term)
        return NewTerm(announced, term)

    def apply(self, change: NewTerm | str) -> None:
        """As the owner, with the core's ``lead``/``follow``: the term stamped from now on."""
        self.current = (self._me, change.term) if isinstance(change, NewTerm) else None
