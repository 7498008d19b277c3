"""The status page's endpoints (observe/statuspage.py) answering from a given state: an
Observer opened on known job records and a View, no server and no socket.  What the page shows
over real sockets and in a real browser is in test_web_surface.py and the e2e tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dsc_bindings.observe.health import Check, Health
from dsc_bindings.observe.observer import Observer
from dsc_bindings.observe.statuspage import (
    HTML_TYPE,
    JSON_TYPE,
    MAX_HISTORY_PAGE,
    PAGE,
    View,
    answer,
)
from dsc_core.model import (
    FileShareInstructions,
    FilterState,
    FilterStatus,
    Job,
    JobState,
    JobStateReason,
)

FS = "http://schemas.microsoft.com/windows/2008/12/wdp/distributedscan/fileshare"
T0 = datetime(2024, 5, 6, 9, 0, tzinfo=UTC)


def job(token: str, state: JobState, minute: int, *reasons: JobStateReason) -> Job:
    """A job created at T0 + ``minute``; a completed one completed a minute later."""
    created = T0 + timedelta(minutes=minute)
    completed = created + timedelta(minutes=1) if not state.is_active else None
    share = FileShareInstructions((r"\\files\scans",))
    return Job(
        token=token,
        state=state,
        reasons=reasons or (JobStateReason.NONE,),
        filters=(FilterStatus(FS, FilterState.PENDING, (), share),),
        psp_identifier="{PSP-1}",
        psp_display_name="Invoices",
        user_name="alice@corp.example",
        owner="alice@corp.example",
        created=created,
        last_activity=created,
        completed=completed,
    )


#: Two active jobs and three completed ones, completed in the order a, b, c.
ACTIVE = [job("active-creating", JobState.CREATING, 10), job("active-pro", JobState.PROCESSING, 11)]
HISTORY = [
    job("done-a", JobState.COMPLETED, 1, JobStateReason.COMPLETED_SUCCESSFULLY),
    job("done-b", JobState.ABORTED, 2, JobStateReason.PROCESSING_FAILED),
    job("done-c", JobState.CANCELED, 3, JobStateReason.CANCELED),
]
SUBSCRIPTION = {"id": "urn:uuid:1", "notify_to": "http://10.0.0.5:5380/sink", "expires": "x"}


@pytest.fixture
def observer(tmp_path: Path) -> Iterator[Observer]:
    observer = Observer(tmp_path)
    observer.open([*HISTORY, *ACTIVE], now=T0)
    yield observer
    observer.close()


@pytest.fixture
def view(tmp_path: Path) -> View:
    return View(
        repository_state="Processing",
        subscriptions=(SUBSCRIPTION,),
        admin=True,
        data_dir=tmp_path,
        store_open=True,
        version="9.8.7",
        health=Health((Check("spool", None), Check("share \\\\files\\scans", None))),
        stalled_after_seconds=60.0,
    )


def get(target: str, view: View, observer: Observer) -> tuple[int, str, Any]:
    reply = answer("GET", target, None, view, observer)
    assert reply is not None, target
    body = reply.body.decode()
    return (
        reply.status,
        reply.content_type,
        json.loads(body) if "json" in reply.content_type else body,
    )


def test_status_json_shows_the_given_state(view: View, observer: Observer) -> None:
    status, content_type, state = get("/status.json", view, observer)
    assert (status, content_type) == (200, JSON_TYPE)
    assert state["server"]["version"] == "9.8.7"
    assert state["server"]["repository_state"] == "Processing"
    assert state["subscriptions"] == [SUBSCRIPTION]
    # Active jobs newest first, with their progress; only a Creating job can stall (its device
    # went quiet long ago here), a Processing one waits on the server's own filters.
    active = {row["token"]: row for row in state["active"]}
    assert [row["token"] for row in state["active"]] == ["active-pro", "active-creating"]
    assert active["active-creating"]["stalled"] is True
    assert active["active-pro"]["stalled"] is False
    # The history, most recently completed first, with outcomes and destinations.
    assert [row["token"] for row in state["history"]] == ["done-c", "done-b", "done-a"]
    assert [row["outcome"] for row in state["history"]] == ["canceled", "failed", "succeeded"]
    assert state["history"][0]["filters"][0]["destinations"]
    assert (state["history_size"], state["history_next"]) == (3, "")


def test_status_json_pages_the_history_by_cursor(view: View, observer: Observer) -> None:
    _, _, first = get("/status.json?limit=2", view, observer)
    assert [row["token"] for row in first["history"]] == ["done-c", "done-b"]
    assert first["history_next"]
    _, _, second = get(f"/status.json?limit=2&cursor={first['history_next']}", view, observer)
    assert [row["token"] for row in second["history"]] == ["done-a"]
    assert second["history_next"] == "" and second["history_size"] == 3


@pytest.mark.parametrize(
    "query",
    ["limit=0", f"limit={MAX_HISTORY_PAGE + 1}", "limit=ten", "cursor=nonsense", "devices=0"],
)
def test_a_bad_query_is_400_saying_what_is_wrong(
    view: View, observer: Observer, query: str
) -> None:
    status, content_type, body = get(f"/status.json?{query}", view, observer)
    assert (status, content_type) == (400, JSON_TYPE)
    assert query.split("=")[0] in body["error"]


def test_one_job_by_token(view: View, observer: Observer) -> None:
    status, _, body = get("/status.json?job=done-b", view, observer)
    assert status == 200 and body["job"]["token"] == "done-b"
    assert body["job"]["state"] == "Aborted"
    status, _, body = get("/status.json?job=no-such-token", view, observer)
    assert status == 404 and body == {"error": "no such job"}


def test_the_page_is_one_static_file(view: View, observer: Observer) -> None:
    status, content_type, body = get("/", view, observer)
    assert (status, content_type, body) == (200, HTML_TYPE, PAGE)


def test_a_non_administrator_gets_health_and_metrics_only(view: View, observer: Observer) -> None:
    """R10: the page and its JSON show users, devices and destinations."""
    outsider = replace(view, admin=False)
    for path in ("/", "/status.json", "/status.json?job=done-a"):
        status, _, body = get(path, outsider, observer)
        assert status == 403 and "scan administrators only" in body
    assert get("/healthz", outsider, observer)[:1] == (200,)
    status, _, metrics = get("/metrics", outsider, observer)
    assert status == 200 and "dsc_health_state" in metrics
    assert "alice" not in metrics and "done-a" not in metrics  # counts only


@pytest.mark.parametrize(
    ("change", "status", "text"),
    [
        ({}, 200, "ok"),
        (
            {"repository_state": "Stopped"},
            503,
            "down\nrepository: Stopped (the server is shutting down)",
        ),
        ({"store_open": False}, 503, "down\nstore: the job store is closed"),
        ({"health": None}, 503, "down\nchecks: not run yet"),
        (
            {"health": Health((Check("directory", "no answer", essential=False),))},
            200,
            "degraded\ndirectory: no answer",
        ),
    ],
)
def test_healthz_answers_from_the_view(
    view: View, observer: Observer, change: dict[str, Any], status: int, text: str
) -> None:
    got_status, _, body = get("/healthz", replace(view, **change), observer)
    assert (got_status, body) == (status, text + "\n")


@pytest.mark.parametrize(
    ("method", "target"), [("POST", "/status.json"), ("GET", "/nope"), ("GET", "/status")]
)
def test_anything_else_is_not_ours(
    view: View, observer: Observer, method: str, target: str
) -> None:
    """None: the binding answers 405, as for every other GET."""
    assert answer(method, target, None, view, observer) is None
