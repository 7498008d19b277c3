"""Web console sessions and the sign-in rate limit (issue 19, section 2).

A session is what a browser holds after signing in: an unguessable cookie value, the user, and
a CSRF token the page must send back in a header with every state-changing call (the cookie
alone is ambient: any page can make the browser send it; the header needs script of our own
origin, which reads the token from ``GET /api/session``).  Sessions live in memory only: a
restart signs everyone out, which is the safe failure.

Timeouts: a session unused for ``idle_seconds`` ends, and so does every session
``absolute_seconds`` after its sign-in, however busy.  Failed sign-ins are counted per client
address and per account name; past ``max_failures`` within ``window_seconds`` further attempts
are refused (HTTP 429) until the window has passed, so guessing passwords through the console
is slow and an account cannot be locked out from one address only.  Both tables are bounded.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["COOKIE", "Session", "SessionBook", "SignInLimiter", "cookie_value"]

#: The cookie's name (``__Host-`` would forbid it over plain HTTP on loopback, which the
#: development mode needs; the attributes are set as that prefix would demand under TLS).
COOKIE = "dsc_session"


@dataclass(frozen=True, slots=True)
class Session:
    token: str
    csrf: str
    #: Who signed in: the name given at sign-in, or the certificate's identity; "" in the
    #: development mode without client certificates or a directory (R10: everyone).
    user: str
    #: "password", "certificate" or "open" (development mode).
    method: str
    created: float
    last_used: float


def cookie_value(header: str | None, name: str = COOKIE) -> str | None:
    """The value of cookie ``name`` in a Cookie header (RFC 6265 section 5.4), or None."""
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


class SessionBook:
    """The open sessions (module doc); thread-safe (the blocking binding has many threads)."""

    def __init__(
        self,
        *,
        idle_seconds: float = 15 * 60.0,
        absolute_seconds: float = 8 * 3600.0,
        max_sessions: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_seconds = idle_seconds
        self.absolute_seconds = absolute_seconds
        self._max = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(self, user: str, method: str) -> Session:
        now = self._clock()
        session = Session(
            secrets.token_urlsafe(32), secrets.token_urlsafe(32), user, method, now, now
        )
        with self._lock:
            self._sessions[session.token] = session
            while len(self._sessions) > self._max:  # the least recently used goes first
                self._sessions.popitem(last=False)
        return session

    def find(self, token: str | None) -> Session | None:
        """The live session of cookie value ``token`` (its use counts as activity), or None."""
        if not token:
            return None
        now = self._clock()
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return None
            if (
                now - session.last_used >= self.idle_seconds
                or now - session.created >= self.absolute_seconds
            ):
                del self._sessions[token]
                return None
            session = dataclasses.replace(session, last_used=now)
            self._sessions[token] = session
            self._sessions.move_to_end(token)
            return session

    def close(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(token, None)

    def __len__(self) -> int:
        return len(self._sessions)


class SignInLimiter:
    """Failed sign-ins per address and per account (module doc)."""

    def __init__(
        self,
        *,
        max_failures: int = 5,
        window_seconds: float = 15 * 60.0,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def wait_seconds(self, address: str, account: str) -> float:
        """0 when a sign-in may be tried now, else how long until it may."""
        now = self._clock()
        with self._lock:
            longest = 0.0
            for key in self._keys(address, account):
                times = self._recent(key, now)
                if len(times) >= self.max_failures:
                    longest = max(longest, times[0] + self.window_seconds - now)
            return longest

    def failed(self, address: str, account: str) -> None:
        now = self._clock()
        with self._lock:
            for key in self._keys(address, account):
                times = self._recent(key, now)
                times.append(now)
                self._failures[key] = times
                self._failures.move_to_end(key)
            while len(self._failures) > self._max_keys:
                self._failures.popitem(last=False)

    def succeeded(self, address: str, account: str) -> None:
        with self._lock:
            for key in self._keys(address, account):
                self._failures.pop(key, None)

    @staticmethod
    def _keys(address: str, account: str) -> tuple[str, str]:
        return f"address {address}", f"account {account.lower()}"

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and now - times[0] >= self.window_seconds:
            times.popleft()
        return times
