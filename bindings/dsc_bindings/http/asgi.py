"""The scan server as an ASGI 3 application (issue 20): any ASGI server is the listener.

The ASGI server parses HTTP and frames the answers; every rule about what a request gets is
the one the h11 bindings apply (:mod:`.request_rules`: cross-site, certificate, ``/api/``, the
GET pages, 405/413/415), and bodies go to the service in the same calls (:class:`.driver.
ServiceWork`: held up to ``max_envelope_bytes``, then fed as they arrive, so a 400 MB SendImage
is streamed with flat memory, R8).  The core's owner is the event loop the app runs on
(:mod:`.running_loop`), attached for as long as the app runs (its lifespan, or
:meth:`AsgiApp.running` when a host application starts it).

What the ASGI server does instead of the h11 driver: connection limits (``--limit-concurrency``),
keep-alive and head timeouts, ``Expect: 100-continue``.  The app keeps R12's body timeout: a
body that makes no progress for ``[limits] body_timeout`` is answered 408 and its exchange
aborted.  Identity: :mod:`.asgi_identity`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, MutableMapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import anyio

from dsc_bindings.http.asgi_identity import ClientIdentity
from dsc_bindings.http.driver import ServiceWork
from dsc_bindings.http.request_rules import (
    Answered,
    Opened,
    RequestHead,
    RequestRules,
    error_reply,
    reply_headers,
)
from dsc_bindings.http.running_loop import RunningLoop
from dsc_bindings.http.site import RequestLike, Site
from dsc_bindings.runtime.peer import UNKNOWN_PEER, Peer
from dsc_core import Limits, Reply

__all__ = ["AsgiApp", "Served"]

log = logging.getLogger("dsc.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Served:
    """What a running app serves: the composition root's Site and the R12 limits."""

    site: Site
    limits: Limits


