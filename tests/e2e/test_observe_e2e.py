"""Seeing the server, end to end against the real ``dsc serve``: the job log (text and JSON),
``/metrics`` parsed with prometheus_client's own parser before and after a scan, ``/healthz``,
the status JSON, device records that survive a restart, ``dsc devices`` and ``dsc job``'s
destinations, and R10 on the web endpoints with client certificates."""

from __future__ import annotations

import http.client
import json
import os
import re
import sqlite3
import ssl
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsc_core import client as dc
from dsc_core.model import FileShareInstructions
from e2e_support import DEFAULT_SID, ServerProcess, Soap, dsc_here, started_servers
from engines_support import BACKENDS, Backend, EnginesBackend, with_backend
from test_attacks_e2e import SoapFrom
from test_e2e_serve import Pki
from waiting import wait_for

BINDINGS = ["async", "blocking"]
LOCAL_SHARE = r"\\localhost\scans"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(30_000)
PDF = b"%PDF-1.7\n" + os.urandom(12_000)


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server(tmp_path: Path, backend: Backend) -> Iterator[StartServer]:
    """``dsc serve`` on the test's ``backend`` (conftest): the embedded store, and PostgreSQL +
    S3 too for what the server shows of what it stored (history, devices, purge): that must not
    depend on where it keeps its state."""
    with started_servers() as keep:

        def start(
            binding: str = "async",
            *,
            data: Path | None = None,
            config: Path | None = None,
            **kwargs: Any,
        ) -> ServerProcess:
            return keep(
                ServerProcess(
                    data or tmp_path / "data",
                    binding=binding,
                    config=with_backend(backend, config, tmp_path),
                    **kwargs,
                )
            )

        yield start


@pytest.fixture
def pages(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "page.png").write_bytes(PNG)
    (folder / "invoice.pdf").write_bytes(PDF)
    return folder / "page.png", folder / "invoice.pdf"


def get(
    server: ServerProcess, path: str, context: ssl.SSLContext | None = None
) -> tuple[int, str, bytes, dict[str, str]]:
    conn: http.client.HTTPConnection
    if server.scheme == "https":
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=30, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers.get("content-type", ""), response.read(), headers
    finally:
        conn.close()


def scan(server: ServerProcess, *args: str) -> dict[str, Any]:
    run = dsc_here("scan", "--server", server.url, "--quiet", "--json", *args)
    assert "Traceback" not in run.err, run
    result: dict[str, Any] = run.json()
    return result


def job_lines(log: str, token: str) -> list[str]:
    return [line.split("dsc.jobs: ", 1)[1] for line in log.splitlines() if f"job {token} " in line]


# --- 1. the job log ---------------------------------------------------------------------------


