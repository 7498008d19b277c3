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
import http.client
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


def timed(call: Callable[[], object], rounds: int) -> list[float]:
    call()  # warm up
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return sorted(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 jobs, 5 rounds (smoke run)")
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    jobs, rounds = (50, 5) if args.quick else (args.jobs, 40)
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

            def get(path: str) -> bytes:
                conn.request("GET", path)
                response = conn.getresponse()
                data = response.read()
                assert response.status == 200, (path, response.status)
                return data

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
            print(f"== {jobs} jobs in the history ({time.perf_counter() - started:.1f} s to make)")
            history = dc.empty_request("GetJobHistoryRequest")
            floor = timed(lambda: post(A.DSC_GET_JOB_HISTORY, history), rounds)
            size = len(get("/status.json"))
            rows = [
                ("GetJobHistory (floor)", floor),
                (
                    f"GET /status.json ({size // 1024} KiB)",
                    timed(lambda: get("/status.json"), rounds),
                ),
                ("GET /metrics", timed(lambda: get("/metrics"), rounds)),
                ("GET /healthz", timed(lambda: get("/healthz"), rounds)),
            ]
            base = statistics.median(floor)
            print(f"{'request':<34} {'median ms':>10} {'p90 ms':>8} {'ratio':>7}")
            for name, samples in rows:
                median = statistics.median(samples)
                p90 = samples[int(len(samples) * 0.9) - 1]
                print(f"{name:<34} {median:>10.2f} {p90:>8.2f} {median / base:>6.2f}x")
            conn.close()
            server.stop_cleanly()
        finally:
            if server.alive:
                server.kill9()
    return 0


if __name__ == "__main__":
    sys.exit(main())
