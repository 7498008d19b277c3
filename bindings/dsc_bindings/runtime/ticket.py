"""A step's completion and what waits for it: :class:`Ticket`, :class:`Wait`, :func:`settle`.

A service call never blocks its caller (the core's owner): where it hands I/O to the command
writer (:mod:`.writer`) or to a pool, it returns a :class:`Wait` on a :class:`Ticket`.  The
async binding awaits the ticket without blocking its loop; a blocking caller uses
:func:`settle`.  Both HTTP bindings and the writer share these two classes, so the HTTP layer
needs nothing of the writer itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Ticket", "Wait", "settle"]

log = logging.getLogger("dsc.writer")


class Ticket:
    """The completion of one batch.  ``error`` is the exception of the command that failed a
    strict batch (None when every command ran).  Completed from a writer thread; waited for
    with :meth:`wait` (blocking) or through :meth:`add_done_callback`."""

    __slots__ = ("_callbacks", "_done", "_event", "_lock", "error", "refused", "value")

    def __init__(self) -> None:
        self._done = False
        #: Made only when a thread blocks in :meth:`wait` (profiled: an Event per ticket was a
        #: few microseconds of every request, and most tickets are completed at once).
        self._event: threading.Event | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.error: BaseException | None = None
        #: The result of an :meth:`CommandWriter.offload` call.
        self.value: object = None
        #: Of a non-strict batch: the jobs whose record write was refused as changed by another
        #: instance (JobChanged; the writer goes on with the rest).  An engine report tells by
        #: it that the run's end was not recorded here (runtime/service.py).
        self.refused: frozenset[str] = frozenset()

    @classmethod
    def completed(cls) -> Ticket:
        ticket = cls()
        ticket._done = True
        return ticket

    @property
    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> bool:
        if self._done:
            return True
        with self._lock:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (in the completing thread, or now if done).  It must be quick and
        thread-safe, e.g. a loop's call-soon that sets an event."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback()

    def _complete(self, error: BaseException | None) -> None:
        with self._lock:
            self.error = error
            self._done = True
            if self._event is not None:
                self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a dead loop must not break the writer
                log.exception("ticket callback failed")


class Wait:
    """A service step that handed I/O to the writer: wait for ``ticket`` (off the core's
    thread), then call ``resume()`` in the core's context (the event loop, or a blocking
    binding's own thread), which returns the step's result or another Wait."""

    __slots__ = ("resume", "ticket")

    def __init__(self, ticket: Ticket, resume: Callable[[], object]) -> None:
        self.ticket = ticket
        self.resume = resume

    def settle(self) -> object:
        """Blocking: wait for every Wait in the chain; the final result."""
        result: object = self
        while isinstance(result, Wait):
            result.ticket.wait()
            result = result.resume()
        return result


def settle(step: object) -> object:
    """Blocking: follow a chain of :class:`Wait` to its result (anything else is the result)."""
    return step.settle() if isinstance(step, Wait) else step
