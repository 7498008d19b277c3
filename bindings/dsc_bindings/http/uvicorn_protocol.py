"""uvicorn's httptools protocol, writing each response head together with its body (issue 20).

::

    uvicorn --factory dsc_bindings.asgi:create_app --loop uvloop \\
        --http dsc_bindings.http.uvicorn_protocol:CoalescingHttpToolsProtocol

Stock uvicorn writes a response's head (at ``http.response.start``) and its body (at
``http.response.body``) with one ``transport.write`` each, and uvloop sends each at once: two
``send()`` calls, two TCP segments, per answer.  Profiled under ``wrk`` (py-spy, 8
connections, GetRepositoryElements), those two sends were 46% of the uvicorn worker's samples.
Holding the head until the body's write makes them one send, as aiohttp and the h11 bindings
do; nothing else about uvicorn changes (``bench/asgi.py`` measures both).

A head is held only until the next write of the same response, which uvicorn makes for every
``http.response.body`` of a response to any method but HEAD (a HEAD answer is its head alone,
RFC 9110 9.3.2: uvicorn writes no body, so such a head is never held, or the client would wait
for it forever); a ``100 Continue`` is never held: the client waits for it before it sends the
body.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttpToolsProtocol"]

_STATUS_LINE = b"HTTP/1.1 "
_CONTINUE = b"HTTP/1.1 100 "


class _HeadWithBody:
    """The transport one request/response cycle writes to: its response head is held and
    written together with the next write (the body's first piece)."""

    __slots__ = ("_held", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(_STATUS_LINE) and not data.startswith(_CONTINUE):
            self._held = data
        else:
            self._transport.write(data)

    def close(self) -> None:
        if self._held is not None:  # never left behind, even if no body write came
            self._transport.write(self._held)
            self._held = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol, each response head sent with its body (module doc)."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # The cycle uvicorn just made for this request writes through the wrapper; the
        # protocol's own answers (400s, 503s of --limit-concurrency) still write directly,
        # and so does the answer to a HEAD request, which has no body write to wait for.
        if self.cycle.scope["method"] != "HEAD":
            self.cycle.transport = _HeadWithBody(self.transport)  # type: ignore[assignment]
