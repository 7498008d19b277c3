"""Sending the outbox of a shared store (issue 18 point 3, docs/architecture.md "Several
instances"): this instance's part of delivering every subscription's notifications.

An instance that makes a change writes its notifications as ``outbox`` rows with the change
(postgresql.py) and rings the doorbell.  Every instance runs one :class:`OutboxPump`: each
poll, and whenever the doorbell rings, it renews the delivery leases it holds and takes those of
subscriptions without a live owner that have rows (store/pgoutbox.py), then hands the rows of
the subscriptions it holds, in id order, to its :class:`~.delivery.DeliveryHub`, which sends
them under today's rules (one bounded queue per subscription, timeouts, give-up after
failures, SubscriptionEnd; the core counts the failures).  Each row is deleted once its message
was answered, before that subscription's next message is sent: an owner that dies leaves the
rows not yet sent plus at most the one in flight, which its successor sends again with the same
MessageID (at most one duplicate per failover).  A clean stop releases the leases, so the
others take over at once instead of after the lease.

A row answered and deleted while a claim was running may still be in that claim's answer (its
snapshot began before the delete committed): it is remembered as deleted until a claim that
began after the delete has run, so the owner never hands it to its hub a second time (a
repeat, with the same MessageID, sent after the messages that followed it;
tests/bindings/test_outbox_pump.py).
"""

from __future__ import annotations

import functools
import logging
import threading
import time

from dsc_bindings.runtime.delivery import DeliveryHub
from dsc_bindings.store.errors import StoreError
from dsc_bindings.store.pgoutbox import OutboxRows
from dsc_core import Deliver

__all__ = ["OutboxPump"]

log = logging.getLogger("dsc.delivery")

#: A failing database is logged at most this often.
_LOG_EVERY_SECONDS = 10.0
#: The doorbell is waited for in slices this long, so that a stop is seen at once.
STOP_CHECK_SECONDS = 0.1


class OutboxPump:
    """See the module doc.  ``start()``, ``stop()`` (no more handing), then, once the hub
    has finished what it holds, ``release()``."""

    def __init__(
        self,
        rows: OutboxRows,
        hub: DeliveryHub,
        me: str,
        *,
        poll_seconds: float,
        lease_seconds: float,
    ) -> None:
        self._rows = rows
        self._hub = hub
        self._me = me
        self._poll = poll_seconds
        self._lease = lease_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        #: Held for a whole pass of :meth:`_pump`: :meth:`hand_now` returns only once a pass
        #: the thread is in has handed its rows over (see there).
        self._pumping = threading.Lock()
        #: Rows handed to the hub and not yet answered.
        self._handed: set[int] = set()
        #: Claims begun so far, and row id -> how many had begun when the row was deleted: a
        #: claim numbered below that may still return it (module doc).
        self._claims = 0
        self._deleted: dict[int, int] = {}
        self._logged = float("-inf")
        self._thread = threading.Thread(target=self._run, name="dsc-outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._poll + 5.0)
        if self._thread.is_alive():
            log.warning("the outbox thread did not stop in time")

    def hand_now(self) -> None:
        """Hand the rows this instance may send to the hub now, in the calling thread (the
        last instance's stop: its Stopped announcement before the subscriptions end,
        ``ScanService.shutdown``).  A row the pump's thread handed already is not handed
        again; one it claimed and is still handing over is in the hub when this returns (it
        waits for the thread's pass), so a SubscriptionEnd given to the hub next cannot
        overtake it (the hub would then send the event to a subscription already ended)."""
        try:
            self._pump()
        except StoreError as exc:
            self._log(exc)

    def release(self) -> None:
        """Give up this instance's delivery leases (a clean stop)."""
        try:
            self._rows.release(self._me)
        except StoreError as exc:
            log.warning(
                "cannot release the delivery leases (%s): other instances take over "
                "once they lapse",
                exc.message,
            )
        self._rows.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._pump()
                self._wait_for_rows()
            except StoreError as exc:
                self._log(exc)
                self._stop.wait(self._poll)
            except Exception:  # a bug must not stop the deliveries for the rest of the run
                log.exception("sending the outbox failed")
                self._stop.wait(self._poll)

    def _wait_for_rows(self) -> None:
        """Until the doorbell rings or the poll interval passes, in slices of
        :data:`STOP_CHECK_SECONDS`: a stop must not wait out the poll (every stop of a
        PostgreSQL-backed server waited up to 2 s here)."""
        deadline = time.monotonic() + self._poll
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self._rows.wait(min(left, STOP_CHECK_SECONDS)):
                return

    def _pump(self) -> None:
        with self._pumping:
            self._hand_claimed()

    def _hand_claimed(self) -> None:
        with self._lock:
            number = self._claims
            self._claims += 1
        rows = self._rows.claim(self._me, self._lease)
        with self._lock:
            fresh = [r for r in rows if r.id not in self._handed and r.id not in self._deleted]
            self._handed.update(r.id for r in fresh)
            # This claim began after these deletes committed: no later one returns them.
            self._deleted = {i: n for i, n in self._deleted.items() if n > number}
        for row in fresh:
            command = Deliver(row.subscription_id, row.address, (row.message,), row.content_type)
            self._hub.deliver(command, functools.partial(self._answered, row.id))

    def _answered(self, row_id: int) -> None:
        """In a hub worker thread, before the subscription's next message is sent."""
        deleted = False
        try:
            self._rows.answered(row_id)
            deleted = True
        except StoreError as exc:
            # Left in the table: sent again (same MessageID) when this instance reads it next.
            log.warning("notification %d answered but not deleted: %s", row_id, exc.message)
        finally:
            with self._lock:
                self._handed.discard(row_id)
                if deleted:  # a claim running now may still return it (module doc)
                    self._deleted[row_id] = self._claims

    def _log(self, exc: StoreError) -> None:
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_SECONDS:
            self._logged = now
            log.warning("cannot read the outbox (%s): notifications wait", exc.message)
