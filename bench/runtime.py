"""Benchmarks of the runtime (issue 7), each a ratio against a floor measured in the same run.

    python3 bench/runtime.py [--quick] [--json results.json] [--only keepalive,large,upload,scale]

Sections:

1. ``keepalive`` - GetRepositoryElements and GetPostScanJobElements over keep-alive at 1, 8 and
   64 connections, load from ``wrk`` (C, not the bottleneck): the async and the blocking
   binding (each a real ScanService with its SQLite store) against a bare h11-on-trio server
   answering the same reply bytes.  3 repetitions, requests/s ratio and p99 ratio as
   min/median/max.  Targets: async >= 0.5x, blocking >= 0.35x, p99 at 64 <= 3x.
2. ``large`` - GetActiveJobs and GetJobHistory with 1,000 jobs, in process: the core's request
   to reply against lxml parsing and serializing the same reply bytes.  Target: within 2x.
3. ``upload`` - SendImage of 400 MB with ``curl --data-binary`` to ``dsc serve`` against the
   same curl to a sink that writes and fsyncs; the server's peak RSS after a 40 MB and after a
   400 MB image.  Target: >= 0.8x the sink's throughput, RSS flat.
4. ``scale`` - ``dsc serve`` with its DEFAULT configuration: 1,000 idle keep-alive connections
   held (from four client addresses), then 200 scanners each run a whole job (create, two 1 MB
   images, end, wait for the end state) while another process measures GetActiveJobs.
   Targets: every job completes, GetActiveJobs p99 <= 100 ms.

A missing ``wrk`` or ``curl`` skips its section with that reason (benchmarks are not tests).
Nothing here asserts a time; the numbers are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bindings"), str(ROOT / "tests")]

from lxml import etree  # noqa: E402

from dsc_core import Limits, RequestInfo, ScanServer, ServerConfig, names  # noqa: E402
from dsc_core import client as dc  # noqa: E402
from dsc_core.model import FileShareInstructions  # noqa: E402
from e2e_support import ServerProcess  # noqa: E402

A = names.Action
SOAP = "application/soap+xml; charset=utf-8"
RESULTS: dict[str, Any] = {}


def child_env() -> dict[str, str]:
    """Children import this checkout's code, not whatever is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "bindings")])
    return env


def envelope(action: str, payload: etree._Element, to: str = "") -> bytes:
    return dc.envelope(action, payload, message_id=f"urn:uuid:{uuid.uuid4()}", to=to)


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt(values: dict[str, float], unit: str = "x") -> str:
    return f"{values['min']:.2f}/{values['median']:.2f}/{values['max']:.2f}{unit}"


# --- servers in child processes ------------------------------------------------------------------


class Child:
    """One of bench/http_servers.py's servers; stopped by closing its stdin."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "http_servers.py"), *args, "--port", "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=child_env(),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"{args[0]} did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Serve(ServerProcess):
    """``dsc serve`` with its default configuration in a temporary data directory, started at
    once and logging warnings only.  Its port is chosen as it starts, and chosen again when
    someone else took it meanwhile (tests/e2e_support.py's ServerProcess: a port chosen here
    and bound seconds later by the child could be taken in between)."""

    def __init__(self, data: Path, binding: str = "async") -> None:
        super().__init__(
            data,
            binding=binding,
            extra=["--log-level", "WARNING"],
            log_path=data.parent / f"serve-{binding}.log",
        )
        self.start(timeout=30)

    def rss(self, field: str = "VmHWM") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)


def post(port: int, body: bytes, content_type: str = SOAP, timeout: float = 60) -> bytes:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/ScanServer", body, {"Content-Type": content_type})
        response = conn.getresponse()
        return response.read()
    finally:
        conn.close()


def create_request() -> bytes:
    return envelope(
        A.DSP_CREATE,
        dc.create_post_scan_job(
            user_identifier="S-1-5-21-0-0-0-1000",
            psp_identifier="PSP-bench",
            instructions=[FileShareInstructions((r"\\localhost\scans",))],
        ),
    )


def token_of(reply: bytes) -> str:
    token = dc.text_of(dc.parse_response(reply).payload, names.DSP, "JobToken")
    assert token, reply[:500]
    return token


# --- 1. keep-alive with wrk ------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: requests/s, p99 latency in seconds, answers that were not 2xx/3xx, and
    wrk's latency histogram (microseconds -> requests), so that rounds can be pooled."""

    rps: float
    p99: float
    non_2xx: int
    latencies: Mapping[int, int] = field(default_factory=dict, repr=False, compare=False)


