"""``dsc serve --workers N``: N server processes on one host sharing the listening port
(issue 18 point 5), so that a machine with more cores uses them.

The parent only supervises.  Each worker is ``dsc serve`` again with a hidden ``--worker-index``:
its listener has SO_REUSEPORT (the kernel spreads connections among the workers), it is an
instance of the cluster on the PostgreSQL store (its own ``instances`` row), it has a local
folder of its own (``DATA/workers/<n>``: the data-folder lock, spool copies, device book), and
worker 0 alone answers UDP discovery.  SIGTERM, SIGINT and SIGHUP to the parent are passed to
every worker; a worker that dies is started again after a backoff (1 s, doubling up to 30 s);
more than :data:`MAX_DEATHS` deaths within :data:`DEATH_WINDOW` seconds stop the others and the
parent exits 1.  With the SQLite store a second worker is refused (one process per data folder).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

log = logging.getLogger("dsc.workers")

#: Restarts allowed before the parent gives up (it cannot keep its workers).
MAX_DEATHS = 5
DEATH_WINDOW = 60.0
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
#: How long the workers get to stop after SIGTERM before they are killed.
STOP_SECONDS = 30.0

SQLITE_REFUSAL = (
    "--workers {n}: the SQLite store is one process's (one server per data folder); "
    'use [store] kind = "postgresql" to run several workers'
)


def worker_command(argv: Sequence[str], index: int) -> list[str]:
    """``dsc serve`` with the parent's options but ``--workers``, as worker ``index``."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        kept.append(arg)
    return [sys.executable, "-m", "dsc_bindings.console.main", *kept, "--worker-index", str(index)]


def supervise(argv: Sequence[str], count: int) -> int:
    """Run ``count`` workers until a stop signal; 0 when every worker stopped cleanly."""
    commands = [worker_command(argv, i) for i in range(count)]
    workers: list[subprocess.Popen[bytes] | None] = [None] * count
    due = [0.0] * count  # when a dead worker is started again
    backoff = [FIRST_BACKOFF] * count
    deaths: list[float] = []
    stopping: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP: passed to %d worker(s)", count)
            for proc in workers:
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGHUP)
            return
        stopping.append(signum)

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    failed = False
    try:
        while not stopping:
            now = time.monotonic()
            for i in range(count):
                proc = workers[i]
                if proc is not None and proc.poll() is not None:
                    log.error(
                        "worker %d (pid %d) exited with %s: starting it again in %.0f s",
                        i,
                        proc.pid,
                        proc.returncode,
                        backoff[i],
                    )
                    deaths.append(now)
                    due[i] = now + backoff[i]
                    backoff[i] = min(MAX_BACKOFF, backoff[i] * 2)
                    workers[i] = None
                if workers[i] is None and now >= due[i]:
                    workers[i] = subprocess.Popen(commands[i])
                    log.info("worker %d started: pid %d", i, workers[i].pid)  # type: ignore[union-attr]
            recent = [t for t in deaths if now - t < DEATH_WINDOW]
            if len(recent) > MAX_DEATHS:
                log.error(
                    "%d worker deaths within %.0f s: cannot keep %d workers, stopping",
                    len(recent),
                    DEATH_WINDOW,
                    count,
                )
                failed = True
                break
            time.sleep(0.2)
        if stopping:
            log.info("signal %s: stopping %d worker(s)", signal.Signals(stopping[0]).name, count)
        codes = _stop(workers)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        return 1
    return 0 if all(code == 0 for code in codes) else 1


def _stop(workers: Sequence[subprocess.Popen[bytes] | None]) -> list[int]:
    running = [proc for proc in workers if proc is not None]
    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    codes = []
    for proc in running:
        try:
            codes.append(proc.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            log.error("worker pid %d did not stop within %.0f s: killed", proc.pid, STOP_SECONDS)
            proc.kill()
            codes.append(proc.wait())
    return codes
