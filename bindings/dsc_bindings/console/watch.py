"""``dsc watch``: follow a scan server live through MS-BDSRR events (WS-Eventing 2004/08).

The client runs a small HTTP sink (``--listen ADDR:PORT``), subscribes at the server with the
sink's address as NotifyTo and EndTo (``--callback URL`` when the server must call another
address than the one listened on: NAT, a container, another interface), prints one line per
notification, and unsubscribes when interrupted (Ctrl-C, SIGTERM).  The subscription asks for the
four MS-BDSRR events (bdsrr 3.2.4.6): PostScanJobStatusEvent, PostScanJobEndStateEvent,
RepositoryStatusSummaryEvent and RepositoryElementsChangeEvent; it is renewed before it expires.
A SubscriptionEnd from the server (it shuts down, or gave up delivering) ends the watch.

What the watch trusts and checks (issue 14 §3):

- It listens on loopback unless told otherwise (``--listen``): a sink on every interface would
  take notifications from anyone who can reach it.
- Its NotifyTo and EndTo carry a random reference parameter (``w:Watch``), which the server
  copies into every notification as a header (WS-Addressing 2004/08 §2.1, R7); a POST without
  it, or a SubscriptionEnd for another subscription, is ignored.
- A server that cannot reach the advertised address says nothing here (its SubscriptionEnd
  goes to the same address).  So the watch asks the server (wse:GetStatus) every
  ``check_every`` seconds: a subscription the server no longer knows ended; and when the active
  jobs changed but no event arrived for a whole interval, the events are not getting through.
  Either is said with the address this watch advertised.
- Everything printed from a notification is escaped (no control characters reach the terminal).
"""

from __future__ import annotations

import http.server
import json
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import FrameType
from typing import Any, TextIO

from lxml import etree

from dsc_bindings.console.output import local_time, printable, short_token
from dsc_core import client as dc
from dsc_core import names

A = names.Action
Element = etree._Element

#: The four MS-BDSRR events a management client can subscribe to (bdsrr 3.2.4.6).
WATCHED_EVENTS = (
    A.DSC_JOB_STATUS_EVENT,
    A.DSC_JOB_END_STATE_EVENT,
    A.DSC_STATUS_SUMMARY_EVENT,
    A.DSC_ELEMENTS_CHANGE_EVENT,
)
#: Subscription length asked for; renewed when a third of it is left.
SUBSCRIPTION_SECONDS = 600
#: Largest notification body the sink reads (a RepositoryElementsChangeEvent is a few KB).
MAX_NOTIFICATION_BYTES = 1024 * 1024
#: How often the watch asks the server whether its subscription still exists (seconds).
CHECK_EVERY = 15.0
#: The reference parameter this watch puts in its NotifyTo/EndTo (module docstring).
WATCH_NS = "urn:dsc-server:watch"
WATCH_KEY = f"{{{WATCH_NS}}}Watch"

__all__ = [
    "CHECK_EVERY",
    "WATCHED_EVENTS",
    "Notification",
    "Sink",
    "Watcher",
    "describe",
    "loopback_warning",
    "parse_listen",
]


@dataclass(frozen=True, slots=True)
class Notification:
    """One POST the sink received."""

    path: str
    body: bytes
    received: datetime = field(default_factory=lambda: datetime.now().astimezone())


class Sink:
    """A ThreadingHTTPServer that queues every POST and answers 202 (one-way messages)."""

    def __init__(self, host: str, port: int) -> None:
        self.notifications: queue.Queue[Notification] = queue.Queue()
        received = self.notifications

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "dsc-watch"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the events are the output; access lines would interleave with them

            def do_POST(self) -> None:
                length = self.headers.get("Content-Length", "")
                if not length.isdigit() or int(length) > MAX_NOTIFICATION_BYTES:
                    self.send_error(413 if length.isdigit() else 411)
                    return
                body = self.rfile.read(int(length))
                received.put(Notification(self.path, body))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._server = Server((host, port), Handler)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dsc-watch-sink", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``:PORT`` or ``[v6]:PORT`` -> (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen wants ADDR:PORT (example 0.0.0.0:5380), not {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _callback_host(listen_host: str, server_url: str) -> str:
    """The address the server can reach us at, when only --listen was given: the local address
    of a connection towards the server (a wildcard listen address is no callback address)."""
    if listen_host not in ("0.0.0.0", "::", ""):
        return listen_host
    from urllib.parse import urlsplit

    parts = urlsplit(server_url)
    target = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        family = socket.getaddrinfo(target, port, type=socket.SOCK_DGRAM)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target, port))  # UDP connect sends nothing: it only picks a route
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- what one notification says ------------------------------------------------------------------


