"""The one owner of the core: every call into ``ScanServer`` and its exchanges runs through
:meth:`CoreOwner.call` (wait for the result) or :meth:`CoreOwner.soon` (hand it over).

The core is not thread-safe and need not be (design.md: sans-IO, one caller at a time).  Its
owner is a *loop* while an HTTP binding serves: the async binding's event loop, or the blocking
binding's service thread (:mod:`dsc_bindings.http.service_thread`); both :meth:`attach` a
:class:`LoopHandle`.  A call made in the loop's own thread runs inline, with no hop and no
lock; a call from any other thread (the processing engine, the ticker, delivery results, UDP
discovery, a reload) is queued to the loop.  Without a loop (tools, start-up and shutdown)
the owner is whoever holds the lock, for the pure core call only (microseconds): no lock is
ever held across I/O.

Being the one place every core call passes, the owner also tells the ticker (runtime/alarm.py)
when the core's next deadline may have moved: after each call it compares the core's count of
such changes (``ScanServer.deadline_changes``, dsc_core/deadlines.py) with the one it last saw,
and nudges when it moved, whatever the call was.  No caller has to remember it (a SendImage's
reservation let go without a command once went unheeded: the job timed out a minute late).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol, TypeVar

from dsc_core import DeadlineChanges

__all__ = ["CoreOwner", "LoopHandle"]

log = logging.getLogger("dsc.service")

T = TypeVar("T")


class LoopHandle(Protocol):
    """A thread that owns the core while it runs (an event loop, the service thread)."""

    def call_soon(self, function: Callable[[], object]) -> None:
        """Run ``function`` in the loop's thread soon; callable from any thread, never
        blocks (trio's ``TrioToken.run_sync_soon``, asyncio's ``call_soon_threadsafe``)."""
        ...

    def is_current(self) -> bool:
        """Whether the calling thread is the loop's."""
        ...


class CoreOwner:
    """Runs core calls as their owner (module doc)."""

    def __init__(
        self,
        deadline_changes: DeadlineChanges | None = None,
        nudge: Callable[[], None] = lambda: None,
    ) -> None:
        """``deadline_changes``: the core's count (module doc); ``nudge``: called, as the
        owner, after a call that moved it (the ticker's ``Alarm.nudge``)."""
        #: Read after each call: one attribute read and a compare (every request's path).
        self._changes = deadline_changes or DeadlineChanges()
        self._seen = self._changes.count
        self._nudge = nudge
        #: The owner when no loop is attached; held only for pure core calls.
        self._lock = threading.RLock()
        #: The loop that owns the core, if one is attached.
        self._loop: LoopHandle | None = None
        #: Calls handed to the loop, in order; guarded by _inbox_lock together with _loop.
        self._inbox: deque[Callable[[], object]] = deque()
        self._inbox_lock = threading.Lock()
        self._wake_pending = False

    def attach(self, loop: LoopHandle) -> Callable[[], None]:
        """Make ``loop`` the owner (a binding does this while it serves).  Returns the
        function that detaches it again; calls still queued for the loop then run in the
        detaching thread, under the lock."""
        with self._inbox_lock:
            if self._loop is not None:
                raise RuntimeError("another loop already owns this service's core")
            self._loop = loop

        def detach() -> None:
            with self._inbox_lock:
                if self._loop is not loop:
                    return
                self._loop = None
            with self._lock:
                self._drain_inbox()

        return detach

    def call(self, function: Callable[[], T]) -> T:
        """Run a pure core call as its owner and return its result (blocks a foreign thread
        until the loop ran it; never blocks the loop)."""
        with self._inbox_lock:
            loop = self._loop
        if loop is None:
            with self._lock:
                try:
                    return function()
                finally:
                    if self._changes.count != self._seen:
                        self._deadline_moved()
        if loop.is_current():
            try:
                return function()
            finally:
                if self._changes.count != self._seen:
                    self._deadline_moved()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

        self.soon(run)
        return future.result()

    def soon(self, function: Callable[[], object]) -> None:
        """Run a core call as its owner, soon, without waiting (calls from one thread keep
        their order).  What it raises is logged: a bug in one hand-off must not stop the
        others."""
        with self._inbox_lock:
            loop = self._loop
            if loop is not None and not loop.is_current():
                self._inbox.append(function)
                wake = not self._wake_pending
                self._wake_pending = True
            else:
                wake = False
        if loop is None:
            with self._lock:
                self._run_owned(function)
            return
        if loop.is_current():
            self._run_owned(function)
            return
        if wake:
            try:
                loop.call_soon(self._drain_inbox)
            except Exception:  # the loop ended without detaching: run here
                with self._lock:
                    self._drain_inbox()

    def _drain_inbox(self) -> None:
        while True:
            with self._inbox_lock:
                if not self._inbox:
                    self._wake_pending = False
                    return
                function = self._inbox.popleft()
            self._run_owned(function)

    def _run_owned(self, function: Callable[[], object]) -> None:
        try:
            function()
        except Exception:
            log.exception("a core call handed to the owner failed")
        finally:  # as in call: a BaseException (KeyboardInterrupt) after a change nudges too
            if self._changes.count != self._seen:
                self._deadline_moved()

    def _deadline_moved(self) -> None:
        # Seen first, nudged after: a change counted in ``_seen`` is always followed by a
        # nudge, even should two threads get here at once (the ticker reads the deadline after
        # the nudge, so it sees the change).
        self._seen = self._changes.count
        self._nudge()
