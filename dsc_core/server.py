"""The one object a binding holds: :class:`ScanServer`, the server's state plus its entry points.

Usage (the whole contract; see docs/architecture.md, "The core contract")::

    server = ScanServer(ServerConfig(), new_id=new_guid)  # the binding supplies ids
    exchange = server.open_exchange(RequestInfo(now=now, content_type=ctype))
    for chunk in body_chunks:
        run(exchange.feed(chunk))          # image chunks leave as store commands
    outcome = exchange.end(now)            # now: when the body ended (optional)
    try:
        run(outcome.commands)              # in order, before sending the reply
        send(outcome.reply)
    except StoreFailure as e:
        failed = exchange.store_failed(temporary=e.temporary)   # R4 step 9
        run(failed.commands); send(failed.reply)

No I/O happens here: time comes in as ``now``, identifiers from ``new_id``.  Requests are read by
``exchange.py`` and answered by the operations in ``registry.py``; job changes follow
``lifecycle.py``; events are written by ``events.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from datetime import datetime

from .commands import Command, DropJob, ProcessingEvent, Removal
from .config import ServerConfig
from .exchange import Exchange
from .model import Job, RepositoryState
from .registry import OPERATIONS
from .state import ServerState
from .subscription import Subscription
from .transport import Outcome, RequestInfo


class ScanServer(ServerState):
    """Configuration, job table, subscriptions and repository state of one scan server."""

    def __init__(self, config: ServerConfig | None = None, *, new_id: Callable[[], str]) -> None:
        #: The core's one leadership flag (:attr:`leads`): it gates the sweeps of :meth:`tick`
        #: and :meth:`next_deadline` here, and the notifier asks it before announcing the
        #: repository state.
        self._leads = True
        super().__init__(config, new_id=new_id, leads=lambda: self._leads)
        self.operations = OPERATIONS

    # --- requests -----------------------------------------------------------------------------

    def open_exchange(self, info: RequestInfo) -> Exchange:
        """Begin one request.  Reads only the configuration (replaced whole on a reload), so
        a binding may open exchanges without being the owner; everything after needs it."""
        return Exchange(self, self.operations, info)

    def handle(self, body: bytes, info: RequestInfo) -> Outcome:
        """One request whose body is all here: feed and end in one call."""
        exchange = self.open_exchange(info)
        early = exchange.feed(body)
        outcome = exchange.end()
        return replace(outcome, commands=tuple(early) + outcome.commands)

    # --- other instances of a shared store (issue 18) ------------------------------------

    def absorb(
        self,
        jobs: Iterable[Job],
        dropped: Iterable[str] = (),
        uploads_elsewhere: Iterable[tuple[str, int]] = (),
    ) -> list[Command]:
        """Records other instances wrote, rows they deleted, uploads they are receiving
        (``JobLifecycle.absorb``): the table is a cache of the shared rows; the binding calls
        this before an exchange's first call and before each tick.  No events."""
        return self.lifecycle.absorb(jobs, dropped, uploads_elsewhere)

    def absorb_subscriptions(
        self,
        stored: Iterable[Subscription],
        ended: Iterable[str],
        counting: Collection[str] = frozenset(),
    ) -> None:
        """Subscriptions other instances created, renewed or ended (``Subscriptions.absorb``,
        which says what ``counting`` keeps); with the jobs, before an exchange's first call and
        before each tick.  No commands."""
        self.subscriptions.absorb(stored, ended, counting)

    @property
    def leads(self) -> bool:
        """Whether this server leads (issue 18 point 4): it announces the repository state and
        runs the sweeps of :meth:`tick`.  Set by :meth:`lead`, cleared by :meth:`follow`; a
        server neither was told about leads (it is the only one)."""
        return self._leads

    def lead(self, announced: RepositoryState, now: datetime) -> list[Command]:
        """This instance became the cluster's leader (issue 18 point 4): from now on it
        announces the repository state, derived from every instance's rows it holds, and its
        :meth:`tick` runs the sweeps.  ``announced``: the state subscribers last heard (the
        binding keeps it in the shared store); a change since is announced now, so a change
        of leader neither repeats nor skips one.  Call it after a catch-up (``absorb``), so
        the table is current."""
        if not self._leads:
            self._leads = True
            self.deadline_changes.moved()  # a follower's deadline was None
        return self.notifier.lead(announced, self.repository_state, now)

    def follow(self) -> None:
        """Another instance leads (issue 18 point 4), or none may yet (the binding has no
        term, runtime/announcing.py): this one announces no repository state (its own changes
        included; the leader reads them from the rows) and :meth:`tick` runs no sweep."""
        if self._leads:
            self._leads = False
            self.deadline_changes.moved()

    # --- the processing engine ------------------------------------------------------------

    def processing(self, event: ProcessingEvent, now: datetime) -> list[Command]:
        """An input from the processing engine (``lifecycle.JobLifecycle.engine_report``)."""
        # A filter keeps the names of at most max_documents_per_job deliveries (issue 19).
        return self.lifecycle.engine_report(event, now, self.config.limits.max_documents_per_job)

    # --- time -----------------------------------------------------------------------------------

    def tick(self, now: datetime) -> list[Command]:
        """Expire subscriptions, time out idle Creating jobs (R6, R7), discard the documents
        of failed jobs kept past their retention, and announce a repository state that
        another instance's change made (``absorb``: issue 18 point 4).

        Only while this server :attr:`leads`; a follower's tick does none of it.  These act on
        rows every instance of a cluster shares (jobs, subscriptions), so one instance runs
        them, the leader (issue 18 point 4; the binding says which with :meth:`lead` and
        :meth:`follow`); the others learn the outcome from the rows.  A follower still sends
        nothing to an expired subscription nor answers for it (``Subscriptions`` checks the
        expiry on each use)."""
        if not self.leads:
            return []
        commands = self.subscriptions.expire(now)
        commands += self.lifecycle.time_out(now, self.config.job_timeout_seconds)
        commands += self.lifecycle.expire_documents(now, self.config.spool_retention_seconds)
        commands += self.notifier.repository_state(self.repository_state, now)
        return commands

    def next_deadline(self) -> datetime | None:
        """When :meth:`tick` next has something to do (aioquic's ``get_timer``), exactly:
        ``tick`` before it changes nothing, ``tick`` at it times out a job or expires a
        subscription.  None: nothing is due however long the binding sleeps (always, while
        this server follows: its tick does nothing).

        A job receiving an image has no deadline until its exchange ends (or is refused or
        aborted), so the answer can change with any call that changes the server: an
        exchange's ``feed``/``end``/``store_failed``/``abort``, ``processing``, ``tick``,
        ``reconfigure``, ``lead``, ``absorb``, some without a command.  Each such change bumps
        :attr:`deadline_changes` (dsc_core/deadlines.py): ask again when it moved instead of
        polling, whichever call moved it."""
        if not self.leads:
            return None
        due = [
            self.subscriptions.next_expiry(),
            self.lifecycle.next_timeout(self.config.job_timeout_seconds),
            self.lifecycle.next_document_expiry(self.config.spool_retention_seconds),
        ]
        times = [t for t in due if t is not None]
        return min(times) if times else None

    # --- deliveries, start and stop ----------------------------------------------------------

    def delivery_result(self, subscription_id: str, ok: bool) -> list[Command]:
        return list(self.subscriptions.delivery_result(subscription_id, ok))

    def end_subscription(self, subscription_id: str) -> list[Command]:
        """The binding gave up delivering to this subscription (its queue is full, R7): end
        it with SubscriptionEnd DeliveryFailure, as after repeated failures."""
        return list(self.subscriptions.give_up(subscription_id))

    def restore(self, jobs: Iterable[Job], now: datetime, *, resume: bool = True) -> list[Command]:
        """Load the jobs a store kept across a restart (``JobLifecycle.restart``); ``resume``
        False: resume none of them (a shared store resumes a job once its lease expired)."""
        return self.lifecycle.restart(jobs, now, resume=resume)

    def resume(self, token: str, now: datetime) -> list[Command]:
        """R13 for one job whose engine is gone (``JobLifecycle.resume``): the binding calls
        this for a job whose lease it took over from a dead instance (issue 18)."""
        return self.lifecycle.resume(token, now)

    def reconfigure(self, config: ServerConfig, now: datetime) -> list[Command]:
        """Apply a reloaded configuration.  Limits, users, timeouts and eventing take effect for
        the next request; a smaller history drops its oldest jobs; subscribers get a
        RepositoryElementsChangeEvent with the repository configuration (R7, bdsrr 3.2.4.6)."""
        self.config = config
        self.subscriptions.config = config
        self.deadline_changes.moved()  # a shorter job timeout or retention brings them forward
        self.jobs.history_size = config.history_size
        commands: list[Command] = [
            DropJob(token, Removal.HISTORY_FULL) for token in self.jobs.trim()
        ]
        commands += self.notifier.elements_changed(config, now)
        return commands

    def shutdown(self, now: datetime, *, last: bool = True) -> list[Command]:
        """The server is stopping: repository Stopped, SubscriptionEnd SourceShuttingDown.

        ``last`` False: other instances of the cluster go on serving the repository, so it is
        not Stopped for anyone and no subscription ends (issue 18 point 4; R7's
        SourceShuttingDown is for the source going away): this one leaves quietly."""
        if not last:
            self.lifecycle.stopped = True
            # Stopped only here: its last changes (the engine's reports) announce nothing; the
            # next leader announces the state of the instances that stay.
            self.follow()
            return []
        commands = self.lifecycle.stop(now)
        commands += self.notifier.shutting_down()
        return commands
