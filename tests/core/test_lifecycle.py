"""The R6 job state machine: the invariants stated in lifecycle.py's docstring over the whole
table, every (JobState, JobInput) pair (table function, ScanServer.apply, and requests through
the transport), and random sequences of requests, engine events and clock steps checked against
an independent model after every step."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from core_support import (
    DSC,
    DSP,
    FS,
    MAIL,
    SP,
    Act,
    cancel_job,
    check_protocol_fault,
    create_job,
    deliveries_of,
    elements_body,
    end_job,
    ok,
    repository_state,
    send_image,
    soap,
    subscribe,
    summaries,
    text_of,
    xp,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import (
    FilterFinished,
    FilterStarted,
    JobInput,
    ProcessingFinished,
    ProcessingStarted,
    ServerConfig,
    UpdateJob,
)
from dsc_core.lifecycle import (
    REFUSALS,
    TRANSITIONS,
    Refused,
    keeps_documents,
    transition,
)
from dsc_core.model import (
    COMPLETED_STATES,
    EmailInstructions,
    FilterState,
    FilterStateReason,
    FilterStatus,
    Job,
    JobState,
    JobStateReason,
)

S, I, R = JobState, JobInput, JobStateReason
ACTIVE = [s for s in JobState if s not in COMPLETED_STATES]
COMPLETED = [S.COMPLETED, S.ABORTED, S.CANCELED]
REQUEST_INPUTS = [I.IMAGE, I.END, I.CANCEL, I.RETRY]


# --- the table's invariants (lifecycle.py docstring) ----------------------------------------------


def test_completed_states_are_exactly_completed_aborted_canceled() -> None:
    assert set(COMPLETED_STATES) == set(COMPLETED)
    assert all(not s.is_active for s in COMPLETED) and all(s.is_active for s in ACTIVE)


def test_completed_states_are_final() -> None:
    """... except an administrator's retry of a Completed or Aborted job (its documents kept:
    JobLifecycle.retry checks that before the table)."""
    for state, job_input in itertools.product(COMPLETED, JobInput):
        if job_input is I.RETRY and state is not S.CANCELED:
            assert TRANSITIONS[(state, job_input)] == (S.PENDING, R.NONE)
        else:
            assert (state, job_input) not in TRANSITIONS
    assert {s for (s, i) in TRANSITIONS if i is I.RETRY} == {S.COMPLETED, S.ABORTED}


def test_only_creating_accepts_images_and_end() -> None:
    assert {s for (s, i) in TRANSITIONS if i is I.IMAGE} == {S.CREATING}
    assert {s for (s, i) in TRANSITIONS if i is I.END} == {S.CREATING}
    assert TRANSITIONS[(S.CREATING, I.IMAGE)] == (S.CREATING, None)  # reasons kept
    assert TRANSITIONS[(S.CREATING, I.END)] == (S.PENDING, R.NONE)


def test_every_active_state_and_only_those_accept_a_cancel() -> None:
    assert {s for (s, i) in TRANSITIONS if i is I.CANCEL} == set(ACTIVE)
    for state in ACTIVE:
        # R6: Canceled at once with the single reason PostScanJobCanceled.
        assert TRANSITIONS[(state, I.CANCEL)] == (S.CANCELED, R.CANCELED)


def test_creating_is_never_entered_and_held_terminating_never_entered() -> None:
    targets = {(s, i): new for (s, i), (new, _) in TRANSITIONS.items()}
    assert [k for k, new in targets.items() if new is S.CREATING] == [(S.CREATING, I.IMAGE)]
    assert S.PENDING_HELD not in targets.values()
    assert S.TERMINATING not in targets.values()
    # ... but a job restored in them can still be canceled.
    assert (S.PENDING_HELD, I.CANCEL) in TRANSITIONS and (S.TERMINATING, I.CANCEL) in TRANSITIONS


def test_timeout_only_while_creating() -> None:
    assert {s for (s, i) in TRANSITIONS if i is I.TIMEOUT} == {S.CREATING}
    assert TRANSITIONS[(S.CREATING, I.TIMEOUT)] == (S.ABORTED, R.TIMED_OUT)


def test_entering_a_completed_state_always_names_a_fitting_reason() -> None:
    fitting = {
        S.COMPLETED: {R.COMPLETED_SUCCESSFULLY, R.COMPLETED_WITH_WARNINGS, R.COMPLETED_WITH_ERRORS},
        S.ABORTED: {R.TIMED_OUT, R.PROCESSING_FAILED},
        S.CANCELED: {R.CANCELED},
    }
    for (state, job_input), (new, reason) in TRANSITIONS.items():
        if new in fitting:
            assert reason in fitting[new], (state, job_input)
        else:
            assert reason in (None, R.NONE), (state, job_input)


def test_engine_path_is_pending_started_processing() -> None:
    assert TRANSITIONS[(S.PENDING, I.ENGINE_STARTED)] == (S.STARTED, R.NONE)
    assert TRANSITIONS[(S.STARTED, I.FILTER_STARTED)] == (S.PROCESSING, R.NONE)
    for state in (S.STARTED, S.PROCESSING):
        assert TRANSITIONS[(state, I.COMPLETE_SUCCESSFULLY)][0] is S.COMPLETED
        assert TRANSITIONS[(state, I.FAIL)] == (S.ABORTED, R.PROCESSING_FAILED)
        assert TRANSITIONS[(state, I.RESUMED)] == (S.PENDING, R.NONE)  # R13
    engine = [
        I.ENGINE_STARTED,
        I.FILTER_STARTED,
        I.FILTER_FINISHED,
        I.COMPLETE_SUCCESSFULLY,
        I.COMPLETE_WITH_WARNINGS,
        I.COMPLETE_WITH_ERRORS,
        I.FAIL,
        I.RESUMED,
    ]
    assert {s for (s, i) in TRANSITIONS if i in engine} == {S.PENDING, S.STARTED, S.PROCESSING}


def test_refusals_name_a_fault_for_each_request_input_and_only_those() -> None:
    assert set(REFUSALS) == {i for i in JobInput if i.from_request} == set(REQUEST_INPUTS)
    assert REFUSALS[I.IMAGE] == REFUSALS[I.END] == "OperationFailed"
    # A completed job is no longer "currently processing" (bdsrr 3.2.4.2).
    assert REFUSALS[I.CANCEL] == "ClientErrorJobTokenNotFound"
    assert REFUSALS[I.RETRY] == "OperationFailed"


# --- every pair ----------------------------------------------------------------------------------

ALL_PAIRS = list(itertools.product(JobState, JobInput))
T0 = datetime.fromisoformat("2026-11-21T09:00:00+01:00")


def synthetic_job(state: JobState, token: str = "job-1") -> Job:
    filters = (
        FilterStatus(FS_DIALECT, FilterState.COMPLETED_SUCCESSFULLY, (), FS),
        FilterStatus(FS_DIALECT, FilterState.PROCESSING, (), FS),
        FilterStatus(FS_DIALECT, FilterState.PENDING, (), FS),
        FilterStatus(FS_DIALECT, FilterState.CANCELED, (FilterStateReason.INVALID_ARGS,)),
    )
    return Job(
        token=token,
        state=state,
        reasons=(R.NONE,),
        filters=filters,
        psp_identifier="PSP",
        psp_display_name="PSP",
        user_name="u",
        owner="",
        created=T0,
        last_activity=T0,
        completed=None if state.is_active else T0,
    )


FS_DIALECT = "http://schemas.microsoft.com/windows/2007/10/imaging/postscan/filter/fileshare"


@pytest.mark.parametrize(
    "state,job_input", ALL_PAIRS, ids=[f"{s.value}-{i.value}" for s, i in ALL_PAIRS]
)
def test_transition_function_on_every_pair(state: JobState, job_input: JobInput) -> None:
    if (state, job_input) in TRANSITIONS:
        assert transition(state, job_input) == TRANSITIONS[(state, job_input)]
        return
    with pytest.raises(Refused) as refused:
        transition(state, job_input)
    assert refused.value.state is state and refused.value.input is job_input
    # A request input names its R4 fault; an engine or clock input is stale (None).
    assert refused.value.fault == (REFUSALS[job_input] if job_input.from_request else None)


@pytest.mark.parametrize(
    "state,job_input", ALL_PAIRS, ids=[f"{s.value}-{i.value}" for s, i in ALL_PAIRS]
)
def test_server_apply_on_every_pair(state: JobState, job_input: JobInput) -> None:
    t = InProcessTransport()
    job = synthetic_job(state)
    t.server.jobs.put(job)
    later = T0 + timedelta(minutes=5)
    if (state, job_input) not in TRANSITIONS:
        with pytest.raises(Refused):
            t.server.apply(job, job_input, later)
        assert t.server.jobs.get(job.token) is job  # the table is untouched
        return
    new_state, reason = TRANSITIONS[(state, job_input)]
    new, commands = t.server.apply(job, job_input, later)
    assert new.state is new_state
    assert new.reasons == ((reason,) if reason is not None else job.reasons)
    assert t.server.jobs.get(job.token) == new
    # The record says what moved it, and which filters it ended (issue 15): none while the
    # job stays active, the running and the pending one when it ends (R6: Canceled).
    assert commands[0] == UpdateJob(new, job_input, () if new_state.is_active else (1, 2))
    if new_state.is_active:
        assert new.completed is None and new.filters == job.filters
        assert t.server.jobs.active() == [new] and t.server.jobs.history() == []
    else:
        # R6: completion time set; unfinished filters end Canceled; finished ones keep theirs.
        assert new.completed == later
        assert [f.state for f in new.filters] == [
            FilterState.COMPLETED_SUCCESSFULLY,
            FilterState.CANCELED,
            FilterState.CANCELED,
            FilterState.CANCELED,
        ]
        assert new.filters[3].reasons == (FilterStateReason.INVALID_ARGS,)
        assert t.server.jobs.history() == [new] and t.server.jobs.active() == []
    names = [type(c).__name__ for c in commands]
    assert ("StartProcessing" in names) == (new_state is S.PENDING)
    assert ("StopProcessing" in names) == (
        state in (S.STARTED, S.PROCESSING) and new_state in (S.ABORTED, S.CANCELED)
    )
    # Issue 8 (spool): documents go when the job ends canceled or timed out, or with no failed
    # filter; here unfinished filters end Canceled, so the other endings keep them (a re-run).
    discarded = new_state is S.CANCELED or reason is R.TIMED_OUT
    assert ("DiscardDocuments" in names) == discarded
    assert keeps_documents(new) == (not discarded)


REQUEST_CASES = [(s, r) for s in JobState for r in ("image", "end", "dsp-cancel", "dsc-cancel")]


@pytest.mark.parametrize(
    "state,request_kind", REQUEST_CASES, ids=[f"{s.value}-{r}" for s, r in REQUEST_CASES]
)
def test_every_request_in_every_state(state: JobState, request_kind: str) -> None:
    """Through the transport: the table's answer, or the fault REFUSALS names, in the protocol
    of the request."""
    t = InProcessTransport()
    job = synthetic_job(state)
    t.server.jobs.put(job)
    job_input, ns = {
        "image": (I.IMAGE, DSP),
        "end": (I.END, DSP),
        "dsp-cancel": (I.CANCEL, DSP),
        "dsc-cancel": (I.CANCEL, DSC),
    }[request_kind]
    if job_input is I.IMAGE:
        reply = send_image(t, job.token, 1, b"IMG")
    elif job_input is I.END:
        reply = end_job(t, job.token)
    else:
        reply = cancel_job(t, ns, job.token)
    now = t.server.jobs.get(job.token)
    assert now is not None
    if (state, job_input) in TRANSITIONS:
        ok(reply)
        assert now.state is TRANSITIONS[(state, job_input)][0]
    else:
        check_protocol_fault(reply, ns, REFUSALS[job_input])
        assert now is job
        assert t.store.documents == {} and t.store.open_documents == {}


# --- random sequences -----------------------------------------------------------------------------

TIMEOUT = 600.0
FINAL_FILTER_STATES = [
    FilterState.COMPLETED_SUCCESSFULLY,
    FilterState.COMPLETED_WITH_WARNINGS,
    FilterState.COMPLETED_WITH_ERRORS,
    FilterState.CANCELED,
]
UNUSABLE = EmailInstructions(False, ())  # no recipient: the filter is Canceled/InvalidArgs
USABLE = [FS, SP, MAIL]


@dataclass
class Model:
    """What R6 says the job must look like, computed from TRANSITIONS and the R6 outcome rule
    (independently of JobLifecycle)."""

    token: str
    coe: bool
    usable: tuple[bool, ...]
    state: JobState
    reasons: tuple[JobStateReason, ...]
    filters: list[tuple[FilterState, tuple[FilterStateReason, ...]]]
    last_activity: datetime
    documents: set[int] = field(default_factory=set)
    completed: datetime | None = None
    completed_order: int = -1

    def apply(self, job_input: JobInput, now: datetime) -> bool:
        entry = TRANSITIONS.get((self.state, job_input))
        if entry is None:
            return False
        self.state, reason = entry
        if reason is not None:
            self.reasons = (reason,)
        if not self.state.is_active:
            self.completed = now
            self.filters = [
                f
                if f[0] not in (FilterState.PENDING, FilterState.PROCESSING)
                else (FilterState.CANCELED, ())
                for f in self.filters
            ]
        return True

    def finish(self, now: datetime) -> None:
        self.filters = [
            f
            if f[0] not in (FilterState.PENDING, FilterState.PROCESSING)
            else (FilterState.COMPLETED_WITH_ERRORS, (FilterStateReason.UNKNOWN_ERROR,))
            for f in self.filters
        ]
        ran = [f for f, usable in zip(self.filters, self.usable, strict=False) if usable]
        failed = any(f[0] in (FilterState.COMPLETED_WITH_ERRORS, FilterState.CANCELED) for f in ran)
        if failed and not self.coe:
            outcome = I.FAIL
        elif failed or any(f[0] is FilterState.CANCELED for f in self.filters):
            outcome = I.COMPLETE_WITH_ERRORS
        elif any(f[0] is FilterState.COMPLETED_WITH_WARNINGS for f in self.filters):
            outcome = I.COMPLETE_WITH_WARNINGS
        else:
            outcome = I.COMPLETE_SUCCESSFULLY
        assert self.apply(outcome, now)


job_specs = st.lists(
    st.tuples(
        st.lists(st.sampled_from([True, True, True, False]), min_size=1, max_size=3),
        st.sampled_from([None, False, True]),
    ),  # usable filters; ContinueOnError
    min_size=1,
    max_size=3,
)

_job = st.sampled_from([0, 0, 0, 1, 2])
_send = st.tuples(st.just("send"), _job, st.integers(1, 3))
_end = st.tuples(st.just("end"), _job)
_cancel = st.tuples(st.just("cancel"), _job, st.sampled_from([DSP, DSC]))
_started = st.tuples(st.just("started"), _job)
_filter_started = st.tuples(st.just("filter_started"), _job, st.integers(0, 3))
_filter_finished = st.tuples(
    st.just("filter_finished"), _job, st.integers(0, 3), st.sampled_from(FINAL_FILTER_STATES)
)
_finished = st.tuples(st.just("finished"), _job)
_advance = st.tuples(st.just("advance"), st.sampled_from([30, 300, 599, 600, 601]))
# "next": the job's natural next input (see natural_step), so that runs get deep.
_next = st.tuples(
    st.just("next"),
    _job,
    st.sampled_from([FilterState.COMPLETED_SUCCESSFULLY] * 3 + FINAL_FILTER_STATES),
)
# one_of picks a branch uniformly: repeating a branch weights it.
steps = st.lists(
    st.one_of(
        *[_next] * 8,
        _send,
        _send,
        _end,
        _started,
        _filter_started,
        _filter_finished,
        _finished,
        _cancel,
        _advance,
    ),
    min_size=12,
    max_size=50,
)  # hypothesis averages about 2 * min_size


def natural_step(m: Model, job: object, filter_state: object) -> tuple[Any, ...]:
    if m.state is S.CREATING:
        return ("end", job)
    if m.state is S.PENDING:
        return ("started", job)
    if m.state in (S.STARTED, S.PROCESSING):
        states = [f[0] for f in m.filters]
        if FilterState.PROCESSING in states:
            return ("filter_finished", job, states.index(FilterState.PROCESSING), filter_state)
        if FilterState.PENDING in states:
            return ("filter_started", job, states.index(FilterState.PENDING))
        return ("finished", job)
    return ("cancel", job, DSC)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=job_specs, script=steps)
def test_random_sequences_follow_the_table(
    specs: list[tuple[list[bool], bool | None]], script: list[tuple[Any, ...]]
) -> None:
    t = InProcessTransport(ServerConfig(job_timeout_seconds=TIMEOUT))
    subscribe(t, t.server.config.dsc_url, expires="P1D")
    models: list[Model] = []
    for usable, coe in specs:
        token = create_job(
            t,
            *[USABLE[i % 3] if u else UNUSABLE for i, u in enumerate(usable)],
            continue_on_error=coe,
        )
        model = Model(
            token,
            bool(coe),
            tuple(usable),
            S.CREATING,
            (R.NONE,),
            [
                (FilterState.PENDING, ())
                if u
                else (FilterState.CANCELED, (FilterStateReason.INVALID_ARGS,))
                for u in usable
            ],
            t.clock,
        )
        if not any(usable):  # R6: no filter left: Aborted at once, the token still given
            model.state, model.reasons, model.completed = (
                S.ABORTED,
                (R.NO_VALID_INSTRUCTIONS,),
                t.clock,
            )
        models.append(model)
    order = itertools.count()
    for m in models:
        if not m.state.is_active:
            m.completed_order = next(order)
    frozen: dict[str, Job] = {}
    reached: set[str] = set()
    check_all(t, models, frozen)
    for step in script:
        kind = step[0]
        if kind == "advance":
            t.advance(float(step[1]))
            for m in models:
                if m.state is S.CREATING and t.clock - m.last_activity >= timedelta(
                    seconds=TIMEOUT
                ):
                    assert m.apply(I.TIMEOUT, t.clock)
                    m.completed_order = next(order)
            check_all(t, models, frozen)
            continue
        m = models[int(step[1]) % len(models)]
        if kind == "next":
            step = natural_step(m, step[1], step[2])
        was_active = m.state.is_active
        run_step(t, m, step)
        if was_active and not m.state.is_active:
            m.completed_order = next(order)
        reached.add(f"{m.state.value}/{m.reasons[0].value}")
        check_all(t, models, frozen)
    for label in sorted(reached):  # shown by --hypothesis-show-statistics
        event(f"reached {label}")


def run_step(t: InProcessTransport, m: Model, step: tuple[Any, ...]) -> None:
    """One step of a job's life, on the server and on the model (one function per kind)."""
    STEPS[step[0]](t, m, step, t.clock)


