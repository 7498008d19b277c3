"""A run of a job's filters that stops for a reason that is not the job's (issue 18 point 2).

The job store or the spool does not answer for a moment (PostgreSQL restarting, S3 unreachable
while the documents are read): nothing is wrong with the job, so it must not fail.  The run
stops where it is, as if the server had crashed there, and the job resumes later (R13, docs/
rulings.md "A job interrupted by a crash resumes"): finished filters stay done, the interrupted
one runs again idempotently.  Which store errors are interruptions is decided in one place,
``dsc_bindings.store.interruption``; what the engine does with one, in ``.engine``."""

from __future__ import annotations

__all__ = ["Interrupted"]


class Interrupted(BaseException):
    """The run cannot go on now, through no fault of the job (module doc): raised through a
    filter to the engine, which reports nothing more of the run and hands the job back to be
    resumed (``engine.ProcessingEngine._work``, the one place that catches it).

    A BaseException, not an Exception, for the reason asyncio's ``CancelledError`` (Python 3.8
    on) and trio's ``Cancelled`` are: it is no error of the code it passes through but an order
    to stop, and the catch-alls on its way (in ``common.never_raises``, in the engine, the
    ``except Exception`` in any filter a third party writes) exist to turn a bug into a failed
    filter, which this must never become (a failed filter ends the job Aborted for good,
    PostScanJobProcessingFailed).  As an Exception every such catch-all had to re-raise it
    first, and one that forgot failed the job.  The project's own two (``never_raises`` and
    the engine's one guard, ``engine._Contained``) take every other BaseException and let it
    pass: a SystemExit in a filter is a failed filter, not a dead worker
    (docs/architecture.md).  What a filter may do with it: clean up in
    ``finally`` or in ``except BaseException: ...; raise``; never catch BaseException without
    raising again (docs/architecture.md, "Filters")."""
