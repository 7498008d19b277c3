"""runtime/outbox.py's OutboxPump with a stand-in store and hub: what ``hand_now`` promises,
and that a row is handed to the hub once however its answer and the next claim interleave.

The last instance of a cluster to stop records its Stopped announcement, calls ``hand_now``,
then ends the subscriptions (``ScanService.shutdown``): each SubscriptionEnd must reach the
hub after the Stopped event, or the hub sends the event to a subscription already ended
(R7).  So ``hand_now`` may return only once every row this instance holds is in the hub,
including a row the pump's own thread claimed and has not handed over yet.

A claim reads the outbox in one snapshot: a row answered and deleted while the claim runs is
still in its answer.  The pump used to forget the row at its answer and hand it over again
(the subscriber heard the message twice, the repeat after the messages that followed it:
tests/e2e/test_cluster_events.py failed so under load with 19 events for 18).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from dsc_bindings.runtime.outbox import OutboxPump
from dsc_bindings.store.errors import StoreError
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


class Snapshots(Rows):
    """Each claim reads the rows first, then runs ``during_claim`` (what happens elsewhere
    while the statement runs), then answers what it read."""

    def __init__(self) -> None:
        super().__init__()
        self.during_claim: Callable[[], None] = lambda: None
        self.failing_deletes = 0

    def claim(self, me: str, lease_seconds: float) -> list[OutboxRow]:
        snapshot = list(self.rows)
        self.during_claim()
        return snapshot

    def answered(self, row_id: int) -> None:
        if self.failing_deletes:
            self.failing_deletes -= 1
            raise StoreError("deleting a sent notification: the database went away", True)
        super().answered(row_id)


class Answering:
    """A hub that sends nothing until told: ``answer()`` runs the oldest notification's
    ``done`` (the subscriber answered it)."""

    def __init__(self) -> None:
        self.accepted: list[Deliver] = []
        self.unanswered: list[Callable[[], None]] = []

    def deliver(self, command: Deliver, done: Callable[[], None] | None = None) -> None:
        self.accepted.append(command)
        assert done is not None
        self.unanswered.append(done)

    def answer(self) -> None:
        self.unanswered.pop(0)()


def test_a_row_answered_while_a_claim_reads_it_is_not_handed_again() -> None:
    rows, hub = Snapshots(), Answering()
    pump = OutboxPump(rows, hub, "me", poll_seconds=0.05, lease_seconds=5)  # type: ignore[arg-type]
    pump.hand_now()
    assert len(hub.accepted) == 1
    # The subscriber answers (the row is deleted) after the next claim's snapshot read it.
    rows.during_claim = hub.answer
    pump.hand_now()
    assert rows.rows == []  # answered and deleted meanwhile
    assert len(hub.accepted) == 1, hub.accepted  # not handed a second time
    rows.during_claim = lambda: None
    pump.hand_now()
    assert len(hub.accepted) == 1, hub.accepted
    # A later row of the same subscription is handed as usual.
    later = OutboxRow(2, STOPPED.subscription_id, STOPPED.address, STOPPED.content_type, b"y")
    rows.rows = [later]
    pump.hand_now()
    assert [c.parts for c in hub.accepted] == [(b"x",), (b"y",)]


def test_a_row_answered_whose_delete_failed_is_handed_again() -> None:
    rows, hub = Snapshots(), Answering()
    pump = OutboxPump(rows, hub, "me", poll_seconds=0.05, lease_seconds=5)  # type: ignore[arg-type]
    pump.hand_now()
    rows.failing_deletes = 1
    hub.answer()  # answered, but the row stays: it is sent again, with the same MessageID
    pump.hand_now()
    assert [c.parts for c in hub.accepted] == [(b"x",), (b"x",)]
