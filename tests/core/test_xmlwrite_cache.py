"""Job XML serialized once per job version (issue 7 point 2): GetActiveJobs and GetJobHistory
join cached bytes; the reply is the same XML the element writers give, and a changed job is
written afresh."""

from __future__ import annotations

from lxml import etree

from core_support import Act, cancel_job, create_job, ok, soap, summaries
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import names
from dsc_core.xmlwrite import SPLICE_MARKER, JobXmlCache, job_summary


def _listing(t: InProcessTransport) -> bytes:
    reply = t.post(soap("<dsc:GetActiveJobsRequest/>", Act.DSC_ACTIVE))
    ok(reply)
    return reply.body


def test_the_same_record_is_serialized_once() -> None:
    t = InProcessTransport()
    token = create_job(t)
    job = t.server.jobs.get(token)
    assert job is not None
    cache = t.server.job_xml
    first = cache.job_summary(names.DSC, "dsc", job)
    assert cache.job_summary(names.DSC, "dsc", job) is first  # no second build
    # The bytes are exactly the element writer's, minus the declaration the envelope makes.
    wrapper = etree.Element(f"{{{names.DSC}}}w", nsmap={"dsc": names.DSC})
    expected = etree.tostring(job_summary(wrapper, names.DSC, job))
    assert first == expected.replace(f' xmlns:dsc="{names.DSC}"'.encode(), b"")


def test_listings_follow_changes_and_hold_no_marker() -> None:
    t = InProcessTransport()
    tokens = [create_job(t) for _ in range(3)]
    before = _listing(t)
    assert SPLICE_MARKER not in before
    assert [v.token for v in summaries(t, "ActiveJobs")] == tokens
    ok(cancel_job(t, names.DSC, tokens[1]))
    after = summaries(t, "ActiveJobs")
    assert [v.token for v in after] == [tokens[0], tokens[2]]
    history = summaries(t, "JobHistory")
    assert [v.token for v in history] == [tokens[1]] and history[0].state != "Creating"
    assert _listing(t) != before


def test_the_cache_stays_bounded() -> None:
    t = InProcessTransport()
    cache = JobXmlCache(max_entries=2)
    jobs = [t.server.jobs.get(create_job(t)) for _ in range(3)]
    for job in jobs:
        assert job is not None
        cache.job_summary(names.DSC, "dsc", job)
    assert len(cache._entries) <= 2


def _repository(t: InProcessTransport) -> bytes:
    body = (
        "<dsc:GetRepositoryElementsRequest><dsc:RequestedElements>"
        "<dsc:Name>dsc:RepositoryStatus</dsc:Name><dsc:Name>dsc:RepositoryConfiguration</dsc:Name>"
        "</dsc:RequestedElements></dsc:GetRepositoryElementsRequest>"
    )
    reply = t.post(soap(body, Act.DSC_REPOSITORY))
    ok(reply)
    return reply.body


def test_repository_answers_are_reused_until_something_changes() -> None:
    from datetime import UTC, datetime

    t = InProcessTransport()
    first = _repository(t)
    assert len(t.server.repository_answers.answers) == 1
    second = _repository(t)
    assert len(t.server.repository_answers.answers) == 1  # the same answer, reused
    payload = first.split(b"<soap:Body>")[1]
    assert (
        payload.split(b"</soap:Body>")[0]
        == second.split(b"<soap:Body>")[1].split(b"</soap:Body>")[0]
    )
    assert b"ftr:email" in first
    now = datetime(2026, 12, 1, tzinfo=UTC)
    t.server.reconfigure(t.server.config.replace(filters=("fileshare",)), now)
    assert b"ftr:email" not in _repository(t)  # a reload is seen at once


def test_job_elements_are_built_once_per_job_version() -> None:
    """GetPostScanJobElements (polled by devices) reuses the answer built at the job's last
    change; a change is seen at once; another set of names is another answer."""
    from core_support import DSC, elements_body, job_view

    t = InProcessTransport()
    token = create_job(t)
    first = job_view(t, token)
    assert first.state == "Creating"
    answers = t.server.job_xml._answers
    assert len(answers) == 1
    (cached,) = answers.values()
    job_view(t, token)
    assert len(answers) == 1 and next(iter(answers.values()))[1] is cached[1]  # reused
    # Another set of names is another answer (an unknown name echoes Valid="false", R5).
    reply = t.post(soap(elements_body("dsc", token, "dsc:NoSuchElement"), Act.DSC_ELEMENTS))
    payload = ok(reply)
    data = payload.find(f"{{{DSC}}}JobElements/{{{DSC}}}ElementData")
    assert data is not None and data.get(f"{{{DSC}}}Valid") == "false"
    assert len(answers) == 2
    ok(cancel_job(t, names.DSC, token))
    assert job_view(t, token).state == "Canceled"  # the new record is written afresh
