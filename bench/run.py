"""The benchmark: ``python bench/run.py [--quick]``.

Every number it prints is a *ratio* of two things measured side by side in this run, on this
machine, interleaved (design.md, "Measuring"): these machines are noisy, so an absolute time
from one run means little, while "the core costs 7x an lxml parse+serialize of the same bytes"
survives a busy neighbour.  Absolute figures are printed for context only.  The tests only
check that ``--quick`` exits 0 and prints the section headers; they never assert a time.

Sections:

1. core vs floor: one request handled by the core (parse, dispatch, reply) against the lxml
   parse+serialize of the same request bytes, the least any SOAP server must do.
2. image upload: a 64 MiB SendImage (MTOM, fed in 64 KiB chunks) through the core with its
   commands carried out by the real JobStore (fsync, rename, SQLite commit), against writing the
   same bytes to a file in the same directory and fsyncing it.
3. memory vs image size: peak traced memory of the core alone streaming SendImages of 1, 16 and
   64 MiB (commands discarded).  R8 wants it flat: the ratio largest/smallest should stay ~1.
4. HTTP: GetRepositoryElements requests/s over keep-alive through the async binding (trio, h11,
   real ScanService) against a bare h11 server on trio answering the same bytes without SOAP
   work (``bench/http_servers.py``).  Both run in their own process; the client is this one.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lxml import etree

from dsc_core import (
    AbortDocument,
    AppendDocument,
    BeginDocument,
    Command,
    CreateJob,
    DiscardDocuments,
    DropJob,
    FinishDocument,
    Limits,
    Outcome,
    RequestInfo,
    ScanServer,
    ServerConfig,
    UpdateJob,
    client,
    names,
)
from dsc_core.model import FileShareInstructions

A = names.Action
HERE = Path(__file__).resolve().parent
NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
MiB = 1024 * 1024
CHUNK = 64 * 1024
STORE_COMMANDS = (
    CreateJob,
    UpdateJob,
    BeginDocument,
    AppendDocument,
    FinishDocument,
    AbortDocument,
    DiscardDocuments,
    DropJob,
)
#: Room for every job the timing loops create (the default limit is 1000 active jobs).
CONFIG = ServerConfig(limits=Limits(max_active_jobs=10**9))


@dataclass(frozen=True)
class Settings:
    """How long to measure.  ``--quick`` keeps the whole run to a few seconds (smoke test)."""

    min_time: float  # seconds per timing sample of a micro benchmark
    repeats: int  # interleaved samples per side; the best one counts
    upload_mib: int
    upload_repeats: int
    memory_sizes_mib: tuple[int, ...]
    http_seconds: float
    http_repeats: int
    http_connections: int


FULL = Settings(0.3, 5, 64, 5, (1, 16, 64), 2.0, 3, 4)
QUICK = Settings(0.03, 2, 8, 1, (1, 4, 16), 0.3, 1, 2)


# --- helpers -----------------------------------------------------------------------------------


def ids() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: str(uuid.UUID(int=next(counter)))


def env(action: str, payload: etree._Element) -> bytes:
    return client.envelope(action, payload, message_id=f"urn:uuid:{uuid.uuid4()}")


def create_body() -> bytes:
    return env(
        A.DSP_CREATE,
        client.create_post_scan_job(
            user_identifier="S-1-5-21-0-0-0-1000",
            psp_identifier="scan-to-folder",
            instructions=[FileShareInstructions(("\\\\localhost\\scans",))],
        ),
    )


def repository_body() -> bytes:
    return env(
        A.DSC_GET_REPOSITORY_ELEMENTS,
        client.repository_elements_request(["RepositoryConfiguration"]),
    )


def info(content_type: str = client.SOAP_XML) -> RequestInfo:
    return RequestInfo(now=NOW, content_type=content_type)


def per_call(fn: Callable[[], object], min_time: float) -> float:
    """Seconds per call: grow the loop until it runs ``min_time``, then divide."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n
        n = max(n * 2, int(n * min_time / max(elapsed, 1e-9) * 1.1))


def side_by_side(
    a: Callable[[], float], b: Callable[[], float], repeats: int
) -> tuple[float, float]:
    """Best of ``repeats`` samples of each, taken alternately so both see the same machine."""
    best_a = best_b = float("inf")
    for _ in range(repeats):
        best_a = min(best_a, a())
        best_b = min(best_b, b())
    return best_a, best_b


