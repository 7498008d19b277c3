"""The event loop a front end serves on, as the core's owner, and its wait for the writer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import anyio
import sniffio
import trio as _trio

from dsc_bindings.runtime.ticket import Ticket, Wait

__all__ = ["RunningLoop"]


class RunningLoop:
    """The running event loop (trio or asyncio) as the core's owner
    (``runtime.owner.LoopHandle``): the async binding's and the ASGI app's."""

    def __init__(self) -> None:
        self._thread = threading.get_ident()
        self.call_soon: Callable[[Callable[[], object]], None]
        #: Under trio a stream's socket is a plain non-blocking socket nobody else writes to
        #: (asyncio's transports buffer, so there the binding always awaits its sends).
        self.trio = sniffio.current_async_library() == "trio"
        if self.trio:
            self.call_soon = _trio.lowlevel.current_trio_token().run_sync_soon
        else:
            loop = asyncio.get_running_loop()

            def call_soon(function: Callable[[], object]) -> None:
                loop.call_soon_threadsafe(function)

            self.call_soon = call_soon

    def is_current(self) -> bool:
        return threading.get_ident() == self._thread

    async def wait(self, ticket: Ticket) -> None:
        """Until the writer completed ``ticket``, without blocking the loop."""
        if ticket.done:
            return
        event = anyio.Event()
        call_soon = self.call_soon
        ticket.add_done_callback(lambda: call_soon(event.set))
        await event.wait()

    async def follow(self, result: object) -> object:
        """Follow a service call's Wait chain to its result."""
        while isinstance(result, Wait):
            await self.wait(result.ticket)
            result = result.resume()
        return result
