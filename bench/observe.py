"""What seeing the server costs (issue 9), as ratios against a floor measured in the same run.

    python3 bench/observe.py [--quick] [--jobs N]

A real ``dsc serve`` (async binding) keeps N jobs in its history (created and canceled over
MS-BDSRR).  Then, over keep-alive HTTP, one request after the other:

- ``GET /status.json`` (what the status page polls every second: every job as JSON) against
  the floor ``GetJobHistory`` (SOAP, the same N jobs, from the core's cached job XML);
- ``GET /metrics`` and ``GET /healthz`` against the same floor.

All of them are answered on the server's event loop, so the ratio also says what an open
status page (one poll a second) takes from it.

Printed: median and p90 milliseconds of each, and the ratio median/floor-median.  Nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import sys

from history import A, dc, history_server, print_table, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 jobs, 5 rounds (smoke run)")
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    jobs, rounds = (50, 5) if args.quick else (args.jobs, 40)
    with history_server(jobs) as server:
        made = server.fill(jobs)
        print(f"== {jobs} jobs in the history ({made:.1f} s to make)")

        def get(path: str) -> bytes:
            return server.get(path)[1]

        history = dc.empty_request("GetJobHistoryRequest")
        size = len(get("/status.json"))
        print_table(
            [
                (
                    "GetJobHistory (floor)",
                    timed(lambda: server.post(A.DSC_GET_JOB_HISTORY, history), rounds),
                ),
                (
                    f"GET /status.json ({size // 1024} KiB)",
                    timed(lambda: get("/status.json"), rounds),
                ),
                ("GET /metrics", timed(lambda: get("/metrics"), rounds)),
                ("GET /healthz", timed(lambda: get("/healthz"), rounds)),
            ]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
