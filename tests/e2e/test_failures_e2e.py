"""Failures that look like failures (issue 14 §3), against the real ``dsc serve``: a job that
ends Completed while a filter failed is a failure in ``dsc history`` (OUTCOME, ``--failed``), in
the job log (WARNING naming the filter, the destination and the reason), in ``/metrics``
(``dsc_jobs_ended_total{outcome}``) and in ``/status.json``; the page's counters survive a
restart; the history is paged and ordered by completion time; a job whose scanner vanished is
stalled on ``/status.json`` and in ``dsc jobs``."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from dsc_core.model import FileShareInstructions
from dsc_core.outcomes import JobOutcome, job_outcome
from e2e_support import (
    DEFAULT_SID,
    Relay,
    ServerProcess,
    SharePointSite,
    Soap,
    dsc,
    free_port,
    started_servers,
)
from test_observe_e2e import LOCAL_SHARE, get, job_lines, scrape, value
from waiting import wait_for

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(20_000)


@dataclass
class Env:
    server: ServerProcess
    data: Path
    config: Path
    site: SharePointSite
    #: succeeded, partial (Completed with errors), failed (Aborted, the only filter refused).
    tokens: dict[str, str]


def scan(server: ServerProcess, image: Path, *args: str) -> str:
    run = dsc("scan", "--server", server.url, "--quiet", "--json", *args, str(image))
    assert "Traceback" not in run.err, run
    token: str = run.json()["token"]
    return token


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("failures")
    image = root / "page.png"
    image.write_bytes(PNG)
    site = SharePointSite(status=403)  # the site refuses every upload: SharePointAccessDenied
    config = root / "dsc.toml"
    config.write_text(
        f"[jobs]\nstalled_after_seconds = 1\n[sharepoint]\nsites = [{site.config()}]\n"
    )
    try:
        with started_servers() as start:
            server = start(ServerProcess(root / "data", config=config))
            tokens = {
                "succeeded": scan(server, image),
                "partial": scan(
                    server,
                    image,
                    *("--share", LOCAL_SHARE, "--sharepoint", site.url()),
                    "--continue-on-error",
                ),
                "failed": scan(server, image, "--share", r"\\host\..\x"),
            }
            yield Env(server, root / "data", config, site, tokens)
    finally:
        site.close()


def test_one_outcome_vocabulary() -> None:
    ok = ("CompletedSuccessfully",)
    assert job_outcome("Completed", ["PostScanJobCompletedSuccessfully"], ok) == "succeeded"
    assert job_outcome("Completed", ["PostScanJobCompletedWithWarnings"], ok) == "succeeded"
    both = ("CompletedSuccessfully", "CompletedWithErrors")
    assert job_outcome("Completed", ["PostScanJobCompletedWithErrors"], both) == "partial"
    errors = ("CompletedWithErrors",)
    assert job_outcome("Completed", ["PostScanJobCompletedWithErrors"], errors) == "failed"
    assert job_outcome("Aborted", ["PostScanJobProcessingFailed"], ("Canceled",)) == "failed"
    assert job_outcome("Aborted", ["PostScanJobProcessingFailed"], both) == "partial"
    assert job_outcome("Aborted", ["PostScanJobTimedOut"], ("Pending",)) == "aborted"
    assert job_outcome("Canceled", ["PostScanJobCanceled"], ()) == "canceled"
    assert job_outcome("Processing", ["None"], ()) == "active"
    failures = {o for o in JobOutcome if o.is_failure}
    assert failures == {JobOutcome.PARTIAL, JobOutcome.FAILED, JobOutcome.ABORTED}


def test_history_shows_a_completed_job_with_a_failed_filter_as_a_failure(env: Env) -> None:
    t = env.tokens
    listed = dsc("history", "--server", env.server.url, "--json").json()
    outcomes = {e["token"]: (e["state"], e["outcome"]) for e in listed}
    assert outcomes[t["partial"]] == ("Completed", "partial")
    assert outcomes[t["failed"]] == ("Aborted", "failed")
    assert outcomes[t["succeeded"]] == ("Completed", "succeeded")

    failed = dsc("history", "--server", env.server.url, "--failed", "--json").json()
    assert [e["token"] for e in failed] == [t["failed"], t["partial"]]
    # --state in any case.
    completed = dsc("history", "--server", env.server.url, "--state", "completed", "--json")
    assert [e["token"] for e in completed.json()] == [t["partial"], t["succeeded"]]
    bad = dsc("history", "--server", env.server.url, "--state", "done")
    assert bad.code == 2 and "use one of Completed, Aborted, Canceled" in bad.err, bad

    # A narrow terminal cuts the other columns, never the outcome.
    table = dsc("history", "--server", env.server.url, "--failed")
    assert table.code == 0, table
    rows = table.out.splitlines()
    assert rows[0].split()[:2] == ["TOKEN", "OUTCOME"]
    assert [r.split()[:2] for r in rows[2:]] == [
        [t["failed"][:8], "failed"],
        [t["partial"][:8], "partial"],
    ]


def test_the_log_warns_naming_the_filter_the_destination_and_the_reason(env: Env) -> None:
    token = env.tokens["partial"]
    log = env.server.log
    site = env.site.url()
    assert re.search(
        rf"WARNING dsc\.jobs: job {token} filter sharepoint CompletedWithErrors \(SharePointAccessDenied\):"
        rf" for {re.escape(site)}\n",
        log,
    ), log
    assert re.search(
        rf"WARNING dsc\.jobs: job {token} partial: Completed \(PostScanJobCompletedWithErrors\) "
        rf"after \d+\.\d s; sharepoint CompletedWithErrors \(SharePointAccessDenied\) for {re.escape(site)}\n",
        log,
    ), log
    assert re.search(rf"INFO    dsc\.jobs: job {env.tokens['succeeded']} completed ", log)


def test_metrics_and_status_count_outcomes_and_scan_deliveries(env: Env) -> None:
    samples = scrape(env.server)
    for outcome, count in (("succeeded", 1), ("partial", 1), ("failed", 1), ("aborted", 0)):
        assert value(samples, "dsc_jobs_ended_total", outcome=outcome) == count, outcome
    # Filter runs that did not deliver a scan; event notifications are counted apart.
    assert value(samples, "dsc_delivery_failures_total") == 2
    assert value(samples, "dsc_event_delivery_failures_total") == 0

    state = json.loads(get(env.server, "/status.json")[2])
    counters = state["counters"]
    assert counters["jobs_ended"] == {
        "succeeded": 1,
        "partial": 1,
        "failed": 1,
        "aborted": 0,
        "canceled": 0,
    }
    assert (counters["delivery_failures"], counters["event_delivery_failures"]) == (2, 0)
    outcomes = {j["token"]: j["outcome"] for j in state["history"]}
    assert outcomes[env.tokens["partial"]] == "partial"


def test_history_is_paged(env: Env) -> None:
    t = env.tokens
    first = json.loads(get(env.server, "/status.json?limit=2")[2])
    assert [j["token"] for j in first["history"]] == [t["failed"], t["partial"]]
    assert first["history_size"] == 3 and first["history_next"]
    second = json.loads(get(env.server, f"/status.json?limit=2&cursor={first['history_next']}")[2])
    assert [j["token"] for j in second["history"]] == [t["succeeded"]]
    assert second["history_next"] == ""
    for query in ("limit=0", "limit=100000", "limit=x", "cursor=nonsense"):
        status, content_type, body, _ = get(env.server, f"/status.json?{query}")
        assert status == 400 and content_type.startswith("application/json"), query
        assert json.loads(body)["error"], query


def test_a_vanished_scanner_is_stalled(env: Env) -> None:
    soap = Soap(env.server.url)
    token = soap.create([FileShareInstructions((LOCAL_SHARE,))])
    soap.send_image(token, 1, PNG)  # ... and then the scanner is gone

    def stalled() -> dict[str, Any] | None:
        state = json.loads(get(env.server, f"/status.json?job={token}")[2])["job"]
        return state if state["stalled"] else None

    job = wait_for(stalled, what="the job shown as stalled")
    assert job["bytes"] == len(PNG) and job["images"] == 1
    assert job["idle_seconds"] >= 1 and job["elapsed_seconds"] >= job["idle_seconds"]
    table = dsc("jobs", "--server", env.server.url)
    assert table.code == 0, table
    header, row = table.out.splitlines()[0], table.out.splitlines()[2]
    assert header.split()[:7] == ["TOKEN", "STATE", "ELAPSED", "IMAGES", "RECEIVED", "LAST", "BYTE"]
    assert all(len(line) <= 100 for line in table.out.splitlines()), table.out
    assert row.startswith(token[:8]) and "Creating STALLED" in row, table.out
    assert "19.5 KB" in row and " ago" in row, row
    listed = dsc("jobs", "--server", env.server.url, "--failed", "--json").json()
    assert [(j["token"], j["stalled"]) for j in listed] == [(token, True)]
    soap.dsc_cancel(token)
    soap.wait_ended(token)


def test_counters_and_history_order_survive_a_restart(env: Env, tmp_path: Path) -> None:
    # A job created first and completed last: the history's order is not the creation order.
    soap = Soap(env.server.url)
    late = soap.create([FileShareInstructions((LOCAL_SHARE,))])
    image = tmp_path / "page.png"
    image.write_bytes(PNG)
    early = scan(env.server, image)
    soap.dsc_cancel(late)
    soap.wait_ended(late)
    before = json.loads(get(env.server, "/status.json")[2])
    assert [j["token"] for j in before["history"]][:2] == [late, early]
    env.server.stop_cleanly()
    with started_servers() as start:
        again = start(ServerProcess(env.data, config=env.config))
        after = json.loads(get(again, "/status.json")[2])
        assert after["counters"]["jobs_ended"] == before["counters"]["jobs_ended"]
        for name in ("jobs_created", "images_received", "bytes_received", "delivery_failures"):
            assert after["counters"][name] == before["counters"][name], name
        # Newest completion first, as before the restart (not by creation).
        assert [j["token"] for j in after["history"]] == [j["token"] for j in before["history"]]
        completed = [j["completed"] for j in after["history"]]
        assert completed == sorted(completed, reverse=True)
        # /metrics starts again at zero, as Prometheus expects of a new process.
        assert value(scrape(again), "dsc_jobs_ended_total", outcome="partial") == 0
        env.server = again


def test_the_log_names_what_each_filter_delivered(tmp_path: Path) -> None:
    site = SharePointSite(status=201)
    relay = Relay()
    smtp = Controller(relay, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        config = tmp_path / "dsc.toml"
        config.write_text(
            f"[sharepoint]\nsites = [{site.config()}]\n"
            f'[smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nfrom = "scans@corp.example"\n'
        )
        image = tmp_path / "page.png"
        image.write_bytes(PNG)
        with started_servers() as start:
            server = start(ServerProcess(tmp_path / "data", config=config))
            token = scan(
                server,
                image,
                *(
                    "--share",
                    LOCAL_SHARE,
                    "--sharepoint",
                    site.url(),
                    "--email",
                    "bob@corp.example",
                ),
            )
            server.stop_cleanly()
        lines = job_lines(server.log, token)
        share = tmp_path / "data" / "shares" / "localhost" / "scans" / DEFAULT_SID
        [message_id] = [
            line.split("Message-ID: ", 1)[1].strip()
            for line in relay.messages[0][2].decode().splitlines()
            if line.startswith("Message-ID: ")
        ]
        # One INFO line per thing delivered: "filter N (kind) delivered WHERE".
        delivered = {
            m.group(1): m.group(2)
            for m in (
                re.fullmatch(rf"job {token} filter \d+ \((\w+)\) delivered (.*)", x) for x in lines
            )
            if m
        }
        assert delivered == {
            "fileshare": str(share / "page_0001.png"),
            "sharepoint": f"{site.url()}/page_0001.png",
            "email": f"Message-ID {message_id} to bob@corp.example",
        }, lines
        assert [u.path for u in site.uploads] == ["/sites/scans/page_0001.png"]
        assert (share / "page_0001.png").read_bytes() == PNG
    finally:
        smtp.stop()
        site.close()
