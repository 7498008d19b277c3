"""uvicorn's httptools protocol, sending what one turn of the loop wrote to a connection as one
write after the loop's next poll for I/O (issue 20).

::

    uvicorn --factory dsc_bindings.asgi:create_app \\
        --http dsc_bindings.http.uvicorn_protocol:CoalescingHttpToolsProtocol

Two things stock uvicorn does that this protocol changes, nothing else:

- **One send per answer.**  uvicorn writes a response's head (at ``http.response.start``) and
  its body (at ``http.response.body``) with one ``transport.write`` each, and uvloop sends each
  at once: two ``send()`` calls, two TCP segments, per answer.  Profiled under ``wrk`` (py-spy,
  8 connections, GetRepositoryElements), those two sends were 46% of the uvicorn worker's
  samples.  Here what a connection is written in one turn of the loop is joined into one write.
- **The connections answered in turn.**  On uvloop the loop runs the ready tasks (each writes
  its answer at once) and then polls for I/O: the poll finds the next requests of the clients
  answered early in that run but not yet those answered last, which then wait for the whole
  next run: about 1% of the requests waited two rounds under ``wrk`` with 8 or 64
  connections, which doubles the p99 latency (``bench/fairness.py``; the hand-written aiohttp
  server on uvloop does the same, docs/performance.md "Tails").  Sending the answers from a
  callback scheduled when they are written, which runs after that poll, makes the next poll
  find every client's next request alike, as asyncio's own loop does (it polls before it runs
  the tasks); the cost is one callback per answer.

A connection holds at most :data:`HOLD_BYTES`: beyond that what it holds is sent at once, so a
large answer is never kept back and the transport's flow control (pause/resume writing)
applies to it as before.  Everything held is sent, in order, before the transport is closed
or half-closed; a ``100 Continue`` or a HEAD answer goes out after the poll like any other
write (microseconds later), never waiting for a body write.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HOLD_BYTES", "CoalescingHttpToolsProtocol"]

#: What a connection may hold before it is sent at once: the transports' default high-water
#: mark (asyncio's and uvloop's 64 KiB), so flow control sees any answer larger than that.
HOLD_BYTES = 64 * 1024


class _HeldWrites:
    """A connection's transport as uvicorn's protocol and its cycles see it: writes are held
    and sent together by a callback scheduled with the first of them (module doc)."""

    __slots__ = ("_held", "_held_bytes", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > HOLD_BYTES:
            self.send_held()
        elif len(self._held) == 1:
            self._loop.call_soon(self.send_held)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def send_held(self) -> None:
        """Send what is held as one write (nothing when it was sent already)."""
        held = self._held
        if not held:
            return
        self._held, self._held_bytes = [], 0
        if not self._transport.is_closing():  # the client left: nothing to send it to
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def is_closing(self) -> bool:
        # Asked by uvicorn at each answer: a method of its own, not __getattr__'s slow path.
        return self._transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._held_bytes

    def write_eof(self) -> None:
        self.send_held()
        self._transport.write_eof()

    def close(self) -> None:
        self.send_held()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._held_bytes = [], 0
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol writing through :class:`_HeldWrites` (module doc)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        held = _HeldWrites(transport, self.loop)
        super().connection_made(held)  # type: ignore[arg-type]
