"""The project against a hand-written server and the floors, side by side (issue 20 point 3).

    python3 bench/asgi.py [--quick] [--seconds 3] [--rounds 3] [--json results.json]

Seven servers, each in its own process, measured with ``wrk`` (C; ``-t1`` and ``-t2``, 8 and 64
connections, keep-alive) in ONE run, interleaved round by round so that a busy neighbour on
the shared machine hits them all alike:

- ``bare h11``: h11 on trio answering the fixed reply bytes (``bench/http_servers.py floor``),
  the floor every ratio is taken against;
- ``aiohttp fixed``: aiohttp (its C parser, asyncio) answering the same fixed bytes;
- ``aiohttp + lxml``: ``bench/handwritten_aiohttp.py``, a scan server written by hand as a
  user would (parse the request and build the reply with lxml, jobs in a dict);
- ``dsc async`` / ``dsc blocking``: ``dsc serve --binding async|blocking`` with its default
  configuration (SQLite store, writer, engine, delivery hub, ticker);
- ``dsc ASGI uvicorn``: ``uvicorn --factory dsc_bindings.asgi:create_app --loop uvloop --http
  httptools --no-access-log`` (``dsc serve`` does not log each request either), and the same
  with ``--http dsc_bindings.http.uvicorn_protocol:CoalescingHttpToolsProtocol`` (uvicorn's
  httptools protocol sending what a turn of the loop wrote to a connection as one write after
  the loop's next poll: one send per answer, and the connections answered in turn), on
  ``--loop dsc_bindings.http.uvicorn_loop:new_event_loop`` (uvloop taking in every pending
  connection at each poll, not one per turn): the deployment docs/operating.md recommends,
  "recommended" in the targets table.

Requests: GetRepositoryElements and GetPostScanJobElements (of a job created on each server).
Every server's answer is checked to be a 200 with the right SOAP action before it is measured,
and a run with non-2xx answers is flagged.  Printed: requests/s and p99 per server (median of
the rounds, min-max), the ratio to the floor, and the targets: the project (its async binding
or the ASGI app) faster than the hand-written server with a p99 no worse, and the async
binding at 0.5x the floor with ``-t1`` and ``-t2``.  Nothing here asserts a time.

The p99 is also printed with every round's requests pooled (wrk's latency histograms added
up): each round's p99 falls in one of two modes the machine picks (where the scheduler puts
wrk's thread and the server's), and the median of three or five rounds can land on one
server's slow mode and the other's fast one (docs/performance.md, "Why one round's p99
swings"); pooled, a slow round weighs by its requests.  ``--json`` writes it per setting as
``pooled_p99_ms``.

Each server's CPU per request is printed too: the CPU time its process (all its threads) used
during its wrk run, from ``/proc/<pid>/stat``, over the requests wrk counted.  On a shared
machine requests/s follow what the neighbours leave; the CPU a request costs hardly does, so
"the floor's CPU per request over its own" is the steadier form of the 0.5x target (a server
that is CPU-bound answers in that proportion; issue 20 point 3 (b)).

``--quick`` (the smoke test) runs the round's wrk against every server at once: it proves that
each answers and the tables print; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from runtime import (  # noqa: E402
    A,
    Child,
    WrkResult,
    create_request,
    dc,
    envelope,
    names,
    pooled_percentile,
    post,
    token_of,
    wrk_run,
)
from wrk_options import missing, wrk_options  # noqa: E402

from e2e_support import UVICORN_RECOMMENDED, ServerProcess, serving  # noqa: E402

OPERATIONS = ("GetRepositoryElements", "GetPostScanJobElements")
FLOOR = "bare h11 (fixed bytes)"
AIOHTTP = "aiohttp (fixed bytes)"
HANDWRITTEN = "aiohttp + lxml (by hand)"
ASYNC = "dsc serve --binding async"
BLOCKING = "dsc serve --binding blocking"
UVICORN = "ASGI app, uvicorn (httptools, uvloop)"
COALESCING = "ASGI app, uvicorn (dsc's uvloop and httptools protocol)"
SERVERS = (FLOOR, AIOHTTP, HANDWRITTEN, ASYNC, BLOCKING, UVICORN, COALESCING)
#: The ways the project is deployed that the target compares with the hand-written server.
PROJECT = (ASYNC, UVICORN, COALESCING)
#: The deployment docs/operating.md recommends (uvicorn, dsc's uvloop and httptools protocol).
RECOMMENDED = COALESCING
UVICORN_OPTIONS = ("--loop", "uvloop", "--http", "httptools", "--no-access-log")
#: uvicorn's httptools protocol, one send per answer after the loop's next poll
#: (http/uvicorn_protocol.py), on uvloop taking in every pending connection at each poll
#: (http/uvicorn_loop.py).
COALESCING_OPTIONS = (*UVICORN_RECOMMENDED, "--no-access-log")


K = TypeVar("K")


@dataclass(frozen=True)
class Run:
    rps: float
    p99_ms: float
    non_2xx: int
    #: The server process's CPU time per request during the run (NaN with --quick).
    cpu_us: float
    #: wrk's latency histogram of the run (microseconds -> requests), for the pooled p99.
    latencies: Mapping[int, int] = field(default_factory=dict, repr=False, compare=False)


def pooled_p99_ms(runs: Sequence[Run]) -> float:
    """The p99 of every round's requests together (runtime.pooled_percentile): a round the
    machine made slow weighs by its requests, where the median of the rounds' p99s can land
    on it (docs/performance.md, "Why one round's p99 swings")."""
    return pooled_percentile([r.latencies for r in runs], 99) * 1000


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) the process ``pid`` has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def pid_of(server: Child | ServerProcess) -> int:
    assert server.proc is not None
    return server.proc.pid


def spread(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{min(values):.2f}/{statistics.median(values):.2f}/{max(values):.2f}"


def request_body(op: str, token: str) -> bytes:
    if op == "GetRepositoryElements":
        payload = dc.repository_elements_request(["RepositoryStatus", "RepositoryConfiguration"])
        return envelope(A.DSC_GET_REPOSITORY_ELEMENTS, payload)
    return envelope(
        A.DSP_GET_JOB_ELEMENTS, dc.job_elements_request(names.DSP, token, ["JobStatus"])
    )


def checked_reply(port: int, body: bytes, op: str) -> bytes:
    """The server's answer to ``body``; it must be the operation's response, not a fault."""
    reply = post(port, body)
    action = dc.parse_response(reply).action
    if not action.endswith(op + "Response"):
        raise RuntimeError(f"port {port} answered {op} with {action}: {reply[:300]!r}")
    return reply


@contextmanager
def child(*args: str) -> Iterator[Child]:
    server = Child(*args)
    try:
        yield server
    finally:
        server.stop()


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every configuration's runs: results[op][f"t{threads}c{conns}"][server] = [Run, ...]."""
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        stateful: dict[str, Child | ServerProcess] = {
            HANDWRITTEN: stack.enter_context(child("handwritten")),
            ASYNC: stack.enter_context(serving(ServerProcess(tmp / "async", binding="async"))),
            BLOCKING: stack.enter_context(
                serving(ServerProcess(tmp / "blocking", binding="blocking"))
            ),
            UVICORN: stack.enter_context(
                serving(ServerProcess(tmp / "uvicorn", binding="uvicorn", extra=UVICORN_OPTIONS))
            ),
            COALESCING: stack.enter_context(
                serving(
                    ServerProcess(tmp / "coalescing", binding="uvicorn", extra=COALESCING_OPTIONS)
                )
            ),
        }
        for op in OPERATIONS:
            # A job per op and server, created just before it is read (job_timeout_seconds).
            bodies: dict[str, Path] = {}
            for name, server in stateful.items():
                token = token_of(post(server.port, create_request()))
                body = request_body(op, token)
                reply = checked_reply(server.port, body, op)
                bodies[name] = tmp / f"{op}-{len(bodies)}.xml"
                bodies[name].write_bytes(body)
                if name == ASYNC:
                    fixed = tmp / f"{op}-reply.xml"
                    fixed.write_bytes(reply)
            with ExitStack() as fixed_servers:
                ports = {name: (server.port, pid_of(server)) for name, server in stateful.items()}
                for name, kind in ((FLOOR, "floor"), (AIOHTTP, "aiohttp")):
                    fixed_server = fixed_servers.enter_context(
                        child(kind, "--body-file", str(fixed))
                    )
                    ports[name] = (fixed_server.port, pid_of(fixed_server))
                    bodies[name] = bodies[ASYNC]
                results[op] = {}
                for threads in args.threads:
                    for conns in args.connections:
                        runs: dict[str, list[Run]] = {name: [] for name in SERVERS}
                        for _ in range(args.rounds):
                            for name, (done, cpu_us) in measured_round(
                                args,
                                {n: (*ports[n], bodies[n]) for n in SERVERS},
                                conns,
                                threads,
                            ).items():
                                runs[name].append(
                                    Run(
                                        done.rps,
                                        done.p99 * 1000,
                                        done.non_2xx,
                                        cpu_us,
                                        done.latencies,
                                    )
                                )
                        results[op][f"t{threads}c{conns}"] = runs
                        print_table(op, threads, conns, runs)
    return results


