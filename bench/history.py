"""What the benches of the web endpoints share (bench/observe.py, bench/webconsole.py): a real
``dsc serve`` whose history holds N jobs, created and canceled over MS-BDSRR, asked over one
keep-alive connection; ``timed`` samples and the table of medians against a floor.  Nothing
here asserts a time.
"""

from __future__ import annotations

import http.client
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bindings"), str(ROOT / "tests")]

from dsc_core import client as dc  # noqa: E402
from dsc_core import names  # noqa: E402
from dsc_core.model import FileShareInstructions  # noqa: E402
from e2e_support import ServerProcess, serving  # noqa: E402

A = names.Action


class HistoryServer:
    """One keep-alive connection to a ``dsc serve`` (see :func:`history_server`)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)

    def post(self, action: str, payload: object) -> dc.Response:
        body = dc.envelope(
            action, payload, message_id=f"urn:uuid:{uuid.uuid4()}", to=self.server.url
        )
        self.conn.request("POST", "/ScanServer", body, {"Content-Type": dc.SOAP_XML})
        response = self.conn.getresponse()
        return dc.parse_response(response.read(), response.status)

    def get(
        self, path: str, headers: dict[str, str] | None = None, ok: Sequence[int] = (200,)
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """The answer to ``GET path`` and its body; its status must be one of ``ok``."""
        self.conn.request("GET", path, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        assert response.status in ok, (path, response.status)
        return response, data

    def fill(self, jobs: int) -> float:
        """``jobs`` jobs into the history (created, then canceled); the seconds it took."""
        started = time.perf_counter()
        for _ in range(jobs):
            created = self.post(
                A.DSP_CREATE,
                dc.create_post_scan_job(
                    user_identifier="S-1-5-21-0-0-0-1000",
                    psp_identifier=str(uuid.uuid4()).upper(),
                    instructions=[FileShareInstructions((r"\\localhost\scans",))],
                    document_root_name="bench",
                ),
            )
            token = dc.text_of(created.payload, names.DSP, "JobToken")
            self.post(A.DSC_CANCEL, dc.token_request(names.DSC, "CancelPostScanJobRequest", token))
        return time.perf_counter() - started


@contextmanager
def history_server(jobs: int) -> Iterator[HistoryServer]:
    """A ``dsc serve`` keeping ``jobs`` jobs in its history (filled by the caller), stopped
    cleanly afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "dsc.toml"
        config.write_text(f"[jobs]\nhistory_size = {jobs}\n")
        with serving(ServerProcess(Path(tmp) / "data", config=config)) as server:
            client = HistoryServer(server)
            try:
                yield client
            finally:
                client.conn.close()


def timed(call: Callable[[], object], rounds: int) -> list[float]:
    """``rounds`` milliseconds of ``call``, sorted, after one call to warm up."""
    call()
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1000)
    return sorted(out)


def print_table(rows: Sequence[tuple[str, list[float]]]) -> None:
    """Median and p90 of each row, and its median's ratio to the first row's (the floor)."""
    base = statistics.median(rows[0][1])
    print(f"{'request':<34} {'median ms':>10} {'p90 ms':>8} {'ratio':>7}")
    for name, samples in rows:
        median = statistics.median(samples)
        p90 = samples[max(0, int(len(samples) * 0.9) - 1)]
        print(f"{name:<34} {median:>10.2f} {p90:>8.2f} {median / base:>6.2f}x")
