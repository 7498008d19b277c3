"""The service's clock and ids: aware local time (R6) and random UUIDs, both cheap per request.

The core takes both as inputs (``RequestInfo.now``, ``ScanServer(new_id=...)``); tests pass
their own (a clock that jumps, ids that count).
"""

from __future__ import annotations

import os
import time
from datetime import datetime, tzinfo

__all__ = ["local_now", "new_uuid"]

#: The local zone as a fixed offset, and until when (time.monotonic()) it is trusted: finding
#: it (``astimezone``) consults the C library's zone rules, which profiled at about 5 us of each
#: request's 230 us; the offset changes twice a year, so it is looked up again every second.
_local_zone: tuple[float, tzinfo | None] = (-1.0, None)
_ZONE_RECHECK_SECONDS = 1.0


def local_now() -> datetime:
    """Aware local time (R6: times carry an explicit UTC offset)."""
    global _local_zone
    until, zone = _local_zone
    moment = time.monotonic()
    if zone is None or moment >= until:
        now = datetime.now().astimezone()
        _local_zone = (moment + _ZONE_RECHECK_SECONDS, now.tzinfo)
        return now
    return datetime.now(zone)


def new_uuid() -> str:
    """A random (version 4) UUID string, like ``str(uuid.uuid4())``.  Drawn from a list made
    256 at a time from one ``os.urandom`` call (profiled: one ``os.urandom`` call and a
    ``UUID`` object per id were about 3 us of each request; formatting each id under a lock,
    12k instructions, callgrind).  ``list.pop`` is atomic: threads need no lock, and two
    that find the list empty at once both refill it, each with fresh random ids."""
    while True:
        try:
            return _ids.pop()
        except IndexError:
            _ids.extend(_fresh_ids())


#: The version nibble's place is "4"; the variant nibble keeps its two random low bits under
#: the RFC variant's "10" (RFC 9562 section 4.1): hex digit -> hex digit.
_VARIANT = {f"{d:x}": f"{(d & 0x3) | 0x8:x}" for d in range(16)}
_BATCH = 256


def _fresh_ids() -> list[str]:
    h = os.urandom(16 * _BATCH).hex()
    variant = _VARIANT
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{variant[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * _BATCH, 32)
    ]


_ids: list[str] = []
# A forked worker (dsc serve --workers, uvicorn --workers) must not hand out its parent's ids.
os.register_at_fork(after_in_child=_ids.clear)
