"""The JSON admin API under ``/api/`` that the web console uses (issue 19), described for
clients in ``openapi.json`` (served at ``/api/openapi.json``).

Who may call it (R10, the same rule as MS-BDSRR):

- a browser signed in (:mod:`.session`): with ``[directory]``, by user name and password,
  checked by an LDAP bind over TLS and then the admin group (``is_listed_admin``); with client
  certificates, by the certificate; in the development mode (neither), by anyone;
- without a session, reads only: a client certificate whose identity is a scan administrator
  (``is_scan_admin``, asking the directory where needed), or anyone in the development mode.

Every state-changing call (POST, PUT, DELETE) needs a session and its CSRF token in the
``X-CSRF-Token`` header: the cookie alone is ambient, the header needs the page's own script.
Bodies are JSON (``Content-Type: application/json``, at most :data:`MAX_BODY_BYTES`).  Errors
are JSON ``{"error": "..."}`` whose text says what to do.  A password is never accepted over
plain HTTP beyond loopback.

The actions go through the core as the SOAP operations ``dsc`` uses (CancelPostScanJob,
RetryPostScanJob, PurgeJobHistory), with the caller's identity: one rule for each, the core's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import PurePath
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

from lxml import etree

from dsc_bindings.http.site import MAX_API_BODY_BYTES, ApiHead, RequestLike, split_target
from dsc_bindings.observe.observer import Observer
from dsc_bindings.observe.web import StatusPages
from dsc_bindings.runtime.peer import Peer
from dsc_bindings.runtime.ticket import Wait
from dsc_bindings.webconsole import page
from dsc_bindings.webconsole.processes import ROUTES as PROCESS_ROUTES
from dsc_bindings.webconsole.replies import JSON_TYPE, ApiError, ApiReply, json_reply, then
from dsc_bindings.webconsole.session import (
    COOKIE,
    Session,
    SessionBook,
    SignInLimiter,
    cookie_value,
)
from dsc_core import DirectoryAnswers, Lookups, Reply, RequestInfo, names
from dsc_core import client as C
from dsc_core.users import is_listed_admin, is_scan_admin

if TYPE_CHECKING:
    from dsc_bindings.runtime.service import ScanService

__all__ = [
    "MAX_BODY_BYTES",
    "ROUTES",
    "ApiHead",
    "ApiRequest",
    "Caller",
    "WebConsole",
    "openapi_document",
]

log = logging.getLogger("dsc.webconsole")

A = names.Action
#: The largest request body the API reads (the HTTP driver's 413 before the body).
MAX_BODY_BYTES = MAX_API_BODY_BYTES
#: Jobs in one answer of GET /api/jobs unless ``limit`` says otherwise, and the most.
JOBS_PAGE = 50
MAX_JOBS_PAGE = 500
#: A filtered GET /api/jobs looks at most at this many jobs of the history per answer, so an
#: answer stays quick however long the history; a short page with a ``next`` cursor then means
#: "more may match further back" (the page asks again when scrolled there).
MAX_SCANNED = 2000
#: Tokens a purge dry run lists (the count is always whole).
DRY_RUN_TOKENS = 100
STATE_CHANGING = frozenset({"POST", "PUT", "DELETE"})
#: Where the read-only status page (.statuspage's ``/``) is served: ``/`` is the console.
STATUS_PAGE = "/status"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, once admitted: ``user`` is the identity the core is given."""

    user: str
    session: Session | None


Handler = Callable[["ApiRequest", Caller, dict[str, str]], Reply | Wait]


