"""runtime/outbox.py's OutboxPump with a stand-in store and hub: what ``hand_now`` promises.

The last instance of a cluster to stop records its Stopped announcement, calls ``hand_now``,
then ends the subscriptions (``ScanService.shutdown``): each SubscriptionEnd must reach the
hub after the Stopped event, or the hub sends the event to a subscription already ended
(R7).  So ``hand_now`` may return only once every row this instance holds is in the hub,
including a row the pump's own thread claimed and has not handed over yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from dsc_bindings.runtime.outbox import OutboxPump
from dsc_bindings.store.pgoutbox import OutboxRow
from dsc_core import Deliver

STOPPED = OutboxRow(1, "urn:uuid:sub", "http://127.0.0.1:1/sink", "application/soap+xml", b"x")


class Rows:
    """The outbox table holding one row until it is answered."""

    def __init__(self) -> None:
        self.rows = [STOPPED]

    def claim(self, me: str, lease_seconds: float) -> list[OutboxRow]:
        return list(self.rows)

    def answered(self, row_id: int) -> None:
        self.rows = [r for r in self.rows if r.id != row_id]

    def release(self, me: str) -> None:
        pass

    def wait(self, timeout: float) -> bool:
        threading.Event().wait(timeout)
        return False

    def close(self) -> None:
        pass


class Hub:
    """Records what it accepted; the pump thread's first hand-over is held at ``go``."""

    def __init__(self) -> None:
        self.accepted: list[Deliver] = []
        self.entered = threading.Event()
        self.go = threading.Event()

    def deliver(self, command: Deliver, done: Callable[[], None] | None = None) -> None:
        if threading.current_thread().name == "dsc-outbox" and not self.entered.is_set():
            self.entered.set()
            self.go.wait(10)
        self.accepted.append(command)


def test_hand_now_returns_only_once_a_row_the_pump_thread_claimed_is_in_the_hub() -> None:
    rows, hub = Rows(), Hub()
    pump = OutboxPump(rows, hub, "me", poll_seconds=0.05, lease_seconds=5)  # type: ignore[arg-type]
    pump.start()
    try:
        assert hub.entered.wait(10)  # the thread claimed the row and is handing it over
        seen_at_return: list[list[Deliver]] = []
        stopping = threading.Thread(
            target=lambda: (pump.hand_now(), seen_at_return.append(list(hub.accepted)))
        )
        stopping.start()
        stopping.join(1.0)  # a hand_now that does not wait for the thread returns here
        hub.go.set()
        stopping.join(10)
        assert not stopping.is_alive()
        # When hand_now returned, the Stopped row was in the hub: a SubscriptionEnd handed
        # over next cannot overtake it.
        assert [c.subscription_id for c in seen_at_return[0]] == [STOPPED.subscription_id]
    finally:
        hub.go.set()
        pump.stop()
