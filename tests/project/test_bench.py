"""The benchmark runs (smoke test): ``python bench/run.py --quick`` exits 0 and prints every
section.  No timing is asserted, ever: these machines are noisy (design.md, "Measuring")."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def run_bench(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a bench script (``command``) in the project; it must exit 0.  A bench that prints
    ``skipped: WHY`` lacks a real part (wrk, PostgreSQL, smbd, HAProxy...): the test skips
    saying why instead of passing without measuring."""
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    if result.stdout.startswith("skipped: "):
        pytest.skip(f"{Path(command[1]).name} {result.stdout.strip()}")
    return result


SECTIONS = ("== core vs floor", "== image upload", "== memory vs image size", "== HTTP")


def test_bench_quick_runs_every_section() -> None:
    result = run_bench([sys.executable, str(ROOT / "bench" / "run.py"), "--quick"], timeout=120)
    for section in SECTIONS:
        assert section in result.stdout, f"missing section {section!r}:\n{result.stdout}"
    http = result.stdout.split("== HTTP", 1)[1]
    # Either measured or explicitly skipped, never silently empty.
    assert (
        "throughput ratio binding/floor" in http or "skipped: HTTP bindings not available" in http
    ), http


def test_runtime_bench_runs_and_writes_json(tmp_path: object) -> None:
    """``bench/runtime.py`` (issue 7) runs: the in-process section here (the wrk, curl and
    scale sections need minutes and external tools; they print a skip when a tool is
    missing).  No timing is asserted."""
    import json

    out = Path(str(tmp_path)) / "results.json"
    result = run_bench(
        [
            sys.executable,
            str(ROOT / "bench" / "runtime.py"),
            "--quick",
            "--only",
            "large",
            "--json",
            str(out),
        ],
        timeout=300,
    )
    assert "== large replies" in result.stdout
    measured = json.loads(out.read_text(encoding="utf-8"))["large"]
    assert set(measured) == {"GetActiveJobs", "GetJobHistory"}
    assert all(entry["jobs"] == 1000 for entry in measured.values())


def test_observe_bench_quick_runs() -> None:
    """``bench/observe.py --quick`` (issue 9): the status endpoints against GetJobHistory."""
    result = run_bench([sys.executable, str(ROOT / "bench" / "observe.py"), "--quick"], timeout=120)
    for row in ("GetJobHistory (floor)", "GET /status.json", "GET /metrics", "GET /healthz"):
        assert row in result.stdout, result.stdout


def test_smb_bench_runs() -> None:
    """``bench/smb.py`` (issue 21), small: the filter and ``smbclient put`` to a real smbd."""
    result = run_bench(
        [sys.executable, str(ROOT / "bench" / "smb.py"), "--size-mb", "8", "--runs", "1"],
        timeout=120,
    )
    assert "filter throughput / smbclient put" in result.stdout, result.stdout


def test_webconsole_bench_runs() -> None:
    """``bench/webconsole.py`` (issue 19) runs: the API's pages against the floor and the idle
    page's requests and bytes per minute (or a skip that says why).  No timing is asserted."""
    result = run_bench(
        [sys.executable, str(ROOT / "bench" / "webconsole.py"), "--quick"], timeout=120
    )
    assert "GET /api/jobs?limit=50" in result.stdout and "If-None-Match (304)" in result.stdout
    idle = result.stdout.split("idle page: ", 1)[1]
    if idle.startswith("skipped: "):  # no browser here: say so, do not pass silently
        pytest.skip(f"bench/webconsole.py idle page {idle.splitlines()[0]}")
    assert "requests/min" in idle, result.stdout


def test_asgi_bench_runs() -> None:
    """``bench/asgi.py --quick`` (issue 20): all seven servers answer and are measured, the
    targets table is printed (or a skip that says why).  No timing is asserted."""
    result = run_bench([sys.executable, str(ROOT / "bench" / "asgi.py"), "--quick"], timeout=180)
    tables = result.stdout.split("== targets", 1)[0]
    for server in (
        "bare h11 (fixed bytes)",
        "aiohttp (fixed bytes)",
        "aiohttp + lxml (by hand)",
        "dsc serve --binding async",
        "dsc serve --binding blocking",
        "ASGI app, uvicorn (httptools, uvloop)",
        "ASGI app, uvicorn (dsc's uvloop and httptools protocol)",
    ):
        assert tables.count(f"\n| {server} |") == 2, result.stdout  # both requests
    assert "non-2xx" not in result.stdout, result.stdout
    assert "== targets" in result.stdout and "| GetPostScanJobElements | t1c8 |" in result.stdout


