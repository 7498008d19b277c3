"""A copy in memory of what several instances write to one database, reloaded in the background.

The status page (event loop) reads the device book and the tally without waiting for a
database (issue 17 point 4: a slow database never blocks the event loop), yet with PostgreSQL
other instances write to the same rows (issue 18).  So the copy a reader gets is at most
:data:`MAX_AGE` seconds (plus one reload) older than the database: a read that finds it older
starts one reload on a thread of its own and answers from the copy it has.  The instance's own
writes update the copy as they commit (from the rows the statements return), so they show at
once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["MAX_AGE", "BackgroundReload"]

log = logging.getLogger("dsc.store")

#: Seconds a copy is served before a read starts a reload (module doc).
MAX_AGE = 2.0


class BackgroundReload:
    """Runs ``reload`` on its own thread when :meth:`due` finds the last one older than
    ``max_age`` seconds; one reload at a time, never on the caller's thread."""

    def __init__(self, what: str, reload: Callable[[], None], max_age: float = MAX_AGE) -> None:
        self._what = what
        self._reload = reload
        self.max_age = max_age
        self._lock = threading.Lock()
        self._loaded = time.monotonic()
        self._running = False
        self._failing = False

    def due(self) -> None:
        """A reader is about to use the copy: reload it in the background if it is old."""
        with self._lock:
            if self._running or time.monotonic() - self._loaded < self.max_age:
                return
            self._running = True
        threading.Thread(target=self._run, name=f"dsc-reload-{self._what}", daemon=True).start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._reload()
        except Exception as exc:  # the copy stays as it was; the next read tries again
            if not self._failing:
                log.warning("%s not reloaded from the database: %s", self._what, exc)
            self._failing = True
        else:
            if self._failing:
                log.info("%s reloaded from the database again", self._what)
            self._failing = False
        finally:
            with self._lock:
                self._loaded = started
                self._running = False
