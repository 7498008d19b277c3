"""Catching up with the other instances of a shared store (issue 18, docs/architecture.md
"Several instances").

With ``[store] kind = "postgresql"`` several ``dsc serve`` instances share the job rows.  The core
still decides only from its own table; that table is a cache of the rows, refreshed before each
exchange's first core call and before each tick:

1. :meth:`JobCatchUp.read`, off the core's owner (a pool thread, the ticker): one query for the
   rows changed since the last read (the store's cursor, postgresql.py says why it misses no late
   commit), the tokens deleted since, and the uploads in flight on the other instances; of a
   job the store knows, only the document rows written since (store/jobdocuments.py);
2. :meth:`JobCatchUp.absorb`, as the owner: the records newer than the one the table holds go to
   ``ScanServer.absorb`` (no events: the instance that made a change announced it).

Writes are compare-and-set: :meth:`JobCatchUp.stamp` (as the owner, right after the core call
that made them) gives each record command the row version it replaces, the version the table's
record has; the store refuses it when the row moved on meanwhile (a temporary StoreError: R4
step 9 answers ServerErrorTemporaryError and the core undoes its change).  After any failed
write of a job (:meth:`JobCatchUp.settled`) its version is forgotten and its row read again by
the next catch-up, whatever the cursor, so the next request decides from the winner's record;
the writes of that job stamped before the failure are refused without asking the database
(:meth:`JobCatchUp.check`: each was decided from the record that lost).  A row read while this
instance still has writes of that job queued is not absorbed (it would be older than what the
table holds, or about to be refused): it is read again once they are done.

A subscription's failure count (R7, ``RecordDeliveryFailures``) is counted by its delivery
owner's core and written after, like any command; a row of that subscription read meanwhile
(another instance's Renew writes its row; so does this instance's previous count) carries the
count from before, and taking it lost a failure: the next one was counted from the older number
and the subscription ended a failure late.  So :meth:`JobCatchUp.absorb` keeps the core's count
(``ScanServer.absorb_subscriptions``' ``counting``) of a subscription whose count has a write
stamped and not yet done, or done after the read began (:meth:`JobCatchUp.counted`: its
snapshot may be older than the write), and reads that row again at the next read whatever the
cursor, which gives the stored count, the core's own or a newer owner's.

A row this instance cannot decode (a newer server's, during a rolling upgrade:
store/undecodable.py) is left out, said once; a job the table held whose row turns into one is
forgotten as if deleted (``ScanServer.absorb``'s ``dropped``: its run here stops), so that
nothing is answered from the stale copy, and its writes, its history trimming and its sweeps
never act on it.

A request waits for its catch-up at most :data:`CATCH_UP_WAIT_SECONDS` (:class:`RequestReads`):
a database that does not answer (frozen, unreachable) must not hold up the requests answered
from memory (GetRepositoryElements, listings; issue 17).  Such a request then decides from what
the table holds, which is safe: every record write is compare-and-set, and the ``uploads`` row
of an image is refused while another instance holds it; a read that answers later is still
absorbed.  One reader thread reads for every request waiting (a read starts only after the
requests it serves arrived), so at most one read waits for the database at a time.

The doorbell (store/pgdoorbell.py) spares most of those reads: every committed change of a job
row, a tombstone or an uploads row rings ``dsc_jobs`` with ``token:version``.  A request whose
operation is a listing (``Operation.listing``: GetActiveJobs, GetJobHistory,
GetRepositoryElements, metadata) skips the read when :meth:`JobCatchUp.fresh`: the listener is
connected, no ring that may be news came since the last read began, the last read began less
than :data:`FRESH_SECONDS` ago, and no job waits to be read again.  Why each condition makes
the skip safe:

- a notification is sent only after its transaction committed, so a ring received before a
  read began is a change that read sees (its snapshot is later); one received during the read
  counts for the next;
- a lost connection loses notifications, so while the listener is down nothing is skipped, and
  its (re)connect counts as a ring: the read after it is a full catch-up of the feed (the
  cursor never moves without a read, so nothing committed meanwhile is missed);
- :data:`FRESH_SECONDS` bounds the staleness of what cannot ring (an instance whose heartbeat
  lapsed, so its uploads stop counting) and of a connection that died silently (no reset);
- this instance's own writes ring too, but are no news: a ring whose version is not above the
  version the table has (:meth:`stamp` records it before the write is sent) is ignored, and so
  is a drop of a job the table does not hold and an uploads change of this instance;
- a job whose write failed is read again by the next read whatever the cursor: while one
  waits, nothing is skipped.

Every other request (a job-addressed one, a write, anything streamed such as SendImage) reads
first, as before: it reads its own writes whichever instance made them (cluster-design 3.5),
so a scanner's SendImage on A right after its CreatePostScanJob on B finds the job even when
A's doorbell is still on the wire.  Listings may lag the other instances by the doorbell's
latency (docs/architecture.md "Several instances").

With SQLite nothing here runs: the service has no :class:`JobCatchUp`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from dsc_bindings.runtime.ticket import Ticket
from dsc_bindings.store.errors import JobChanged, StoreError
from dsc_bindings.store.interface import (
    Announcement,
    EventsWrite,
    JobChanges,
    Rang,
    VersionedWrite,
)
from dsc_bindings.store.subcodec import decode_subscription
from dsc_bindings.store.undecodable import UndecodableRecords
from dsc_core import (
    AnnounceRepositoryState,
    Command,
    CreateJob,
    Deliver,
    DropJob,
    Job,
    RecordDeliveryFailures,
    ScanServer,
    UpdateJob,
)
from dsc_core.subscription import Subscription

__all__ = ["CATCH_UP_WAIT_SECONDS", "FRESH_SECONDS", "Caught", "JobCatchUp", "RequestReads"]

log = logging.getLogger("dsc.store")

#: A request waits this long at most for the other instances' changes (module doc).
CATCH_UP_WAIT_SECONDS = 2.0
#: A request skips the read only if the last one began less than this long ago (module doc).
FRESH_SECONDS = 1.0
#: A failing catch-up is logged at most this often.
_LOG_EVERY_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Caught:
    """One read of the feed, decoded, for :meth:`JobCatchUp.absorb`."""

    cursor: int
    #: (record, row version) of the rows read.
    jobs: tuple[tuple[Job, int], ...]
    dropped: tuple[str, ...]
    uploads_elsewhere: tuple[tuple[str, int], ...]
    #: Subscriptions created or renewed, and ended, since the last read (issue 18 point 3).
    subscriptions: tuple[Subscription, ...] = ()
    subscriptions_ended: tuple[str, ...] = ()
    #: The doorbell's ring count when the read began, and when it began (time.monotonic).
    rung: int = 0
    began: float = float("-inf")
    #: Which read this is (JobCatchUp numbers them as they begin); -1: older than every one.
    number: int = -1
    #: The subscriptions it read again whatever the cursor (their counts, module doc).
    recounted: frozenset[str] = frozenset()
    #: Jobs whose rows it read and left out: they do not decode (store/undecodable.py).
    left_out: tuple[str, ...] = ()


class JobCatchUp:
    """The cursor, and the row version of each job the core's table holds (module doc).
    Thread-safe: read in pool threads, stamped and absorbed as the owner, settled by the
    writer."""

    def __init__(
        self,
        changes: Callable[[int, frozenset[str]], JobChanges],
        instance: Callable[[], str] = str,
        *,
        fresh_seconds: float = FRESH_SECONDS,
        undecodable: UndecodableRecords | None = None,
    ) -> None:
        self._fresh_seconds = fresh_seconds
        #: Rows this instance cannot decode, left out and logged once (store/undecodable.py):
        #: the store's, so that the start's load and the reads share what was logged.
        self._undecodable = undecodable if undecodable is not None else UndecodableRecords()
        self._changes = changes
        #: This instance's name in uploads rows (its own uploads ring too).
        self._instance = instance
        self._lock = threading.Lock()
        self._cursor = 0
        #: token -> the row version of the record the core's table has (or will have once
        #: this instance's queued writes are done).
        self._known: dict[str, int] = {}
        #: token -> writes stamped and not yet settled.
        self._pending: Counter[str] = Counter()
        #: token -> failed writes so far: a write stamped before a failure is refused.
        self._epochs: dict[str, int] = {}
        #: Tokens to read again whatever the cursor (a failed write, or skipped while pending).
        self._stale: set[str] = set()
        #: The doorbell (module doc): listening, rings that may be news (and reconnects), the
        #: ring count when the last absorbed read began, and when it began.
        self._listening = False
        self._rung = 0
        self._read_rung = -1
        self._read_began = float("-inf")
        #: Failure counts (module doc): reads begun so far; subscription -> its count writes
        #: stamped and not yet done; -> the reads begun when its last one was done; those
        #: to read again whatever the cursor.
        self._reads = 0
        #: The number of the newest read absorbed so far (a later one absorbed is late).
        self._absorbed = -1
        self._counting: Counter[str] = Counter()
        self._counted: dict[str, int] = {}
        self._recount: set[str] = set()

    # --- reading (off the owner) --------------------------------------------------------------

    def read(self) -> Caught:
        """Ask the store what changed since the last absorbed read; raises StoreError."""
        with self._lock:
            cursor, stale = self._cursor, frozenset(self._stale)
            rung, began = self._rung, time.monotonic()
            number, recount = self._reads, frozenset(self._recount)
            self._reads += 1
        # Job tokens and subscription identifiers in one set: the store reads the rows of both.
        changes = self._changes(cursor, stale | recount)
        jobs: list[tuple[Job, int]] = []
        left_out: list[str] = []
        for token, version, text, documents in changes.rows:
            # Another instance's record this one cannot read (a newer server's?): left out,
            # not a failed request, and left where it is (store/undecodable.py).
            job = self._undecodable.decode(token, text, documents)
            if job is None:
                left_out.append(token)
            else:
                jobs.append((job, version))
        for token in changes.dropped:
            self._undecodable.forget(token)
        subscriptions: list[Subscription] = []
        for identifier, _version, text in changes.subscriptions:
            try:
                subscriptions.append(decode_subscription(text))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning(
                    "subscription %s: the stored record does not decode (%s)", identifier, exc
                )
        return Caught(
            changes.cursor,
            tuple(jobs),
            changes.dropped,
            changes.uploads_elsewhere,
            tuple(subscriptions),
            changes.subscriptions_ended,
            rung,
            began,
            number,
            recount,
            tuple(left_out),
        )

    def unreadable(self) -> tuple[frozenset[str], frozenset[str]]:
        """The jobs whose last record read does not decode here (store/undecodable.py), and
        those of them no server reads (corrupt): a request for one is answered as temporary,
        or for a corrupt one as an internal error (Exchange.rows_unreadable)."""
        corrupt = self._undecodable.corrupt()
        return self._undecodable.tokens() - corrupt, corrupt

    def seed(self, caught: Caught) -> None:
        """At start: the core was restored from the rows; this read (made before) gives their
        versions and the cursor.  A row changed in between is newer than its known version, so
        the next read brings it again."""
        with self._lock:
            self._cursor = caught.cursor
            self._known = {job.token: version for job, version in caught.jobs}
            self._read_rung, self._read_began = caught.rung, caught.began

    # --- the doorbell (in its listener's thread) ------------------------------------------------

    def ring(self, rang: Rang | None) -> None:
        """A change committed somewhere: news unless this instance made it (module doc);
        None (a payload this server does not know) is news."""
        with self._lock:
            if rang is None:
                news = True
            elif rang.version is not None:
                news = rang.version > self._known.get(rang.token, 0)
            elif rang.dropped:
                news = rang.token in self._known
            elif rang.claimable:
                news = False  # a lease let go: no change of the record (runtime/leasing.py)
            else:
                news = rang.upload_instance != self._instance()
            if news:
                self._rung += 1

    def heard(self, listening: bool) -> None:
        """The listener (re)connected, or lost its connection (module doc)."""
        with self._lock:
            self._listening = listening
            self._rung += 1  # whatever was missed meanwhile: the next read is a full catch-up

    def fresh(self) -> bool:
        """Whether a listing may skip the read (module doc)."""
        with self._lock:
            return (
                self._listening
                and not self._stale
                and self._rung == self._read_rung
                and time.monotonic() - self._read_began < self._fresh_seconds
            )

    # --- as the core's owner ------------------------------------------------------------------

    def absorb(self, server: ScanServer, caught: Caught) -> list[Command]:
        """Hand the records newer than the table's to the core (``ScanServer.absorb``)."""
        with self._lock:
            self._cursor = max(self._cursor, caught.cursor)
            if caught.began > self._read_began:
                self._read_rung, self._read_began = caught.rung, caught.began
            # Reads are absorbed by whichever request or tick waited for them, so one may come
            # after a newer read (their queries ran one after the other, RequestReads): that
            # one saw what became of every job the table does not know (its row, tombstone, or
            # undecodable record), so a late read brings none of them (it brought a job
            # deleted or forgotten meanwhile back, stale, a deleted one for ever) and forgets
            # none (the table's record is newer).  Records of known jobs still count by version.
            late = caught.number < self._absorbed
            self._absorbed = max(self._absorbed, caught.number)
            fresh: list[Job] = []
            for job, version in caught.jobs:
                token = job.token
                if self._pending[token]:
                    self._stale.add(token)
                    continue
                if late and token not in self._known:
                    continue
                self._stale.discard(token)
                if version <= self._known.get(token, 0):
                    continue  # this instance wrote it, or read it before
                self._known[token] = version
                fresh.append(job)
            forgotten: list[str] = []
            for token in () if late else caught.left_out:
                if self._pending[token]:
                    # Its writes queued here are refused (the row moved on); read again after.
                    self._stale.add(token)
                    continue
                # Not readable here any more (a newer server rewrote it): the table forgets its
                # copy, as it never knew a job it cannot read, so nothing is answered from a
                # stale record (store/undecodable.py).  Reading it again at every round would
                # tell nothing new (and no listing would skip a read); its next write comes
                # with the cursor.
                self._stale.discard(token)
                self._known.pop(token, None)  # gone already if a write of it was refused
                forgotten.append(token)
            for token in caught.dropped:
                self._known.pop(token, None)
                self._stale.discard(token)
            counting = self._still_counting(caught)
        server.absorb_subscriptions(caught.subscriptions, caught.subscriptions_ended, counting)
        return server.absorb(fresh, (*caught.dropped, *forgotten), caught.uploads_elsewhere)

    def _still_counting(self, caught: Caught) -> frozenset[str]:
        """The subscriptions of ``caught`` whose count the core keeps (module doc), marked to
        be read again; the lock held."""
        counting: set[str] = set()
        for sub in caught.subscriptions:
            identifier = sub.identifier
            if self._counting[identifier] or self._counted.get(identifier, -1) > caught.number:
                counting.add(identifier)
                self._recount.add(identifier)
            else:
                self._counted.pop(identifier, None)
        for identifier in caught.subscriptions_ended:
            self._counted.pop(identifier, None)
            counting.discard(identifier)
        # Asked for and now read (or gone: ended and pruned), unless kept again.
        self._recount -= (caught.recounted | frozenset(caught.subscriptions_ended)) - counting
        return frozenset(counting)

    def stamp(
        self, commands: Sequence[Command], leader: tuple[str, int] | None = None
    ) -> list[Command | VersionedWrite | EventsWrite]:
        """The commands with each record command wrapped in the version it replaces, and the
        notifications carried by a write, so that they commit with it (outbox rows, issue 18
        point 3): by the batch's last CreateJob/UpdateJob before them (else its first
        DropJob), the others by one EventsWrite.  An AnnounceRepositoryState becomes such a
        write's Announcement, its events with it, under ``leader`` (this instance's id and
        term, issue 18 point 4); with no ``leader`` it is dropped, events and all (no term, so
        nothing may be announced: its core follows and makes none, runtime/announcing.py).  A
        SubscriptionEnd stays apart: the delivery hub sends it directly (the subscription is
        gone from the store)."""
        stamped: list[Command | VersionedWrite | EventsWrite] = []
        carrier: int | None = None  # where the write carrying the batch's notifications is
        with self._lock:
            for command in commands:
                carrier = self._stamp_one(command, stamped, carrier, leader)
        return stamped

    def _stamp_one(
        self,
        command: Command,
        stamped: list[Command | VersionedWrite | EventsWrite],
        carrier: int | None,
        leader: tuple[str, int] | None,
    ) -> int | None:
        """Add one command of :meth:`stamp` to ``stamped``; where the write carrying the
        batch's notifications is now.  The lock held."""
        if isinstance(command, AnnounceRepositoryState):
            if leader is None:
                return carrier
            return _carry(stamped, carrier, _announcement(command, leader))
        if isinstance(command, Deliver) and not command.final:
            return _carry(stamped, carrier, command)
        if isinstance(command, (CreateJob, UpdateJob, DropJob)):
            stamped.append(self._versioned(command))
            # A job's write carries what follows it; a drop only when nothing carries yet.
            keeps = carrier is not None and isinstance(command, DropJob)
            return carrier if keeps else len(stamped) - 1
        if isinstance(command, RecordDeliveryFailures):
            self._counting[command.identifier] += 1
        stamped.append(command)
        return carrier

    def _versioned(self, command: CreateJob | UpdateJob | DropJob) -> VersionedWrite:
        """A record command with the version it replaces; the lock held."""
        expected: int | None = None
        if isinstance(command, CreateJob):
            token = command.job.token
            self._known[token] = 1
        elif isinstance(command, UpdateJob):
            token = command.job.token
            # Unknown (a write of this job just failed): the store refuses it.
            expected = self._known.get(token)
            if expected is not None:
                self._known[token] = expected + 1
        else:
            token = command.token
            self._known.pop(token, None)
        self._pending[token] += 1
        return VersionedWrite(command, expected, self._epochs.get(token, 0))

    # --- as the writer ------------------------------------------------------------------------

    def counted(self, command: RecordDeliveryFailures) -> None:
        """A stamped failure count was written, or failed (then the store's count is the one
        to take, and the next read of the row brings it)."""
        identifier = command.identifier
        with self._lock:
            self._counting[identifier] -= 1
            if self._counting[identifier] <= 0:
                del self._counting[identifier]
            self._counted[identifier] = self._reads

    def check(self, write: VersionedWrite) -> None:
        """Refuse a write decided before a failed write of the same job (module doc)."""
        token = _token(write)
        with self._lock:
            current = self._epochs.get(token, 0)
        if write.epoch != current:
            raise JobChanged(token)

    def settled(self, write: VersionedWrite, error: BaseException | None) -> None:
        """A stamped write ran (``error`` None) or failed: then forget the job's version and
        read its row again at the next catch-up."""
        token = _token(write)
        with self._lock:
            self._pending[token] -= 1
            if self._pending[token] <= 0:
                del self._pending[token]
            if error is not None and not isinstance(write.command, DropJob):
                if write.epoch == self._epochs.get(token, 0):  # not one refused by check()
                    self._epochs[token] = write.epoch + 1
                self._known.pop(token, None)
                self._stale.add(token)


