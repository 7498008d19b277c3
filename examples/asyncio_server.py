"""The sans-IO core embedded in a plain asyncio program: ``asyncio.start_server`` + h11.

What it shows:

- the whole binding loop in one page: bytes from the socket go into h11, h11's request body goes
  into one ``Exchange`` chunk by chunk, the core's commands are carried out *in order, before the
  reply is sent*, and a failed command turns into ``exchange.store_failed(...)`` (R4 step 9);
- a job store that is just a dict (no SQLite, no files), and a toy processing engine that reports
  every filter as successful through ``server.processing(event, now)``;
- the clock: a background task sleeps until ``server.next_deadline()`` and calls
  ``server.tick(now)``, woken early whenever a request may have moved the deadline.

It is deliberately small (no TLS, no connection limit, no event delivery); the project's own
binding (``dsc_bindings``) does all of that.  Run it and talk to it with the ``dsc`` client::

    python examples/asyncio_server.py --port 5362
    dsc repo --server http://127.0.0.1:5362/ScanServer

``--port 0`` binds a free port; the first stdout line always names the bound port (the tests
read it).  ``--requests N`` exits after N answered requests.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import h11

from dsc_core import (
    AbortDocument,
    AnnounceRepositoryState,
    AppendDocument,
    BeginDocument,
    Command,
    CreateJob,
    Deliver,
    DiscardDocuments,
    DropJob,
    Exchange,
    FilterFinished,
    FilterStarted,
    FilterState,
    FinishDocument,
    Job,
    Outcome,
    ProcessingFinished,
    ProcessingStarted,
    Reply,
    RequestInfo,
    ScanServer,
    ServerConfig,
    StartProcessing,
    StopProcessing,
    UpdateJob,
)


def utcnow() -> datetime:
    """The only clock of the program: the core never reads one, it is given ``now``."""
    return datetime.now(UTC)


class StoreFailure(Exception):
    """A store command could not be carried out; ``temporary`` picks the R4 step 9 fault."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


@dataclass
class DictStore:
    """Jobs and documents in dicts.  Real stores must make ``FinishDocument`` durable before
    returning, because the reply that follows acknowledges the image to the scanner."""

    jobs: dict[str, Job] = field(default_factory=dict)
    documents: dict[tuple[str, int], bytes] = field(default_factory=dict)
    uploads: dict[tuple[str, int], bytearray] = field(default_factory=dict)

    def apply(self, command: Command) -> None:
        if isinstance(command, (CreateJob, UpdateJob)):
            self.jobs[command.job.token] = command.job
        elif isinstance(command, BeginDocument):
            self.uploads[(command.token, command.document_id)] = bytearray()
        elif isinstance(command, AppendDocument):
            # A real store writes the chunk to a file here: bytes never gather in the core.
            self.uploads[(command.token, command.document_id)] += command.data
        elif isinstance(command, FinishDocument):
            data = self.uploads.pop((command.token, command.document_id), None)
            if data is None or len(data) != command.size:
                raise StoreFailure("document size mismatch", temporary=False)
            self.documents[(command.token, command.document_id)] = bytes(data)
        elif isinstance(command, AbortDocument):
            self.uploads.pop((command.token, command.document_id), None)
        elif isinstance(command, (DiscardDocuments, DropJob)):
            for key in [k for k in self.documents if k[0] == command.token]:
                del self.documents[key]
            if isinstance(command, DropJob):
                self.jobs.pop(command.token, None)


class App:
    """One ScanServer, its store, its engine and its clock task, shared by all connections.

    asyncio runs one coroutine at a time, so the core (which is not thread-safe and needs no
    lock here) sees each call complete before the next one starts.
    """

    def __init__(self, config: ServerConfig, requests: int | None) -> None:
        self.config = config
        self.server = ScanServer(config, new_id=lambda: str(uuid.uuid4()))
        self.store = DictStore()
        self.requests_left = requests
        self.done = asyncio.Event()
        self.deadline_moved = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    # --- carrying out commands ----------------------------------------------------------------

    def carry_out(self, commands: Iterable[Command]) -> None:
        """In order.  Store commands may raise StoreFailure; the caller turns that into the
        core's store_failed fault.  Engine and delivery commands never fail here."""
        for command in commands:
            if isinstance(command, StartProcessing):
                self._spawn(self.engine(command.job))
            elif isinstance(command, StopProcessing):
                pass  # the toy engine checks the job's state between filters
            elif isinstance(command, Deliver):
                # This example does not POST events; telling the core they failed lets it end
                # the subscription after its configured number of failures (R7).
                if not command.final:
                    self.carry_out(self.server.delivery_result(command.subscription_id, False))
            elif isinstance(command, AnnounceRepositoryState):
                # One server records nothing; the state's event goes out like any other.
                self.carry_out(command.events)
            else:
                self.store.apply(command)
        self.deadline_moved.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def engine(self, job: Job) -> None:
        """A processing engine that runs no filter at all and reports each one as successful.
        A real one copies the documents (``self.store.documents``) somewhere between the
        FilterStarted and FilterFinished reports."""
        await asyncio.sleep(0)
        self.carry_out(self.server.processing(ProcessingStarted(job.token), utcnow()))
        for index, status in enumerate(job.filters):
            if status.instructions is None:
                continue  # an unusable filter: the core keeps it Canceled
            self.carry_out(self.server.processing(FilterStarted(job.token, index), utcnow()))
            await asyncio.sleep(0)
            self.carry_out(
                self.server.processing(
                    FilterFinished(job.token, index, FilterState.COMPLETED_SUCCESSFULLY), utcnow()
                )
            )
        self.carry_out(self.server.processing(ProcessingFinished(job.token), utcnow()))

    async def clock(self) -> None:
        """Call tick() when the core says it has something to do (aioquic's timer shape)."""
        while True:
            deadline = self.server.next_deadline()
            timeout = None if deadline is None else max(0.0, (deadline - utcnow()).total_seconds())
            self.deadline_moved.clear()
            try:
                await asyncio.wait_for(self.deadline_moved.wait(), timeout)
            except TimeoutError:
                self.carry_out(self.server.tick(utcnow()))

    # --- one request --------------------------------------------------------------------------

    def answer(self, exchange: Exchange, failure: StoreFailure | None) -> Reply:
        """End the exchange (or report the failure that happened while feeding) and carry out
        the resulting commands; a failure among them becomes the R4 step 9 fault."""
        outcome: Outcome
        if failure is not None:
            outcome = exchange.store_failed(temporary=failure.temporary)
        else:
            outcome = exchange.end()
            try:
                self.carry_out(outcome.commands)
                return outcome.reply
            except StoreFailure as exc:
                outcome = exchange.store_failed(temporary=exc.temporary)
        self.carry_out(outcome.commands)  # undo commands; a failure here is a real bug
        return outcome.reply

    def counted(self) -> bool:
        """Count one answered request; True when the program should stop."""
        if self.requests_left is None:
            return False
        self.requests_left -= 1
        if self.requests_left <= 0:
            self.done.set()
            return True
        return False


