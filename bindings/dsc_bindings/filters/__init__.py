"""PostScan filters (R9) and the processing engine that runs them (R6).

Each filter is a synchronous function ``run(job, filter_index, documents, settings, cancelled)
-> FilterOutcome`` that never raises, its outcome naming what it delivered (issue 19), except
:class:`~.interruption.Interrupted` (the store does not answer: no outcome, the job resumes);
:class:`ProcessingEngine` runs a job's filters in worker
threads and reports ProcessingStarted / FilterStarted / FilterFinished / ProcessingFinished.
"""

from dsc_bindings.filters.common import (
    FilterOutcome,
    FilterRun,
    content_type_for,
    document_file_name,
    sanitize_name,
)
from dsc_bindings.filters.engine import DEFAULT_RUNNERS, ProcessingEngine
from dsc_bindings.filters.settings import FilterSettings, parse_unc

__all__ = [
    "DEFAULT_RUNNERS",
    "FilterOutcome",
    "FilterRun",
    "FilterSettings",
    "ProcessingEngine",
    "content_type_for",
    "document_file_name",
    "parse_unc",
    "sanitize_name",
]
