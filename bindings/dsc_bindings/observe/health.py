"""What a scan needs, checked (issue 14, section 2): ``/healthz``, and the log at start.

=============  ==============================================================  ==========
check          passes when                                                     if not
=============  ==============================================================  ==========
``store``      the job store is open: SQLite's ``PRAGMA quick_check`` says      down (503)
               ``ok``; PostgreSQL answers (the database is reachable); the S3
               bucket answers (issue 17; a failure names the engine)
``data``       the data directory (spool) is writable by the server's user     down (503)
``cluster``    PostgreSQL store: this instance's heartbeat (runtime/cluster.py)  down (503)
               succeeded within ``[cluster] lease_seconds`` (else the others
               consider it down, and the load balancer must drop it too)
``share``      each share root exists, is a directory, and a file can be       down (503)
               created in it (one check per root, named by its UNC prefix)
``directory``  ``[directory]``: a bind as the configured account succeeds      degraded
               (a failure names the directory's URL)
``smtp``       ``[smtp]``: the relay accepts a connection (its 220 greeting)   degraded
=============  ==============================================================  ==========

``down``: scans cannot be kept or delivered; ``/healthz`` answers 503.  ``degraded``: scans
still reach the shares, but some users or deliveries fail (names not resolved, e-mail not
sent); ``/healthz`` answers 200 so that an orchestrator does not restart a server that still
works, and its body says ``degraded`` and names each failing check for monitoring to alert on.
``/metrics`` carries the same result as gauges (.metrics.HealthGauges).

The checks touch the disk and the network, so they never run on the event loop: a
:class:`HealthMonitor` runs them in a thread, each under a time limit, and keeps the result;
``/healthz`` reads the last result and, when it is older than ``max_age``, asks for a new one
(the answer after that one sees it).
"""

from __future__ import annotations

import logging
import os
import smtplib
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

__all__ = ["STATES", "Check", "Health", "HealthMonitor", "Probe", "run_probes"]

log = logging.getLogger("dsc.health")

#: Seconds each check may take; one that takes longer fails as "timed out".
CHECK_SECONDS = 5.0
#: How old a result may be before /healthz asks for a new one.
MAX_AGE_SECONDS = 5.0

State = Literal["ok", "degraded", "down"]
STATES: tuple[State, ...] = get_args(State)


@dataclass(frozen=True, slots=True)
class Check:
    """One check's result: ``problem`` is None when it passed."""

    name: str
    problem: str | None
    #: A failure makes the server down (True) or only degraded (False).
    essential: bool = True


@dataclass(frozen=True, slots=True)
class Health:
    checks: tuple[Check, ...]

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.problem is not None)

    @property
    def state(self) -> State:
        failed = self.failed
        if any(c.essential for c in failed):
            return "down"
        return "degraded" if failed else "ok"

    @property
    def status(self) -> int:
        return 503 if self.state == "down" else 200

    def text(self) -> str:
        """``ok``, or the state and one line per failing check (``name: problem``)."""
        lines = [self.state, *(f"{c.name}: {c.problem}" for c in self.failed)]
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Probe:
    """A check to run: ``run`` returns the problem, or None; it may block (off the loop)."""

    name: str
    run: Callable[[], str | None]
    essential: bool = True
    #: What the check asks (a path, a URL, a relay's address): a check that does not answer
    #: in time says whom it waited for, since its own message never comes.
    subject: str = ""

    def late(self, timeout: float) -> str:
        waited = f"no answer within {timeout:g} s"
        return f"{self.subject}: {waited}" if self.subject else waited


def writable_directory(path: Path) -> str | None:
    """The directory exists and the server's user can create a file in it.

    A file is created, not only ``os.access`` asked: access() answers from the mode bits,
    which root passes everywhere, while the file system may still refuse (sysfs, a read-only
    or root-squashed mount, an ACL).  ``TemporaryFile`` opens it with ``O_TMPFILE`` where the
    file system has it, so share users never see the probe; elsewhere it is unlinked at once.
    """
    try:
        if not path.exists():
            return f"{path} does not exist (create it, owned by the server's user)"
        if not path.is_dir():
            return f"{path} is not a directory"
        with tempfile.TemporaryFile(dir=path, prefix=".dsc-health-"):
            pass
    except OSError as exc:
        return (
            f"{path} is not writable by the server's user (uid {os.geteuid()}): "
            f"{exc.strerror or exc}"
        )
    return None


def smtp_accepts(host: str, port: int, timeout: float) -> str | None:
    """The relay answers a connection with its greeting (nothing is sent but QUIT)."""
    try:
        with smtplib.SMTP(host, port, timeout=timeout) as relay:
            relay.quit()
    except (OSError, smtplib.SMTPException) as exc:
        return f"relay {host}:{port} does not accept a connection ({exc})"
    return None


def run_probes(probes: Sequence[Probe], timeout: float = CHECK_SECONDS) -> Health:
    """Run the probes in parallel, each in a daemon thread (a hung network call must not hold
    the process at exit), each at most ``timeout`` seconds."""
    results: dict[int, str | None] = {}

    def run(index: int, probe: Probe) -> None:
        try:
            results[index] = probe.run()
        except Exception as exc:  # a check that raises has failed, saying why
            results[index] = f"check failed: {exc!r}"

    threads = [
        threading.Thread(target=run, args=(i, p), name=f"dsc-health-{p.name}", daemon=True)
        for i, p in enumerate(probes)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    checks = tuple(
        Check(p.name, results[i] if i in results else p.late(timeout), p.essential)
        for i, p in enumerate(probes)
    )
    return Health(checks)


class HealthMonitor:
    """Runs the probes off the event loop and keeps the last result (module doc)."""

    def __init__(
        self,
        probes: Callable[[], Sequence[Probe]],
        *,
        max_age: float = MAX_AGE_SECONDS,
        timeout: float = CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probes = probes
        self._max_age = max_age
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._last: Health | None = None
        self._taken = 0.0
        self._running = False

    def check_now(self) -> Health:
        """Run every check in the calling thread (start-up) and keep the result."""
        health = run_probes(self._probes(), self._timeout)
        with self._lock:
            self._last, self._taken = health, self._clock()
        return health

    def check_at_start(self) -> None:
        """Run every check now and log what to fix (the service's start, ``StartCheck``)."""
        log_health(self.check_now())

    def current(self) -> Health | None:
        """The last result, at once (never blocks); a refresh starts when it is old."""
        with self._lock:
            last = self._last
            stale = last is None or self._clock() - self._taken >= self._max_age
            start = stale and not self._running
            if start:
                self._running = True
        if start:
            threading.Thread(target=self._refresh, name="dsc-health", daemon=True).start()
        return last

    def _refresh(self) -> None:
        try:
            health = run_probes(self._probes(), self._timeout)
            with self._lock:
                self._last, self._taken = health, self._clock()
        finally:
            with self._lock:
                self._running = False


def log_health(health: Health) -> None:
    """At start: each failing check as one ERROR (down) or WARNING (degraded) line saying what
    to fix; one INFO line when every check passed."""
    if not health.failed:
        log.info("health: every check passed (%s)", ", ".join(c.name for c in health.checks))
        return
    for check in health.failed:
        if check.essential:
            log.error("health: %s: %s: no scan can be kept or delivered", check.name, check.problem)
        else:
            log.warning("health: %s: %s (scans continue, degraded)", check.name, check.problem)
