"""One HTTP request on its way through the core (:class:`ServiceRequest`).

A request reaches the core only through its owner (:class:`~.owner.CoreOwner`); what it
needs besides (the command writer, a pool for directory lookups, the clock, the observer) it
is given at its start as a :class:`RequestRuntime`, never by reaching into the service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from dsc_bindings.runtime.observing import ServiceObserver
from dsc_bindings.runtime.owner import CoreOwner
from dsc_bindings.runtime.peer import Peer
from dsc_bindings.runtime.ticket import Ticket, Wait
from dsc_bindings.store.errors import CreationRefused
from dsc_bindings.store.sqlite import StoreError
from dsc_core import Command, DirectoryAnswers, Exchange, Outcome, Reply

if TYPE_CHECKING:
    from dsc_bindings.directory.ldap import Directory

__all__ = ["RequestRuntime", "ServiceRequest", "directory_answers"]

log = logging.getLogger("dsc.service")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RequestRuntime:
    """What every request of one service needs, besides the core's owner's ``call``."""

    owner: CoreOwner
    #: Hand a batch to the command writer, after an earlier ticket of the same exchange
    #: (``ScanService.submit``): ``submit(commands, strict, after)``.
    submit: Callable[[Sequence[Command], bool, Ticket | None], Ticket]
    #: Run a blocking call off the owner (a directory lookup); its ticket carries the value.
    offload: Callable[[Callable[[], object]], Ticket]
    #: The user directory (R14), or None: the core's tables are used.
    directory: Directory | None
    clock: Callable[[], datetime]
    observer: ServiceObserver
    #: A shared store (issue 18, runtime/catchup.py): start reading what other instances
    #: changed, off the owner (a ticket; the argument: whether the request needs current
    #: rows, False lets a listing skip the read while the doorbell is quiet); then, as the
    #: owner, hand it to the core: the jobs whose rows this instance cannot read, a newer
    #: server's and corrupt ones (store/undecodable.py), or None when nothing was read.  None
    #: with SQLite: nothing to catch up with.
    catch_up: (
        tuple[
            Callable[[bool], Ticket],
            Callable[[Ticket], tuple[frozenset[str], frozenset[str]] | None],
        ]
        | None
    ) = None


def directory_answers(ticket: Ticket) -> DirectoryAnswers:
    """The directory's answers an offloaded call left on ``ticket``."""
    if ticket.error is not None:
        raise ticket.error  # Directory.answer reports trouble as answers, never raises
    assert isinstance(ticket.value, DirectoryAnswers)
    return ticket.value


