"""The one way a test waits for something another thread or process does: poll a predicate
until it holds, and fail saying what was awaited (never a bare sleep, never a time asserted)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 30.0, what: str = "", interval: float = 0.02
) -> T:
    """Poll until ``predicate()`` is truthy and return its value; after ``timeout`` seconds,
    fail naming ``what`` (else the predicate).  The timeout only bounds a failing test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what or predicate}")
        time.sleep(interval)
