"""What a request head gets, decided once for every HTTP front end (the h11 driver, the ASGI app).

:meth:`RequestRules.decide` applies, in this order: the issue-14 cross-site refusal (403), an
unusable client certificate (403), the web console's ``/api/`` (its own body limit, 413), the
read-only GET endpoints, then the SOAP rules: 405 for anything but POST, 413 for a declared
body over the R12 limit, 415 for a media type that is not SOAP.  The answer is either a reply
to send at once (:class:`Answered`) or the exchange to open with the first service call
(:class:`Opened`).  Framing (keep-alive, ``Expect``, Transfer-Encoding with Content-Length) is
each front end's own: h11's or the ASGI server's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus

from dsc_bindings.http.cross_site import cross_site_refusal
from dsc_bindings.http.site import MAX_API_BODY_BYTES, ApiHead, ApiReply, RequestLike, Site
from dsc_bindings.runtime.peer import Peer
from dsc_core import Limits, Reply
from dsc_core.config import max_request_bytes
from dsc_core.content_type import soap_media_type_refusal
from dsc_core.fast_init import fast_init

__all__ = [
    "SERVER_NAME",
    "Answered",
    "Opened",
    "Rejection",
    "RequestHead",
    "RequestRules",
    "body_limit_setting",
    "check_head",
    "error_reply",
    "header_fields",
    "reply_headers",
]

log = logging.getLogger("dsc.http")

SERVER_NAME = "dsc-server"
_SERVER_NAME = SERVER_NAME.encode("ascii")


@dataclass(frozen=True, slots=True)
class Rejection:
    """An HTTP-level refusal of a request head, answered before any body is read."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