def header(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


# --- 1. core vs the lxml floor ---------------------------------------------------------------


class _FreshServers:
    """A fresh server every 100 jobs, so the job table does not grow without bound across the
    timing loop (creating a job is O(active jobs) in the core: it counts them)."""

    def __init__(self) -> None:
        self.server = ScanServer(CONFIG, new_id=ids())
        self.used = 0

    def next(self) -> ScanServer:
        self.used += 1
        if self.used % 100 == 0:
            self.server = ScanServer(CONFIG, new_id=ids())
        return self.server


def core_case(name: str) -> tuple[bytes, Callable[[], Outcome]]:
    """The request bytes and a function that has the core handle them once."""
    if name == "GetRepositoryElements":
        body = repository_body()
        server = ScanServer(CONFIG, new_id=ids())
        return body, lambda: server.handle(body, info())
    if name == "GetActiveJobs (50 active jobs)":
        server = ScanServer(CONFIG, new_id=ids())
        create = create_body()
        for _ in range(50):
            assert server.handle(create, info()).reply.status == 200
        body = env(A.DSC_GET_ACTIVE_JOBS, client.empty_request("GetActiveJobsRequest"))
        return body, lambda: server.handle(body, info())
    if name == "CreatePostScanJob":
        body = create_body()
        fresh = _FreshServers()
        return body, lambda: fresh.next().handle(body, info())
    raise ValueError(name)


def bench_core_vs_floor(s: Settings) -> None:
    header("core vs floor: one request through the core / lxml parse+serialize of its bytes")
    print(
        "(the floor is what any SOAP server pays for the request; the last two columns add "
        "parse+serialize of the\n reply bytes to it, a fairer floor for replies much larger "
        "than their requests)"
    )
    print(
        f"{'request':<32}{'core us':>9}{'floor us':>10}{'core/floor':>12}"
        f"{'+reply us':>11}{'core/both':>11}"
    )
    for name in ("GetRepositoryElements", "GetActiveJobs (50 active jobs)", "CreatePostScanJob"):
        body, handle = core_case(name)
        outcome = handle()
        reply = outcome.reply.body
        assert outcome.reply.status == 200, outcome

        def floor(body: bytes = body) -> object:
            return etree.tostring(etree.fromstring(body))

        def both(body: bytes = body, reply: bytes = reply) -> object:
            etree.tostring(etree.fromstring(body))
            return etree.tostring(etree.fromstring(reply))

        best = [float("inf")] * 3
        candidates: tuple[Callable[[], object], ...] = (handle, floor, both)
        for _ in range(s.repeats):  # interleaved: all three see the same machine
            for i, fn in enumerate(candidates):
                best[i] = min(best[i], per_call(fn, s.min_time))
        core_t, floor_t, both_t = best
        print(
            f"{name:<32}{core_t * 1e6:>9.1f}{floor_t * 1e6:>10.1f}{core_t / floor_t:>11.1f}x"
            f"{both_t * 1e6:>11.1f}{core_t / both_t:>10.1f}x",
            flush=True,
        )


# --- 2. image upload through core + JobStore vs a plain file ---------------------------------


def image_chunks(size: int, chunk: bytes) -> Iterator[bytes]:
    """``size`` bytes as repeats of one chunk object: the generator itself holds no image."""
    for offset in range(0, size, len(chunk)):
        yield chunk if offset + len(chunk) <= size else chunk[: size - offset]


def send_image_body(token: str, document_id: int, size: int, chunk: bytes) -> client.Mtom:
    cid = f"image{document_id}@bench"
    root = env(A.DSP_SEND_IMAGE, client.send_image_request(token, document_id, "png", cid))
    return client.mtom(root, cid, image_chunks(size, chunk), boundary=f"bench-{uuid.uuid4().hex}")


def upload_through_core(folder: Path, size: int, chunk: bytes) -> float:
    """Seconds for one SendImage through the core, commands carried out by a real JobStore."""
    from dsc_bindings.store.sqlite import JobStore

    with JobStore.open(folder) as store:
        server = ScanServer(CONFIG, new_id=lambda: str(uuid.uuid4()))

        def run(commands: Sequence[Command]) -> None:
            for command in commands:
                if isinstance(command, STORE_COMMANDS):
                    store.apply(command)

        created = server.handle(create_body(), info())
        run(created.commands)
        token = client.text_of(
            client.parse_response(created.reply.body).payload, names.DSP, "JobToken"
        )
        body = send_image_body(token, 1, size, chunk)
        start = time.perf_counter()
        exchange = server.open_exchange(info(body.content_type))
        for piece in body.chunks():
            run(exchange.feed(piece))
        outcome = exchange.end()
        run(outcome.commands)
        elapsed = time.perf_counter() - start
        assert outcome.reply.status == 200, outcome.reply.body[-400:]
        assert store.document_path(token, 1).stat().st_size == size
    return elapsed


def write_file(folder: Path, size: int, chunk: bytes) -> float:
    """Seconds to write the same bytes, in the same chunks, to one file and fsync it."""
    path = folder / "floor.bin"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for piece in image_chunks(size, chunk):
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def _settle() -> None:
    """Write back every dirty page first (untimed), so neither side pays for the other's
    writeback: with 64 MiB samples that is the biggest source of noise."""
    if hasattr(os, "sync"):
        os.sync()


def bench_upload(s: Settings) -> None:
    size = s.upload_mib * MiB
    header(
        f"image upload: SendImage of {s.upload_mib} MiB in 64 KiB chunks, core + JobStore / "
        "write+fsync of the same bytes"
    )
    chunk = os.urandom(CHUNK)
    with tempfile.TemporaryDirectory(
        prefix="dsc-bench-", dir=os.environ.get("DSC_BENCH_DIR")
    ) as tmp:
        counter = itertools.count()

        def core() -> float:
            folder = Path(tmp) / f"store{next(counter)}"
            _settle()
            try:
                return upload_through_core(folder, size, chunk)
            finally:
                shutil.rmtree(folder)  # same disk footprint as the floor, which unlinks

        def floor() -> float:
            _settle()
            return write_file(Path(tmp), size, chunk)

        core_t, floor_t = side_by_side(core, floor, s.upload_repeats)
    print(f"{'path':<34}{'seconds':>10}{'MiB/s':>10}")
    print(f"{'core + JobStore':<34}{core_t:>10.3f}{size / MiB / core_t:>10.1f}")
    print(f"{'write + fsync (floor)':<34}{floor_t:>10.3f}{size / MiB / floor_t:>10.1f}")
    print(
        f"time ratio core/floor: {core_t / floor_t:.2f}x  "
        f"(throughput {floor_t / core_t:.0%} of the floor)",
        flush=True,
    )


# --- 3. memory vs image size --------------------------------------------------------------------


def peak_memory(size: int, chunk: bytes) -> int:
    """Peak bytes traced while the core alone streams one SendImage of ``size`` bytes."""
    server = ScanServer(CONFIG, new_id=ids())
    created = server.handle(create_body(), info())
    token = client.text_of(client.parse_response(created.reply.body).payload, names.DSP, "JobToken")
    body = send_image_body(token, 1, size, chunk)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        exchange = server.open_exchange(info(body.content_type))
        for piece in body.chunks():
            exchange.feed(piece)  # commands discarded: only the core's own memory counts
        outcome = exchange.end()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert outcome.reply.status == 200, outcome.reply.body[-400:]
    return peak


def bench_memory(s: Settings) -> None:
    header(
        "memory vs image size: peak traced memory of the core streaming one SendImage "
        "(64 KiB chunks)"
    )
    chunk = os.urandom(CHUNK)
    peaks = {mib: peak_memory(mib * MiB, chunk) for mib in s.memory_sizes_mib}
    print(f"{'image MiB':<34}{'peak KiB':>10}")
    for mib, peak in peaks.items():
        print(f"{mib:<34}{peak / 1024:>10.1f}")
    smallest, largest = min(s.memory_sizes_mib), max(s.memory_sizes_mib)
    print(
        f"peak ratio {largest} MiB / {smallest} MiB: {peaks[largest] / peaks[smallest]:.2f}x "
        f"for an image {largest // smallest}x larger (flat is ~1)",
        flush=True,
    )


# --- 4. HTTP: async binding vs a bare h11 server ---------------------------------------------


class ServerProcess:
    """One of bench/http_servers.py's servers in its own process; stopped by closing stdin."""

    def __init__(self, *args: str) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "http_servers.py"), *args, "--port", "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            self.log.seek(0)
            raise RuntimeError(
                f"{args[0]} server did not start: {line!r} {self.log.read()[-2000:]}"
            )
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 response reader (Content-Length bodies only), so that the client's
    own cost stays small next to either server's."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        rest += data
    buf[:] = rest[length:]
    return status, rest[:length]