def _local(tag: object) -> str:
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def _find(el: Element | None, local: str) -> Element | None:
    if el is None:
        return None
    for child in el.iter():
        if _local(child.tag) == local:
            return child
    return None


def _texts(el: Element | None, local: str) -> list[str]:
    if el is None:
        return []
    return [(c.text or "").strip() for c in el.iter() if _local(c.tag) == local]


def describe(body: bytes, *, wide: bool = False) -> dict[str, Any]:
    """The fields of one notification as a dict: ``event`` (the action's last segment) and what
    that event carries.  Raises ValueError for a body that is not a SOAP envelope."""
    root = etree.fromstring(body, etree.XMLParser(resolve_entities=False, no_network=True))
    header = _find(root, "Header")
    headers = {_local(child.tag): child for child in header} if header is not None else {}
    action = (headers["Action"].text or "").strip() if "Action" in headers else ""
    body_el = _find(root, "Body")
    payload = next(iter(body_el), None) if body_el is not None else None
    event = action.rsplit("/", 1)[-1] or _local(payload.tag if payload is not None else "")
    out: dict[str, Any] = {"event": event, "action": action}
    key = next((c for c in header if c.tag == WATCH_KEY), None) if header is not None else None
    if key is not None:
        out["watch_key"] = (key.text or "").strip()
    read = _EVENT_FIELDS.get(event)
    if payload is not None and read is not None:
        out.update(read(payload))
    return out


def _job_fields(payload: Element) -> dict[str, Any]:
    """PostScanJobStatusEvent / PostScanJobEndStateEvent: the job, without empty labels."""
    status = _find(payload, "JobStatus")
    if status is None:
        status = _find(payload, "PostScanJobEndState")
    fields = dc.read_job(payload if status is None else status, names.DSC).as_dict()
    for key in ("psp_identifier", "psp_display_name", "user_name"):
        if not fields[key]:
            del fields[key]
    return fields


def _first(payload: Element, local: str) -> str:
    return (_texts(payload, local) or [""])[0]


_EVENT_FIELDS: dict[str, Callable[[Element], dict[str, Any]]] = {
    "PostScanJobStatusEvent": _job_fields,
    "PostScanJobEndStateEvent": _job_fields,
    "RepositoryStatusSummaryEvent": lambda payload: {
        "state": _first(payload, "RepositoryState"),
        "reasons": _texts(payload, "RepositoryStateReason"),
    },
    "RepositoryElementsChangeEvent": lambda payload: {"filters": _texts(payload, "Dialect")},
    "SubscriptionEnd": lambda payload: {
        "status": _first(payload, "Status").rsplit("/", 1)[-1],
        "reason": _first(payload, "Reason"),
        "identifier": _first(payload, "Identifier"),
    },
}


def line_of(fields: dict[str, Any], received: datetime, *, wide: bool = False) -> str:
    """One readable line: local time, event, and its essentials; nothing from the wire reaches
    the terminal unescaped (a state or reason could hold an escape sequence)."""
    return printable(_line(fields, received, wide=wide))


def _line(fields: dict[str, Any], received: datetime, *, wide: bool = False) -> str:
    when = local_time(received.isoformat(), wide=wide)
    event = fields["event"]
    if event in ("PostScanJobStatusEvent", "PostScanJobEndStateEvent"):
        kind = "job ended" if event == "PostScanJobEndStateEvent" else "job"
        reasons = ",".join(r for r in fields["reasons"] if r != "None")
        filters = " ".join(
            f"{f['dialect'].rsplit('/', 1)[-1].split(':')[-1]}:{f['state']}"
            for f in fields["filters"]
        )
        parts = [
            f"{kind} {short_token(fields['token'], wide)}",
            fields["state"] + (f" ({reasons})" if reasons else ""),
            f"images {fields['images_received']}",
        ]
        if filters:
            parts.append(filters)
        return f"{when}  " + "  ".join(parts)
    if event == "RepositoryStatusSummaryEvent":
        return f"{when}  repository {fields['state']}"
    if event == "RepositoryElementsChangeEvent":
        offered = ", ".join(names.filter_name(f) for f in fields["filters"])
        return f"{when}  repository configuration changed; filters: {offered or '(none)'}"
    if event == "SubscriptionEnd":
        return f"{when}  subscription ended by the server: {fields['status']} {fields['reason']}"
    return f"{when}  {event}"