async def read_event(conn: h11.Connection, reader: asyncio.StreamReader, timeout: float) -> object:
    """The next h11 event (or h11.PAUSED), reading from the socket as needed, with a timeout
    per read so that a silent client cannot hold the connection forever."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await asyncio.wait_for(reader.read(64 * 1024), timeout)
        conn.receive_data(data)  # b"" means EOF; h11 then reports ConnectionClosed or an error


async def send(conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply) -> None:
    headers = [
        ("Content-Type", reply.content_type),
        ("Content-Length", str(len(reply.body))),
        ("Server", "dsc-asyncio-example"),
    ]
    writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers)) or b"")
    writer.write(conn.send(h11.Data(data=reply.body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


async def serve_connection(
    app: App, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    limits = app.config.limits
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_http_header_bytes)
    try:
        while True:
            try:
                event = await read_event(conn, reader, limits.idle_timeout)
            except (TimeoutError, h11.RemoteProtocolError, ConnectionError) as exc:
                await _refuse(conn, writer, exc)
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed (or PAUSED after a close): the client is gone
            if not await handle_request(app, conn, reader, writer, event):
                return
            if app.counted() or conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def handle_request(
    app: App,
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: h11.Request,
) -> bool:
    """Stream one request body through one exchange and send the reply.  False when the
    connection is unusable afterwards."""
    limits = app.config.limits
    content_type = None
    for name, value in request.headers:
        if name == b"content-type":
            content_type = value.decode("latin-1")
    exchange = app.server.open_exchange(
        RequestInfo(now=utcnow(), content_type=content_type, path=request.target.decode("latin-1"))
    )
    if conn.they_are_waiting_for_100_continue:
        writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
    failure: StoreFailure | None = None
    while True:
        try:
            event = await read_event(conn, reader, limits.body_timeout)
        except (TimeoutError, h11.RemoteProtocolError, ConnectionError) as exc:
            app.carry_out(exchange.abort())  # drop a half-received upload: no debris
            await _refuse(conn, writer, exc)
            return False
        if isinstance(event, h11.Data):
            if failure is None:  # after a failure the rest of the body is read and dropped
                try:
                    app.carry_out(exchange.feed(bytes(event.data)))
                except StoreFailure as exc:
                    failure = exc
        elif isinstance(event, h11.EndOfMessage):
            break
        else:  # ConnectionClosed in the middle of the body
            app.carry_out(exchange.abort())
            return False
    reply = app.answer(exchange, failure)
    try:
        await send(conn, writer, reply)
    except ConnectionError:
        return False
    return True


async def _refuse(conn: h11.Connection, writer: asyncio.StreamWriter, exc: Exception) -> None:
    """Answer a broken request with a bare HTTP error when h11 still allows a response."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = getattr(
        exc, "error_status_hint", 408 if isinstance(exc, asyncio.TimeoutError) else 400
    )
    body = f"{status} {type(exc).__name__}\n".encode()
    try:
        writer.write(
            conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        ("Content-Type", "text/plain"),
                        ("Content-Length", str(len(body))),
                        ("Connection", "close"),
                    ],
                )
            )
            or b""
        )
        writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
    except (h11.LocalProtocolError, ConnectionError):
        pass


async def run(host: str, port: int, requests: int | None) -> int:
    app = App(ServerConfig(), requests)
    listener = await asyncio.start_server(lambda r, w: serve_connection(app, r, w), host, port)
    bound = listener.sockets[0].getsockname()[1]
    print(f"listening on http://{host}:{bound}/ScanServer port {bound}", flush=True)
    clock = asyncio.ensure_future(app.clock())
    try:
        await app.done.wait()
    finally:
        listener.close()
        await listener.wait_closed()
        clock.cancel()
        for task in list(app.tasks):
            task.cancel()
    jobs = ", ".join(f"{j.token[:8]} {j.state.value}" for j in app.store.jobs.values())
    print(f"answered {requests} requests; jobs: {jobs or 'none'}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5362, help="0 picks a free port")
    parser.add_argument(
        "--requests", type=int, default=None, help="exit after answering this many requests"
    )
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args.host, args.port, args.requests))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