class AsgiApp:
    """An ASGI 3 application over what ``start`` serves while it runs (module doc).

    ``start`` is an async context manager factory: entering it starts the service (store,
    writer, engine, ticker, discovery), leaving it stops them."""

    def __init__(
        self,
        start: Callable[[], AbstractAsyncContextManager[Served]],
        identity: ClientIdentity | None = None,
    ) -> None:
        self._start = start
        self._identity = identity if identity is not None else ClientIdentity()
        self._rules: RequestRules | None = None
        self._limits = Limits()
        self._loop: RunningLoop | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the service for the body of the ``async with`` (what the lifespan does; a host
        application whose lifespan does not reach mounted apps, Starlette's, enters this)."""
        if self._rules is not None:
            raise RuntimeError("this dsc-server ASGI app is already running")
        async with self._start() as served:
            loop = RunningLoop()
            owner = served.site.owner
            detach = owner.attach(loop) if owner is not None else None
            self._loop, self._limits = loop, served.limits
            self._rules = RequestRules(served.site, served.limits)
            try:
                yield
            finally:
                self._rules = self._loop = None
                if detach is not None:
                    detach()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        running = self.running()
        try:
            await running.__aenter__()
        except Exception as exc:
            # One line for the operator (the ASGI server prints it and stops the worker).
            log.error("cannot start: %s", exc)
            await send({"type": "lifespan.startup.failed", "message": f"cannot start: {exc}"})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await running.__aexit__(None, None, None)
        except Exception as exc:
            log.exception("stopping failed")
            await send({"type": "lifespan.shutdown.failed", "message": str(exc)})
        else:
            await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        rules, loop = self._rules, self._loop
        head_only = scope["method"] == "HEAD"
        if rules is None or loop is None:
            await _respond(
                send,
                error_reply(
                    503,
                    "The scan server is not running: the ASGI server must run the lifespan "
                    "protocol (or the host application enter AsgiApp.running()).",
                ),
                (("Retry-After", "1"),),
                head_only,
            )
            return
        client = scope.get("client")
        peer = Peer.of(tuple(client)) if client else UNKNOWN_PEER
        head = RequestHead.parse(
            scope["method"].encode("ascii"), _target(scope), scope.get("headers", ())
        )
        identity, unusable = self._identity.identify(scope)
        decision = rules.decide(head, identity, peer, unusable)
        if isinstance(decision, Answered):
            await _respond(send, decision.reply, decision.headers, head_only)
            return
        reply = await self._exchange(decision, receive, loop, peer)
        if reply is not None:
            await _respond(send, reply, rules.reply_extra(reply, decision.web), head_only)

    async def _exchange(
        self, opened: Opened, receive: Receive, loop: RunningLoop, peer: Peer
    ) -> Reply | None:
        """Feed the body to the service as it arrives; its Reply, or None when the client
        left (the exchange is then aborted: no upload debris, R12)."""
        limits = self._limits
        opener: Callable[[], RequestLike] | None = opened.opener
        #: The open service request, until its finish call returned (then nothing to abort).
        request: RequestLike | None = None
        held: list[bytes] = []
        held_bytes = 0
        try:
            while True:
                message = await _receive_within(receive, limits.body_timeout, loop.trio)
                if message is None:
                    log.warning(
                        "%s: no body progress for %.1f s: answered 408 (exchange aborted)",
                        peer,
                        limits.body_timeout,
                    )
                    return error_reply(
                        408, f"No body progress for {limits.body_timeout:g} seconds."
                    )
                if message["type"] == "http.disconnect":
                    log.info("%s: client gone mid-request (exchange aborted)", peer)
                    return None
                body = message.get("body", b"")
                if body:
                    held.append(body)
                    held_bytes += len(body)
                finish = not message.get("more_body", False)
                if not (finish or request is not None or held_bytes > limits.max_envelope_bytes):
                    continue  # a small request is opened, fed and finished in one call
                work = ServiceWork(opener, request, held, finish)
                opener, held, held_bytes = None, [], 0
                try:
                    step = work()
                    request = work.request  # opened: aborted if the rest fails or is cancelled
                    result = await loop.follow(step)
                except Exception as exc:  # a bug: the service answers faults, never raises
                    request = work.request
                    log.error("%s: service %s call failed: %r", peer, work.what, exc, exc_info=exc)
                    return error_reply(500, "The server failed to process the request.")
                if finish:
                    assert isinstance(result, Reply)
                    request = None
                    return result
                request = work.request
        finally:
            if request is not None:
                # Also when cancelled: the exchange must be aborted (R12).
                with anyio.CancelScope(shield=True):
                    try:
                        await loop.follow(request.abort())
                    except Exception:
                        log.exception("%s: aborting the exchange failed", peer)


async def _receive_within(receive: Receive, timeout: float, trio: bool) -> Message | None:
    """The next message, or None when none came within ``timeout`` seconds (R12's body
    timeout).  On asyncio with ``asyncio.timeout`` (one timer): anyio's cancel scope, entered
    around every receive, was ~5% of the app's CPU per small request (issue 20).  A message
    that is already there needs no timer at all: a small body arrives with its head, and
    uvicorn hands it over without suspending, so ``receive`` is stepped once by hand and only
    one that waits is resumed under the timeout (callgrind: the timer was ~4% of a request)."""
    if trio:
        with anyio.move_on_after(timeout):
            return await receive()
        return None
    pending = receive().__await__()
    try:
        first = pending.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    try:
        async with asyncio.timeout(timeout):
            return await _Resumed(pending, first)
    except TimeoutError:
        return None


class _Resumed:
    """An awaitable that continues ``pending`` (the iterator of an awaitable already stepped
    once, which yielded ``first``) as if it had been awaited from the start: what the task
    sends or throws in (a cancellation by the timeout) goes to it."""

    __slots__ = ("_first", "_pending")

    def __init__(self, pending: Generator[Any, Any, Message], first: object) -> None:
        self._pending = pending
        self._first = first

    def __await__(self) -> Generator[Any, Any, Message]:
        pending, yielded = self._pending, self._first
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                pending.close()
                raise
            except BaseException as exc:
                try:
                    yielded = pending.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
            else:
                try:
                    yielded = pending.send(sent)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]


def _target(scope: Scope) -> str:
    """The request target as the h11 driver sees it: the raw path below the mount point
    (``root_path``) and the query."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else str(scope["path"])
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    query = scope.get("query_string") or b""
    return f"{path}?{query.decode('latin-1')}" if query else path


async def _respond(
    send: Send, reply: Reply, extra: tuple[tuple[str, str], ...], head_only: bool
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": reply.status,
            "headers": reply_headers(reply, extra, server=False),
        }
    )
    # HEAD: the head of the same answer, no body (RFC 9110 9.3.2).
    await send({"type": "http.response.body", "body": b"" if head_only else reply.body})