# --- the watch itself ----------------------------------------------------------------------------


class Watcher:
    """Subscribe, print notifications until stopped, unsubscribe."""

    def __init__(
        self,
        call: Callable[..., dc.Response],
        server_url: str,
        sink: Sink,
        callback: str,
        out: TextIO,
        *,
        as_json: bool = False,
        wide: bool = False,
        check_every: float = CHECK_EVERY,
        err: TextIO | None = None,
    ) -> None:
        self._err = err or out
        self._call = call
        self._server_url = server_url
        self._sink = sink
        self._callback = callback.rstrip("/")
        self._out = out
        self._json = as_json
        self._wide = wide
        self._stop = threading.Event()
        self.manager = ""
        self.identifier = ""
        self.expires_at = 0.0
        #: Echoed by the server in every notification to this watch (module docstring).
        self.key = uuid.uuid4().hex
        self.check_every = check_every
        #: Notifications ignored because they were not for this watch.
        self.ignored = 0
        self._received_since_check = False
        self._jobs: tuple[tuple[str, str, int], ...] | None = None
        self._changed_silently = False
        self.warned_silent = False

    def stop(self) -> None:
        self._stop.set()

    @property
    def callback(self) -> str:
        """Where the server was told to send the events."""
        return f"{self._callback}/events"

    def _endpoint(self, parent: Element, local: str, path: str) -> None:
        epr = etree.SubElement(parent, f"{{{names.WSE}}}{local}")
        etree.SubElement(epr, f"{{{names.WSA}}}Address").text = f"{self._callback}/{path}"
        params = etree.SubElement(epr, f"{{{names.WSA}}}ReferenceParameters")
        etree.SubElement(params, WATCH_KEY, nsmap={"w": WATCH_NS}).text = self.key

    def subscribe(self) -> None:
        request = etree.Element(f"{{{names.WSE}}}Subscribe", nsmap={"wse": names.WSE})
        self._endpoint(request, "EndTo", "end")
        delivery = etree.SubElement(request, f"{{{names.WSE}}}Delivery", Mode=names.PUSH_MODE)
        self._endpoint(delivery, "NotifyTo", "events")
        etree.SubElement(request, f"{{{names.WSE}}}Expires").text = f"PT{SUBSCRIPTION_SECONDS}S"
        filter_el = etree.SubElement(
            request, f"{{{names.WSE}}}Filter", Dialect=names.DEVPROF_ACTION_DIALECT
        )
        filter_el.text = " ".join(WATCHED_EVENTS)
        response = self._call(A.SUBSCRIBE, request, to=self._server_url)
        payload = response.payload
        manager = dc.find_path(payload, names.WSE, "SubscriptionManager")
        for child in manager if manager is not None else ():
            if _local(child.tag) == "Address":
                self.manager = (child.text or "").strip()
        self.identifier = (_texts(manager, "Identifier") or [""])[0]
        if not self.identifier:
            raise ValueError("the SubscribeResponse has no wse:Identifier")
        self._granted(dc.text_of(payload, names.WSE, "Expires"))

    def _granted(self, expires: str) -> None:
        from dsc_core.eventing import parse_duration

        try:
            seconds = parse_duration(expires).total_seconds()
        except ValueError:
            seconds = SUBSCRIPTION_SECONDS
        self.expires_at = time.monotonic() + seconds

    def _manager_headers(self) -> list[Element]:
        ident = etree.Element(f"{{{names.WSE}}}Identifier", nsmap={"wse": names.WSE})
        ident.text = self.identifier
        return [ident]

    def renew(self) -> None:
        request = etree.Element(f"{{{names.WSE}}}Renew", nsmap={"wse": names.WSE})
        etree.SubElement(request, f"{{{names.WSE}}}Expires").text = f"PT{SUBSCRIPTION_SECONDS}S"
        response = self._call(
            A.RENEW, request, to=self.manager or self._server_url, headers=self._manager_headers()
        )
        self._granted(dc.text_of(response.payload, names.WSE, "Expires"))

    def unsubscribe(self) -> None:
        request = etree.Element(f"{{{names.WSE}}}Unsubscribe", nsmap={"wse": names.WSE})
        self._call(
            A.UNSUBSCRIBE,
            request,
            to=self.manager or self._server_url,
            headers=self._manager_headers(),
        )

    def subscription_exists(self) -> bool:
        """wse:GetStatus: False when the server no longer knows this subscription (a fault)."""
        request = etree.Element(f"{{{names.WSE}}}GetStatus", nsmap={"wse": names.WSE})
        try:
            self._call(
                A.GET_STATUS,
                request,
                to=self.manager or self._server_url,
                headers=self._manager_headers(),
            )
        except dc.ClientFault:
            return False
        return True

    def _jobs_now(self) -> tuple[tuple[str, str, int], ...]:
        """The active jobs and the newest ended one: a job that began and ended between two
        checks still changes the latter."""
        jobs = []
        for action, request, container in (
            (A.DSC_GET_ACTIVE_JOBS, "GetActiveJobsRequest", "ActiveJobs"),
            (A.DSC_GET_JOB_HISTORY, "GetJobHistoryRequest", "JobHistory"),
        ):
            payload = self._call(action, dc.empty_request(request), to=self._server_url).payload
            found = dc.read_summaries(payload, container)
            jobs += found if container == "ActiveJobs" else found[:1]  # history: newest first
        return tuple(sorted((j.token, j.state, j.images_received) for j in jobs))

    def check(self) -> str | None:
        """One look at the server (module docstring): "lost" when the subscription is gone;
        warns once when jobs changed and no event arrived for a whole interval."""
        if not self.subscription_exists():
            return "lost"
        jobs = self._jobs_now()
        received, self._received_since_check = self._received_since_check, False
        if received:
            self._changed_silently = False
        elif self._changed_silently and not self.warned_silent:
            self.warned_silent = True
            self._err.write(
                f"dsc: warning: jobs changed on the server but no event arrived here for "
                f"{self.check_every:g} s: the server may not reach {self.callback} (the "
                "address this watch advertised); give --listen ADDR:PORT or --callback URL\n"
            )
            self._err.flush()
        if self._jobs is not None and jobs != self._jobs and not received:
            self._changed_silently = True
        self._jobs = jobs
        return None

    def _ours(self, fields: dict[str, Any]) -> bool:
        if fields.pop("watch_key", None) != self.key:
            return False
        if fields["event"] == "SubscriptionEnd":
            return bool(fields.get("identifier") == self.identifier)
        return True

    def run(self) -> str:
        """Print notifications until :meth:`stop`, a SubscriptionEnd, or a subscription the
        server dropped; returns why it ended: "stopped", "ended" (SourceShuttingDown and the
        like), "failed" (the server gave up delivering) or "lost" (the subscription is gone)."""
        self._jobs = self._jobs_now()  # what "jobs changed" is measured against
        next_check = time.monotonic() + self.check_every
        while not self._stop.is_set():
            if self.expires_at - time.monotonic() < SUBSCRIPTION_SECONDS / 3:
                self.renew()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.check_every
                if self.check() == "lost":
                    return "lost"
            try:
                note = self._sink.notifications.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                fields = describe(note.body, wide=self._wide)
            except (ValueError, etree.XMLSyntaxError):
                self.ignored += 1  # not SOAP: not from the server
                continue
            if not self._ours(fields):
                self.ignored += 1
                continue
            self._received_since_check = True
            if self._json:
                fields = {"received": note.received.isoformat(timespec="seconds"), **fields}
                self._out.write(json.dumps(fields) + "\n")
            else:
                self._out.write(line_of(fields, note.received, wide=self._wide) + "\n")
            self._out.flush()
            if fields["event"] == "SubscriptionEnd":
                return "failed" if fields["status"] == "DeliveryFailure" else "ended"
        return "stopped"


def install_stop_signals(watcher: Watcher) -> Callable[[], None]:
    """SIGINT and SIGTERM stop the watch (then it unsubscribes); returns an undo function."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        watcher.stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)

    return restore


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_warning(listen: tuple[str, int], callback: str | None, server: str) -> str | None:
    """Why the server cannot reach this watch, when that is known before subscribing: a
    loopback listener for a server on another host."""
    from urllib.parse import urlsplit

    server_host = urlsplit(server).hostname or ""
    if callback or not _is_loopback(listen[0]) or _is_loopback(server_host):
        return None
    return (
        f"listening on {listen[0]} (this machine only) for a server on {server_host}: it "
        "cannot deliver events here; give --listen with an address it can reach"
    )


def callback_url(listen: tuple[str, int], sink_port: int, callback: str | None, server: str) -> str:
    """The sink's address as the server should call it."""
    if callback:
        return callback
    return f"http://{_url_host(_callback_host(listen[0], server))}:{sink_port}"
