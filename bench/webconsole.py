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
import sys
from pathlib import Path

from history import history_server, print_table, timed

CHROMIUM = "/usr/bin/chromium"


def idle_cost(url: str, seconds: float, settle: float = 3.0) -> str:
    """Requests and bytes per minute of an open console page while nothing changes, watched
    for ``seconds`` once ``settle`` seconds of polls (every 2 s, console.js) have filled the
    browser's ETag cache."""
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
        page.wait_for_timeout(settle * 1000)  # the first polls fill the ETag cache
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
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 60 jobs, 5 rounds, one poll watched idle"
    )
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds the idle page is watched")
    args = parser.parse_args()
    # --quick: after the page's first poll (2 s), one more poll watched: the line is printed.
    jobs, rounds, idle, settle = (
        (60, 5, 2.2, 2.2) if args.quick else (args.jobs, 40, args.idle, 3.0)
    )
    with history_server(jobs) as server:
        made = server.fill(jobs)
        print(f"== web console: {jobs} jobs in the history ({made:.1f} s to make)")

        def get(path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
            return server.get(path, headers, ok=(200, 304))[0]

        cursor = ""
        for _ in range(min(100, jobs // 50 - 1)):
            page = server.get(f"/api/jobs?state=ended&limit=50&cursor={cursor}")[1]
            cursor = json.loads(page)["next"]
        tag = get("/api/jobs?limit=50").getheader("ETag") or ""
        print_table(
            [
                ("GET /healthz (floor)", timed(lambda: get("/healthz"), rounds)),
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
        )
        print(f"idle page: {idle_cost(f'http://127.0.0.1:{server.server.port}', idle, settle)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
