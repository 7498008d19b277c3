"""How the blocking ``dsc serve`` learns of SIGINT, SIGTERM and SIGHUP (serve.SignalInbox).

A Python signal handler runs in the main thread between any two steps of whatever that thread
was doing.  The blocking binding's main thread waits for a signal; a handler that took a lock
the wait itself holds for an instant (``threading.Event.set()`` takes the Event's Condition,
which ``Event.wait(timeout)`` holds on its way out of every timed wait) hangs the process for
good: the blocking ``dsc serve`` once stayed up > 20 s after SIGTERM, its log ending at the
"signal SIGTERM: shutting down" line (test_e2e_serve.py::test_cancel_while_processing).

A profile hook calls the handler at one chosen step of the waiting thread, as a signal arriving
at that moment would; every step is tried in turn."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from dsc_bindings.serve import SignalInbox

#: Steps of the wait (profile events) at which a signal is delivered, one run each; an
#: Event-based wait hangs from the 5th on (measured), a wait loop takes ~2 per turn.
STEPS = range(1, 40)


def wait_with_a_signal_at(step: int, signum: int) -> tuple[bool, list[int]]:
    """Whether the wait ended, and what it returned, with ``signum`` delivered at ``step``."""
    inbox = SignalInbox(poll=0.01)
    received: list[int] = []
    seen = 0

    def hook(frame: FrameType, event: str, arg: object) -> None:
        nonlocal seen
        seen += 1
        if seen == step:
            inbox.handler(signum, None)

    def wait() -> None:
        sys.setprofile(hook)
        try:
            received.append(inbox.next())
        finally:
            sys.setprofile(None)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(10)
    return not thread.is_alive(), received


def test_a_signal_at_any_moment_of_the_wait_is_received() -> None:
    for step in STEPS:
        ended, received = wait_with_a_signal_at(step, signal.SIGTERM)
        assert ended, f"the wait hung when the signal came at step {step}"
        assert received == [signal.SIGTERM], (step, received)


def test_signals_are_received_in_order_and_none_is_lost() -> None:
    inbox = SignalInbox()
    for signum in (signal.SIGHUP, signal.SIGHUP, signal.SIGTERM):
        inbox.handler(signum, None)
    assert [inbox.next() for _ in range(3)] == [signal.SIGHUP, signal.SIGHUP, signal.SIGTERM]
