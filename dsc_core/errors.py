"""The one exception the core's API raises on purpose (h11's LocalProtocolError, for callers)."""

from __future__ import annotations


class UsageError(Exception):
    """The caller misused the core's API (a bug in the binding, never caused by request bytes)."""
