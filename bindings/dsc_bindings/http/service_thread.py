"""One thread that runs every service call of the blocking binding's connections, in turn.

The blocking binding gives each connection a thread for its socket; if those threads also ran
the service calls (the SOAP and job work, a few tens of microseconds each), every call would
compete for the GIL with the other connections' calls, and lxml, which lets go of the GIL
while it parses, would hand it to another thread in the middle of each one.  Measured with
wrk, 8 keep-alive connections: 15 context switches per request and two thirds of each thread's
time spent waiting.  Here connection threads do HTTP and socket I/O only and hand each
``Call`` to this thread (as the async binding's event loop runs them): +9% requests per
second at 8 connections, and the p99 at 64 went from 113 ms to 15 ms.

A service call never blocks: where it needs I/O it returns a
:class:`~dsc_bindings.runtime.ticket.Wait`, which the connection thread waits for before handing
the resumption back (:meth:`ServiceThread.settle`).

While the binding serves, this thread is also the core's owner
(:class:`~dsc_bindings.runtime.owner.CoreOwner`, as the async binding's event loop is): the
connections' calls run the core inline, with no lock, and the engine, the ticker and the
deliveries hand their core calls to it (:meth:`ServiceThread.call_soon`).

Usage::

    calls = ServiceThread()
    calls.start()
    detach = owner.attach(calls)              # the core's owner while serving
    reply = calls.settle(action.function)     # from a connection thread
    calls.stop()                              # later calls run in their caller's thread
    detach()
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from dsc_bindings.runtime.ticket import Wait

__all__ = ["ServiceThread"]

log = logging.getLogger("dsc.service")

_Outcome = tuple[bool, object]
#: A call and where its outcome goes; None for a call handed over without waiting (call_soon).
_Item = tuple[Callable[[], object], tuple[list[_Outcome], threading.Lock] | None]


class ServiceThread:
    def __init__(
        self, name: str = "dsc-service-calls", initializer: Callable[[], object] | None = None
    ) -> None:
        self._name = name
        #: Run first in the thread (the blocking binding pins it to its CPU).
        self._initializer = initializer
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: Guards _running with the queue: no call is queued after the thread has left.
        self._lock = threading.Lock()
        self._running = False
        self._done = threading.local()
        self._ident: int | None = None

    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued; calls made afterwards run in their caller's thread."""
        with self._lock:
            if not self._running:
                return
            self._running = False
            self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self, function: Callable[[], object]) -> object:
        """``function()`` in the service thread; its result, or what it raised."""
        done: threading.Lock | None = getattr(self._done, "lock", None)
        if done is None:
            done = self._done.lock = threading.Lock()
        outcome: list[_Outcome] = []
        done.acquire()
        with self._lock:
            queued = self._running
            if queued:
                self._queue.put((function, (outcome, done)))
        if not queued:
            done.release()
            return function()
        done.acquire()  # released by the service thread when the call is over
        done.release()
        ok, value = outcome[0]
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        return value

    def call_soon(self, function: Callable[[], object]) -> None:
        """Queue ``function`` without waiting (the core's owner's hand-off, from any thread);
        raises RuntimeError once the thread stopped (the owner then runs it itself)."""
        with self._lock:
            if not self._running:
                raise RuntimeError("the service thread has stopped")
            self._queue.put((function, None))

    def is_current(self) -> bool:
        """Whether the calling thread is this service thread."""
        return threading.get_ident() == self._ident

    def settle(self, function: Callable[[], object]) -> object:
        """``function()`` and every resumption of the Wait chain it returns, each in the
        service thread; the waiting itself happens in the calling thread."""
        result = self.run(function)
        while isinstance(result, Wait):
            result.ticket.wait()
            result = self.run(result.resume)
        return result

    def _main(self) -> None:
        self._ident = threading.get_ident()
        if self._initializer is not None:
            self._initializer()
        while True:
            item = self._queue.get()
            if item is None:
                self._ident = None
                return
            function, waiter = item
            if waiter is None:
                try:
                    function()
                except Exception:  # a bug in one hand-off must not stop the others
                    log.exception("a call handed to the service thread failed")
                continue
            outcome, done = waiter
            try:
                outcome.append((True, function()))
            except BaseException as exc:  # handed to the caller, who reports it
                outcome.append((False, exc))
            finally:
                done.release()
