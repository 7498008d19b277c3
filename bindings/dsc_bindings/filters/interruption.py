"""A run of a job's filters that stops for a reason that is not the job's (issue 18 point 2).

The job store or the spool does not answer for a moment (PostgreSQL restarting, S3 unreachable
while the documents are read): nothing is wrong with the job, so it must not fail.  The run
stops where it is, as if the server had crashed there, and the job resumes later (R13, docs/
rulings.md "A job interrupted by a crash resumes"): finished filters stay done, the interrupted
one runs again idempotently.  Which store errors are interruptions is decided in one place,
``dsc_bindings.store.interruption``; what the engine does with one, in ``.engine``."""

from __future__ import annotations

__all__ = ["Interrupted"]


class Interrupted(Exception):
    """The run cannot go on now, through no fault of the job (module doc): raised through a
    filter (``common.never_raises`` lets it pass) to the engine, which reports nothing more of
    the run and hands the job back to be resumed."""