def pooled_percentile(histograms: Iterable[Mapping[int, int]], percent: float) -> float:
    """The ``percent`` percentile, in seconds, of the requests of every histogram together
    (wrk's rounds pooled: one slow round weighs by its requests, not as one round in three)."""
    pooled: Counter[int] = Counter()
    for histogram in histograms:
        pooled.update(histogram)
    total = sum(pooled.values())
    if not total:
        return float("nan")
    rank = math.ceil(total * percent / 100)
    seen = 0
    for latency_us in sorted(pooled):
        seen += pooled[latency_us]
        if seen >= rank:
            return latency_us * 1e-6
    raise AssertionError("unreachable: the ranks add up to the total")


def wrk_run(
    port: int, body_file: Path, connections: int, seconds: float, threads: int = 1
) -> WrkResult:
    """One wrk run posting ``body_file`` over keep-alive (``threads`` client threads)."""
    # A script of its own: runs at once on one body (bench/asgi.py --quick) must not read
    # each other's half-written file (wrk then sends a GET).
    script = body_file.with_suffix(f".{uuid.uuid4().hex[:8]}.lua")
    histogram = script.with_suffix(".latencies")
    # done(): wrk's latency histogram, one "microseconds count" line per value seen (its
    # SCRIPTING: latency(i) is the i-th value and its count, #latency how many there are).
    script.write_text(
        "wrk.method = 'POST'\n"
        f"local f = io.open('{body_file}', 'rb')\n"
        "wrk.body = f:read('*a')\nf:close()\n"
        f"wrk.headers['Content-Type'] = '{SOAP}'\n"
        "function done(summary, latency, requests)\n"
        f"  local out = io.open('{histogram}', 'w')\n"
        "  for i = 1, #latency do\n"
        "    local value, count = latency(i)\n"
        "    out:write(string.format('%d %d\\n', value, count))\n"
        "  end\n"
        "  out:close()\n"
        "end\n",
        encoding="utf-8",
    )
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/ScanServer",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    script.unlink()
    latencies: dict[int, int] = {}
    if histogram.exists():
        for line in histogram.read_text(encoding="ascii").splitlines():
            value, count = line.split()
            latencies[int(value)] = latencies.get(int(value), 0) + int(count)
        histogram.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        rps,
        float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else float("nan"),
        int(bad.group(1)) if bad else 0,
        latencies,
    )


def wrk(port: int, body_file: Path, connections: int, seconds: float) -> tuple[float, float]:
    """(requests/s, p99 seconds) of one ``wrk -t1`` run posting ``body_file`` over keep-alive."""
    result = wrk_run(port, body_file, connections, seconds)
    if result.non_2xx:
        print(f"    warning: {result.non_2xx} non-2xx answers", flush=True)
    return result.rps, result.p99


