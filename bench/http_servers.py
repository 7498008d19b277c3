"""The two HTTP servers the benchmark compares, each run in its own process by ``bench/run.py``.

- ``floor``: a bare h11 server on trio that answers every request with a fixed 200 and a fixed
  body (the same bytes the core would answer, given with ``--body-file``), doing no SOAP work at
  all.  It is the cost of HTTP/1.1 keep-alive with h11 on trio: the floor under our binding.
- ``core``: the project's async binding (``dsc_bindings.http.async_server.serve``) in front of a real
  ``dsc_bindings.runtime.service.ScanService`` (SQLite job store in a temporary directory).
- ``blocking``: the blocking binding (``dsc_bindings.http.blocking_server``) in front of the same.
- ``sink``: the floor of an upload: h11 on trio that writes each request body to a file as it
  arrives, fsyncs it, and answers 200 (what ``curl --data-binary`` is compared against).
- ``aiohttp``: aiohttp (its C parser, asyncio's loop) reading each body and answering the fixed
  bytes of ``--body-file``: what a popular framework costs without any SOAP work.
- ``handwritten``: ``bench/handwritten_aiohttp.py``, the aiohttp + lxml scan server a user might
  write (issue 20), on the same loop.

Each prints ``port N`` on the first stdout line and stop when their stdin is closed, so the
benchmark needs no signals to end them.  Usage::

    python bench/http_servers.py floor --port 0 --body-file reply.xml
    python bench/http_servers.py core --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import h11
import trio


async def _stop_on_stdin_eof(cancel_scope: trio.CancelScope) -> None:
    """Stop when the benchmark closes our stdin (no signals, works the same everywhere)."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(4096):
            pass
    cancel_scope.cancel()


# --- the floor ---------------------------------------------------------------------------------


async def _floor_connection(stream: trio.SocketStream, body: bytes) -> None:
    """Keep-alive loop with h11: read a request (body dropped), send the fixed reply, repeat."""
    conn = h11.Connection(h11.SERVER)
    headers = [
        ("Content-Type", "application/soap+xml; charset=utf-8"),
        ("Content-Length", str(len(body))),
    ]
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(64 * 1024)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.EndOfMessage):
                out = conn.send(h11.Response(status_code=200, headers=headers))
                out += conn.send(h11.Data(data=body))
                out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            # h11.Request and h11.Data: nothing to do until the end of the message.
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await stream.aclose()


async def run_floor(port: int, body: bytes) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(f"port {listeners[0].socket.getsockname()[1]}", flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_stdin_eof, nursery.cancel_scope)
        await trio.serve_listeners(functools.partial(_floor_connection, body=body), listeners)


# --- the core behind the async binding ---------------------------------------------------------


async def run_core(port: int) -> None:
    from dsc_bindings.filters.settings import FilterSettings
    from dsc_bindings.http.async_server import serve
    from dsc_bindings.serve import compose, settle_heap
    from dsc_core import ServerConfig

    config = ServerConfig()
    with tempfile.TemporaryDirectory(prefix="dsc-bench-") as tmp:
        composition = compose(config, Path(tmp), FilterSettings.embedded_default(tmp))
        service = composition.service
        service.start()
        settle_heap()  # as `dsc serve` does
        try:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(
                    functools.partial(
                        serve,
                        composition.site,
                        host="127.0.0.1",
                        port=port,
                        limits=config.limits,
                        grace=1.0,
                    )
                )
                print(f"port {bound}", flush=True)
                await _stop_on_stdin_eof(nursery.cancel_scope)
        finally:
            service.shutdown(timeout=2.0)