def wrk_round(
    args: argparse.Namespace, targets: dict[K, tuple[int, Path]], conns: int, threads: int
) -> dict[K, WrkResult]:
    """One round: ``wrk`` against each target (port, body file) in turn; with ``--quick`` all
    at once, since wrk runs for 1 s at least and a smoke run proves that every server answers
    and the tables print, not what they measure."""
    plain = {name: (port, None, body) for name, (port, body) in targets.items()}
    return {
        name: result for name, (result, _) in measured_round(args, plain, conns, threads).items()
    }


def measured_round(
    args: argparse.Namespace,
    targets: dict[K, tuple[int, int | None, Path]],
    conns: int,
    threads: int,
) -> dict[K, tuple[WrkResult, float]]:
    """:func:`wrk_round` against targets (port, pid or None, body file), each with its
    server's CPU per request in us (NaN without a pid, and with ``--quick``, where the runs
    overlap)."""
    if not args.quick:
        done: dict[K, tuple[WrkResult, float]] = {}
        for name, (port, pid, body) in targets.items():
            before = cpu_seconds(pid) if pid is not None else math.nan
            result = wrk_run(port, body, conns, args.seconds, threads)
            used = cpu_seconds(pid) - before if pid is not None else math.nan
            # wrk runs for whole seconds (runtime.wrk_run): that many seconds of requests.
            requests = result.rps * max(1, round(args.seconds))
            done[name] = (result, used / requests * 1e6 if requests else math.nan)
        return done
    with ThreadPoolExecutor(len(targets)) as pool:
        futures = {
            name: pool.submit(wrk_run, port, body, conns, args.seconds, threads)
            for name, (port, _, body) in targets.items()
        }
        return {name: (future.result(), math.nan) for name, future in futures.items()}