def bench_keepalive(quick: bool) -> None:
    print("== keep-alive: wrk against the bindings and a bare h11-on-trio server", flush=True)
    if shutil.which("wrk") is None:
        print("   skipped: wrk is not installed (apt-get install -y wrk)", flush=True)
        RESULTS["keepalive"] = {"skipped": "wrk is not installed"}
        return
    seconds = 1.0 if quick else 4.0
    repetitions = 1 if quick else 3
    counts = (1, 8, 64)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dsc-wrk-") as tmp:
        servers = {"async": Child("core"), "blocking": Child("blocking")}
        try:
            tokens = {k: token_of(post(s.port, create_request())) for k, s in servers.items()}
            for op in ("GetRepositoryElements", "GetPostScanJobElements"):
                bodies: dict[str, Path] = {}
                for kind in servers:
                    if op == "GetRepositoryElements":
                        request = envelope(
                            A.DSC_GET_REPOSITORY_ELEMENTS,
                            dc.repository_elements_request(
                                ["RepositoryStatus", "RepositoryConfiguration"]
                            ),
                        )
                    else:
                        request = envelope(
                            A.DSP_GET_JOB_ELEMENTS,
                            dc.job_elements_request(names.DSP, tokens[kind], ["JobStatus"]),
                        )
                    bodies[kind] = Path(tmp) / f"{op}-{kind}.xml"
                    bodies[kind].write_bytes(request)
                reply = Path(tmp) / f"{op}-reply.xml"
                reply.write_bytes(post(servers["async"].port, bodies["async"].read_bytes()))
                floor = Child("floor", "--body-file", str(reply))
                try:
                    for count in counts:
                        runs: dict[str, list[tuple[float, float]]] = {
                            "floor": [],
                            "async": [],
                            "blocking": [],
                        }
                        for _ in range(repetitions):  # interleaved: drift hits all alike
                            runs["floor"].append(wrk(floor.port, bodies["async"], count, seconds))
                            for kind, server in servers.items():
                                runs[kind].append(wrk(server.port, bodies[kind], count, seconds))
                        row: dict[str, Any] = {
                            k: {
                                "rps": [r for r, _ in v],
                                "p99_ms": [p * 1000 for _, p in v],
                            }
                            for k, v in runs.items()
                        }
                        for kind in servers:
                            row[f"{kind}_ratio"] = spread(
                                [
                                    r / f
                                    for (r, _), (f, _) in zip(
                                        runs[kind], runs["floor"], strict=True
                                    )
                                ]
                            )
                            row[f"{kind}_p99_ratio"] = spread(
                                [
                                    p / fp
                                    for (_, p), (_, fp) in zip(
                                        runs[kind], runs["floor"], strict=True
                                    )
                                ]
                            )
                        results[f"{op}@{count}"] = row
                        print(
                            f"   {op:24} c={count:<3} floor {statistics.median(row['floor']['rps']):8.0f} rps"
                            f" | async {fmt(row['async_ratio'])} (p99 {fmt(row['async_p99_ratio'])})"
                            f" | blocking {fmt(row['blocking_ratio'])}"
                            f" (p99 {fmt(row['blocking_p99_ratio'])})",
                            flush=True,
                        )
                finally:
                    floor.stop()
        finally:
            for server in servers.values():
                server.stop()
    RESULTS["keepalive"] = results


# --- 2. large replies in process ----------------------------------------------------------------


def per_call(fn: Callable[[], object], min_time: float) -> float:
    best = float("inf")
    deadline = time.perf_counter() + min_time
    while True:
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
        if time.perf_counter() > deadline:
            return best


def bench_large(quick: bool) -> None:
    print("== large replies: GetActiveJobs / GetJobHistory with 1,000 jobs vs lxml", flush=True)
    from datetime import UTC, datetime

    ids = iter(range(10**9))
    # R15 caps replies at 32,767 octets by default; this measures the opt-in large replies
    # ([limits] max_reply_bytes) that list all 1,000 jobs.
    server = ScanServer(
        ServerConfig(history_size=1000, limits=Limits(max_reply_bytes=4 * 1024 * 1024)),
        new_id=lambda: str(uuid.UUID(int=next(ids))),
    )
    now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    info = RequestInfo(now=now, content_type=SOAP)

    def create() -> str:
        return token_of(server.handle(create_request(), info).reply.body)

    for token in [create() for _ in range(1000)]:  # 1,000 into the history ...
        cancel = envelope(
            A.DSC_CANCEL, dc.token_request(names.DSC, "CancelPostScanJobRequest", token)
        )
        assert server.handle(cancel, info).reply.status == 200
    for _ in range(1000):  # ... and 1,000 active (max_active_jobs)
        create()
    min_time = 0.5 if quick else 2.0
    results = {}
    for op, local in (
        (A.DSC_GET_ACTIVE_JOBS, "GetActiveJobsRequest"),
        (A.DSC_GET_JOB_HISTORY, "GetJobHistoryRequest"),
    ):
        request = envelope(op, etree.Element(f"{{{names.DSC}}}{local}"))
        reply = server.handle(request, info).reply.body
        jobs = reply.count(b"<dsc:JobSummary>")

        def core(request: bytes = request) -> None:
            server.handle(request, info)

        def floor(reply: bytes = reply) -> None:
            etree.tostring(etree.fromstring(reply))

        ratios = []
        for _ in range(3):
            ratios.append(per_call(core, min_time / 3) / per_call(floor, min_time / 3))
        name = op.rsplit("/", 1)[1]
        results[name] = {"jobs": jobs, "reply_bytes": len(reply), "time_ratio": spread(ratios)}
        print(
            f"   {name:15} {jobs} jobs, {len(reply) / 1024:.0f} KiB: core/lxml time "
            f"{fmt(spread(ratios))} (target <= 2x)",
            flush=True,
        )
    RESULTS["large"] = results


