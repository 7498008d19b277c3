"""What tells a binding that :meth:`ScanServer.next_deadline` may have moved: a count of the
changes to what it reads (the subscriptions' expiries, the idle Creating jobs and the uploads
that keep a job from being idle, the documents kept for a re-run, the configuration and the
leadership).

Each of those changes bumps the count in the one place it happens (``JobTable``,
``JobLifecycle``'s kept documents, ``Subscriptions``, ``ScanServer.reconfigure``/``lead``/
``follow``); reads leave it.  The binding compares it after each call into the core and reads
the deadline again when it moved, whichever call it was (a change without a command included),
so no caller has to remember to.  A count, not a time: the core stays pure (no clock)."""

from __future__ import annotations

__all__ = ["DeadlineChanges"]


class DeadlineChanges:
    """A counter of changes that may move the next deadline (module doc).  It only grows; a
    change that moves the deadline later, or not at all, may count too (the binding then reads
    an unchanged deadline once), one that may bring it forward always does."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        #: Compared with the value last seen, never read as a quantity.
        self.count = 0

    def moved(self) -> None:
        self.count += 1
