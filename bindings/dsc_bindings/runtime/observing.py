"""What the runtime reports, and to whom: small Protocols the composition root fills.

The runtime sits below the observer, the status page and the health checks
(``dsc_bindings.observe``, tests/project/test_module_graph.py): it never imports them.
``dsc_bindings.serve`` builds the :class:`~dsc_bindings.observe.observer.Observer` and the
:class:`~dsc_bindings.observe.health.HealthMonitor` and hands them to the
:class:`~dsc_bindings.runtime.service.ScanService` as these two roles.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from dsc_core import Command, Job

__all__ = ["ServiceObserver", "StartCheck"]


class ServiceObserver(Protocol):
    """The job log, metrics and device records as the runtime feeds them."""

    def open(self, jobs: Sequence[Job], now: datetime | None = None) -> None:
        """The store was opened with ``jobs`` in it."""
        ...

    def close(self) -> None: ...

    def bound_devices(self, now: datetime) -> None:
        """Apply the device book's retention and cap (the ticker, hourly)."""
        ...

    def request_commands(
        self, commands: Sequence[Command], address: str | None, identity: str | None
    ) -> None:
        """A request's commands, with who asked (called by the core's owner)."""
        ...

    def request_ended(self, operation: str, fault: str | None) -> None: ...

    def applied(self, command: Command) -> None:
        """A store command was carried out: it is durable (the writer's threads)."""
        ...

    def store_failed(self, message: str) -> None: ...

    def event_delivery_failed(self) -> None: ...


class StartCheck(Protocol):
    """What a scan needs, checked once at start and logged (``.observe.health``)."""

    def check_at_start(self) -> None: ...