# --- 3. upload with curl ---------------------------------------------------------------------------


def curl(port: int, body: Path, content_type: str) -> float:
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}",
            "-H",
            f"Content-Type: {content_type}",
            "-H",
            "Expect:",
            "--data-binary",
            f"@{body}",
            f"http://127.0.0.1:{port}/ScanServer",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    code, seconds = out.split()
    if code != "200":
        raise RuntimeError(f"upload answered {code}")
    return float(seconds)


def upload_file(
    folder: Path, port: int, size: int, document_id: int, token: str
) -> tuple[Path, str]:
    cid = f"image{document_id}@bench"
    root = envelope(A.DSP_SEND_IMAGE, dc.send_image_request(token, document_id, "png", cid))
    mtom = dc.mtom(root, cid, [], boundary=f"bench-{uuid.uuid4().hex}")
    path = folder / f"upload-{size}.bin"
    block = os.urandom(1024 * 1024)
    with open(path, "wb") as f:
        f.write(mtom.head)
        for _ in range(size // len(block)):
            f.write(block)
        f.write(mtom.tail)
    return path, mtom.content_type


def bench_upload(quick: bool) -> None:
    print("== SendImage upload: curl --data-binary, dsc serve vs a write+fsync sink", flush=True)
    if shutil.which("curl") is None:
        print("   skipped: curl is not installed", flush=True)
        RESULTS["upload"] = {"skipped": "curl is not installed"}
        return
    big = (40 if quick else 400) * 1024 * 1024
    small = big // 10
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dsc-upload-") as tmp:
        folder = Path(tmp)
        for binding in ("async", "blocking"):
            serve = Serve(folder / f"data-{binding}", binding)
            sink = Child("sink")
            try:
                token = token_of(post(serve.port, create_request()))
                small_file, ctype = upload_file(folder, serve.port, small, 1, token)
                curl(serve.port, small_file, ctype)
                rss_small = serve.rss()
                ratios = []
                for rep in range(1 if quick else 3):
                    big_file, ctype = upload_file(folder, serve.port, big, 2 + rep, token)
                    floor_time = curl(sink.port, big_file, "application/octet-stream")
                    core_time = curl(serve.port, big_file, ctype)
                    ratios.append(floor_time / core_time)
                    big_file.unlink()
                rss_big = serve.rss()
            finally:
                sink.stop()
                serve.stop()
            results[binding] = {
                "image_mb": big // 2**20,
                "throughput_ratio": spread(ratios),
                "peak_rss_mb_small": rss_small / 2**20,
                "peak_rss_mb_big": rss_big / 2**20,
            }
            print(
                f"   {binding:8} {big // 2**20} MB: throughput vs sink {fmt(spread(ratios))} "
                f"(target >= 0.8x); peak RSS {rss_small / 2**20:.0f} MiB after "
                f"{small // 2**20} MB, {rss_big / 2**20:.0f} MiB after {big // 2**20} MB",
                flush=True,
            )
    RESULTS["upload"] = results


# --- 4. scale ------------------------------------------------------------------------------------------

_MONITOR = r"""
import http.client, json, os, sys, time
port, stop, body = int(sys.argv[1]), sys.argv[2], open(sys.argv[3], "rb").read()
times, errors = [], 0
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
while not os.path.exists(stop):
    began = time.perf_counter()
    try:
        conn.request("POST", "/ScanServer", body, {"Content-Type": "application/soap+xml"})
        response = conn.getresponse(); response.read()
        if response.status != 200: errors += 1
    except Exception:
        errors += 1
        conn.close(); conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times.append(time.perf_counter() - began)
    time.sleep(0.005)
print(json.dumps({"times": times, "errors": errors}))
"""


def bench_scale(quick: bool) -> None:
    print("== scale: 200 scanners while 1,000 idle keep-alive connections are held", flush=True)
    runs = [_scale_once(quick) for _ in range(1 if quick else 3)]
    p99 = spread([run["get_active_jobs"]["p99_ms"] for run in runs])
    completed = sum(run["completed"] for run in runs)
    total = sum(run["scanners"] for run in runs)
    print(
        f"   {len(runs)} run(s): {completed}/{total} jobs completed; GetActiveJobs p99 "
        f"{fmt(p99, ' ms')} (min/median/max; target <= 100 ms)",
        flush=True,
    )
    RESULTS["scale"] = {"runs": runs, "completed": completed, "jobs": total, "p99_ms": p99}


class _ScaleClients:
    """The scale run's clients against one ``dsc serve``: idle keep-alive holders and scanners,
    counting what happened to them in ``stats``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stats: dict[str, Any] = {"idle_closed": 0, "refused": 0, "completed": 0, "failed": []}
        self.repository = envelope(
            A.DSC_GET_REPOSITORY_ELEMENTS, dc.repository_elements_request(["RepositoryStatus"])
        )

    async def request(self, stream: Any, body: bytes, ctype: str = SOAP) -> bytes:
        """POST ``body`` on ``stream`` and read the answer's body (503s counted)."""
        head = (
            f"POST /ScanServer HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        await stream.send_all(head + body)
        data = await self._receive_until(stream, b"", lambda got: b"\r\n\r\n" in got)
        head_bytes, rest = data.split(b"\r\n\r\n", 1)
        status = int(head_bytes.split()[1])
        found = re.search(rb"(?i)content-length:\s*(\d+)", head_bytes)
        length = int(found.group(1)) if found else 0
        rest = await self._receive_until(stream, rest, lambda got: len(got) >= length)
        if status == 503:
            self.stats["refused"] += 1
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        return rest

    @staticmethod
    async def _receive_until(stream: Any, data: bytes, enough: Callable[[bytes], bool]) -> bytes:
        while not enough(data):
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    async def connect(self, source: str) -> Any:
        import trio

        sock = trio.socket.socket()
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", self.port))
        return trio.SocketStream(sock)

    async def holder(self, source: str, ready: Any) -> None:
        """One idle keep-alive connection: a request, then held until the server closes it."""
        import trio

        try:
            stream = await self.connect(source)
            await self.request(stream, self.repository)
        except (OSError, ConnectionError, RuntimeError, trio.BrokenResourceError):
            self.stats["idle_closed"] += 1
            ready.release()
            return
        ready.release()
        try:
            await stream.receive_some(1)  # held until the server closes it
        except (OSError, trio.BrokenResourceError):
            pass
        self.stats["idle_closed"] += 1

    async def scanner(self, number: int, image: bytes) -> None:
        """One scanner's job (create, two images, end, poll to its end), retried on a lost
        connection up to 20 times."""
        import trio

        last: BaseException | None = None
        for _attempt in range(20):
            try:
                stream = await self.connect("127.0.0.1")
                state = await self._scan(stream, number, image)
                if state == "Completed":
                    self.stats["completed"] += 1
                else:
                    self.stats["failed"].append(state)
                await stream.aclose()
                return
            except (OSError, ConnectionError, RuntimeError, trio.BrokenResourceError) as exc:
                last = exc
                await trio.sleep(0.2)
        self.stats["failed"].append(repr(last))

    async def _scan(self, stream: Any, number: int, image: bytes) -> str:
        """The job's final state (or the last one seen)."""
        import trio

        token = token_of(await self.request(stream, create_request()))
        for document_id in (1, 2):
            cid = f"i{document_id}@s{number}"
            root = envelope(A.DSP_SEND_IMAGE, dc.send_image_request(token, document_id, "png", cid))
            mtom = dc.mtom(root, cid, [image], boundary=f"b{number}x{document_id}")
            await self.request(stream, b"".join(mtom.chunks()), mtom.content_type)
        end = dc.token_request(names.DSP, "EndPostScanJobRequest", token)
        await self.request(stream, envelope(A.DSP_END, end))
        query = envelope(
            A.DSP_GET_JOB_ELEMENTS, dc.job_elements_request(names.DSP, token, ["JobStatus"])
        )
        state = "?"
        for _ in range(1200):
            payload = dc.parse_response(await self.request(stream, query)).payload
            state = dc.read_job_elements(payload, names.DSP).state
            if state in ("Completed", "Aborted", "Canceled"):
                break
            await trio.sleep(0.1)
        return state


class _ActiveJobsMonitor:
    """GetActiveJobs every 5 ms from a separate process (``_MONITOR``), started once the idle
    connections are held; ``stop`` returns its times and errors."""

    def __init__(self, folder: Path, port: int) -> None:
        import threading

        self._port = port
        self._body_file = folder / "active.xml"
        self._body_file.write_bytes(
            envelope(A.DSC_GET_ACTIVE_JOBS, etree.Element(f"{{{names.DSC}}}GetActiveJobsRequest"))
        )
        self._stop_file = folder / "stop"
        self._process: list[subprocess.Popen[str]] = []
        self.start = threading.Event()
        self._starter = threading.Thread(target=self._run, daemon=True)
        self._starter.start()

    def _run(self) -> None:
        self.start.wait()
        command = [sys.executable, "-c", _MONITOR, str(self._port), str(self._stop_file)]
        self._process.append(
            subprocess.Popen([*command, str(self._body_file)], stdout=subprocess.PIPE, text=True)
        )

    def stop(self) -> dict[str, Any]:
        self._stop_file.touch()
        self._starter.join(10)
        out, _ = self._process[0].communicate(timeout=60)
        measured: dict[str, Any] = json.loads(out)
        return measured


def _scale_once(quick: bool) -> dict[str, Any]:
    import trio

    scanners = 50 if quick else 200
    idle = 250 if quick else 1000
    image = os.urandom(1024 * 1024)
    timing: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="dsc-scale-") as tmp:
        serve = Serve(Path(tmp) / "data")
        clients = _ScaleClients(serve.port)
        monitor = _ActiveJobsMonitor(Path(tmp), serve.port)

        async def main() -> None:
            ready = trio.Semaphore(0)
            began = time.monotonic()
            async with trio.open_nursery() as holders:
                for i in range(idle):
                    holders.start_soon(clients.holder, f"127.0.0.{10 + i % 4}", ready)
                for _ in range(idle):
                    await ready.acquire()
                timing["held_in_s"] = time.monotonic() - began
                monitor.start.set()
                began = time.monotonic()
                async with trio.open_nursery() as nursery:
                    for number in range(scanners):
                        nursery.start_soon(clients.scanner, number, image)
                timing["jobs_in_s"] = time.monotonic() - began
                holders.cancel_scope.cancel()

        try:
            trio.run(main)
            measured = monitor.stop()
            peak = serve.rss()
        finally:
            monitor.start.set()
            serve.stop()
    stats = clients.stats
    times = sorted(measured["times"])
    p50 = times[len(times) // 2] * 1000
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
    result = {
        "scanners": scanners,
        "idle_connections": idle,
        "completed": stats["completed"],
        "failed": stats["failed"][:10],
        "idle_reclaimed": stats["idle_closed"],
        "refused_503": stats["refused"],
        "get_active_jobs": {"n": len(times), "p50_ms": p50, "p99_ms": p99},
        "monitor_errors": measured["errors"],
        "peak_rss_mb": peak / 2**20,
        **timing,
    }
    print(
        f"   {stats['completed']}/{scanners} jobs completed in {timing.get('jobs_in_s', 0):.1f} s "
        f"with {idle} idle connections held ({stats['idle_closed']} reclaimed, "
        f"{stats['refused']} refused with 503); GetActiveJobs p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"over {len(times)} requests (target <= 100 ms); peak RSS {peak / 2**20:.0f} MiB",
        flush=True,
    )
    return result


# --- main -------------------------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[bool], None]] = {
    "keepalive": bench_keepalive,
    "large": bench_large,
    "upload": bench_upload,
    "scale": bench_scale,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"sections, of {', '.join(SECTIONS)}"
    )
    args = parser.parse_args(argv)
    for name in args.only.split(","):
        SECTIONS[name.strip()](args.quick)
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=2), encoding="utf-8")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