@pytest.mark.parametrize("binding", BINDINGS)
def test_job_log_lines_of_a_real_server(
    start_server: StartServer, pages: tuple[Path, Path], binding: str
) -> None:
    server = start_server(binding)
    png, pdf = pages
    done = scan(server, "--process-name", "Invoices", str(png), str(pdf))
    failed = scan(server, "--share", r"\\host\..\x", str(png))
    soap = Soap(server.url)
    canceled = soap.create([FileShareInstructions((LOCAL_SHARE,))])
    soap.send_image(canceled, 1, PNG)
    soap.dsc_cancel(canceled)
    soap.wait_ended(canceled)
    with pytest.raises(dc.ClientFault):
        soap.dsp_job("00000000-0000-0000-0000-000000000000")
    assert get(server, "/nope")[0] == 405
    server.stop_cleanly()
    log = server.log

    size = len(PNG) + len(PDF)
    lines = job_lines(log, done["token"])
    assert len(lines) == 8, lines
    # Each file the filter wrote, by its path on the share (issue 14 §3).
    folder = server.data / "shares" / "localhost" / "scans" / DEFAULT_SID
    assert lines[:7] == [
        f"job {done['token']} created: user {DEFAULT_SID}, device 127.0.0.1, process Invoices, "
        f"to fileshare {LOCAL_SHARE}",
        f"job {done['token']} image 1 received: {len(PNG)} bytes (png)",
        f"job {done['token']} image 2 received: {len(PDF)} bytes (pdf-a)",
        f"job {done['token']} ended by the device: 2 image(s), {size} bytes",
        f"job {done['token']} filter 0 (fileshare) delivered {folder / 'page_0001.png'}",
        f"job {done['token']} filter 0 (fileshare) delivered {folder / 'page_0002.pdf'}",
        f"job {done['token']} filter fileshare CompletedSuccessfully: delivered to {LOCAL_SHARE}",
    ]
    assert (folder / "page_0002.pdf").read_bytes() == PDF
    assert re.fullmatch(
        rf"job {done['token']} completed \(PostScanJobCompletedSuccessfully\) after \d+\.\d s",
        lines[7],
    )
    failed_lines = job_lines(log, failed["token"])
    assert (
        f"job {failed['token']} filter fileshare Canceled (FileShareAccessDenied): "
        r"for \\host\..\x" in failed_lines
    ), failed_lines
    # A failure is a WARNING that names the filter, where it was to deliver and why.
    assert re.fullmatch(
        rf"job {failed['token']} failed: Aborted \(PostScanJobProcessingFailed\) after \d+\.\d s; "
        r"fileshare Canceled \(FileShareAccessDenied\) for \\\\host\\\.\.\\x",
        failed_lines[-1],
    ), failed_lines[-1]
    assert re.search(rf"WARNING dsc\.jobs: job {failed['token']} failed: ", log), log
    canceled_lines = job_lines(log, canceled)
    assert canceled_lines[0].startswith(f"job {canceled} created: user {DEFAULT_SID}, device 1")
    assert re.fullmatch(
        rf"job {canceled} canceled \(PostScanJobCanceled\) after \d+\.\d s", canceled_lines[-1]
    )
    # Every refusal names the client's address.
    assert re.search(
        r"127\.0\.0\.1:\d+: GetPostScanJobElements to /ScanServer answered with HTTP 400, "
        r"Sender/ClientErrorJobTokenNotFound: ",
        log,
    ), log
    assert re.search(r"127\.0\.0\.1:\d+: GET /nope refused with 405", log), log