def _announcement(command: AnnounceRepositoryState, leader: tuple[str, int]) -> Announcement:
    """The store's record of an announcement under ``leader``'s term, with its events."""
    state, previous = command.state.value, command.previous.value
    return Announcement(state, previous, *leader, events=command.events)


def _carry(
    stamped: list[Command | VersionedWrite | EventsWrite],
    carrier: int | None,
    what: Deliver | Announcement,
) -> int:
    """Add a notification or an announcement to the write at ``carrier``, or to a new
    EventsWrite when there is none (or it carries an announcement already); where the carrier
    is now."""
    write = stamped[carrier] if carrier is not None else None
    if (
        carrier is None
        or not isinstance(write, (VersionedWrite, EventsWrite))
        or (isinstance(what, Announcement) and write.announcement is not None)
    ):
        carrier, write = len(stamped), EventsWrite()
        stamped.append(write)
    if isinstance(what, Deliver):
        stamped[carrier] = replace(write, events=(*write.events, what))
    else:
        # Where it falls among the write's events: a notification the core emitted after it
        # is stored after its events (the order the core emitted them in).
        stamped[carrier] = replace(write, announcement=replace(what, after=len(write.events)))
    return carrier


def _token(write: VersionedWrite) -> str:
    command = write.command
    return command.token if isinstance(command, DropJob) else command.job.token