class WebConsole:
    """The web console of one service: its page, its API and its sign-ins (wired by
    ``dsc_bindings.serve.compose`` as a site's :class:`~dsc_bindings.http.site.WebApi` and,
    in front of the status pages, its :class:`~dsc_bindings.http.site.WebPages`)."""

    def __init__(self, service: ScanService, observer: Observer, pages: StatusPages) -> None:
        self.service = service
        self.observer = observer
        self.pages = pages
        #: The web console's sign-ins (issue 19, .session).
        self.sessions = SessionBook()
        self.sign_in_limiter = SignInLimiter()

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return self.pages.headers

    def answer_get(self, target: str, identity: str | None) -> Reply | RequestLike | None:
        """The console's page files (.page); the read-only status page at ``/status`` (the
        status pages' ``/``); else the status pages' answer."""
        path, query = split_target(target)
        if path in page.PATHS:
            return page.page_reply(path)
        if path == STATUS_PAGE:
            return self.pages.answer_get(f"/?{query}" if query else "/", identity)
        return self.pages.answer_get(target, identity)

    def open_api(self, head: ApiHead, identity: str | None, peer: Peer | None) -> ApiRequest:
        """A request for ``/api/``."""
        return ApiRequest(self, head, identity, peer)


class ApiRequest:
    """One request for ``/api/``: the body is collected, then :meth:`finish` answers it (a
    Reply, or a Wait where the directory or the core's store work must run first)."""

    def __init__(
        self, console: WebConsole, head: ApiHead, identity: str | None, peer: Peer | None
    ) -> None:
        self.console = console
        self.service = console.service
        self.head = head
        self._identity = identity
        self._peer = peer
        self._body = bytearray()
        self._too_big = False
        self.path, query = split_target(head.target)
        self.query = {k: v[0] for k, v in parse_qs(query).items()}

    # --- RequestLike ----------------------------------------------------------------------------

    def feed(self, data: bytes) -> Wait | None:
        if len(self._body) + len(data) > MAX_BODY_BYTES:
            self._too_big = True
            self._body.clear()
        elif not self._too_big:
            self._body += data
        return None

    def finish(self) -> Reply | Wait:
        try:
            return self._answer()
        except ApiError as exc:
            return exc.reply()

    def abort(self) -> Wait | None:
        return None

    # --- routing ------------------------------------------------------------------------------

    def _answer(self) -> Reply | Wait:
        if self._too_big:
            raise ApiError(413, f"The request body exceeds {MAX_BODY_BYTES} bytes.")
        handler, params = _route(self.head.method, self.path)
        session = self.console.sessions.find(cookie_value(self.head.cookie))
        if self.head.method in STATE_CHANGING and handler is not _sign_in:
            self._check_csrf(session)
        if handler in _PUBLIC:
            return handler(self, Caller(session.user if session else "", session), params)
        if session is not None:
            return handler(self, Caller(session.user, session), params)
        return then(
            self._certificate_admin(), lambda user: handler(self, Caller(user, None), params)
        )

    def _check_csrf(self, session: Session | None) -> None:
        if session is None:
            raise ApiError(
                401, "Sign in first (POST /api/session): changes need a signed-in session."
            )
        sent = self.head.csrf or ""
        if not secrets.compare_digest(sent.encode(), session.csrf.encode()):
            raise ApiError(
                403,
                "The X-CSRF-Token header is missing or is not this session's token "
                "(GET /api/session gives it); reload the page.",
            )

    def _certificate_admin(self) -> str | Wait:
        """The caller without a session: a scan administrator's certificate, or anyone in the
        development mode (R10); else 401/403."""
        config, directory = self.service.config, self.service.directory
        identity = self._identity or ""
        if not config.require_client_certificates:
            if directory is None:
                return ""  # R10: without client certificates everyone is an administrator
            raise ApiError(401, "Sign in with your directory account (POST /api/session).")
        info = RequestInfo(now=self.service.clock(), identity=identity)
        if is_scan_admin(config, info):
            return identity
        if directory is None or not identity:
            raise _not_admin(identity)
        asked = self.service.offload(lambda: directory.answer(Lookups(admin=identity)))

        def decide() -> str:
            answers = _answers(asked.value, asked.error)
            if is_scan_admin(config, dataclasses.replace(info, directory=answers)):
                return identity
            raise _not_admin(identity)

        return Wait(asked, decide)

    # --- helpers for the handlers ---------------------------------------------------------------

    def json_body(self) -> dict[str, Any]:
        ctype = (self.head.content_type or "").split(";", 1)[0].strip().lower()
        if not self._body:
            return {}
        if ctype != "application/json":
            raise ApiError(415, "Send the request body as JSON (Content-Type: application/json).")
        try:
            value = json.loads(self._body)
        except ValueError as exc:
            raise ApiError(400, f"The request body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return value

    def soap(
        self,
        caller: Caller,
        action: str,
        payload: etree._Element,
        done: Callable[[C.Response], Reply],
        failed: Callable[[C.ClientFault], ApiError],
    ) -> Reply | Wait:
        """Run one SOAP operation through the core as ``caller`` (its rules, its faults):
        ``done`` answers the parsed response, ``failed`` turns a fault into an ApiError."""
        body = C.envelope(action, payload, message_id=f"urn:uuid:{uuid.uuid4()}")
        request = self.service.open_request(
            "application/soap+xml; charset=utf-8", caller.user or self._identity, "/api", self._peer
        )

        def parsed(reply: Reply) -> Reply:
            try:
                response = C.parse_response(reply.body, reply.status)
            except C.ClientFault as fault:
                raise failed(fault) from None
            return done(response)

        return then(request.feed(body), lambda _: then(request.finish(), parsed))

    @property
    def secure(self) -> bool:
        """The server is reached over TLS (what it advertises: exposure.py builds it)."""
        return self.service.config.base_url.lower().startswith("https:")

    @property
    def address(self) -> str:
        return self._peer.host if self._peer is not None and self._peer.known else "?"

    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.address.strip("[]")).is_loopback
        except ValueError:
            return False

    def cacheable(self, value: object) -> Reply:
        """A GET answer with an ETag: ``If-None-Match`` with it gets 304 and no body, so a page
        that polls costs a request head while nothing changes."""
        body = json.dumps(value, default=str).encode()
        tag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = (("Cache-Control", "no-cache, private"), ("ETag", tag))
        if self.head.if_none_match is not None and tag in self.head.if_none_match:
            return ApiReply(304, JSON_TYPE, b"", headers)
        return ApiReply(200, JSON_TYPE, body, headers)


