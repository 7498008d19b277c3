"""Count, don't time: what a whole server spends per request, the socket aside (issue 20).

    python3 bench/servers_in_process.py [--server NAME] [--requests 2000]
    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=builtin_sum \\
        python3 bench/servers_in_process.py --callgrind GetRepositoryElements \\
        --server handwritten --requests 200

Each server's own protocol object (the one its listener would make for a TCP connection) is
given a transport that keeps what is written, on uvloop, and fed the bytes ``wrk`` sends for
GetRepositoryElements or GetPostScanJobElements, one request after the other on one
keep-alive connection, each awaited until its answer is written:

- ``handwritten``: ``bench/handwritten_aiohttp.py`` (aiohttp's protocol and C parser, the
  handler parsing and building with lxml), what ``bench/asgi.py`` compares the project with;
- ``uvicorn-floor``: uvicorn's httptools protocol (as ``bench/asgi.py`` runs it: uvicorn's
  default middleware, no access log) over a trivial ASGI app answering fixed bytes: what
  uvicorn itself spends, the part of a request the app cannot cut;
- ``uvicorn``: the same protocol over the project's ASGI app
  (``dsc_bindings.asgi.create_app``), ``coalescing``: with
  :class:`dsc_bindings.http.uvicorn_protocol.CoalescingHttpToolsProtocol`.

Printed per request: Python function calls (cProfile) and thread CPU time (min/median of 5;
noisy on a shared machine).  With ``--callgrind OP`` only OP's requests run inside ``sum()``
(callgrind told to collect in ``builtin_sum`` only counts exactly them: divide its total by
``--requests``).  Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib.util
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

from per_request import OPERATIONS, http_request, request_bodies  # noqa: E402
from runtime import create_request, token_of  # noqa: E402

SERVERS = ("handwritten", "uvicorn-floor", "uvicorn", "coalescing")
FIXED_REPLY = b'<?xml version="1.0" encoding="utf-8"?><Envelope/>'
FIXED_LENGTH = str(len(FIXED_REPLY)).encode()


class KeptTransport(asyncio.Transport):
    """A connected transport that keeps what the server writes; ``answered`` is set when a
    whole answer (its Content-Length worth of body) has been written."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self.written = bytearray()
        self.answered: asyncio.Future[bytes] = loop.create_future()
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 5362)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data
        head, _, body = bytes(self.written).partition(b"\r\n\r\n")
        length = head.lower().partition(b"content-length:")[2].partition(b"\r\n")[0]
        if length and len(body) >= int(length) and not self.answered.done():
            self.answered.set_result(bytes(self.written))

    def writelines(self, data: Any) -> None:
        self.write(b"".join(data))

    def next_answer(self) -> None:
        self.written = bytearray()
        self.answered = self._loop.create_future()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


async def handwritten(stack: contextlib.AsyncExitStack) -> asyncio.Protocol:
    from aiohttp import web

    spec = importlib.util.spec_from_file_location("handwritten", HERE / "handwritten_aiohttp.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runner = web.AppRunner(module.make_app(), access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    assert runner.server is not None
    return runner.server()  # type: ignore[no-any-return]


async def uvicorn_protocol(app: Any, protocol: str) -> asyncio.Protocol:
    import uvicorn
    from uvicorn.server import ServerState

    config = uvicorn.Config(app, loop="uvloop", http=protocol, lifespan="off", access_log=False)
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Mon, 07 Dec 2026 00:00:00 GMT"), *config.encoded_headers]
    protocol_class: Any = config.http_protocol_class
    return protocol_class(config=config, server_state=state, app_state={})  # type: ignore[no-any-return]


async def fixed_app(scope: Any, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    """The trivial ASGI app: reads the body, answers fixed bytes."""
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/soap+xml; charset=utf-8"),
                (b"content-length", FIXED_LENGTH),
            ],
        }
    )
    await send({"type": "http.response.body", "body": FIXED_REPLY})


async def project_app(stack: contextlib.AsyncExitStack, data: Path) -> Any:
    from dsc_bindings.asgi import create_app

    app = create_app(data_dir=data, port=5362)
    await stack.enter_async_context(app.running())
    return app


async def server(name: str, stack: contextlib.AsyncExitStack, data: Path) -> asyncio.Protocol:
    if name == "handwritten":
        return await handwritten(stack)
    if name == "uvicorn-floor":
        return await uvicorn_protocol(fixed_app, "httptools")
    protocol = (
        "dsc_bindings.http.uvicorn_protocol:CoalescingHttpToolsProtocol"
        if name == "coalescing"
        else "httptools"
    )
    return await uvicorn_protocol(await project_app(stack, data), protocol)


async def serve(protocol: asyncio.Protocol, transport: KeptTransport, raw: bytes, n: int) -> bytes:
    """``n`` requests one after the other on the connection; the last answer."""
    answer = b""
    for _ in range(n):
        transport.next_answer()
        protocol.data_received(raw)
        answer = await transport.answered
    return answer


def count(args: argparse.Namespace) -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stack = contextlib.AsyncExitStack()
    data = Path(tempfile.mkdtemp(prefix="dsc-count-"))
    try:
        protocol = loop.run_until_complete(server(args.server, stack, data))
        transport = KeptTransport(loop)
        protocol.connection_made(transport)

        def one(body: bytes, n: int) -> bytes:
            return loop.run_until_complete(serve(protocol, transport, http_request(body), n))

        token = "none"
        if args.server != "uvicorn-floor":
            token = token_of(one(create_request(), 1).partition(b"\r\n\r\n")[2])
        n = args.requests
        for op, body in request_bodies(token).items():
            if args.callgrind is not None:
                if op == args.callgrind:
                    one(body, 50)  # warm: caches filled, the templates built
                    # callgrind collects inside builtin_sum only: these n requests.
                    sum(map(lambda _: len(one(body, n)), range(1)))
                    print(f"{args.server} {op}: {n} requests")
                continue
            reply = one(body, 200)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:400]
            if args.server != "uvicorn-floor":
                assert b"Response" in reply and b"Fault" not in reply, reply[:600]
            profile = cProfile.Profile()
            profile.enable()
            one(body, n)
            profile.disable()
            calls = pstats.Stats(profile).total_calls / n  # type: ignore[attr-defined]
            runs = []
            for _ in range(5):
                start = time.thread_time()
                one(body, n)
                runs.append((time.thread_time() - start) / n * 1e6)
            print(
                f"{args.server:13} {op:24} {calls:7.1f} Python calls/request, CPU "
                f"{min(runs):6.1f} / {statistics.median(runs):6.1f} us/request (min/median of 5)",
                flush=True,
            )
    finally:
        protocol.connection_lost(None)
        loop.run_until_complete(stack.aclose())
        loop.close()
        shutil.rmtree(data, ignore_errors=True)  # the server's data folder (jobs, spool)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=SERVERS, default="uvicorn")
    parser.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    parser.add_argument(
        "--callgrind",
        choices=OPERATIONS,
        help="only run this operation's requests inside sum() (see the module doc)",
    )
    count(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
