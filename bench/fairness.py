"""Count, don't time: in what order a server answers its connections (issue 20 point 3 (a)).

    python3 bench/fairness.py [--quick] [--seconds 3] [--rounds 3] [--connections 64 8]
        [--threads 1 2]

``wrk`` holds N keep-alive connections, each sending its next request as soon as it has
the answer to the last (a closed loop).  A server that answers in arrival order answers every
other connection exactly once between two answers on one connection: N-1 "answers between".
A request that waits a second round (2N-1 between) waits twice as long as the others; when 1%
of them do, the p99 latency is twice the mean whatever the server's speed.  This was the tail
of the ASGI app under uvicorn on uvloop (faster than the hand-written server, p99 1.2-1.8x
worse) until dsc's httptools protocol sent the answers after the loop's next poll
(``dsc_bindings.http.uvicorn_protocol``; docs/performance.md, "Tails").

Each server's protocol writes through a transport that notes every answer (its connection and
the serving thread's CPU time), so the order is counted in the server itself: a busy machine
stretches wall times and hardly changes the order.  wrk runs one thread unless ``--threads``
says otherwise: with two on a 2-CPU machine each thread's connections also wait while the CPU
runs the other, so the order is partly wrk's.  The servers, each in its own process, measured
round by round in turn:

- ``hand-written, asyncio``: ``bench/handwritten_aiohttp.py`` as ``bench/asgi.py`` runs it;
- ``hand-written, uvloop``: the same on uvloop (which lets ~1% of the requests wait a round);
- ``ASGI app, uvloop, uvicorn's own protocol``: the app as stock uvicorn serves it;
- ``ASGI app, uvloop`` and ``ASGI app, asyncio``: ``dsc_bindings.asgi.create_app`` under
  uvicorn with dsc's httptools protocol (``--loop uvloop`` or ``--loop asyncio``).

Printed per server and setting: answers between two answers on one connection (p50 / p99 /
p99.9; N-1 is round-robin), the serving thread's CPU time between them in ms (the same
percentiles), and wrk's req/s and p99 for reference.  Nothing here asserts a time;
``--quick`` (the smoke test) runs one round of 1 s at 8 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from http_servers import drain_stdin, run_aiohttp  # noqa: E402
from wrk_options import missing, wrk_options  # noqa: E402

#: Server name -> (what it runs, its event loop).
SERVERS = {
    "hand-written, asyncio": ("handwritten", "asyncio"),
    "hand-written, uvloop": ("handwritten", "uvloop"),
    "ASGI app, uvloop, uvicorn's own protocol": ("asgi-stock", "uvloop"),
    "ASGI app, uvloop": ("asgi", "uvloop"),
    "ASGI app, asyncio": ("asgi", "asyncio"),
}
STATUS_LINE = b"HTTP/1.1 "
CONTINUE = b"HTTP/1.1 100 "


# --- in the server's process ---------------------------------------------------------------


class AnswerLog:
    """Every answer a server wrote: (connection, monotonic ns, serving thread's CPU ns)."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, int, int]] = []
        self._connections = 0

    def transport(self, transport: asyncio.Transport) -> asyncio.Transport:
        self._connections += 1
        return _NotingTransport(transport, self, self._connections)  # type: ignore[return-value]

    def note(self, connection: int) -> None:
        self.answers.append((connection, time.monotonic_ns(), time.thread_time_ns()))


class _NotingTransport:
    """``transport``, noting each write that begins an answer (its status line)."""

    def __init__(self, transport: asyncio.Transport, log: AnswerLog, connection: int) -> None:
        self._transport = transport
        self._log = log
        self._connection = connection

    def write(self, data: bytes) -> None:
        if data.startswith(STATUS_LINE) and not data.startswith(CONTINUE):
            self._log.note(self._connection)
        self._transport.write(data)

    def writelines(self, chunks: Sequence[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def serve_handwritten(loop: str, log: AnswerLog) -> None:
    from aiohttp import web_protocol
    from handwritten_aiohttp import make_app

    made = web_protocol.RequestHandler.connection_made

    def connection_made(self: web_protocol.RequestHandler, transport: Any) -> None:
        made(self, log.transport(transport))

    web_protocol.RequestHandler.connection_made = connection_made  # type: ignore[method-assign]
    run_aiohttp(0, make_app(), loop_factory(loop))


def serve_asgi(loop: str, log: AnswerLog, data: Path, *, stock: bool = False) -> None:
    """The ASGI app under uvicorn with dsc's httptools protocol (``stock``: uvicorn's own)."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from dsc_bindings.asgi import create_app
    from dsc_bindings.http.uvicorn_protocol import CoalescingHttpToolsProtocol

    protocol = HttpToolsProtocol if stock else CoalescingHttpToolsProtocol

    class NotingProtocol(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(log.transport(transport))

    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = sock.getsockname()[1]
    app = create_app(data_dir=data, port=port)
    config = uvicorn.Config(
        app, loop=loop, http=NotingProtocol, lifespan="on", access_log=False, log_level="warning"
    )

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            print(f"port {port}", flush=True)
            # stdin read on a thread that sleeps in read(): no signals, no polling.
            threading.Thread(target=self._stop_at_eof, daemon=True).start()

        def _stop_at_eof(self) -> None:
            drain_stdin()
            self.should_exit = True

    Server(config).run(sockets=[sock])


def serve(args: argparse.Namespace) -> int:
    log = AnswerLog()
    kind, loop = SERVERS[args.serve]
    if kind == "handwritten":
        serve_handwritten(loop, log)
    else:
        serve_asgi(loop, log, args.data, stock=kind == "asgi-stock")
    args.record.write_text(json.dumps(log.answers), encoding="utf-8")
    return 0


# --- the measurement ----------------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    """How one wrk run's connections were answered (module doc)."""

    between: tuple[int, int, int]
    cpu_ms: tuple[float, float, float]
    answers: int


def percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    last = len(ordered) - 1
    return tuple(ordered[min(last, int(p * len(ordered)))] for p in (0.5, 0.99, 0.999))  # type: ignore[return-value]


def answer_order(answers: Sequence[Sequence[int]], start: int, end: int) -> Order:
    """The order of the answers written between ``start`` and ``end`` (monotonic ns)."""
    run = [a for a in answers if start <= a[1] <= end]
    last: dict[int, tuple[int, int]] = {}
    between: list[float] = []
    cpu: list[float] = []
    for index, (connection, _, cpu_ns) in enumerate(run):
        if connection in last:
            before, before_cpu = last[connection]
            between.append(index - before - 1)
            cpu.append((cpu_ns - before_cpu) / 1e6)
        last[connection] = (index, cpu_ns)
    if not between:
        return Order((0, 0, 0), (0.0, 0.0, 0.0), len(run))
    b50, b99, b999 = percentiles(between)
    return Order((int(b50), int(b99), int(b999)), percentiles(cpu), len(run))


class Child:
    """One server of SERVERS in its own process; stopped by closing its stdin."""

    def __init__(self, name: str, tmp: Path, index: int) -> None:
        self.record = tmp / f"answers-{index}.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE.parent / "bindings")])
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "--serve", name, "--record", str(self.record)]
            + ["--data", str(tmp / f"data-{self.record.stem}")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"{name} did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> list[list[int]]:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self.record.exists():
            return []
        answers: list[list[int]] = json.loads(self.record.read_text(encoding="utf-8"))
        return answers


@contextmanager
def children(tmp: Path) -> Iterator[dict[str, Child]]:
    with ExitStack() as stack:
        started: dict[str, Child] = {}
        for index, name in enumerate(SERVERS):
            started[name] = Child(name, tmp, index)
            stack.callback(started[name].stop)
        yield started


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from asgi import checked_reply, request_body
    from runtime import create_request, post, token_of, wrk_run

    runs: list[tuple[str, str, int, int, int, float, float]] = []
    settings = [(t, c) for t in args.threads for c in args.connections]
    with children(tmp) as servers:
        bodies = {}
        for name, server in servers.items():
            token = token_of(post(server.port, create_request()))
            body = request_body(args.op, token)
            checked_reply(server.port, body, args.op)
            bodies[name] = tmp / f"body-{len(bodies)}.xml"
            bodies[name].write_bytes(body)
        for threads, conns in settings:
            for _ in range(args.rounds):
                for name, server in servers.items():
                    start = time.monotonic_ns()
                    done = wrk_run(server.port, bodies[name], conns, args.seconds, threads)
                    config = f"t{threads} -c{conns}"
                    runs.append(
                        (name, config, start, time.monotonic_ns(), conns, done.rps, done.p99)
                    )
        answers = {name: server.stop() for name, server in servers.items()}
    results: dict[str, Any] = {}
    for name, config, start, end, conns, rps, p99 in runs:
        order = answer_order(answers[name], start, end)
        results.setdefault(config, {}).setdefault(name, []).append(
            {
                "between": order.between,
                "cpu_ms": order.cpu_ms,
                "answers": order.answers,
                "rps": rps,
                "p99_ms": p99 * 1000,
                "connections": conns,
            }
        )
    return results


def median_of(rounds: list[dict[str, Any]], key: str, i: int) -> float:
    """The median over the rounds of percentile ``i`` of ``key``."""
    return statistics.median(r[key][i] for r in rounds)


def print_tables(op: str, results: dict[str, Any]) -> None:
    for config, by_server in results.items():
        conns = next(iter(by_server.values()))[0]["connections"]
        print(f"\n{op}, wrk -{config} (median of the rounds; round-robin is {conns - 1} between)")
        print(
            "| server | answers between, p50 / p99 / p99.9 | CPU between, ms p50 / p99 / p99.9"
            " | req/s | p99 ms |"
        )
        print("| --- | --- | --- | --- | --- |")
        for name, rounds in by_server.items():
            between = " / ".join(f"{median_of(rounds, 'between', i):.0f}" for i in range(3))
            cpu = " / ".join(f"{median_of(rounds, 'cpu_ms', i):.2f}" for i in range(3))
            rps = statistics.median(r["rps"] for r in rounds)
            p99 = statistics.median(r["p99_ms"] for r in rounds)
            print(f"| {name} | {between} | {cpu} | {rps:,.0f} | {p99:.2f} |")
    sys.stdout.flush()


def _own_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--op",
        choices=("GetRepositoryElements", "GetPostScanJobElements"),
        default="GetPostScanJobElements",
    )
    # The servers' side of a run (this file started again as each server's process).
    parser.add_argument("--serve", choices=tuple(SERVERS), help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    args = wrk_options(
        "the order in which servers answer their keep-alive connections under wrk",
        argv,
        connections=[64, 8],
        threads=[1],
        quick_connections=8,
        more=_own_options,
    )
    if args.serve:
        return serve(args)
    if skipped := missing():
        print(skipped)
        return 0
    with tempfile.TemporaryDirectory(prefix="dsc-fairness-") as tmp:
        results = measure(args, Path(tmp))
    print_tables(args.op, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
