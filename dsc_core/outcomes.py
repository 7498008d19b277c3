"""How a job turned out, in one word: the vocabulary every view of a job uses (issue 14 §3).

R6 ends a job in one of three states, but the state alone hides failures: a job whose filter
could not deliver still ends ``Completed`` (reason ``PostScanJobCompletedWithErrors``) when it
asked for ``ContinueOnError``.  The job log, ``/metrics`` (``dsc_jobs_ended_total{outcome}``),
the status page, ``dsc jobs``/``dsc history`` and the device counts all read the outcome from
:func:`job_outcome`, so they cannot disagree about what failed.

The function reads the wire values (strings), so a job record of the server and a job a client
read off the wire (``client.JobView``) give the same answer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = ["ENDED_OUTCOMES", "JobOutcome", "job_outcome"]

_ENDED = frozenset({"Completed", "Aborted", "Canceled"})
#: R6 reasons that say a filter did not deliver (2.2.5.11).
_FILTER_FAILED = frozenset({"PostScanJobCompletedWithErrors", "PostScanJobProcessingFailed"})
#: Filter states (2.2.5.6) of a filter that delivered its documents.
_DELIVERED = frozenset({"CompletedSuccessfully", "CompletedWithWarnings"})


class JobOutcome(str, enum.Enum):
    """One word per way a job can end (plus ``active`` for a job that has not ended)."""

    ACTIVE = "active"
    #: Completed, successfully or with warnings: every filter delivered.
    SUCCEEDED = "succeeded"
    #: A filter failed, another one delivered (ContinueOnError, or a failure after a success).
    PARTIAL = "partial"
    #: A filter failed and no filter delivered anything.
    FAILED = "failed"
    #: Aborted before any filter ran: timed out while Creating, no valid instructions, ...
    ABORTED = "aborted"
    #: Canceled by a client (R6): someone chose it, so it is not counted as a failure.
    CANCELED = "canceled"

    @property
    def is_failure(self) -> bool:
        """Shown as a failure (red or amber, WARNING in the log, ``--failed``)."""
        return self in (JobOutcome.PARTIAL, JobOutcome.FAILED, JobOutcome.ABORTED)


#: Every outcome of an ended job (metric labels, CLI choices).
ENDED_OUTCOMES = tuple(o for o in JobOutcome if o is not JobOutcome.ACTIVE)


def job_outcome(state: str, reasons: Iterable[str], filter_states: Iterable[str]) -> JobOutcome:
    """The outcome of a job from its JobState, JobStateReasons and its filters' FilterStates.

    A reason of :data:`_FILTER_FAILED` (or any other ``...Failed`` reason a Completed job may
    carry) makes a Completed or Aborted job ``partial`` when some filter delivered, else
    ``failed``; an Aborted job without one never ran a filter (``aborted``).
    """
    if state not in _ENDED:
        return JobOutcome.ACTIVE
    if state == "Canceled":
        return JobOutcome.CANCELED
    reasons = tuple(reasons)
    filter_failed = any(r in _FILTER_FAILED for r in reasons) or (
        state == "Completed" and any(r.endswith("Failed") for r in reasons)
    )
    if not filter_failed:
        return JobOutcome.SUCCEEDED if state == "Completed" else JobOutcome.ABORTED
    if any(s in _DELIVERED for s in filter_states):
        return JobOutcome.PARTIAL
    return JobOutcome.FAILED
