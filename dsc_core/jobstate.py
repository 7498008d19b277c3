"""The job state machine of R6: one table of (state, input) -> (new state, reason).

Invariants (checked by tests/test_jobstate.py over every pair):
- A job is created in Creating (reason None), or directly Aborted with
  NoValidPostScanInstructionsFound when no filter is usable; that is not a transition.
- Only Creating accepts images and EndPostScanJob.  Only active states accept a cancel.
- Completed, Aborted and Canceled are final: no input leaves them.
- Pending-Held and Terminating are never entered by this server (the spec reaches Pending-Held
  only "by means outside this protocol", and Windows never returns Terminating, note <9>); they are
  in the table so that a job restored in them can still be canceled.
- A pair that is not in the table is refused: a request input gets the fault named in
  ``REFUSALS`` (R4 step 7 or 8); an input from the processing engine is stale and ignored.
"""

from __future__ import annotations

import enum
from typing import Final

from .model import JobState, JobStateReason

S = JobState
R = JobStateReason


class JobInput(enum.Enum):
    # From requests (WS-DSP or MS-BDSRR)
    IMAGE = "SendImage"
    END = "EndPostScanJob"
    CANCEL = "CancelPostScanJob"
    # From the clock (tick)
    TIMEOUT = "Timeout"
    # From the processing engine
    ENGINE_STARTED = "ProcessingStarted"
    FILTER_STARTED = "FilterStarted"
    FILTER_FINISHED = "FilterFinished"
    COMPLETE_SUCCESSFULLY = "CompleteSuccessfully"
    COMPLETE_WITH_WARNINGS = "CompleteWithWarnings"
    COMPLETE_WITH_ERRORS = "CompleteWithErrors"
    FAIL = "Fail"
    # From a restart: processing was interrupted by a crash
    INTERRUPTED = "Interrupted"

    @property
    def from_request(self) -> bool:
        return self in (JobInput.IMAGE, JobInput.END, JobInput.CANCEL)


I = JobInput

#: None as the reason means "keep the current reasons".
TRANSITIONS: Final[dict[tuple[JobState, JobInput], tuple[JobState, JobStateReason | None]]] = {
    (S.CREATING, I.IMAGE): (S.CREATING, None),
    (S.CREATING, I.END): (S.PENDING, R.NONE),
    (S.CREATING, I.TIMEOUT): (S.ABORTED, R.TIMED_OUT),
    (S.PENDING, I.ENGINE_STARTED): (S.STARTED, R.NONE),
    (S.STARTED, I.FILTER_STARTED): (S.PROCESSING, R.NONE),
    (S.PROCESSING, I.FILTER_STARTED): (S.PROCESSING, None),
    (S.PROCESSING, I.FILTER_FINISHED): (S.PROCESSING, None),
    (S.STARTED, I.COMPLETE_SUCCESSFULLY): (S.COMPLETED, R.COMPLETED_SUCCESSFULLY),
    (S.STARTED, I.COMPLETE_WITH_WARNINGS): (S.COMPLETED, R.COMPLETED_WITH_WARNINGS),
    (S.STARTED, I.COMPLETE_WITH_ERRORS): (S.COMPLETED, R.COMPLETED_WITH_ERRORS),
    (S.STARTED, I.FAIL): (S.ABORTED, R.PROCESSING_FAILED),
    (S.PROCESSING, I.COMPLETE_SUCCESSFULLY): (S.COMPLETED, R.COMPLETED_SUCCESSFULLY),
    (S.PROCESSING, I.COMPLETE_WITH_WARNINGS): (S.COMPLETED, R.COMPLETED_WITH_WARNINGS),
    (S.PROCESSING, I.COMPLETE_WITH_ERRORS): (S.COMPLETED, R.COMPLETED_WITH_ERRORS),
    (S.PROCESSING, I.FAIL): (S.ABORTED, R.PROCESSING_FAILED),
    (S.STARTED, I.INTERRUPTED): (S.ABORTED, R.PROCESSING_FAILED),
    (S.PROCESSING, I.INTERRUPTED): (S.ABORTED, R.PROCESSING_FAILED),
    # R6: cancel from either protocol on any active job, at once, with the single reason.
    (S.CREATING, I.CANCEL): (S.CANCELED, R.CANCELED),
    (S.PENDING, I.CANCEL): (S.CANCELED, R.CANCELED),
    (S.PENDING_HELD, I.CANCEL): (S.CANCELED, R.CANCELED),
    (S.STARTED, I.CANCEL): (S.CANCELED, R.CANCELED),
    (S.PROCESSING, I.CANCEL): (S.CANCELED, R.CANCELED),
    (S.TERMINATING, I.CANCEL): (S.CANCELED, R.CANCELED),
}

#: The fault for a request input in a state that does not accept it (R4 steps 7 and 8).
#: A completed job is no longer "currently processing": cancel answers JobTokenNotFound (R6).
REFUSALS: Final[dict[JobInput, str]] = {
    I.IMAGE: "OperationFailed",
    I.END: "OperationFailed",
    I.CANCEL: "ClientErrorJobTokenNotFound",
}


class Refused(Exception):
    """The table has no entry for (state, input).  ``fault`` names the R4 fault for a request
    input, or is None for a stale engine/clock input that is to be ignored."""

    def __init__(self, state: JobState, job_input: JobInput) -> None:
        super().__init__(f"{job_input.value} is not accepted in state {state.value}")
        self.state = state
        self.input = job_input
        self.fault = REFUSALS.get(job_input)


def transition(state: JobState, job_input: JobInput) -> tuple[JobState, JobStateReason | None]:
    try:
        return TRANSITIONS[(state, job_input)]
    except KeyError:
        raise Refused(state, job_input) from None