def run_blocking(port: int) -> None:
    from dsc_bindings.filters.settings import FilterSettings
    from dsc_bindings.http.blocking_server import BlockingServer
    from dsc_bindings.serve import compose, settle_heap
    from dsc_core import ServerConfig

    config = ServerConfig()
    with tempfile.TemporaryDirectory(prefix="dsc-bench-") as tmp:
        composition = compose(config, Path(tmp), FilterSettings.embedded_default(tmp))
        service = composition.service
        service.start()
        settle_heap()  # as `dsc serve` does
        server = BlockingServer(composition.site, "127.0.0.1", port, None, config.limits, grace=1.0)
        try:
            print(f"port {server.start()}", flush=True)
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            server.shutdown()
            service.shutdown(timeout=2.0)


# --- aiohttp: fixed bytes, and the hand-written aiohttp + lxml server ---------------------------


def run_aiohttp(
    port: int, app: object, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
) -> None:
    """Serve ``app`` (an aiohttp Application) as ``web.run_app`` would, on asyncio's own loop
    (or ``loop_factory``'s), until stdin closes."""
    from aiohttp import web

    assert isinstance(app, web.Application)

    async def main() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.create_server(("127.0.0.1", port), backlog=1024)
        await web.SockSite(runner, sock).start()
        print(f"port {sock.getsockname()[1]}", flush=True)
        try:
            # stdin read on a thread that sleeps in read(): no signals, no polling.
            await asyncio.get_running_loop().run_in_executor(None, drain_stdin)
        finally:
            await runner.cleanup()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def drain_stdin() -> None:
    while sys.stdin.buffer.read(4096):
        pass


def fixed_bytes_app(body: bytes) -> object:
    from aiohttp import web

    headers = {"Content-Type": "application/soap+xml; charset=utf-8"}

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_post("/ScanServer", answer)
    return app


# --- the upload floor: write and fsync ----------------------------------------------------------


_uploads = itertools.count(1)


async def _sink_connection(stream: trio.SocketStream, folder: Path) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    fd = -1
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(256 * 1024))
            elif isinstance(event, h11.Request):
                # A new file per upload, kept, as the server keeps each image in its spool:
                # overwriting one file let the kernel drop the previous upload's dirty pages
                # instead of writing them, which made the floor faster than any real store.
                fd = os.open(
                    folder / f"upload-{next(_uploads)}", os.O_WRONLY | os.O_CREAT | os.O_EXCL
                )
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
            elif isinstance(event, h11.Data):
                view = memoryview(event.data)
                while view:
                    view = view[os.write(fd, view) :]
            elif isinstance(event, h11.EndOfMessage):
                os.fsync(fd)
                os.close(fd)
                fd = -1
                out = conn.send(h11.Response(status_code=200, headers=[("Content-Length", "2")]))
                out += conn.send(h11.Data(data=b"ok")) + conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            else:
                return
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        if fd >= 0:
            os.close(fd)
        await stream.aclose()


async def run_sink(port: int) -> None:
    with tempfile.TemporaryDirectory(prefix="dsc-sink-") as tmp:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        print(f"port {listeners[0].socket.getsockname()[1]}", flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_stdin_eof, nursery.cancel_scope)
            await trio.serve_listeners(
                functools.partial(_sink_connection, folder=Path(tmp)), listeners
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP servers for bench/run.py")
    parser.add_argument(
        "kind", choices=("floor", "core", "blocking", "sink", "aiohttp", "handwritten")
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--body-file", type=Path, help="floor, aiohttp: the fixed reply body")
    args = parser.parse_args(argv)
    if args.kind == "floor":
        body = args.body_file.read_bytes() if args.body_file else b"<ok/>"
        trio.run(run_floor, args.port, body)
    elif args.kind == "core":
        trio.run(run_core, args.port)
    elif args.kind == "blocking":
        run_blocking(args.port)
    elif args.kind == "aiohttp":
        body = args.body_file.read_bytes() if args.body_file else b"<ok/>"
        run_aiohttp(args.port, fixed_bytes_app(body))
    elif args.kind == "handwritten":
        from handwritten_aiohttp import make_app

        run_aiohttp(args.port, make_app())
    else:
        trio.run(run_sink, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