def _send(t: InProcessTransport, m: Model, step: tuple[Any, ...], now: datetime) -> None:
    doc = int(step[2])
    reply = send_image(t, m.token, doc, f"image {doc} of {m.token}".encode(), chunk_size=97)
    if doc in m.documents:
        check_protocol_fault(reply, DSP, "InvalidArgs")  # R6: DocumentId already used
    elif m.apply(I.IMAGE, now):
        ok(reply)
        m.documents.add(doc)
        m.last_activity = now
    else:
        check_protocol_fault(reply, DSP, REFUSALS[I.IMAGE])


def _end_or_cancel(t: InProcessTransport, m: Model, step: tuple[Any, ...], now: datetime) -> None:
    kind = step[0]
    job_input = I.END if kind == "end" else I.CANCEL
    ns = DSP if kind == "end" else str(step[2])
    reply = end_job(t, m.token) if kind == "end" else cancel_job(t, ns, m.token)
    if m.apply(job_input, now):
        ok(reply)
    else:
        check_protocol_fault(reply, ns, REFUSALS[job_input])


def _started(t: InProcessTransport, m: Model, step: tuple[Any, ...], now: datetime) -> None:
    t.engine(ProcessingStarted(m.token))
    if m.state.is_active:
        m.apply(I.ENGINE_STARTED, now)


