"""Rate limit of UDP Probe replies per source address (issue 14 §4, bounded state).

A ProbeMatch is larger than the Probe that asks for it, and a UDP source address is not
checked: unlimited replies make the server an amplifier towards a spoofed address and let one
sender keep the discovery thread busy.  Each source address gets a token bucket (``RATE``
replies a second, bursts of ``BURST``); at most ``MAX_TRACKED`` addresses are tracked (the
ones whose bucket is full again are forgotten first), and beyond that every new address shares
one bucket, so memory stays bounded however many addresses send.  Excess Probes are dropped,
unanswered, and counted (``dsc_discovery_probes_dropped`` in /metrics).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BURST", "MAX_TRACKED", "RATE", "ProbeLimiter"]

#: Replies a second to one address, and the burst it may spend at once: a scanner or a
#: management client probes a handful of times when it looks for the server.
RATE = 2.0
BURST = 10.0
#: Source addresses tracked at once (a few hundred bytes each).
MAX_TRACKED = 4096


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class ProbeLimiter:
    """Token buckets per source address (module doc).  Used by one thread."""

    def __init__(
        self,
        rate: float = RATE,
        burst: float = BURST,
        max_tracked: int = MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_tracked = max_tracked
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        #: Shared by the addresses that find the table full.
        self._overflow = _Bucket(burst, clock())

    def allow(self, address: str) -> bool:
        """Whether a Probe from ``address`` gets a reply now (and spend a token if so)."""
        now = self._clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self.max_tracked:
                self._forget_full(now)
            if len(self._buckets) < self.max_tracked:
                bucket = self._buckets[address] = _Bucket(self.burst, now)
            else:
                bucket = self._overflow
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    @property
    def tracked(self) -> int:
        return len(self._buckets)

    def _forget_full(self, now: float) -> None:
        """Forget the addresses whose bucket has refilled: they are as if never seen."""
        refill = self.burst / self.rate
        for address in [a for a, b in self._buckets.items() if now - b.updated >= refill]:
            del self._buckets[address]