def test_fairness_bench_runs() -> None:
    """``bench/fairness.py --quick`` (issue 20 point 3 (a)): every server answers, its answers
    are counted in its own process (each row has its counts, not an empty run) and the table
    prints.  No timing, and no order, is asserted: the order is what it measures."""
    result = run_bench(
        [sys.executable, str(ROOT / "bench" / "fairness.py"), "--quick"], timeout=180
    )
    assert "round-robin is 7 between" in result.stdout, result.stdout
    for server in (
        "hand-written, asyncio",
        "hand-written, uvloop",
        "ASGI app, uvloop, uvicorn's own protocol",
        "ASGI app, uvloop",
        "ASGI app, asyncio",
    ):
        row = re.search(rf"\n\| {re.escape(server)} \| (\d+) / (\d+) / (\d+) \|", result.stdout)
        assert row is not None, result.stdout
        assert int(row.group(1)) >= 1, result.stdout  # answers on the other connections


@pytest.mark.parametrize("binding", ["async", "asgi", "core"])
def test_per_request_counts_run(binding: str) -> None:
    """``bench/per_request.py`` (issue 20): both requests through the h11 driver and through
    the ASGI app in process, each answered (the script checks the reply), calls and CPU per
    request printed.  No timing is asserted."""
    result = run_bench(
        [sys.executable, str(ROOT / "bench" / "per_request.py"), "--binding", binding]
        + ["--requests", "50"],
        timeout=120,
    )
    for operation in ("GetRepositoryElements", "GetPostScanJobElements"):
        line = next((row for row in result.stdout.splitlines() if f" {operation} " in row), "")
        assert "Python calls/request" in line and "us/request" in line, result.stdout


@pytest.mark.parametrize("server", ["handwritten", "uvicorn-floor", "coalescing"])
def test_servers_in_process_counts_run(server: str) -> None:
    """``bench/servers_in_process.py`` (issue 20): the hand-written aiohttp server, uvicorn
    over a trivial app and uvicorn over the project's app, each fed both requests on one
    connection in process and answered 200 (the script checks), calls and CPU printed."""
    result = run_bench(
        [sys.executable, str(ROOT / "bench" / "servers_in_process.py"), "--server", server]
        + ["--requests", "50"],
        timeout=120,
    )
    for operation in ("GetRepositoryElements", "GetPostScanJobElements"):
        line = next((row for row in result.stdout.splitlines() if f" {operation} " in row), "")
        assert "Python calls/request" in line and "us/request" in line, result.stdout


def test_storage_bench_runs() -> None:
    """``bench/storage.py`` (issue 17), tiny: a record commit, a SendImage against curl, the
    listings and concurrent uploads, on a real PostgreSQL and SeaweedFS."""
    result = run_bench(
        [
            sys.executable,
            str(ROOT / "bench" / "storage.py"),
            *("--image-mb", "1", "--jobs", "4", "--uploads", "2"),
            *("--upload-mb", "1", "--commits", "3", "--runs", "1"),
        ],
        timeout=180,
    )
    assert "| commit PostgreSQL / SQLite |" in result.stdout, result.stdout
    assert "2 concurrent 1 MB uploads to S3: peak RSS (MiB)" in result.stdout, result.stdout


def test_job_documents_bench_runs() -> None:
    """``bench/job_documents.py``, tiny: a job's SendImage record writes on SQLite and a real
    PostgreSQL, as ratios, and another instance's catch-up reads of them.  No timing is
    asserted."""
    result = run_bench(
        [
            sys.executable,
            str(ROOT / "bench" / "job_documents.py"),
            "--documents",
            "30",
            "--runs",
            "1",
        ],
        timeout=120,
    )
    for engine in ("sqlite", "postgresql"):
        assert f"\n| {engine} | " in result.stdout, result.stdout
    # The catch-up's document rows, exact counts: documents 20 and 30 (store/jobdocuments.py).
    assert "\n| whole list (before) | 20 -> 30 | " in result.stdout, result.stdout
    assert "\n| rows since the version known | 1 -> 1 | " in result.stdout, result.stdout