def _filter_started(t: InProcessTransport, m: Model, step: tuple[Any, ...], now: datetime) -> None:
    index = int(step[2])
    t.engine(FilterStarted(m.token, index))
    if m.state.is_active and index < len(m.filters) and (m.state, I.FILTER_STARTED) in TRANSITIONS:
        m.filters[index] = (FilterState.PROCESSING, ())
        m.apply(I.FILTER_STARTED, now)


def _filter_finished(t: InProcessTransport, m: Model, step: tuple[Any, ...], now: datetime) -> None:
    index, state = int(step[2]), step[3]
    assert isinstance(state, FilterState)
    reasons = (
        (FilterStateReason.UNKNOWN_ERROR,) if state is FilterState.COMPLETED_WITH_ERRORS else ()
    )
    t.engine(FilterFinished(m.token, index, state, reasons))
    if not m.state.is_active or index >= len(m.filters):
        return
    failed = state in (FilterState.COMPLETED_WITH_ERRORS, FilterState.CANCELED)
    if failed and not m.coe:
        if (m.state, I.FAIL) in TRANSITIONS:
            m.filters[index] = (state, reasons)
            m.apply(I.FAIL, now)
        return
    if m.state is S.STARTED:
        assert m.apply(I.FILTER_STARTED, now)
    if (m.state, I.FILTER_FINISHED) in TRANSITIONS:
        m.filters[index] = (state, reasons)
        m.apply(I.FILTER_FINISHED, now)
        if all(f[0] not in (FilterState.PENDING, FilterState.PROCESSING) for f in m.filters):
            m.finish(now)