class ServiceRequest:
    """One HTTP request on its way through the core: ``feed`` the body, then ``finish``.

    Used by one connection at a time, from the core's owner context (the loop, or a blocking
    binding's thread: the core calls take the core lock themselves).  Each method returns at
    once; where commands are being carried out it returns a :class:`Wait` (see ``settle``).
    """

    def __init__(self, run: RequestRuntime, exchange: Exchange, peer: Peer | None = None) -> None:
        self._run = run
        self._exchange = exchange
        #: The client's address (``host:port``) for the log and the device records.
        self._peer = peer
        #: The R4 step 9 fault once a store command of this exchange failed.
        self._failed: Reply | None = None
        self._reply: Reply | None = None
        self._done = False
        #: The last batch of this exchange: its next one runs after it.
        self._last: Ticket | None = None
        #: The core's table was refreshed from the shared rows for this request (issue 18).
        self._caught_up = run.catch_up is None

    def feed(self, data: bytes) -> Wait | None:
        """Pass a piece of the body to the core; its commands (image bytes) are written off
        the loop.  After a store failure the rest of the body is discarded: the answer is
        already decided (the fault of R4 step 9) and ``finish`` returns it."""
        if self._done or self._failed is not None or not data:
            return None
        exchange = self._exchange
        if not self._caught_up and exchange.streamed:
            # A streamed body (SendImage) emits document commands while it is fed: the rows
            # first (its cost is nothing beside the image's).
            return self._catch_up(lambda: self.feed(data), needed=True)
        commands = self._run.owner.call(lambda: exchange.feed(data))
        # One batch of this exchange in flight at a time, and the caller does not wait for
        # the batch it just handed over: the next piece of the body is read while this one
        # is written (measured, 400 MB SendImage: waiting for each 256 KiB write before the
        # next read held the async binding to a third of a write+fsync sink's throughput).
        # Batches stay in order: the next is submitted only once this one is done; a failure
        # is seen by the next feed or by finish.  At most one piece waits while one is
        # written, so memory stays flat.
        previous = self._last
        if previous is not None and not previous.done:
            return Wait(previous, lambda: self._feed_after(previous, commands))
        return self._feed_after(previous, commands)

    def _feed_after(self, previous: Ticket | None, commands: Sequence[Command]) -> Wait | None:
        if previous is not None and previous.error is not None:
            return self._after_feed(previous)  # R4 step 9: this piece is dropped with the rest
        if commands:
            self._submit(commands, strict=True)
        return None

    def finish(self) -> Reply | Wait:
        """End the request: the core's reply once its commands were carried out in order
        (so an acknowledged image is durable), or the R4 step 9 fault if one failed."""
        if self._reply is not None:
            return self._reply
        if self._done and self._failed is None:
            raise RuntimeError("finish() after abort()")
        if not self._caught_up and self._failed is None:
            # A plain body was only buffered so far: whether the answer needs current rows
            # is known now (a listing may skip the read, runtime/catchup.py).
            needed = self._run.owner.call(self._exchange.current_jobs_needed)
            return self._catch_up(self.finish, needed=needed)
        last = self._last
        if self._failed is None and last is not None:
            if not last.done:  # the body's last piece is still being written
                return Wait(last, self.finish)
            if last.error is not None:
                undo = self._after_feed(last)
                if undo is not None:
                    return Wait(undo.ticket, self.finish)
        self._done = True
        if self._failed is not None:
            last = self._last
            if last is not None and not last.done:  # the undo commands still run
                return Wait(last, self.finish)
            self._reply = self._failed
            return self._failed
        exchange = self._exchange
        directory = self._run.directory
        if directory is not None:
            # R14: what the request needs from the directory is asked off the loop (LDAP may
            # be slow), then the exchange ends with the answers.
            needs = self._run.owner.call(exchange.lookups)
            if needs:
                asked = self._run.offload(lambda: directory.answer(needs))
                return self._then(asked, lambda: self._end_with(directory_answers(asked)))
        return self._end_with(None)

    def _end_with(self, answers: DirectoryAnswers | None) -> Reply | Wait:
        outcome = self._run.owner.call(lambda: self._end(answers))
        if not outcome.commands and (self._last is None or self._last.done):
            self._reply = outcome.reply  # nothing to write (most reads): answer at once
            return outcome.reply
        ticket = self._submit(outcome.commands, strict=True)
        return self._then(ticket, lambda: self._after_finish(ticket, outcome.reply))

    def abort(self) -> Wait | None:
        """The connection was lost before ``finish``: drop any upload in progress, so that no
        ``.part`` debris remains and the device may send the same DocumentId again."""
        if self._done:
            return None
        self._done = True
        if self._failed is not None:
            return None  # store_failed already ended the exchange and dropped the upload
        exchange = self._exchange
        commands = self._run.owner.call(exchange.abort)
        ticket = self._submit(commands, strict=False)
        return None if ticket.done else Wait(ticket, lambda: None)

    # --- internals ------------------------------------------------------------------------------

    def _catch_up(self, resume: Callable[[], T], *, needed: bool) -> T | Wait:
        """Before the exchange's first core call that may read jobs: the other instances'
        changes into the core's table (runtime/catchup.py), then ``resume``.  A read that
        failed or took too long leaves the table as it is (its writes are still
        compare-and-set), and the core is told (Exchange.rows_unread: a job it does not know
        is then a temporary fault, not ClientErrorJobTokenNotFound); so are the jobs whose rows
        this instance cannot read (Exchange.rows_unreadable: a newer server's, during a
        rolling upgrade; an instance that reads them answers the scanner's next try)."""
        self._caught_up = True
        assert self._run.catch_up is not None
        begin, absorb = self._run.catch_up
        ticket = begin(needed)

        def caught() -> T | Wait:
            unreadable = absorb(ticket)
            if unreadable is None and needed:
                self._run.owner.call(self._exchange.rows_unread)
            elif unreadable is not None and any(unreadable):
                newer, corrupt = unreadable
                self._run.owner.call(lambda: self._exchange.rows_unreadable(newer, corrupt))
            return resume()

        return self._then(ticket, caught)

    def _submit(self, commands: Sequence[Command], *, strict: bool) -> Ticket:
        ticket = self._run.submit(commands, strict, self._last)
        self._last = ticket
        return ticket

    @staticmethod
    def _then(ticket: Ticket, resume: Callable[[], T]) -> T | Wait:
        return resume() if ticket.done else Wait(ticket, resume)

    def _end(self, answers: DirectoryAnswers | None) -> Outcome:
        exchange = self._exchange
        outcome = exchange.end(self._run.clock(), directory=answers)
        if outcome.fault is not None:
            # R12: every limit exceeded (and every other refusal) is logged, with who asked.
            log.info(
                "%s: %s to %s answered with HTTP %d, %s",
                self._peer or "?",
                exchange.operation or "request",
                exchange.info.path,
                outcome.reply.status,
                outcome.fault,
            )
        observer = self._run.observer
        observer.request_commands(
            outcome.commands, exchange.info.client_address, exchange.info.identity
        )
        observer.request_ended(exchange.operation, outcome.fault_subcode)
        return outcome

    def _after_feed(self, ticket: Ticket) -> Wait | None:
        if ticket.error is None:
            return None
        undo = self._store_failed(ticket.error)
        return None if undo.done else Wait(undo, lambda: None)

    def _after_finish(self, ticket: Ticket, reply: Reply) -> Reply | Wait:
        if ticket.error is None:
            self._reply = reply
            return reply
        undo = self._store_failed(ticket.error)
        self._reply = self._failed
        assert self._failed is not None
        failed = self._failed
        return failed if undo.done else Wait(undo, lambda: failed)

    def _store_failed(self, exc: BaseException) -> Ticket:
        """R4 step 9: tell the core, carry out its undo commands, answer with its fault."""
        temporary = isinstance(exc, StoreError) and exc.temporary
        fault = None
        if isinstance(exc, CreationRefused):
            # A limit counted across instances (issue 18 point 1): the answer is the limit's
            # own fault, as when the core counted it.
            log.info("job not created: %s", exc.message)
            fault = exc.fault
        elif isinstance(exc, StoreError):
            log.error(
                "job store failed (%s): %s", "temporary" if temporary else "permanent", exc.message
            )
        else:
            log.error("job store raised an unexpected error; answering InternalError: %r", exc)
        exchange = self._exchange
        outcome = self._run.owner.call(
            lambda: exchange.store_failed(temporary=temporary, fault=fault)
        )
        self._failed = outcome.reply
        return self._submit(outcome.commands, strict=False)
