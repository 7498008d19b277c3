"""The operation registry: every operation the server answers, by WS-Addressing Action.

Each protocol module declares its operations (``OPERATIONS``: action, argument reader, handler,
and for SendImage the upload step); this module gathers them and refuses two claims on one
action.  docs/contributing.md "Adding an operation" walks through adding one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from . import bdsrr, dsp, metadata, subscription_ops
from .operation import Operation


class Registry:
    """Operations by action URI."""

    def __init__(self, operations: Iterable[Operation[Any]]) -> None:
        self._by_action: dict[str, Operation[Any]] = {}
        for operation in operations:
            if operation.action in self._by_action:
                raise ValueError(f"two operations declare the action {operation.action}")
            self._by_action[operation.action] = operation

    def get(self, action: str) -> Operation[Any] | None:
        return self._by_action.get(action)

    def __iter__(self) -> Iterator[Operation[Any]]:
        return iter(self._by_action.values())


#: Every operation of this server.
OPERATIONS = Registry(
    dsp.OPERATIONS + bdsrr.OPERATIONS + metadata.OPERATIONS + subscription_ops.OPERATIONS
)
