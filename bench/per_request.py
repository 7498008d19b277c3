"""Count, don't time: what one small request costs the project in process (issue 20).

    python3 bench/per_request.py [--binding async|asgi] [--requests 2000]
    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=builtin_sum \\
        python3 bench/per_request.py --callgrind GetPostScanJobElements --requests 200

GetRepositoryElements and GetPostScanJobElements (of a job created first) are served in
process, without sockets or a scheduler, by

- ``async``: the h11 driver of the async binding (``http.driver.HttpConnection``) in front of
  the service and core that ``dsc serve`` composes (its Calls run inline, as on the loop);
- ``asgi``: the ASGI app (``dsc_bindings.asgi.create_app``) on uvloop, the body in one
  ``http.request`` message, as uvicorn gives a small request;
- ``core``: the core alone (``dsc_core``, as tests/core drives it): an exchange opened, fed
  the body and ended, as the bindings call it (no store: a read has no command to carry out).

Printed per request: Python function calls (cProfile; repeatable to the call) and thread CPU
time (min/median of 5 runs; noisy on a shared machine).  ``--callgrind OP`` runs only OP's
requests inside ``sum()``, so that callgrind, told to collect inside ``builtin_sum`` only,
counts the instructions of exactly those requests (divide its total by ``--requests``):
instruction counts do not change with the machine's load.  Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from runtime import A, create_request, dc, envelope, names, token_of  # noqa: E402

OPERATIONS = ("GetRepositoryElements", "GetPostScanJobElements")
CONTENT_TYPE = b"application/soap+xml; charset=utf-8"


@dataclass(frozen=True)
class Binding:
    """One request through a binding: ``create`` may wait for the store, ``sync`` must not
    (a read: it runs without an event loop turn, so that callgrind can count it alone)."""

    create: Callable[[bytes], Coroutine[Any, Any, bytes]]
    sync: Callable[[bytes], bytes]


def request_bodies(token: str) -> dict[str, bytes]:
    return {
        "GetRepositoryElements": envelope(
            A.DSC_GET_REPOSITORY_ELEMENTS,
            dc.repository_elements_request(["RepositoryStatus", "RepositoryConfiguration"]),
        ),
        "GetPostScanJobElements": envelope(
            A.DSP_GET_JOB_ELEMENTS, dc.job_elements_request(names.DSP, token, ["JobStatus"])
        ),
    }


def http_request(body: bytes) -> bytes:
    """The bytes wrk sends for ``body`` (its headers: Host, Content-Type, Content-Length)."""
    return (
        b"POST /ScanServer HTTP/1.1\r\nHost: 127.0.0.1:5362\r\nContent-Type: "
        + CONTENT_TYPE
        + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def async_binding(data: Path) -> Binding:
    """One request through the h11 driver and the service: its reply's body (in ``sync``,
    a read that answers without waiting for the store; ``create`` may wait)."""
    from dsc_bindings.filters.settings import FilterSettings
    from dsc_bindings.http.driver import Call, HttpConnection, Receive, Send
    from dsc_bindings.http.running_loop import RunningLoop
    from dsc_bindings.runtime.peer import Peer
    from dsc_bindings.runtime.ticket import Wait
    from dsc_bindings.serve import compose, settle_heap
    from dsc_core import ServerConfig

    config = ServerConfig()
    composition = compose(config, data, FilterSettings.embedded_default(str(data)))
    composition.service.start()
    settle_heap()
    connection = HttpConnection(
        composition.site,
        config.limits,
        identity=None,
        peer=Peer("127.0.0.1", 40000),
        over_capacity=None,
        unusable_certificate=None,
    )

    loop = RunningLoop()

    async def create(body: bytes) -> bytes:
        out: list[bytes] = []
        fed = False
        while True:
            action = connection.next_action()
            if isinstance(action, Receive):
                if fed:
                    return b"".join(out).partition(b"\r\n\r\n")[2]
                connection.receive_data(http_request(body))
                fed = True
            elif isinstance(action, Send):
                out.append(action.data)
            elif isinstance(action, Call):
                result = action.function()
                if isinstance(result, Wait):
                    result = await loop.follow(result)
                connection.call_done(result)
            else:
                raise AssertionError(f"unexpected {action!r}")

    def sync(body: bytes) -> bytes:
        coroutine = create(body)
        try:
            coroutine.send(None)
        except StopIteration as done:
            return bytes(done.value)
        coroutine.close()
        raise AssertionError("the request waited for the store (a read answers at once)")

    return Binding(create, sync)


async def asgi_app(data: Path, stack: Any) -> Binding:
    """One request through the ASGI app (its coroutine never suspends for a small read)."""
    from dsc_bindings.asgi import create_app

    app = create_app(data_dir=data, port=5362)
    await stack.enter_async_context(app.running())

    async def create(body: bytes) -> bytes:
        out: list[bytes] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Any) -> None:
            if message["type"] == "http.response.body":
                out.append(message["body"])

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/ScanServer",
            "raw_path": b"/ScanServer",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"127.0.0.1:5362"),
                (b"content-type", CONTENT_TYPE),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 40000),
            "http_version": "1.1",
            "asgi": {"version": "3.0"},
        }
        await app(scope, receive, send)  # type: ignore[arg-type]
        return out[0]

    def sync(body: bytes) -> bytes:
        coroutine = create(body)
        try:
            coroutine.send(None)
        except StopIteration as done:
            return bytes(done.value)
        coroutine.close()
        raise AssertionError("the app waited (a small read answers at once)")

    return Binding(create, sync)


async def core_alone() -> Binding:
    """One request through the core's exchange: open, feed, end (what the service calls)."""
    from datetime import UTC, datetime

    from dsc_bindings.runtime.clock import new_uuid
    from dsc_core import RequestInfo, ScanServer, ServerConfig

    server = ScanServer(ServerConfig(), new_id=new_uuid)
    now = datetime(2026, 12, 7, tzinfo=UTC)
    content_type = CONTENT_TYPE.decode()

    def sync(body: bytes) -> bytes:
        info = RequestInfo(now, content_type, None, "/ScanServer", "127.0.0.1")
        exchange = server.open_exchange(info)
        exchange.feed(body)
        outcome = exchange.end(now)
        return outcome.reply.body

    async def create(body: bytes) -> bytes:
        return sync(body)

    return Binding(create, sync)


