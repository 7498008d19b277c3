"""ext:PurgeJobHistory (``dsc purge --before WHEN``): an administrator trims the history by age;
active jobs stay, the jobs' records and documents go (DropJob), a store failure puts them back
(R4 step 9), only scan administrators may (R4 step 5, R10), and a bad date is InvalidArgs."""

from __future__ import annotations

from datetime import datetime, timedelta

from lxml import etree

from core_support import (
    DSC,
    cancel_job,
    check_fault,
    check_protocol_fault,
    create_job,
    envelope,
    payload_of,
    summaries,
)
from dsc_bindings.inprocess import InProcessTransport
from dsc_core import DropJob, Removal, ServerConfig, names
from dsc_core.model import FileShareInstructions

A = names.Action
SHARE = FileShareInstructions((r"\\host\share",))


def purge_request(before: str) -> etree._Element:
    request = etree.Element(f"{{{names.EXT}}}PurgeJobHistoryRequest")
    etree.SubElement(request, f"{{{names.EXT}}}Before").text = before
    return request


def purged(t: InProcessTransport, before: datetime, identity: str | None = None) -> int:
    reply = t.post(
        envelope(A.EXT_PURGE_JOB_HISTORY, purge_request(before.isoformat())), identity=identity
    )
    assert reply.status == 200, reply.body.decode()
    return int(payload_of(reply).findtext(f"{{{names.EXT}}}Purged") or "-1")


def ended_job(t: InProcessTransport, admin: str | None = None) -> str:
    token = create_job(t, SHARE, identity=admin)
    cancel_job(t, DSC, token, identity=admin)
    return token


def test_purge_removes_jobs_that_ended_before_the_date() -> None:
    t = InProcessTransport()
    old = ended_job(t)
    t.clock += timedelta(hours=2)
    new = ended_job(t)
    active = create_job(t, SHARE)
    assert purged(t, t.clock - timedelta(days=1)) == 0
    assert purged(t, t.clock - timedelta(hours=1)) == 1
    assert DropJob(old, Removal.PURGED) in t.commands and old not in t.store.jobs
    assert [j.token for j in summaries(t, "JobHistory")] == [new]
    assert [j.token for j in summaries(t, "ActiveJobs")] == [active]
    assert purged(t, t.clock + timedelta(seconds=1)) == 1
    assert summaries(t, "JobHistory") == [] and [j.token for j in summaries(t, "ActiveJobs")] == [
        active
    ]


def test_a_store_failure_puts_the_jobs_back() -> None:
    t = InProcessTransport()
    first = ended_job(t)
    t.clock += timedelta(minutes=1)
    second = ended_job(t)
    t.store.fail_on = DropJob
    reply = t.post(envelope(A.EXT_PURGE_JOB_HISTORY, purge_request(t.clock.isoformat())))
    check_protocol_fault(reply, DSC, "ServerErrorTemporaryError")
    # Back in their places, newest first (R6).
    assert [j.token for j in summaries(t, "JobHistory")] == [second, first]


def test_only_scan_administrators_may_purge() -> None:
    t = InProcessTransport(
        ServerConfig(require_client_certificates=True, scan_admins=frozenset({"admin"}))
    )
    ended_job(t, "admin")
    reply = t.post(
        envelope(A.EXT_PURGE_JOB_HISTORY, purge_request(t.clock.isoformat())), identity="alice"
    )
    check_fault(
        reply,
        status=400,
        code="Sender",
        subcode=(DSC, "ClientErrorCurrentUserNotScanAdmin"),
        reason="The current user is not a scan administrator",
    )
    assert purged(t, t.clock + timedelta(seconds=1), identity="admin") == 1


def test_a_bad_date_is_invalid_args() -> None:
    t = InProcessTransport()
    for text in ("yesterday", "2026-11-21T09:00:00"):  # no offset: ambiguous (R6)
        reply = t.post(envelope(A.EXT_PURGE_JOB_HISTORY, purge_request(text)))
        check_protocol_fault(reply, DSC, "InvalidArgs")
