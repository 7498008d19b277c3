"""A deadline on every answer of an SMB server (issue 21: connections with timeouts).

smbprotocol bounds the TCP connect and the negotiation, but smbclient's calls wait for every
other answer without a limit: a server that stops answering without closing the connection (hung,
frozen, a firewall dropping the packets) would hold a delivery thread forever.  Every call the
filter makes runs :meth:`AnswerWatch.within` a deadline; one thread per pool watches the
deadlines, and when one passes it aborts the connections to that server (the caller's
``on_silence``), which wakes the waiting call with an error.  The call then fails as a lost
connection (:class:`SmbConnectionLost`, errno ETIMEDOUT): the filter delivers once more on a
fresh connection, then reports the failure (R9; ``dsc retry`` runs it again).
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class SmbConnectionLost(ConnectionError):
    """The connection to the SMB server broke (server gone, reset, or silent past the timeout)."""


class AnswerWatch:
    """Deadlines of the SMB calls under way, and the thread that enforces them."""

    def __init__(self, on_silence: Callable[[str], None]) -> None:
        self._on_silence = on_silence
        self._cond = threading.Condition()
        #: call number -> (deadline on the monotonic clock, host)
        self._deadlines: dict[int, tuple[float, str]] = {}
        self._expired: set[int] = set()
        self._numbers = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def within(self, host: str, seconds: float, where: str) -> Iterator[None]:
        """Run the body's SMB calls to ``host``; past ``seconds`` the connection is aborted and
        the body's error becomes SmbConnectionLost (ETIMEDOUT)."""
        with self._cond:
            number = next(self._numbers)
            self._deadlines[number] = (time.monotonic() + seconds, host)
            self._start_locked()
            self._cond.notify()
        try:
            yield
        except OSError as exc:
            if self._forget(number):
                raise SmbConnectionLost(
                    errno.ETIMEDOUT, f"no answer from {host} within {seconds:g} s", where
                ) from exc
            raise
        finally:
            self._forget(number)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _forget(self, number: int) -> bool:
        """Stop watching call ``number``; True when its deadline had passed."""
        with self._cond:
            self._deadlines.pop(number, None)
            expired = number in self._expired
            self._expired.discard(number)
            return expired

    def _start_locked(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(
                target=self._watch, name="smb-answer-watch", daemon=True
            )
            self._thread.start()

    def _watch(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                silent = {n: host for n, (at, host) in self._deadlines.items() if at <= now}
                for n in silent:
                    del self._deadlines[n]
                    self._expired.add(n)
                if not silent:
                    soonest = min((at for at, _ in self._deadlines.values()), default=None)
                    self._cond.wait(None if soonest is None else soonest - now)
                    continue
            for host in sorted(set(silent.values())):
                log.warning("SMB server %s did not answer in time: aborting its connections", host)
                try:
                    self._on_silence(host)
                except Exception:  # the watch must outlive one bad abort
                    log.exception("aborting the connections to %s failed", host)


__all__ = ["AnswerWatch", "SmbConnectionLost"]