class RequestReads:
    """The catch-up reads of requests and ticks (module doc): one reader thread; each read
    starts after every request waiting for it arrived, so one read serves all the requests
    that came while the previous one ran (under load, far fewer queries than requests), and
    at most one read waits for the database at a time.  A request waits at most ``wait``
    seconds; ``absorb_late`` takes a read that finished after some of its requests stopped
    waiting (it runs in the reader thread: hand it to the owner)."""

    def __init__(
        self,
        catch_up: JobCatchUp,
        absorb_late: Callable[[Caught], None],
        *,
        wait: float = CATCH_UP_WAIT_SECONDS,
    ) -> None:
        self._catch_up = catch_up
        self._absorb_late = absorb_late
        self._wait = wait
        self._logged = float("-inf")
        self._settle_lock = threading.Lock()
        #: Requests waiting for the next read.
        self._waiting: list[Ticket] = []
        #: (when, n, ticket) of the requests still waiting: settled empty at ``when``.
        self._deadlines: list[tuple[float, int, Ticket]] = []
        self._numbers = itertools.count()
        self._wake = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._read_loop, name="dsc-catch-up", daemon=True),
            threading.Thread(target=self._time_out, name="dsc-catch-up-timer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def begin(self) -> Ticket:
        """Ask for a read that starts from now; the ticket completes with it (``value``: the
        Caught) or after the wait without a value (the request answers from the table)."""
        gate = Ticket()
        with self._wake:
            if self._closed:
                return Ticket.completed()
            self._waiting.append(gate)
            heapq.heappush(
                self._deadlines, (time.monotonic() + self._wait, next(self._numbers), gate)
            )
            self._wake.notify_all()  # the reader, and the timer when it had nothing to do
        return gate

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()

    def _settle(self, gate: Ticket, value: Caught | None) -> bool:
        with self._settle_lock:
            if gate.done:
                return False  # settled already: by the read, or by the deadline
            gate.value = value
            gate._complete(None)
            return True

    def _read_loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                batch, self._waiting = self._waiting, []
            caught: Caught | None = None
            try:
                caught = self._catch_up.read()
            except StoreError as exc:
                self._log(exc)
            except Exception:  # a bug must not stop the catch-up for the rest of the run
                log.exception("catch-up read failed")
            late = False
            for gate in batch:
                if not self._settle(gate, caught):
                    late = True
            if late and caught is not None:
                self._absorb_late(caught)

    def _log(self, exc: StoreError) -> None:
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_SECONDS:
            self._logged = now
            log.warning(
                "cannot read what other instances changed (%s): requests are answered from "
                "what this instance knows; their writes are still checked",
                exc.message,
            )

    def _time_out(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (
                    not self._deadlines or self._deadlines[0][0] > time.monotonic()
                ):
                    timeout = self._deadlines[0][0] - time.monotonic() if self._deadlines else None
                    self._wake.wait(timeout)
                if self._closed:
                    return
                _, _, gate = heapq.heappop(self._deadlines)
            self._settle(gate, None)
