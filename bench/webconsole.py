"""What the web console costs (issue 19, section 5), as ratios against a floor measured in the
same run.

    python3 bench/webconsole.py [--quick] [--jobs N] [--idle SECONDS]

A real ``dsc serve`` (async binding) keeps N jobs (default 10,000) in its history, created and
canceled over MS-BDSRR.  Then, over keep-alive HTTP, one request after the other:

- ``GET /api/jobs?limit=50``: the history's first page, what the console shows;
- the same page deep in the history (a ``cursor`` from 100 pages on);
- a search that matches nothing (``q=``): the worst case, it examines the most a filtered
  answer looks at (api.MAX_SCANNED jobs) and answers with a cursor to go on;
- the page's poll while nothing changes: ``If-None-Match`` with the ETag, answered 304;
- the floor: ``GET /healthz``, the cheapest answer on the same loop.

Then the idle page's cost: Debian's chromium opens ``/`` (development mode: it signs in
at once) and stays on it for ``--idle`` seconds while nothing happens; every request it makes
and its bytes (request and response heads and bodies, as the browser counts them) are summed
and given per minute.  Skipped, saying why, without chromium or Playwright.

Printed: median and p90 milliseconds and the ratio median/floor.  Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bindings"), str(ROOT / "tests")]

from dsc_core import client as dc  # noqa: E402
from dsc_core import names  # noqa: E402
from dsc_core.model import FileShareInstructions  # noqa: E402
from e2e_support import ServerProcess  # noqa: E402

A = names.Action
CHROMIUM = "/usr/bin/chromium"


def timed(call: Callable[[], object], rounds: int) -> list[float]:
    call()  # warm up
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return sorted(out)


def idle_cost(url: str, seconds: float) -> str:
    """Requests and bytes per minute of an open console page while nothing changes."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "skipped: playwright is not installed"
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if executable is None:
        return "skipped: no chromium (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, args=["--headless", "--no-sandbox"], headless=True
        )
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#active-table tbody tr")
        page.wait_for_timeout(3000)  # the first polls fill the ETag cache
        seen: list[object] = []
        page.on("requestfinished", lambda request: seen.append(request))
        page.wait_for_timeout(seconds * 1000)
        total = 0
        statuses: dict[int, int] = {}
        for request in seen:
            sizes = request.sizes()  # type: ignore[attr-defined]
            total += sum(
                sizes[k]
                for k in (
                    "requestHeadersSize",
                    "requestBodySize",
                    "responseHeadersSize",
                    "responseBodySize",
                )
            )
            response = request.response()  # type: ignore[attr-defined]
            if response is not None:
                statuses[response.status] = statuses.get(response.status, 0) + 1
        browser.close()
    per_minute = 60.0 / seconds
    answers = ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items()))
    return (
        f"{len(seen) * per_minute:.0f} requests/min, {total * per_minute / 1024:.1f} KiB/min "
        f"(measured over {seconds:.0f} s: {answers or 'none'})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 jobs, 5 rounds, 4 s idle")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds the idle page is watched")
    args = parser.parse_args()
    jobs, rounds, idle = (60, 5, 4.0) if args.quick else (args.jobs, 40, args.idle)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "dsc.toml"
        config.write_text(f"[jobs]\nhistory_size = {jobs}\n")
        server = ServerProcess(Path(tmp) / "data", config=config).start()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)

            def post(action: str, payload: object) -> dc.Response:
                body = dc.envelope(
                    action, payload, message_id=f"urn:uuid:{uuid.uuid4()}", to=server.url
                )
                conn.request("POST", "/ScanServer", body, {"Content-Type": dc.SOAP_XML})
                response = conn.getresponse()
                return dc.parse_response(response.read(), response.status)

            def get(path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
                conn.request("GET", path, headers=headers or {})
                response = conn.getresponse()
                response.read()
                assert response.status in (200, 304), (path, response.status)
                return response

            started = time.perf_counter()
            for _ in range(jobs):
                created = post(
                    A.DSP_CREATE,
                    dc.create_post_scan_job(
                        user_identifier="S-1-5-21-0-0-0-1000",
                        psp_identifier=str(uuid.uuid4()).upper(),
                        instructions=[FileShareInstructions((r"\\localhost\scans",))],
                        document_root_name="bench",
                    ),
                )
                token = dc.text_of(created.payload, names.DSP, "JobToken")
                post(A.DSC_CANCEL, dc.token_request(names.DSC, "CancelPostScanJobRequest", token))
            print(
                f"== web console: {jobs} jobs in the history "
                f"({time.perf_counter() - started:.1f} s to make)"
            )
            cursor = ""
            for _ in range(min(100, jobs // 50 - 1)):
                conn.request("GET", f"/api/jobs?state=ended&limit=50&cursor={cursor}")
                cursor = json.loads(conn.getresponse().read())["next"]
            tag = get("/api/jobs?limit=50").getheader("ETag") or ""
            floor = timed(lambda: get("/healthz"), rounds)
            rows = [
                ("GET /healthz (floor)", floor),
                ("GET /api/jobs?limit=50", timed(lambda: get("/api/jobs?limit=50"), rounds)),
                (
                    "  ... deep in the history",
                    timed(lambda: get(f"/api/jobs?state=ended&limit=50&cursor={cursor}"), rounds),
                ),
                (
                    "  ... q= matching nothing",
                    timed(lambda: get("/api/jobs?limit=50&q=no-such-text"), rounds),
                ),
                (
                    "  ... If-None-Match (304)",
                    timed(lambda: get("/api/jobs?limit=50", {"If-None-Match": tag}), rounds),
                ),
            ]
            base = statistics.median(floor)
            print(f"{'request':<34} {'median ms':>10} {'p90 ms':>8} {'ratio':>7}")
            for name, samples in rows:
                median = statistics.median(samples)
                p90 = samples[max(0, int(len(samples) * 0.9) - 1)]
                print(f"{name:<34} {median:>10.2f} {p90:>8.2f} {median / base:>6.2f}x")
            conn.close()
            base_url = f"http://127.0.0.1:{server.port}"
            print(f"idle page: {idle_cost(base_url, idle)}")
            server.stop_cleanly()
        finally:
            if server.alive:
                server.kill9()
    return 0


if __name__ == "__main__":
    sys.exit(main())