def _answers(value: object, error: BaseException | None) -> DirectoryAnswers:
    if error is not None:
        raise error
    assert isinstance(value, DirectoryAnswers)
    if value.unavailable:
        raise ApiError(503, "The directory cannot be reached now; try again in a minute.")
    return value


def _not_admin(identity: str) -> ApiError:
    who = f"{identity!r} is" if identity else "this client is"
    return ApiError(
        403,
        f"{who} not a scan administrator (R10): ask to be added to [server] scan_admins or "
        "to the directory's admin group.",
    )


def _fault_error(fault: C.ClientFault, token: str = "") -> ApiError:
    sub = fault.subcode or ""
    if sub.endswith("ClientErrorJobTokenNotFound"):
        return ApiError(404, f"No job {token} is known to this server.")
    if sub.endswith("ClientErrorCurrentUserNotScanAdmin"):
        return ApiError(403, f"Not a scan administrator (R10): {fault.reason}")
    if sub.endswith("InvalidArgs"):
        return ApiError(400, f"Invalid argument: {fault.reason} ({fault.detail})")
    if fault.status >= 500:
        return ApiError(503, f"The server could not carry it out now: {fault.line()}")
    return ApiError(409, fault.line())


# --- session ---------------------------------------------------------------------------------


def _cookie(request: ApiRequest, value: str, max_age: int) -> tuple[str, str]:
    secure = "; Secure" if request.secure else ""
    return (
        "Set-Cookie",
        f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}",
    )


def _sign_in_mode(service: ScanService) -> str:
    if service.directory is not None:
        return "password"
    return "certificate" if service.config.require_client_certificates else "open"


def _session_info(request: ApiRequest, session: Session) -> dict[str, Any]:
    book = request.console.sessions
    return {
        "signed_in": True,
        "user": session.user,
        "method": session.method,
        "csrf": session.csrf,
        "idle_seconds": book.idle_seconds,
        "absolute_seconds": book.absolute_seconds,
        # The Cluster section is shown on a PostgreSQL store only (issue 18 point 6).
        "cluster": request.service.cluster is not None,
    }


