"""Job <-> JSON: every field survives, and anything else is refused."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsc_bindings.store.jobcodec import decode_job, document_row, encode_job
from dsc_core.model import (
    Document,
    EmailInstructions,
    FileShareInstructions,
    FilterState,
    FilterStateReason,
    FilterStatus,
    Job,
    JobState,
    JobStateReason,
    SharePointInstructions,
)

FS = "http://schemas.microsoft.com/windows/2008/12/wdp/distributedscan/fileshare"


def full_job() -> Job:
    """A job with a value in every field, every instruction kind and None."""
    plus2 = timezone(timedelta(hours=2))
    return Job(
        token="6e2b8c1a-0f3d-4b6e-9a51-2c7d8e9f0a1b",
        state=JobState.COMPLETED,
        reasons=(JobStateReason.COMPLETED_WITH_ERRORS, JobStateReason.SEND_IMAGE_FAILED),
        filters=(
            FilterStatus(
                FS,
                FilterState.COMPLETED_SUCCESSFULLY,
                (),
                FileShareInstructions(("\\\\srv\\scans", "\\\\srv\\ärchiv")),
                delivered=("\\\\srv\\scans\\alice\\Rechnung_0001.pdf",),
            ),
            FilterStatus(
                "urn:email",
                FilterState.COMPLETED_WITH_ERRORS,
                (FilterStateReason.INVALID_SMTP_SERVER, FilterStateReason.UNABLE_TO_SEND_EMAIL),
                EmailInstructions(True, ("a@example.com", "b@example.com"), True),
                delivered=("Message-ID <dsc.1@example.com> to a@example.com",),
                delivered_truncated=True,
            ),
            FilterStatus(
                "urn:sp",
                FilterState.CANCELED,
                (FilterStateReason.INVALID_ARGS,),
                SharePointInstructions(False, ("https://sp.example.com/docs",)),
            ),
            FilterStatus(
                "urn:unknown", FilterState.CANCELED, (FilterStateReason.INVALID_ARGS,), None
            ),
        ),
        psp_identifier="{PSP-1}",
        psp_display_name='Scan to share "quoted" \u2603',
        user_name="alice@example.com",
        owner="S-1-5-21-1",
        created=datetime(2024, 3, 31, 1, 59, 59, 123000, tzinfo=plus2),
        last_activity=datetime(2024, 3, 31, 3, 0, 0, 1, tzinfo=ZoneInfo("Europe/Berlin")),
        documents=(Document(1, "pdf-a", 12345), Document(-7, "tiff-multi-g4", 0)),
        completed=datetime(2024, 3, 30, 23, 0, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
        continue_on_error=True,
        document_root_name="Rechnung",
    )


def stored(job: Job) -> tuple[str, list[tuple[int, str, int]]]:
    """The job as a store keeps it: the record, and its documents as rows beside it."""
    return encode_job(job), [document_row(d) for d in job.documents]


def test_round_trip_every_field() -> None:
    job = full_job()
    back = decode_job(*stored(job))
    assert back == job
    for f in dataclasses.fields(Job):  # also field by field, with types
        assert getattr(back, f.name) == getattr(job, f.name), f.name
        assert type(getattr(back, f.name)) is type(getattr(job, f.name)), f.name
    # R6: the UTC offset is kept, not just the instant.
    for name in ("created", "last_activity", "completed"):
        assert getattr(back, name).utcoffset() == getattr(job, name).utcoffset(), name
    assert back.created.microsecond == 123000


def test_defaults_and_naive_time_round_trip() -> None:
    job = Job(
        token="t",
        state=JobState.CREATING,
        reasons=(JobStateReason.NONE,),
        filters=(),
        psp_identifier="",
        psp_display_name="",
        user_name="",
        owner="",
        created=datetime(2024, 1, 1),
        last_activity=datetime(2024, 1, 1),
    )
    back = decode_job(*stored(job))
    assert back == job and back.completed is None and back.created.tzinfo is None


def test_codec_covers_every_job_field() -> None:
    # Guards model.py changes: a new Job field must be added to the codec too.
    record = json.loads(encode_job(full_job()))
    assert set(record) - {"v"} == {f.name for f in dataclasses.fields(Job)} - {"documents"}


def test_equal_jobs_encode_equal() -> None:
    assert encode_job(full_job()) == encode_job(full_job())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.pop("owner"),
        lambda r: r.update(v=4),
        lambda r: r.update(v=0),
        lambda r: r["filters"][0].pop("delivered"),
        lambda r: r["filters"][0].update(delivered="\\\\srv\\scans\\a.pdf"),
        lambda r: r["filters"][0].update(delivered=[7]),
        lambda r: r["filters"][0].update(delivered_truncated=None),
        lambda r: r.update(state="Sleeping"),
        lambda r: r.update(continue_on_error=1),
        lambda r: r.update(created=12),
        lambda r: r.update(documents=[]),  # version 3 keeps them beside the record
        lambda r: r["filters"][0].update(instructions={"kind": "ftp"}),
        lambda r: r["filters"][0].pop("instructions"),
        lambda r: r["filters"][1]["instructions"].update(addresses="a@example.com"),
        lambda r: r.update(reasons=[3]),
    ],
)
def test_decode_is_strict(mutate: object) -> None:
    text, documents = stored(full_job())
    record = json.loads(text)
    mutate(record)  # type: ignore[operator]
    with pytest.raises(ValueError):
        decode_job(json.dumps(record), documents)


@pytest.mark.parametrize(
    "row", [(1, "pdf-a", True), (1, "pdf-a", "3"), ("1", "pdf-a", 3), (1, 2, 3), (1, "pdf-a")]
)
def test_document_rows_are_checked(row: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        decode_job(encode_job(full_job()), [row])


def test_a_version_2_record_keeps_its_documents_inside() -> None:
    """Records written before the documents had rows of their own carry them whole: they
    decode as they are (rows beside one are older than it: an earlier server wrote it last)."""
    job = full_job()
    record = json.loads(encode_job(job))
    record["v"] = 2
    record["documents"] = [
        {"document_id": d.document_id, "format": d.format, "size": d.size} for d in job.documents
    ]
    assert decode_job(json.dumps(record)) == job
    assert decode_job(json.dumps(record), [(9, "jfif", 1)]) == job
    record["documents"][0]["size"] = True
    with pytest.raises(ValueError):
        decode_job(json.dumps(record))


def test_a_version_1_record_decodes_with_nothing_delivered() -> None:
    """Records written before issue 19 kept no delivered names: they still decode."""
    job = full_job()
    text, documents = stored(job)
    record = json.loads(text)
    record["v"] = 1
    record["documents"] = [{"document_id": i, "format": f, "size": n} for i, f, n in documents]
    for f in record["filters"]:
        del f["delivered"], f["delivered_truncated"]
    old = decode_job(json.dumps(record))
    assert old == job.evolve(
        filters=tuple(
            dataclasses.replace(f, delivered=(), delivered_truncated=False) for f in job.filters
        )
    )
    # Written again, it is a current record.
    assert json.loads(encode_job(old))["v"] == 3


@pytest.mark.parametrize("text", ["", "[]", "null", "{", '{"v": 1}'])
def test_decode_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        decode_job(text)


# --- property: any job round-trips ------------------------------------------------------------

texts = st.text(max_size=20)
offsets = st.one_of(
    st.none(),
    st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m))),
    # Whole seconds (historic LMT offsets have them): Python 3.11's fromisoformat misreads
    # sub-second offsets such as "+00:00:00.000001", which no real time zone has.
    st.integers(-23 * 3600, 23 * 3600).map(lambda s: timezone(timedelta(seconds=s))),
)
times = st.builds(
    lambda dt, tz: dt.replace(tzinfo=tz),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    offsets,
)
instructions = st.one_of(
    st.none(),
    st.builds(FileShareInstructions, st.tuples(texts) | st.tuples()),
    st.builds(
        EmailInstructions, st.booleans(), st.lists(texts, max_size=3).map(tuple), st.booleans()
    ),
    st.builds(SharePointInstructions, st.booleans(), st.lists(texts, max_size=3).map(tuple)),
)
filters = st.builds(
    FilterStatus,
    texts,
    st.sampled_from(FilterState),
    st.lists(st.sampled_from(FilterStateReason), max_size=3).map(tuple),
    instructions,
    st.lists(texts, max_size=3).map(tuple),
    st.booleans(),
)
jobs = st.builds(
    Job,
    token=texts,
    state=st.sampled_from(JobState),
    reasons=st.lists(st.sampled_from(JobStateReason), max_size=3).map(tuple),
    filters=st.lists(filters, max_size=3).map(tuple),
    psp_identifier=texts,
    psp_display_name=texts,
    user_name=texts,
    owner=texts,
    created=times,
    last_activity=times,
    documents=st.lists(
        st.builds(Document, st.integers(-(2**63), 2**63), texts, st.integers(0, 2**40)), max_size=3
    ).map(tuple),
    completed=st.none() | times,
    continue_on_error=st.booleans(),
    document_root_name=texts,
)


@settings(max_examples=150, deadline=None)
@given(jobs)
def test_any_job_round_trips(job: Job) -> None:
    back = decode_job(*stored(job))
    assert back == job
    for name in ("created", "last_activity", "completed"):
        assert (
            getattr(back, name) is None
            or getattr(back, name).utcoffset() == getattr(job, name).utcoffset()
        )


def test_codec_covers_every_filter_field() -> None:
    # Guards model.py changes: a new FilterStatus field must be added to the codec too.
    record = json.loads(encode_job(full_job()))
    assert set(record["filters"][0]) == {f.name for f in dataclasses.fields(FilterStatus)}