def print_table(op: str, threads: int, conns: int, runs: dict[str, list[Run]]) -> None:
    floor = runs[FLOOR]
    print(f"\n{op}, wrk -t{threads} -c{conns} (per round; min/median/max)", flush=True)
    print(
        "| server | req/s (median) | vs floor | p99 ms (median) | p99 vs floor |"
        " p99 ms, rounds pooled | CPU us/request (median) | floor's CPU per request / its own |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in SERVERS:
        mine = runs[name]
        rps = statistics.median(r.rps for r in mine)
        p99 = statistics.median(r.p99_ms for r in mine)
        ratio = spread([r.rps / f.rps for r, f in zip(mine, floor, strict=True)])
        p99_ratio = spread([r.p99_ms / f.p99_ms for r, f in zip(mine, floor, strict=True)])
        cpu = statistics.median(r.cpu_us for r in mine)
        cpu_ratio = spread(cpu_versus_floor(mine, floor))
        bad = sum(r.non_2xx for r in mine)
        flag = f" ({bad} non-2xx answers!)" if bad else ""
        print(
            f"| {name}{flag} | {rps:,.0f} | {ratio}x | {p99:.2f} | {p99_ratio}x |"
            f" {pooled_p99_ms(mine):.2f} | {cpu:.1f} | {cpu_ratio}x |"
        )
    sys.stdout.flush()


def cpu_versus_floor(mine: list[Run], floor: list[Run]) -> list[float]:
    """Round by round, the floor's CPU per request over ``mine``'s (the req/s ratio a
    CPU-bound server reaches, whatever the neighbours take)."""
    return [f.cpu_us / r.cpu_us for r, f in zip(mine, floor, strict=True)]


def versus_handwritten(runs: dict[str, list[Run]], name: str) -> tuple[str, str]:
    """``name``'s req/s and p99 against the hand-written server's, round by round."""
    mine, hand = runs[name], runs[HANDWRITTEN]
    faster = [r.rps / h.rps for r, h in zip(mine, hand, strict=True)]
    p99 = [r.p99_ms / h.p99_ms for r, h in zip(mine, hand, strict=True)]
    return spread(faster), spread(p99)


def print_targets(results: dict[str, Any]) -> None:
    """The two targets of issue 20 point 3, per configuration, each round against its own
    hand-written and floor run (min/median/max over the rounds): the project's fastest form
    and the recommended deployment (uvicorn, dsc's uvloop and httptools protocol)."""
    print("\n== targets (per round: min/median/max)", flush=True)
    print(
        "| request | wrk | best of the project | req/s vs hand-written | p99 vs hand-written |"
        " recommended: req/s / p99 vs hand-written | recommended: p99 vs hand-written, rounds"
        " pooled | async vs floor (>= 0.5x) | async vs floor, CPU per request |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for op, configs in results.items():
        for config, runs in configs.items():
            floor = runs[FLOOR]
            best = max(PROJECT, key=lambda name: statistics.median(r.rps for r in runs[name]))
            faster, p99 = versus_handwritten(runs, best)
            ours, ours_p99 = versus_handwritten(runs, RECOMMENDED)
            floor_ratio = [r.rps / f.rps for r, f in zip(runs[ASYNC], floor, strict=True)]
            cpu_ratio = cpu_versus_floor(runs[ASYNC], floor)
            pooled = pooled_p99_ms(runs[RECOMMENDED]) / pooled_p99_ms(runs[HANDWRITTEN])
            print(
                f"| {op} | {config} | {best} | {faster}x | {p99}x | {ours}x / {ours_p99}x |"
                f" {pooled:.2f}x | {spread(floor_ratio)}x | {spread(cpu_ratio)}x |"
            )
    sys.stdout.flush()


def _run_json(run: Run) -> dict[str, Any]:
    fields = asdict(run)
    del fields["latencies"]
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    args = wrk_options(
        "wrk against the project, a hand-written aiohttp + lxml server and the floors",
        argv,
        threads=[1, 2],
        connections=[8, 64],
    )
    if skipped := missing():
        print(skipped)
        return 0
    with tempfile.TemporaryDirectory(prefix="dsc-asgi-bench-") as tmp:
        results = measure(args, Path(tmp))
    print_targets(results)
    if args.json:
        # Per run its numbers (not wrk's histogram); per setting the pooled p99 of each server.
        raw = {
            op: {
                c: {
                    **{n: [_run_json(r) for r in runs] for n, runs in v.items()},
                    "pooled_p99_ms": {n: pooled_p99_ms(runs) for n, runs in v.items()},
                }
                for c, v in d.items()
            }
            for op, d in results.items()
        }
        args.json.write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