async def measure(args: argparse.Namespace) -> None:
    import contextlib

    n = args.requests
    async with contextlib.AsyncExitStack() as stack:
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dsc-count-")))
        if args.binding == "asgi":
            binding = await asgi_app(data, stack)
        elif args.binding == "core":
            binding = await core_alone()
        else:
            binding = await async_binding(data)
        token = token_of(await binding.create(create_request()))
        one = binding.sync
        for op, body in request_bodies(token).items():
            if args.callgrind is not None:
                if op == args.callgrind:
                    # callgrind collects inside builtin_sum only: these n requests.
                    print(f"{op}: {sum(map(lambda _: len(one(body)) > 0, range(n)))} requests")
                continue
            for _ in range(200):  # warm: caches filled, the templates built
                reply = one(body)
            assert b"Response" in reply and b"Fault" not in reply, reply[:400]
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(n):
                one(body)
            profile.disable()
            calls = pstats.Stats(profile).total_calls / n  # type: ignore[attr-defined]
            runs = []
            for _ in range(5):
                start = time.thread_time()
                for _ in range(n):
                    one(body)
                runs.append((time.thread_time() - start) / n * 1e6)
            print(
                f"{args.binding:5} {op:24} {calls:7.1f} Python calls/request, CPU "
                f"{min(runs):6.1f} / {statistics.median(runs):6.1f} us/request (min/median of 5)",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binding", choices=("async", "asgi", "core"), default="async")
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument(
        "--callgrind",
        choices=OPERATIONS,
        help="only run this operation's requests inside sum() (see the module doc)",
    )
    args = parser.parse_args(argv)
    if args.binding == "asgi":
        import uvloop

        uvloop.run(measure(args))
    else:
        asyncio.run(measure(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