def load(port: int, request: bytes, seconds: float, connections: int) -> float:
    """Requests per second over ``connections`` keep-alive connections for ``seconds``."""
    counts = [0] * connections
    errors: list[BaseException] = []
    deadline = time.perf_counter() + seconds
    barrier = threading.Barrier(connections + 1)

    def worker(i: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = bytearray()
                barrier.wait()
                while time.perf_counter() < deadline:
                    sock.sendall(request)
                    status, _ = _read_response(sock, buf)
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}")
                    counts[i] += 1
        except BaseException as exc:
            errors.append(exc)
            try:
                barrier.abort()
            except threading.BrokenBarrierError:
                pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    try:
        barrier.wait()
        start = time.perf_counter()
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"load generator failed: {errors[0]!r}")
    return sum(counts) / elapsed


def http_request(body: bytes) -> bytes:
    return (
        b"POST /ScanServer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/soap+xml; charset=utf-8\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def http_bindings_available() -> str | None:
    """None when the async binding and the service can be used, else why not."""
    try:
        from dsc_bindings.http import async_server as http_async
        from dsc_bindings.runtime import service
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if not callable(getattr(http_async, "serve", None)):
        return "dsc_bindings.http.async_server has no serve()"
    if getattr(service, "ScanService", None) is None:
        return "dsc_bindings.runtime.service has no ScanService"
    return None


def bench_http(s: Settings) -> None:
    header(
        "HTTP: GetRepositoryElements over keep-alive, async binding + ScanService / "
        "bare h11 on trio answering the same bytes"
    )
    why = http_bindings_available()
    if why is not None:
        print(f"skipped: HTTP bindings not available ({why})")
        return
    body = repository_body()
    reply = ScanServer(CONFIG, new_id=ids()).handle(body, info()).reply
    request = http_request(body)
    with tempfile.NamedTemporaryFile(suffix=".xml", delete=False) as f:
        f.write(reply.body)
    servers: list[ServerProcess] = []
    try:
        try:
            core = ServerProcess("core")
            servers.append(core)
            floor = ServerProcess("floor", "--body-file", f.name)
            servers.append(floor)
            load(core.port, request, min(0.2, s.http_seconds), 1)  # warm up both
            load(floor.port, request, min(0.2, s.http_seconds), 1)
            core_rps, floor_rps = side_by_side(
                lambda: -load(core.port, request, s.http_seconds, s.http_connections),
                lambda: -load(floor.port, request, s.http_seconds, s.http_connections),
                s.http_repeats,
            )
        except (RuntimeError, OSError) as exc:
            print(f"skipped: HTTP bindings not available (they failed: {exc})")
            return
    finally:
        for server in servers:
            server.stop()
        os.unlink(f.name)
    core_rps, floor_rps = -core_rps, -floor_rps  # side_by_side keeps the minimum: best rate
    print(f"{'server':<34}{'req/s':>10}{'us/req':>10}")
    print(f"{'async binding + core':<34}{core_rps:>10.0f}{1e6 / core_rps:>10.1f}")
    print(f"{'bare h11 on trio (floor)':<34}{floor_rps:>10.0f}{1e6 / floor_rps:>10.1f}")
    print(
        f"throughput ratio binding/floor: {core_rps / floor_rps:.2f}  "
        f"(time per request {floor_rps / core_rps:.1f}x the floor; "
        f"{s.http_connections} connections, {len(reply.body)}-byte replies)",
        flush=True,
    )


# --- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks: ratios measured side by side.")
    parser.add_argument(
        "--quick", action="store_true", help="a few seconds in all (the smoke test uses it)"
    )
    args = parser.parse_args(argv)
    s = QUICK if args.quick else FULL
    print(
        f"dsc-server benchmarks ({'quick' if args.quick else 'full'}); Python "
        f"{sys.version.split()[0]}, lxml {'.'.join(map(str, etree.LXML_VERSION))}; "
        "ratios are measured side by side in this run",
        flush=True,
    )
    started = time.perf_counter()
    bench_core_vs_floor(s)
    bench_upload(s)
    bench_memory(s)
    bench_http(s)
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
