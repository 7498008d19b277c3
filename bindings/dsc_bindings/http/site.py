"""What one HTTP listener serves: a :class:`Site`, built by the composition root
(``dsc_bindings.serve``) from the scan service, the web endpoints and the observer.

The HTTP driver (:mod:`.driver`) reads only these small Protocols; it never looks for a part
by name.  Each part but the requests is optional, so a test can serve just what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dsc_bindings.runtime.owner import CoreOwner
from dsc_bindings.runtime.peer import Peer
from dsc_bindings.runtime.ticket import Wait
from dsc_core import Reply

__all__ = [
    "MAX_API_BODY_BYTES",
    "ApiHead",
    "ApiReply",
    "HttpObserver",
    "RequestLike",
    "Requests",
    "Site",
    "WebApi",
    "WebPages",
    "no_origins",
    "split_target",
]

#: The largest request body the web console's API reads (a scan process's XML is the biggest
#: thing sent); the driver refuses a larger declared body with 413 before reading it.
MAX_API_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ApiHead:
    """What the HTTP driver passes of a request for ``/api/`` (``.webconsole.api``)."""

    method: str
    target: str
    content_type: str | None = None
    cookie: str | None = None
    csrf: str | None = None
    if_none_match: str | None = None


@dataclass(frozen=True, slots=True)
class ApiReply(Reply):
    """A Reply with headers of its own (Set-Cookie, ETag, Retry-After, Allow)."""

    headers: tuple[tuple[str, str], ...] = ()


class RequestLike(Protocol):
    """A service request (:class:`~dsc_bindings.runtime.request.ServiceRequest`): each method
    returns at once, with its result or a :class:`~dsc_bindings.runtime.ticket.Wait` for
    commands in flight."""

    def feed(self, data: bytes) -> Wait | None: ...
    def finish(self) -> Reply | Wait: ...
    def abort(self) -> Wait | None: ...


class Requests(Protocol):
    """Opens the SOAP exchanges (:class:`~dsc_bindings.runtime.service.ScanService`)."""

    def open_request(
        self, content_type: str | None, identity: str | None, path: str, peer: Peer | None = None
    ) -> RequestLike: ...


class WebPages(Protocol):
    """The read-only GET endpoints (``dsc_bindings.observe.web``)."""

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Headers of every answer of these endpoints (CSP and friends)."""
        ...

    def answer_get(self, target: str, identity: str | None) -> Reply | RequestLike | None:
        """The answer, or a request carried out like a SOAP one (its check needs the
        directory), or None: not one of ours (the driver answers 405)."""
        ...


class WebApi(Protocol):
    """The web console's JSON API (``dsc_bindings.webconsole.api.WebConsole``)."""

    def open_api(self, head: ApiHead, identity: str | None, peer: Peer) -> RequestLike: ...


class HttpObserver(Protocol):
    """What the driver reports (``dsc_bindings.observe.observer.Observer``)."""

    def http_refused(self, status: int) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...


def split_target(target: str) -> tuple[str, str]:
    """A request target's path and query (RFC 9112 3.2.1, origin-form: absolute-path
    ["?" query]): the web endpoints are chosen by the path alone, whatever the query."""
    path, _, query = target.partition("?")
    return path, query


def no_origins() -> frozenset[str]:
    return frozenset()


@dataclass(frozen=True, slots=True)
class Site:
    """The parts one listener serves."""

    #: Opens SOAP exchanges; None on a listener without SOAP (.monitor): every request that
    #: is not one of ``pages`` gets 404.
    requests: Requests | None
    pages: WebPages | None = None
    api: WebApi | None = None
    observer: HttpObserver | None = None
    #: The origins whose pages may send requests here (.cross_site), asked only for a
    #: request that carries an Origin.
    own_origins: Callable[[], frozenset[str]] = no_origins
    #: The core's owner: the binding attaches its loop (or service thread) while it serves.
    owner: CoreOwner | None = None