def test_json_log_format(start_server: StartServer, pages: tuple[Path, Path]) -> None:
    server = start_server(extra=["--log-format", "json"])
    done = scan(server, "--process-name", "Invoices", str(pages[0]))
    server.stop_cleanly()
    records = [json.loads(line) for line in server.log.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    mine = {r["event"]: r for r in records if r.get("job") == done["token"]}
    created = mine["job.created"]
    assert created["level"] == "INFO" and created["logger"] == "dsc.jobs"
    assert created["user"] == DEFAULT_SID and created["device"] == "127.0.0.1"
    assert created["scan_process"] == "Invoices"
    assert created["destinations"] == {"fileshare": [LOCAL_SHARE]}
    assert mine["job.image"]["bytes"] == len(PNG) and mine["job.image"]["format"] == "png"
    assert mine["job.filter"]["state"] == "CompletedSuccessfully"
    assert mine["job.completed"]["reasons"] == ["PostScanJobCompletedSuccessfully"]
    assert isinstance(mine["job.completed"]["seconds"], float)


# --- 2. metrics and health ----------------------------------------------------------------------


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, content_type, body, _ = get(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version="), content_type
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.parametrize("binding", BINDINGS)
def test_metrics_before_and_after_a_scan(
    start_server: StartServer, pages: tuple[Path, Path], binding: str
) -> None:
    server = start_server(binding)
    before = scrape(server)
    assert value(before, "dsc_active_jobs") == 0
    assert value(before, "dsc_jobs_created_total") == 0
    done = scan(server, str(pages[0]), str(pages[1]))
    with pytest.raises(dc.ClientFault):
        Soap(server.url).dsc_cancel("00000000-0000-0000-0000-000000000000")
    after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert done["state"] == "Completed"
    assert grew("dsc_jobs_created_total") == 1
    assert grew("dsc_jobs_ended_total", outcome="succeeded") == 1
    assert grew("dsc_images_received_total") == 2
    assert grew("dsc_image_bytes_received_total") == len(PNG) + len(PDF)
    assert grew("dsc_requests_total", operation="CreatePostScanJob", outcome="ok") == 1
    assert grew("dsc_requests_total", operation="SendImage", outcome="ok") == 2
    assert grew("dsc_requests_total", operation="CancelPostScanJob", outcome="fault") == 1
    assert grew("dsc_faults_total", subcode="ClientErrorJobTokenNotFound") == 1
    assert grew("dsc_upload_seconds_count") == 2
    assert grew("dsc_processing_seconds_count") == 1
    assert value(after, "dsc_processing_seconds_bucket", le="+Inf") == 1
    assert grew("dsc_filter_results_total", filter="fileshare", state="CompletedSuccessfully") == 1
    assert value(after, "dsc_active_jobs") == 0
    assert value(after, "dsc_connections") >= 1  # the scrape's own connection
    assert value(after, "dsc_subscriptions") == 0
    assert value(after, "dsc_delivery_failures_total") == 0

    status, _, body, _ = get(server, "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, _, _, headers = get(server, "/ScanServer")
    assert status == 405 and headers["allow"] == "POST"
    assert value(scrape(server), "dsc_http_refusals_total", status="405") == 1


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_status_json_and_dsc_job_destinations(
    start_server: StartServer, pages: tuple[Path, Path]
) -> None:
    server = start_server()
    done = scan(server, "--process-name", "Invoices", str(pages[0]))
    status, content_type, body, _ = get(server, "/status.json")
    assert status == 200 and content_type.startswith("application/json")
    state = json.loads(body)
    assert state["server"]["repository_state"] == "Idle"
    assert state["active"] == []
    [entry] = state["history"]
    assert entry["token"] == done["token"] and entry["state"] == "Completed"
    assert entry["device"] == "127.0.0.1" and entry["process"] == "Invoices"
    assert entry["filters"][0]["destinations"] == [LOCAL_SHARE]
    assert entry["created"] and entry["completed"] and entry["seconds"] is not None
    assert state["counters"]["jobs_ended"]["succeeded"] == 1
    assert get(server, "/status.json?job=nope")[0] == 404

    human = dsc_here("job", done["token"], "--server", server.url)
    assert human.code == 0, human
    assert f"Filter fileshare  CompletedSuccessfully -> {LOCAL_SHARE}" in human.out, human.out
    detail = dsc_here("job", done["token"][:8], "--server", server.url, "--json").json()
    assert detail["filters"][0]["destinations"] == [LOCAL_SHARE]


# --- 3. devices -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_devices_are_recorded_and_survive_a_restart(
    start_server: StartServer, pages: tuple[Path, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server = start_server(data=data)
    assert dsc_here("devices", "--server", server.url).out.startswith("(no devices yet")
    scan(server, str(pages[0]))
    scan(server, "--share", r"\\host\..\x", str(pages[0]))
    first = dsc_here("devices", "--server", server.url, "--json")
    assert first.code == 0, first
    [device] = first.json()
    assert device["address"] == "127.0.0.1" and device["identity"] == ""
    assert (device["jobs"], device["completed"], device["failed"], device["canceled"]) == (
        2,
        1,
        1,
        0,
    )
    assert device["first_contact"] <= device["last_contact"]
    server.stop_cleanly()

    again = start_server(data=data)
    kept = dsc_here("devices", "--server", again.url, "--json").json()
    assert kept == [device]
    # A job created before a restart and ended after it counts for its device.
    soap = Soap(again.url)
    token = soap.create([FileShareInstructions((LOCAL_SHARE,))])
    again.stop_cleanly()
    third = start_server(data=data)
    Soap(third.url).dsc_cancel(token)
    wait_for(
        lambda: dsc_here("devices", "--server", third.url, "--json").json()[0]["canceled"] == 1,
        what="the canceled job counted",
    )
    table = dsc_here("devices", "--server", third.url)
    lines = table.out.rstrip("\n").split("\n")
    assert lines[0].split()[:3] == ["ADDRESS", "IDENTITY", "LAST"]
    assert lines[2].split()[0] == "127.0.0.1" and all(len(line) <= 100 for line in lines)


def listed_devices(server: ServerProcess) -> list[str]:
    run = dsc_here("devices", "--server", server.url, "--json")
    assert run.code == 0, run
    return [d["address"] for d in run.json()]


@pytest.mark.parametrize("binding", BINDINGS)
def test_over_the_device_cap_the_oldest_is_evicted(
    start_server: StartServer, tmp_path: Path, binding: str
) -> None:
    """Issue 14 section 4: N+1 devices (loopback addresses 127.0.0.x) leave N, the one
    with the oldest last contact gone, in the book and in the file."""
    config = tmp_path / "dsc.toml"
    config.write_text("[devices]\nmax_devices = 3\n", encoding="utf-8")
    data = tmp_path / "data"
    server = start_server(binding, data=data, config=config)
    for n in (1, 2, 3):
        SoapFrom(server.url, f"127.0.0.{n}").create([FileShareInstructions((LOCAL_SHARE,))])
    assert listed_devices(server) == ["127.0.0.3", "127.0.0.2", "127.0.0.1"]
    SoapFrom(server.url, "127.0.0.4").create([FileShareInstructions((LOCAL_SHARE,))])
    assert listed_devices(server) == ["127.0.0.4", "127.0.0.3", "127.0.0.2"]
    assert "device book: 1 device(s) evicted" in server.log
    # /status.json lists the most recent devices, as many as asked, and says how many are kept.
    state = json.loads(get(server, "/status.json?devices=2")[2])
    assert [d["address"] for d in state["devices"]] == ["127.0.0.4", "127.0.0.3"]
    assert state["devices_size"] == 3
    status, _, body, _ = get(server, "/status.json?devices=0")
    assert status == 400 and b"devices must be a number from 1 to 500" in body
    server.stop_cleanly()
    again = start_server(binding, data=data, config=config)
    assert listed_devices(again) == ["127.0.0.4", "127.0.0.3", "127.0.0.2"]


def age_device(backend: Backend, data: Path, address: str, days: int) -> None:
    """Move a device's first and last contact ``days`` back, where the backend keeps the book
    (the data folder's SQLite file, or the PostgreSQL database: issue 17)."""
    select = f"SELECT last_contact FROM devices WHERE address = '{address}'"
    update = (
        "UPDATE devices SET first_contact = {0}, last_contact = {0}, last_contact_at = {0} "
        f"WHERE address = '{address}'"
    )
    if isinstance(backend, EnginesBackend):
        import psycopg

        with psycopg.connect(backend.dsn, autocommit=True) as pg:
            [(stamp,)] = pg.execute(select).fetchall()  # type: ignore[arg-type]
            aged = datetime.fromisoformat(stamp) - timedelta(days=days)
            pg.execute(
                update.replace("{0}", "%s"),  # type: ignore[arg-type]
                (aged.isoformat(), aged.isoformat(), aged.timestamp()),
            )
        return
    with sqlite3.connect(data / "jobs.sqlite3") as conn:
        [(stamp,)] = conn.execute(select)
        aged = datetime.fromisoformat(stamp) - timedelta(days=days)
        conn.execute(
            update.replace("{0}", "?"), (aged.isoformat(), aged.isoformat(), aged.timestamp())
        )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_device_past_the_retention_is_gone_after_a_restart(
    start_server: StartServer, tmp_path: Path, backend: Backend
) -> None:
    config = tmp_path / "dsc.toml"
    config.write_text("[devices]\nretention_days = 30\n", encoding="utf-8")
    data = tmp_path / "data"
    server = start_server(data=data, config=config)
    for n in (1, 2):
        SoapFrom(server.url, f"127.0.0.{n}").create([FileShareInstructions((LOCAL_SHARE,))])
    assert listed_devices(server) == ["127.0.0.2", "127.0.0.1"]
    server.stop_cleanly()
    # 127.0.0.1 was last seen 31 days ago (the server was down meanwhile).
    age_device(backend, data, "127.0.0.1", 31)
    again = start_server(data=data, config=config)
    assert listed_devices(again) == ["127.0.0.2"]
    assert (
        "device book: 1 device(s) removed, last contact more than 30 days ago "
        "([devices] retention_days)"
    ) in again.log


# --- 4. R10 on the web endpoints ------------------------------------------------------------------


def test_status_page_is_for_scan_administrators(
    start_server: StartServer, pages: tuple[Path, Path], tmp_path: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    config = tmp_path / "dsc.toml"
    config.write_text('[users]\nscan_admins = ["admin"]\n')
    server = start_server(
        config=config, tls=(pki.server_cert, pki.server_key), client_ca=pki.ca_pem
    )
    alice = Soap(server.url, pki.context("alice"))
    token = alice.create([FileShareInstructions((LOCAL_SHARE,))])
    for path in ("/status", "/status.json", f"/status.json?job={token}"):
        assert get(server, path, pki.context("admin"))[0] == 200, path
        status, _, body, _ = get(server, path, pki.context("bob"))
        assert status == 403 and b"scan administrators only" in body, path
    state = json.loads(get(server, "/status.json", pki.context("admin"))[2])
    assert [(d["address"], d["identity"]) for d in state["devices"]] == [("127.0.0.1", "alice")]
    assert [j["token"] for j in state["active"]] == [token]
    # Counts and up/down only: any client the TLS layer accepted.
    assert get(server, "/metrics", pki.context("bob"))[0] == 200
    assert get(server, "/healthz", pki.context("bob"))[0] == 200

    def as_user(user: str, *args: str) -> Any:
        return dsc_here(
            *args, "--server", server.url, "--ca", str(pki.ca_pem), "--cert", str(pki.users[user])
        )

    refused = as_user("bob", "devices")
    assert refused.code == 1 and "scan administrators only" in refused.err, refused
    listed = as_user("admin", "devices", "--json")
    assert listed.code == 0 and listed.json()[0]["identity"] == "alice", listed


# --- 5. dsc purge ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_dsc_purge_trims_the_history(start_server: StartServer, pages: tuple[Path, Path]) -> None:
    server = start_server()
    tokens = [scan(server, str(pages[0]))["token"] for _ in range(2)]
    none = dsc_here("purge", "--server", server.url, "--before", "1d", "--json", "--yes")
    assert none.code == 0 and none.json()["purged"] == 0, none
    tomorrow = (datetime.now() + timedelta(days=1)).date().isoformat()
    run = dsc_here("purge", "--server", server.url, "--before", tomorrow, "--yes")
    assert run.code == 0, run
    assert re.fullmatch(r"2 job\(s\) that ended before .* removed from the history\n", run.out)
    assert dsc_here("history", "--server", server.url, "--json").json() == []
    state = json.loads(get(server, "/status.json")[2])
    assert state["history"] == [] and not any(t in json.dumps(state) for t in tokens)
    bad = dsc_here("purge", "--server", server.url, "--before", "soon")
    assert bad.code == 2 and "neither a date/time" in bad.err, bad
