"""A run of a job's filters that stops for a reason that is not the job's (issue 18 point 2).

The job store or the spool does not answer for a moment (PostgreSQL restarting, S3 unreachable
while the documents are read): nothing is wrong with the job, so it must not fail.  The run
stops where it is, as if the server had crashed there, and the job resumes later (R13, docs/
rulings.md "A job interrupted by a crash resumes"): finished filters stay done, the interrupted
one runs again idempotently.  Which store errors are interruptions is decided in one place,
``dsc_bindings.store.interruption``; what the engine does with one, in ``.engine``."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

__all__ = ["Contained", "Interrupted"]

#: Where a contained step is logged unless the caller names its own logger.
log = logging.getLogger("dsc_bindings.filters.engine")

#: What a step run on the main thread lets go to the program (:class:`Contained`): a real
#: Ctrl-C (Python raises it for SIGINT on the main thread only) and ``sys.exit``.
_PROGRAM_STOPS = (KeyboardInterrupt, SystemExit)


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
    the engine's one guard, ``Contained`` below) take every other BaseException and let it
    pass: a SystemExit in a filter is a failed filter, not a dead worker
    (docs/architecture.md).  What a filter may do with it: clean up in
    ``finally`` or in ``except BaseException: ...; raise``; never catch BaseException without
    raising again (docs/architecture.md, "Filters")."""


class Contained:
    """The one rule for what a step of a job may raise, in the engine (the spool read, a
    filter, a report, the ``interrupted`` and ``freed`` callbacks) and in
    ``common.never_raises``: anything but the types in ``passes``
    is logged at ERROR with its traceback and goes no further, so the step counts as failed
    and the worker goes on with the job and then the next one.

    Any BaseException, not only Exception: a worker thread is the engine's, and nothing else
    catches there; a SystemExit, GeneratorExit or KeyboardInterrupt raised in it can mean
    nothing but the end of that thread, which stays counted in ``_workers`` with its job never
    finished and its place never freed.  Interrupted passes by default: it is no failure but
    the order to stop the run, which ``engine.ProcessingEngine._work`` alone takes.

    On the main thread KeyboardInterrupt and SystemExit pass too, whatever ``passes`` says:
    there they mean what their raiser meant, the user's Ctrl-C or the program's exit, the
    program's to take, not a failed step.  The engine never runs a step there (its workers
    are threads of their own), but a filter is a plain function (``engine.DEFAULT_RUNNERS``,
    exported by ``dsc_bindings.filters``) that a program may call on its main thread, as
    bench/smb.py does with ``fileshare.run``: contained, a Ctrl-C there became a filter
    CompletedWithErrors and the program went on."""

    def __init__(
        self,
        message: str,
        *args: object,
        passes: tuple[type[BaseException], ...] = (Interrupted,),
        logger: logging.Logger = log,
    ) -> None:
        self._logger = logger
        self._message = message
        self._args = args
        self._passes = passes

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        raised: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if kind is None or raised is None or isinstance(raised, self._passes):
            return False
        if (
            isinstance(raised, _PROGRAM_STOPS)
            and threading.current_thread() is threading.main_thread()
        ):
            return False  # the program's (class doc)
        self._logger.error(self._message, *self._args, exc_info=(kind, raised, traceback))
        return True