def _finished(t: InProcessTransport, m: Model, step: tuple[Any, ...], now: datetime) -> None:
    t.engine(ProcessingFinished(m.token))
    if m.state in (S.STARTED, S.PROCESSING):
        m.finish(now)


STEPS: dict[str, Callable[[InProcessTransport, Model, tuple[Any, ...], datetime], None]] = {
    "send": _send,
    "end": _end_or_cancel,
    "cancel": _end_or_cancel,
    "started": _started,
    "filter_started": _filter_started,
    "filter_finished": _filter_finished,
    "finished": _finished,
}


def check_all(t: InProcessTransport, models: list[Model], frozen: dict[str, Job]) -> None:
    for m in models:
        job = t.server.jobs.get(m.token)
        assert job is not None
        assert (job.state, job.reasons) == (m.state, m.reasons)
        assert [(f.state, f.reasons) for f in job.filters] == m.filters
        assert job.completed == m.completed
        assert {d.document_id for d in job.documents} == m.documents
        # ImagesReceived equals the stored documents while the job may still need them
        # (R6 discards a timed-out job's; issue 8 a canceled or fully successful one's).
        stored = {d for (tok, d) in t.store.documents if tok == m.token}
        assert stored == (m.documents if keeps_documents(job) else set())
        assert job.images_received == len(m.documents)
        # Completed jobs never change again.
        if not job.is_active:
            assert frozen.setdefault(m.token, job) == job
    assert t.store.open_documents == {}
    # The repository is Processing iff some job is Started or Processing, and says so.
    busy = any(m.state in (S.STARTED, S.PROCESSING) for m in models)
    state = repository_state(t)
    assert state == ("Processing" if busy else "Idle")
    events = deliveries_of(t, Act.DSC_SUMMARY_EVENT)
    last = text_of(events[-1], "//dsc:RepositoryState") if events else "Idle"
    assert last == state
    # GetActiveJobs and GetJobHistory partition the jobs, with the model's values.
    active, history = summaries(t, "ActiveJobs"), summaries(t, "JobHistory")
    assert sorted(v.token for v in active + history) == sorted(m.token for m in models)
    by_token = {m.token: m for m in models}
    for view in active + history:
        m = by_token[view.token]
        assert (view.state, view.reasons) == (m.state.value, tuple(r.value for r in m.reasons))
        assert [f.state for f in view.filters] == [f[0].value for f in m.filters]
        assert view.images_received == len(m.documents)
    assert all(by_token[v.token].state.is_active for v in active)
    assert [v.token for v in active] == [m.token for m in models if m.state.is_active]
    assert [v.token for v in history] == [
        m.token
        for m in sorted(
            (m for m in models if not m.state.is_active), key=lambda m: -m.completed_order
        )
    ]


def test_model_agrees_on_a_known_sequence() -> None:
    """A fixed walk through the same machinery (a guard that the model above is not vacuous)."""
    t = InProcessTransport()
    token = create_job(t, FS, UNUSABLE, continue_on_error=True)
    ok(send_image(t, token, 1, b"a"))
    ok(end_job(t, token))
    t.engine(ProcessingStarted(token))
    t.engine(FilterStarted(token, 0))
    t.engine(FilterFinished(token, 0, FilterState.COMPLETED_WITH_WARNINGS))
    (view,) = summaries(t, "JobHistory")
    # The unusable filter was Canceled, so errors outrank the warning.
    assert (view.state, view.reasons) == ("Completed", ("PostScanJobCompletedWithErrors",))
    assert [f.state for f in view.filters] == ["CompletedWithWarnings", "Canceled"]
    body = ok(t.post(soap(elements_body("dsc", token, "dsc:JobStatus"), Act.DSC_ELEMENTS)))
    assert xp(body, "//dsc:JobCompletedTime")