@fast_init
@dataclass(frozen=True, slots=True)
class RequestHead:
    """The parts of a request head the rules read (raw header values, None when absent)."""

    method: bytes
    target: str
    content_type: bytes | None = None
    content_length: bytes | None = None
    transfer_encoding: bytes | None = None
    fetch_site: bytes | None = None
    origin: bytes | None = None
    cookie: bytes | None = None
    csrf: bytes | None = None
    if_none_match: bytes | None = None

    @classmethod
    def parse(
        cls, method: bytes, target: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> RequestHead:
        """From lower-cased header names (h11 and ASGI both give them so), in one pass."""
        content_type = content_length = transfer_encoding = fetch_site = origin = None
        cookie = csrf = if_none_match = None
        for key, value in headers:
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                content_length = value
            elif key == b"transfer-encoding":
                transfer_encoding = value
            elif key == b"sec-fetch-site":
                fetch_site = value
            elif key == b"origin":
                origin = value
            elif key == b"cookie":
                cookie = value
            elif key == b"x-csrf-token":
                csrf = value
            elif key == b"if-none-match":
                if_none_match = value
        return cls(
            method,
            target,
            content_type,
            content_length,
            transfer_encoding,
            fetch_site,
            origin,
            cookie,
            csrf,
            if_none_match,
        )

    @property
    def has_body(self) -> bool:
        if self.transfer_encoding is not None:
            return True
        length = self.content_length
        return length is not None and length.strip() not in (b"", b"0")


@dataclass(frozen=True, slots=True)
class Answered:
    """Answer at once with ``reply`` and ``headers``; ``refused``: an HTTP-level refusal (the
    body, if any, is not read)."""

    reply: Reply
    headers: tuple[tuple[str, str], ...] = ()
    refused: bool = False


@fast_init
@dataclass(frozen=True, slots=True)
class Opened:
    """Carry the request out: ``opener`` opens the service request (body fed to it, its
    ``finish`` is the Reply).  ``web``: an answer of the web endpoints (their headers, and an
    :class:`~.site.ApiReply`'s own, go with it)."""

    opener: Callable[[], RequestLike]
    web: bool = False


class RequestRules:
    """The rules of one listener's :class:`~.site.Site` (module doc)."""

    __slots__ = (
        "_answer_get",
        "_limits",
        "_observer",
        "_open_api",
        "_own_origins",
        "_soap",
        "web_headers",
    )

    def __init__(self, site: Site, limits: Limits) -> None:
        self._soap = site.requests
        self._limits = limits
        pages = site.pages
        self._answer_get: Callable[[str, str | None], Reply | RequestLike | None] | None = (
            pages.answer_get if pages is not None else None
        )
        #: Headers of every answer of the web endpoints (CSP and friends).
        self.web_headers: tuple[tuple[str, str], ...] = pages.headers if pages is not None else ()
        self._open_api: Callable[[ApiHead, str | None, Peer], RequestLike] | None = (
            site.api.open_api if site.api is not None else None
        )
        self._own_origins = site.own_origins
        self._observer = site.observer

    def refused(self, status: int) -> None:
        """Count an HTTP-level refusal (the observer's metrics)."""
        if self._observer is not None:
            self._observer.http_refused(status)

    def refuse(self, head: RequestHead, peer: Peer, rejection: Rejection) -> Answered:
        self.refused(rejection.status)
        log.warning(
            "%s: %s %s refused with %d: %s",
            peer,
            head.method.decode("ascii", "replace"),
            head.target,
            rejection.status,
            rejection.message,
        )
        return Answered(
            error_reply(rejection.status, rejection.message), rejection.headers, refused=True
        )

    def decide(
        self,
        head: RequestHead,
        identity: str | None,
        peer: Peer,
        unusable_certificate: str | None = None,
    ) -> Answered | Opened:
        """What this request gets (module doc)."""
        # Issue 14: what a browser marks as sent by another site is refused, on every path.
        foreign = cross_site_refusal(head.fetch_site, head.origin, self._own_origins)
        if foreign is not None:
            return self.refuse(head, peer, Rejection(403, foreign))
        if unusable_certificate is not None:
            return self.refuse(head, peer, Rejection(403, f"Refused: {unusable_certificate}."))
        target = head.target
        if self._open_api is not None and target.startswith("/api/"):
            # The web console's JSON API (.webconsole.api): its own admission (a session, its
            # CSRF token, JSON bodies), answered at the end of the body like SOAP.
            return self._web_api(head, identity, peer)
        if head.method in (b"GET", b"HEAD") and self._answer_get is not None:
            # The status page, its JSON, /metrics and /healthz (.statuspage); HEAD gets the
            # head of the same answer (RFC 9110 9.3.2).  Any other GET is refused below like
            # every other method but POST.
            reply = self._answer_get(target, identity)
            if isinstance(reply, Reply):
                return Answered(reply, self.web_headers)
            if reply is not None:
                # The answer needs the directory (.observe.web.StatusRequest): it is carried
                # out like a SOAP request, at the end of the (empty) body.
                get_request = reply
                return Opened(lambda: get_request, web=True)
        requests = self._soap
        if requests is None:
            return self.refuse(head, peer, Rejection(404, "This listener serves no SOAP."))
        rejection = check_head(head.method, head.content_length, self._limits)
        ctype = head.content_type.decode("latin-1") if head.content_type is not None else None
        if rejection is None:
            unsupported = soap_media_type_refusal(ctype)
            if unsupported is not None:
                rejection = Rejection(415, unsupported)
        if rejection is not None:
            return self.refuse(head, peer, rejection)
        return Opened(lambda: requests.open_request(ctype, identity, target, peer))

    def _web_api(self, head: RequestHead, identity: str | None, peer: Peer) -> Answered | Opened:
        length = head.content_length.strip() if head.content_length is not None else b""
        if length.isdigit() and int(length) > MAX_API_BODY_BYTES:
            return self.refuse(
                head, peer, Rejection(413, f"The request body exceeds {MAX_API_BODY_BYTES} bytes.")
            )

        def text(value: bytes | None) -> str | None:
            return None if value is None else value.decode("latin-1")

        api_head = ApiHead(
            head.method.decode("ascii", "replace"),
            head.target,
            text(head.content_type),
            text(head.cookie),
            text(head.csrf),
            text(head.if_none_match),
        )
        assert self._open_api is not None
        api = self._open_api(api_head, identity, peer)
        return Opened(lambda: api, web=True)

    def reply_extra(self, reply: Reply, web: bool) -> tuple[tuple[str, str], ...]:
        """The headers that go with the answer of an :class:`Opened` request."""
        if not web:
            return ()
        # An API answer carries headers of its own (Set-Cookie, ETag: .webconsole.api).
        own = reply.headers if isinstance(reply, ApiReply) else ()
        return (*self.web_headers, *own)


def check_head(method: bytes, length: bytes | None, limits: Limits) -> Rejection | None:
    """405 for anything but POST (every SOAP operation is a POST, R1; the read-only GET
    endpoints of .statuspage are answered before this check); 413 when the declared
    Content-Length exceeds max_image_bytes + max_envelope_bytes (R12), before the body is read
    (and before any 100 Continue)."""
    if method != b"POST":
        return Rejection(
            405,
            f"Method {method.decode('ascii', 'replace')} is not "
            "allowed; this server only answers POST.",
            (("Allow", "POST"),),
        )
    if length is not None:
        try:
            declared = int(length)
        except ValueError:  # the front end already validated it; stay defensive
            return Rejection(400, "The Content-Length header is not a number.")
        if declared > max_request_bytes(limits):
            return Rejection(
                413,
                f"The request body of {declared} bytes exceeds the limit of "
                f"{max_request_bytes(limits)} bytes{body_limit_setting(limits)}.",
            )
    return None


def body_limit_setting(limits: Limits) -> str:
    """What a 413 adds so that an administrator knows what to raise: the body limit is one
    image plus its envelope (dsc_core.config.max_request_bytes), the image set by
    ``[limits] max_image_bytes``."""
    return f" (one image of at most max_image_bytes = {limits.max_image_bytes}, plus its envelope)"


def error_reply(status: int, message: str) -> Reply:
    """The plain-text body of an HTTP-level error (not SOAP: no exchange was opened)."""
    phrase = _phrase(status)
    return Reply(status, "text/plain; charset=utf-8", f"{status} {phrase}: {message}\n".encode())


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


@functools.lru_cache(maxsize=64)
def reason(status: int) -> bytes:
    return _phrase(status).encode("ascii")


@functools.lru_cache(maxsize=64)
def _header_value(value: str) -> bytes:
    """A header value of the server's own, checked once (a bug, not a client, could break it)."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"header value with a line break: {value!r}")
    return value.encode("latin-1")


def reply_headers(
    reply: Reply, extra: tuple[tuple[str, str], ...] = (), *, server: bool = True
) -> list[tuple[bytes, bytes]]:
    """The response headers of ``reply``: Server (unless the front end's server names itself),
    ``extra``, then its framing.  Every name and value is the server's own (never a client's
    bytes)."""
    return header_fields(reply.status, reply.content_type, len(reply.body), extra, server=server)


def header_fields(
    status: int,
    content_type: str,
    length: int,
    extra: tuple[tuple[str, str], ...] = (),
    *,
    server: bool = True,
) -> list[tuple[bytes, bytes]]:
    """:func:`reply_headers` of a reply of this status, content type and body length."""
    headers = [(b"Server", _SERVER_NAME)] if server else []
    headers += [(name.encode("ascii"), value.encode("latin-1")) for name, value in extra]
    if status != 304:
        # A 304 (the web console's If-None-Match) has no content, and a Content-Length
        # there would have to be the 200's (RFC 9110 section 8.6): none is sent.
        headers += [
            (b"Content-Type", _header_value(content_type)),
            (b"Content-Length", str(length).encode("ascii")),
        ]
    return headers
