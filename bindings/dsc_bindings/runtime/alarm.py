"""The ticker's sleep (runtime/service.py): until the core's next deadline, or until something
new may have brought that deadline forward, or until the service stops.

The core says exactly when its ``tick`` next has work (``ScanServer.next_deadline``: None when
nothing is due however long the binding sleeps), and that the answer can change with any call
that changes the server.  So the ticker sleeps until the deadline it read, and the core's owner
:meth:`Alarm.nudge` s it after each call that moved the core's count of such changes
(``ScanServer.deadline_changes``, runtime/owner.py): the ticker then reads the deadline again.
An idle server's ticker therefore does not wake each second (it used to: docs/performance.md).

A nudge is heeded no sooner than ``heed_after`` seconds after the sleep began (nudges given
meanwhile are kept, then end the sleep at once): under load every request nudges, and the ticker
reads the deadline (a hop into the core's owner) at most that often, not once per request.  A
nudge given before then does not wake the sleeper either (it wakes at that time by itself and
finds the nudge): on a busy server a wake-up of another thread takes the GIL from the event loop,
and may leave its thread waiting for a CPU to get it back, a delay of every request in flight.
"""

from __future__ import annotations

import enum
import threading
import time

__all__ = ["Alarm", "Wake"]


class Wake(enum.Enum):
    """Why :meth:`Alarm.sleep` returned."""

    DUE = "due"  # the time asked for has come
    NUDGED = "nudged"  # something may need the ticker sooner: read the deadline again
    STOPPED = "stopped"  # the service stops: the ticker ends


class Alarm:
    """A sleep that a nudge or a stop ends early (module doc); any thread may nudge or stop."""

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._nudged = False
        self._stopped = False
        #: When the sleep in progress heeds a nudge (monotonic); None while nobody sleeps.
        self._heed_at: float | None = None

    def nudge(self) -> None:
        """Something may have brought the next deadline forward.  Cheap when a nudge is
        already pending (every request of a busy server calls this): the flag is only read.
        That read may see a nudge the sleeper is just taking; the sleeper reads the deadline
        after taking it, so it sees the change that this nudge was about."""
        if self._nudged:
            return
        with self._condition:
            self._nudged = True
            if self._heed_at is not None and time.monotonic() >= self._heed_at:
                self._condition.notify_all()

    def clear(self) -> None:
        """Forget the nudges given so far: the caller is about to read the deadline, which
        answers them (a nudge after this ends the next sleep)."""
        with self._condition:
            self._nudged = False

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify_all()

    def sleep(self, seconds: float, heed_after: float = 0.0) -> Wake:
        """Sleep at most ``seconds``.  A stop ends it at once; a nudge (also one given before
        the call) ends it, though not before ``heed_after`` seconds."""
        began = time.monotonic()
        due = began + seconds
        heed = began + min(heed_after, seconds)
        with self._condition:
            self._heed_at = heed
            try:
                while not self._stopped:
                    now = time.monotonic()
                    if now >= due:
                        return Wake.DUE
                    if now >= heed and self._nudged:
                        self._nudged = False
                        return Wake.NUDGED
                    # Before ``heed`` the wait ends at ``heed`` by itself (nudge() does not
                    # notify then), and finds any nudge given meanwhile.
                    self._condition.wait((heed if now < heed else due) - now)
                return Wake.STOPPED
            finally:
                self._heed_at = None