def _get_session(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply:
    if caller.session is None:
        return json_reply(200, {"signed_in": False, "sign_in": _sign_in_mode(request.service)})
    return json_reply(200, _session_info(request, caller.session))


def _signed_in(request: ApiRequest, user: str, method: str) -> Reply:
    book = request.console.sessions
    session = book.open(user, method)
    log.info("web console: %s signed in (%s) from %s", user or "(anyone)", method, request.address)
    return json_reply(
        200,
        _session_info(request, session),
        (_cookie(request, session.token, int(book.absolute_seconds)),),
    )


def _password_attempt(request: ApiRequest, user: object, password: object) -> tuple[str, str]:
    """``user`` and ``password`` once they may be tried: both non-empty text, sent over TLS or
    from the server itself, and not held back by the failed attempts before (429)."""
    if not isinstance(user, str) or not isinstance(password, str) or not user or not password:
        raise ApiError(400, "Give a user name and a password (both non-empty text).")
    if not request.secure and not request.loopback():
        raise ApiError(
            403,
            "A password is never accepted over plain HTTP from another machine: serve with TLS "
            "(--tls-cert/--tls-key), or sign in on the server itself.",
        )
    wait = request.console.sign_in_limiter.wait_seconds(request.address, user)
    if wait > 0:
        log.warning(
            "web console: sign-in as %r from %s refused: too many failed attempts",
            user,
            request.address,
        )
        raise ApiError(
            429,
            f"Too many failed sign-ins; try again in {int(wait) + 1} seconds.",
            (("Retry-After", str(int(wait) + 1)),),
        )
    return user, password


def _sign_in(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply | Wait:
    body = request.json_body()
    service = request.service
    user, password = body.get("user"), body.get("password")
    if password is None:
        if service.directory is not None and not request._identity:
            raise ApiError(400, "Give your user name and password.")
        return then(
            request._certificate_admin(),
            lambda who: _signed_in(request, who, "certificate" if request._identity else "open"),
        )
    directory = service.directory
    if directory is None:
        raise ApiError(
            400, "This server has no [directory]: sign in with a client certificate instead."
        )
    user, password = _password_attempt(request, user, password)
    limiter = request.console.sign_in_limiter

    def check() -> tuple[str | None, DirectoryAnswers | None]:
        from dsc_bindings.directory.ldap import DirectoryError, DirectoryUnavailable

        try:
            found = directory.user_by_identity(user)
            if found is None:
                return "no such user", None
            directory.connect(found.dn, password).unbind()
        except DirectoryUnavailable:
            raise
        except DirectoryError as exc:
            return str(exc), None
        return None, directory.answer(Lookups(admin=user))

    asked = service.offload(check)

    def decide() -> Reply:
        from dsc_bindings.directory.ldap import DirectoryUnavailable

        if isinstance(asked.error, DirectoryUnavailable):
            raise ApiError(503, f"The directory cannot be reached now ({asked.error}); try later.")
        value = asked.value
        if asked.error is not None or not isinstance(value, tuple):
            raise ApiError(503, "The directory could not check the password; try again later.")
        problem, answers = value
        if problem is not None:
            limiter.failed(request.address, user)
            log.warning(
                "web console: failed sign-in as %r from %s: %s", user, request.address, problem
            )
            raise ApiError(401, "The user name or password is wrong.")
        limiter.succeeded(request.address, user)
        answers = _answers(answers, None)
        if not is_listed_admin(service.config, user, answers):
            log.warning(
                "web console: %r (from %s) is not a scan administrator: refused",
                user,
                request.address,
            )
            raise _not_admin(user)
        return _signed_in(request, user, "password")

    return then(Wait(asked, decide), _same)


def _same(reply: Reply) -> Reply:
    return reply


def _sign_out(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply:
    if caller.session is not None:
        request.console.sessions.close(caller.session.token)
        log.info("web console: %s signed out", caller.session.user or "(anyone)")
    return json_reply(200, {"signed_in": False}, (_cookie(request, "", 0),))


# --- jobs ------------------------------------------------------------------------------------


def _when(text: str, name: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            400, f"{name} must be a date and time like 2026-01-31T18:00:00+01:00, not {text!r}"
        ) from None
    if value.tzinfo is None:
        raise ApiError(400, f"{name} needs a UTC offset (like +01:00 or Z): {text!r}")
    return value


def _matcher(query: dict[str, str]) -> Callable[[dict[str, Any]], bool] | None:
    state = query.get("state", "").lower()
    user = query.get("user", "").lower()
    device = query.get("device", "").lower()
    text = query.get("q", "").lower()
    since = _when(query["since"], "since") if query.get("since") else None
    until = _when(query["until"], "until") if query.get("until") else None
    if not (state or user or device or text or since or until):
        return None

    def match(job: dict[str, Any]) -> bool:
        if (
            state
            and state not in ("active", "ended")
            and state
            not in (
                job["outcome"],
                job["state"].lower(),
            )
        ):
            return False
        if user and user not in (job["user"] or "").lower():
            return False
        if device and device not in (job["device"] or "").lower():
            return False
        stamp = datetime.fromisoformat(job["completed"] or job["created"])
        if since is not None and stamp < since:
            return False
        if until is not None and stamp >= until:
            return False
        if text:
            words = [job["token"], job["user"], job["device"], job["process"], job["identity"]]
            words += job["reasons"]
            for f in job["filters"]:
                # What it delivered too: "which job wrote Invoice_0042.pdf?" (issue 19).
                words += [f["filter"], f["state"], *f["reasons"], *f["destinations"]]
                words += f["delivered"]
            if not any(text in (w or "").lower() for w in words):
                return False
        return True

    return match


def _limit(query: dict[str, str]) -> int:
    text = query.get("limit", str(JOBS_PAGE))
    if not text.isdigit() or not 1 <= int(text) <= MAX_JOBS_PAGE:
        raise ApiError(400, f"limit must be a number from 1 to {MAX_JOBS_PAGE}, not {text!r}")
    return int(text)


def _list_jobs(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply:
    query = request.query
    limit, cursor = _limit(query), query.get("cursor", "")
    match = _matcher(query)
    observer = request.console.observer
    state = query.get("state", "").lower()
    jobs: list[dict[str, Any]] = []
    if not cursor and state != "ended":
        now = time.time()
        active = observer.active(now, request.service.config.stalled_after_seconds)
        active.sort(key=lambda j: j["created"], reverse=True)
        jobs = [j for j in active if match is None or match(j)][:limit]
    history: list[dict[str, Any]] = []
    next_cursor = ""
    size = 0
    if state != "active":
        try:
            if match is None:
                history, next_cursor, size = observer.history(limit - len(jobs) or 1, cursor)
                history = history[: limit - len(jobs)]
            else:
                history, next_cursor, size = _scan(observer, limit - len(jobs), cursor, match)
        except ValueError as exc:
            raise ApiError(400, f"cursor is not one this server gave ({exc})") from None
    return request.cacheable(
        {"jobs": jobs + history, "next": next_cursor, "history_size": size, "active": len(jobs)}
    )


def _scan(
    observer: Any, limit: int, cursor: str, match: Callable[[dict[str, Any]], bool]
) -> tuple[list[dict[str, Any]], str, int]:
    """Matching history jobs before ``cursor``, looking at no more than MAX_SCANNED."""
    found: list[dict[str, Any]] = []
    scanned = 0
    size = 0
    while len(found) < limit and scanned < MAX_SCANNED:
        page, after, size = observer.history(min(100, MAX_SCANNED - scanned), cursor)
        for index, job in enumerate(page):
            if match(job):
                found.append(job)
                if len(found) == limit:
                    # The cursor of the next answer is just after this job.
                    rest = page[index + 1 :]
                    if not rest:
                        return found, after, size
                    return found, _cursor_before(observer, job, cursor, index), size
        scanned += len(page)
        cursor = after
        if not after:
            break
    return found, cursor, size


def _cursor_before(observer: Any, job: dict[str, Any], cursor: str, index: int) -> str:
    """The cursor that continues right after the ``index``-th job of the page at ``cursor``."""
    _, after, _ = observer.history(index + 1, cursor)
    return str(after)


def _job(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply:
    token = params["token"]
    service = request.service
    found = request.console.observer.job(token, time.time(), service.config.stalled_after_seconds)
    if found is None:
        raise ApiError(404, f"No job {token} is known to this server (purged, or never made).")
    record = service.job_record(token)
    documents = [] if record is None else [dataclasses.asdict(d) for d in record.documents]
    timeline = [{"at": found["created"], "what": "created"}]
    if found["completed"]:
        timeline.append({"at": found["completed"], "what": f"ended {found['state']}"})
    return request.cacheable({"job": {**found, "documents": documents, "timeline": timeline}})


def _cancel(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply | Wait:
    token = params["token"]
    payload = C.token_request(names.DSC, "CancelPostScanJobRequest", token)
    observer = request.console.observer

    def done(_: C.Response) -> Reply:
        log.info("web console: %s canceled job %s", caller.user or "(anyone)", token)
        return json_reply(200, {"token": token, "canceled": True})

    def failed(fault: C.ClientFault) -> ApiError:
        known = observer.job(token, 0.0, 0.0)
        if known is not None and not known["active"]:
            return ApiError(
                409,
                f"Job {token} has already ended ({known['state']}); only an active job can be "
                "canceled.",
            )
        return _fault_error(fault, token)

    return request.soap(caller, A.DSC_CANCEL, payload, done, failed)


def _retry(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply | Wait:
    token = params["token"]
    payload = etree.Element(f"{{{names.EXT}}}RetryPostScanJobRequest", nsmap={"ext": names.EXT})
    etree.SubElement(payload, f"{{{names.EXT}}}JobToken").text = token

    def done(response: C.Response) -> Reply:
        count = C.text_of(response.payload, names.EXT, "FiltersToRun")
        log.info("web console: %s retried job %s", caller.user or "(anyone)", token)
        return json_reply(200, {"token": token, "filters_to_run": int(count or 0)})

    def failed(fault: C.ClientFault) -> ApiError:
        if (fault.subcode or "").endswith("OperationFailed"):
            return ApiError(
                409,
                f"Job {token} cannot be retried: only a completed job with a failed filter whose "
                "documents are still kept (see [jobs] spool_retention_seconds) can be.",
            )
        return _fault_error(fault, token)

    return request.soap(caller, A.EXT_RETRY_JOB, payload, done, failed)


def _purge(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply | Wait:
    body = request.json_body()
    if not isinstance(body.get("before"), str):
        raise ApiError(400, 'Give "before": the jobs that ended before this time go.')
    before = _when(body["before"], "before")
    if body.get("dry_run", False) is True:
        tokens = request.service.purgeable(before)
        return json_reply(
            200,
            {
                "dry_run": True,
                "before": before.isoformat(),
                "count": len(tokens),
                "tokens": tokens[:DRY_RUN_TOKENS],
            },
        )
    payload = etree.Element(f"{{{names.EXT}}}PurgeJobHistoryRequest", nsmap={"ext": names.EXT})
    etree.SubElement(payload, f"{{{names.EXT}}}Before").text = before.isoformat()

    def done(response: C.Response) -> Reply:
        purged = int(C.text_of(response.payload, names.EXT, "Purged") or 0)
        log.info(
            "web console: %s purged %d job(s) that ended before %s",
            caller.user or "(anyone)",
            purged,
            before.isoformat(),
        )
        return json_reply(200, {"dry_run": False, "before": before.isoformat(), "purged": purged})

    return request.soap(caller, A.EXT_PURGE_JOB_HISTORY, payload, done, _fault_error)


# --- the rest ------------------------------------------------------------------------------


def _devices(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply:
    book = request.console.observer.devices
    return request.cacheable({"devices": [d.as_dict() for d in book.all()] if book else []})


def _subscriptions(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply:
    view = request.console.pages.status_view(caller.user, None)
    return request.cacheable({"subscriptions": list(view.subscriptions)})


def _cluster(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply:
    cluster = request.service.cluster
    if cluster is None:
        raise ApiError(
            404,
            f"One instance: the store is SQLite in {request.service.data_dir}; instances "
            'need [store] kind = "postgresql".',
        )
    return request.cacheable(cluster.as_json())


def _health(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply:
    from dsc_bindings.observe.statuspage import healthy

    health = healthy(request.console.pages.status_view(caller.user, None))
    return request.cacheable(
        {
            "status": health.state,
            "checks": [
                {
                    "name": c.name,
                    "ok": c.problem is None,
                    "problem": c.problem,
                    "essential": c.essential,
                }
                for c in health.checks
            ],
        }
    )


#: Field names whose values are secrets: shown as "(set)" or "" (issue 19: secrets redacted).
_SECRET_WORDS = ("password", "secret", "token", "key")


def redacted(value: object) -> object:
    """A JSON-ready copy of a settings value with every secret replaced (see _SECRET_WORDS)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {
            str(k): ("(set)" if v else "")
            if any(word in str(k).lower() for word in _SECRET_WORDS)
            else redacted(v)
            for k, v in value.items()
            if not str(k).startswith("_")  # internal caches, not settings
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redacted(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, PurePath | datetime):
        return str(value)
    if callable(value):
        return None
    return str(value)


def _settings(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply:
    service = request.service
    directory = service.directory
    return request.cacheable(
        {
            "server": redacted(service.config),
            "filters": redacted(service.filter_settings),
            "directory": redacted(directory.settings) if directory is not None else None,
            "data_dir": str(service.data_dir),
        }
    )


def openapi_document() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("openapi.json").read_text(encoding="utf-8")
    value: dict[str, Any] = json.loads(text)
    return value


def _openapi(request: ApiRequest, caller: Caller, params: dict[str, str]) -> Reply:
    return request.cacheable(openapi_document())


#: Every route: (method, path pattern with {names}) -> handler.  openapi.json documents each
#: (a test holds them together).
ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/api/openapi.json"): _openapi,
    ("GET", "/api/session"): _get_session,
    ("POST", "/api/session"): _sign_in,
    ("DELETE", "/api/session"): _sign_out,
    ("GET", "/api/health"): _health,
    ("GET", "/api/jobs"): _list_jobs,
    ("GET", "/api/jobs/{token}"): _job,
    ("POST", "/api/jobs/{token}/cancel"): _cancel,
    ("POST", "/api/jobs/{token}/retry"): _retry,
    ("POST", "/api/history/purge"): _purge,
    ("GET", "/api/devices"): _devices,
    ("GET", "/api/subscriptions"): _subscriptions,
    ("GET", "/api/cluster"): _cluster,
    ("GET", "/api/settings"): _settings,
}
ROUTES.update(PROCESS_ROUTES)
#: Routes anyone who reached the server may call: the API's description, and signing in/out.
_PUBLIC: frozenset[Handler] = frozenset({_openapi, _get_session, _sign_in, _sign_out})


def _route(method: str, path: str) -> tuple[Handler, dict[str, str]]:
    parts = path.rstrip("/").split("/")
    allowed: list[str] = []
    for (verb, pattern), handler in ROUTES.items():
        names_ = pattern.split("/")
        if len(names_) != len(parts):
            continue
        params: dict[str, str] = {}
        for want, got in zip(names_, parts, strict=True):
            if want.startswith("{"):
                if not got:
                    break
                params[want[1:-1]] = unquote(got)
            elif want != got:
                break
        else:
            if verb == method:
                return handler, params
            allowed.append(verb)
    if allowed:
        raise ApiError(
            405,
            f"{method} is not allowed on {path}; use {', '.join(sorted(allowed))}.",
            (("Allow", ", ".join(sorted(allowed))),),
        )
    raise ApiError(404, f"No API endpoint {path} (GET /api/openapi.json lists them).")