def test_workers_bench_runs() -> None:
    """``bench/workers.py --quick`` (issue 18 point 5): ``dsc serve --workers 1`` and ``2`` on
    a throwaway PostgreSQL both answer and are measured (or a skip that says why).  No timing
    is asserted."""
    result = run_bench([sys.executable, str(ROOT / "bench" / "workers.py"), "--quick"], timeout=180)
    assert "GetRepositoryElements, wrk -t1 -c8" in result.stdout, result.stdout
    for workers in (1, 2):
        assert f"\n| --workers {workers} | " in result.stdout, result.stdout
    assert "non-2xx" not in result.stdout, result.stdout


def test_cluster_bench_runs() -> None:
    """``bench/cluster.py --quick`` (issue 18 point 8): the scale run's scanners through HAProxy
    on one and on three instances all complete, and the failover is measured (or a skip that
    says why).  No timing is asserted."""
    result = run_bench([sys.executable, str(ROOT / "bench" / "cluster.py"), "--quick"], timeout=240)
    for count in (1, 3):
        assert f"\n| {count} | 20/20 | " in result.stdout, result.stdout
    assert "failover: kill -9 to the same SendImage accepted elsewhere: " in result.stdout


def test_cluster_latency_bench_runs() -> None:
    """``bench/cluster_latency.py --quick`` (issue 18 point 8): a job's filter held on a real SMTP
    relay, its instance killed, the job rescued and completed by the other; ten job changes on
    one instance delivered to a subscriber by the other (or a skip that says why).  No timing
    is asserted."""
    result = run_bench(
        [sys.executable, str(ROOT / "bench" / "cluster_latency.py"), "--quick"], timeout=240
    )
    assert "| the lease taken by the survivor | " in result.stdout, result.stdout
    assert "| the job Completed on the survivor | " in result.stdout, result.stdout
    found = re.search(r"events: 10 job changes on (dsc-\w), delivered by (dsc-\w)", result.stdout)
    assert found and found[1] != found[2], result.stdout
    assert "| request sent -> notification received | " in result.stdout, result.stdout


def test_catchup_bench_runs() -> None:
    """``bench/catchup.py --quick`` (issue 18 point 1): both listings answered by a server on
    SQLite and one on PostgreSQL (the script checks each reply and refuses non-2xx), the
    ratio printed.  No timing is asserted."""
    result = run_bench([sys.executable, str(ROOT / "bench" / "catchup.py"), "--quick"], timeout=180)
    for operation in ("GetActiveJobs", "GetRepositoryElements"):
        assert re.search(
            rf"^{operation}, wrk -t1 -c1: SQLite [\d,]+ req/s, PostgreSQL [\d,]+ req/s, "
            r"PostgreSQL / SQLite ",
            result.stdout,
            re.M,
        ), result.stdout


def test_runtime_bench_serve_chooses_its_port_again_when_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bench/runtime.py``'s ``Serve`` chooses its port as it starts, through the tests' one
    ServerProcess, and chooses again when someone else holds it (it used to pick a port, let
    go of it, and start ``dsc serve`` on it: a race with every other process)."""
    import importlib.util
    import socket

    import e2e_support

    spec = importlib.util.spec_from_file_location("bench_runtime", ROOT / "bench" / "runtime.py")
    assert spec is not None and spec.loader is not None
    runtime = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_runtime", runtime)  # its dataclasses look it up
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts the project's folders first
    spec.loader.exec_module(runtime)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = int(taken.getsockname()[1])
        chosen: list[int] = []
        real_free_port = e2e_support.free_port

        def free_port() -> int:  # the first choice is taken by the time the server binds it
            chosen.append(held if not chosen else real_free_port())
            return chosen[-1]

        monkeypatch.setattr(e2e_support, "free_port", free_port)
        serve = runtime.Serve(tmp_path / "data")
        try:
            assert chosen[0] == held and serve.port == chosen[-1] != held
            assert runtime.token_of(runtime.post(serve.port, runtime.create_request()))
        finally:
            serve.stop()
