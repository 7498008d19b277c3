"""The read-only web endpoints served beside the SOAP services, on the same listener.

=================  ===============================================  ============================
``GET /``          the status page: one static HTML file, inline    scan administrators (R10)
                   CSS and JS (drawing with the web console's
                   ``/dom.js``), no CDN, no build step; it polls
                   ``/status.json`` every second and redraws
``GET /status.json``  repository state, active jobs with progress,  scan administrators (R10)
                   one page of the history with times and
                   outcomes (``?limit=N&cursor=C``), the devices of
                   most recent contact (``?devices=N``),
                   subscriptions, counters (``?job=TOKEN``: one
                   job, with where each filter delivered)
``GET /metrics``   Prometheus text format (prometheus_client)       every client that passed TLS
``GET /healthz``   ``ok``; or ``degraded`` (200) / ``down`` (503)   every client that passed TLS
                   and each failing check (.health)
=================  ===============================================  ============================

R10: with client certificates required, the page and its JSON show user names, devices and
destinations, so only scan administrators see them (403 otherwise).  ``/metrics`` holds counts
only (no user, token or address) and ``/healthz`` only up/down: every client whose certificate
the TLS layer accepted may read them, so a monitoring system needs a client certificate but not
an administrator's.  Without client certificates (development mode) everyone is an
administrator, as for MS-BDSRR.

:func:`answer` decides; it needs a :class:`View` of the service, taken in the core's owner
context (cheap: no disk, no network).

``/status.json`` is answered on the event loop, so its cost must not grow with the history: the
history is paged (``limit``, default :data:`HISTORY_PAGE`, at most :data:`MAX_HISTORY_PAGE`; the
answer's ``history_next`` is the ``cursor`` of the next page), the counters are the durable
totals kept in memory (.tally), the devices are the most recent ``devices`` (default
:data:`DEVICES_PAGE`) read from the book's recency order, and only the active jobs are listed
whole.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from dsc_bindings.http.site import split_target
from dsc_bindings.observe.health import Check, Health
from dsc_bindings.observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dsc_bindings.observe.observer import Observer
from dsc_bindings.store import tally
from dsc_core import Reply
from dsc_core.outcomes import ENDED_OUTCOMES

__all__ = ["OPEN_PATHS", "PAGE", "PATHS", "SECURITY_HEADERS", "View", "answer"]

JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
PATHS = frozenset({"/", "/status.json", "/metrics", "/healthz"})
#: The paths for scan administrators only (R10: they show users, devices and destinations).
ADMIN_PATHS = frozenset({"/", "/status.json"})
#: The paths that hold no user, token or address (R10 note above): anyone may read them, and
#: the monitoring listener (``[server] monitor_listen``) serves only these.
OPEN_PATHS = PATHS - ADMIN_PATHS
#: Completed jobs in one /status.json answer, unless ``?limit=`` says otherwise (and the most).
HISTORY_PAGE = 50
MAX_HISTORY_PAGE = 500
#: Devices in one /status.json answer, the most recent contact first, unless ``?devices=``
#: says otherwise (at most :data:`MAX_HISTORY_PAGE`); ``devices_size`` says how many are kept.
DEVICES_PAGE = 50


@dataclass(frozen=True, slots=True)
class View:
    """What the page needs from the core and the service, read by the core's owner."""

    repository_state: str
    subscriptions: tuple[dict[str, Any], ...]
    #: Whether the client may see the page: the core's rule (``dsc_core.users.is_scan_admin``,
    #: R10/R14), decided by the service, with the directory's answer when there is one.
    admin: bool
    data_dir: Path
    store_open: bool
    version: str
    #: The last result of the .health checks (None before the first).
    health: Health | None = None
    #: ServerConfig.stalled_after_seconds: when an active job is shown as stalled.
    stalled_after_seconds: float = 60.0
    #: The PostgreSQL store's instances (``ClusterMember.as_json``); None with SQLite.
    cluster: dict[str, Any] | None = None


def _reply(status: int, content_type: str, body: bytes) -> Reply:
    return Reply(status, content_type, body)


def _text(status: int, message: str) -> Reply:
    return _reply(status, TEXT_TYPE, f"{message}\n".encode())


def healthy(view: View) -> Health:
    """What /healthz and /metrics report: what the loop knows at once (the repository, the
    store open), then the last result of the .health checks (run off the loop)."""
    stopped = view.repository_state == "Stopped"
    now = [Check("repository", "Stopped (the server is shutting down)" if stopped else None)]
    if not view.store_open:
        now.append(Check("store", "the job store is closed"))
    last = view.health.checks if view.health is not None else (Check("checks", "not run yet"),)
    known = {check.name for check in now}
    return Health((*now, *(check for check in last if check.name not in known)))


@functools.cache
def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsc-server")
    except PackageNotFoundError:  # a checkout that was never installed
        return "(not installed)"


class BadQuery(ValueError):
    """A /status.json query that cannot be answered (HTTP 400, with this text)."""


def _limit(query: dict[str, list[str]], name: str = "limit", default: int = HISTORY_PAGE) -> int:
    text = query.get(name, [str(default)])[0]
    if not text.isdigit() or not 1 <= int(text) <= MAX_HISTORY_PAGE:
        raise BadQuery(f"{name} must be a number from 1 to {MAX_HISTORY_PAGE}, not {text!r}")
    return int(text)


def snapshot(
    view: View,
    observer: Observer,
    *,
    limit: int = HISTORY_PAGE,
    cursor: str = "",
    devices_limit: int = DEVICES_PAGE,
) -> dict[str, Any]:
    now = time.time()
    try:
        history, next_cursor, history_size = observer.history(limit, cursor)
    except ValueError as exc:
        raise BadQuery(f"cursor is not one this server gave ({exc})") from None
    totals = observer.tally.values()
    counters: dict[str, Any] = {
        "jobs_created": totals[tally.JOBS_CREATED],
        "images_received": totals[tally.IMAGES_RECEIVED],
        "bytes_received": totals[tally.BYTES_RECEIVED],
        "delivery_failures": totals[tally.DELIVERY_FAILURES],
        "event_delivery_failures": totals[tally.EVENT_DELIVERY_FAILURES],
        "connections": observer.connections,
        "jobs_ended": {o.value: totals[tally.ended(o)] for o in ENDED_OUTCOMES},
    }
    devices, devices_size = (
        observer.devices.recent(devices_limit) if observer.devices is not None else ([], 0)
    )
    state: dict[str, Any] = {
        "server": {
            "version": view.version,
            "now": datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
            "started": datetime.fromtimestamp(observer.started)
            .astimezone()
            .isoformat(timespec="seconds"),
            "repository_state": view.repository_state,
            "stalled_after_seconds": view.stalled_after_seconds,
        },
        "counters": counters,
        "active": observer.active(now, view.stalled_after_seconds),
        "history": history,
        "history_size": history_size,
        "history_next": next_cursor,
        "devices": [d.as_dict() for d in devices],
        "devices_size": devices_size,
        "subscriptions": list(view.subscriptions),
    }
    if view.cluster is not None:  # nothing of it with the SQLite store
        state["cluster"] = view.cluster
    return state


def answer(
    method: str, target: str, identity: str | None, view: View, observer: Observer
) -> Reply | None:
    """The answer to a GET of one of :data:`PATHS`, or None: not ours (the caller's 405)."""
    path, query_text = split_target(target)
    if method != "GET" or path not in PATHS:
        return None
    if path == "/healthz":
        health = healthy(view)
        return _text(health.status, health.text())
    if path == "/metrics":
        return _reply(200, METRICS_CONTENT_TYPE, observer.metrics.render(healthy(view)))
    if not view.admin:
        return _text(403, "The status page is for scan administrators only (R10).")
    if path == "/":
        return _reply(200, HTML_TYPE, PAGE.encode())
    query = parse_qs(query_text)
    if "job" in query:
        job = observer.job(query["job"][0], time.time(), view.stalled_after_seconds)
        if job is None:
            return _reply(404, JSON_TYPE, b'{"error": "no such job"}\n')
        return _reply(200, JSON_TYPE, json.dumps({"job": job}).encode())
    try:
        state = snapshot(
            view,
            observer,
            limit=_limit(query),
            cursor=query.get("cursor", [""])[0],
            devices_limit=_limit(query, "devices", DEVICES_PAGE),
        )
    except BadQuery as exc:
        return _reply(400, JSON_TYPE, json.dumps({"error": str(exc)}).encode())
    return _reply(200, JSON_TYPE, json.dumps(state).encode())


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dsc-server status</title>
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
 h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
 table { border-collapse: collapse; width: 100%; background: #fff; }
 th, td { text-align: left; padding: .25em .6em; border-bottom: 1px solid #e4e4e4;
          white-space: nowrap; }
 th { background: #f0f0f0; font-weight: 600; } td.num { text-align: right; }
 .tok { font-family: ui-monospace, monospace; }
 /* Outcomes (dsc_core.outcomes): a failure is never green. */
 .succeeded { color: #17702f; } .failed, .aborted, .bad { color: #b3261e; font-weight: 600; }
 .partial { color: #a35200; font-weight: 600; } .canceled { color: #666; }
 tr.failed td, tr.aborted td { background: #fdecea; } tr.partial td { background: #fff4e0; }
 tr.stalled td { background: #fdecea; } .stalled { color: #b3261e; font-weight: 600; }
 .card.bad { border-color: #b3261e; }
 #status { color: #666; } .muted { color: #888; font-style: italic; }
 .cards { display: flex; gap: 1em; flex-wrap: wrap; }
 .card { background: #fff; border: 1px solid #e4e4e4; padding: .5em 1em; min-width: 8em; }
 .card b { display: block; font-size: 1.3em; }
</style>
</head>
<body>
<h1>dsc-server</h1>
<p><a href="/">Open the console</a>: search the history, cancel, retry, purge, scan
processes.</p>
<div id="status">loading&hellip;</div>
<h2>Repository</h2>
<div class="cards" id="counters"></div>
<h2>Active jobs</h2>
<table id="active"><thead><tr><th>Token</th><th>State</th><th>Created</th><th>Elapsed</th>
<th>Images</th><th>Received</th><th>Last byte</th><th>User</th><th>Device</th><th>Process</th>
<th>Filters</th></tr></thead>
<tbody></tbody></table>
<h2>History <span id="history-size"></span></h2>
<table id="history"><thead><tr><th>Token</th><th>Outcome</th><th>Completed</th>
<th>Duration</th><th>Images</th><th>User</th><th>Device</th><th>Filters and destinations</th>
</tr></thead><tbody></tbody></table>
<h2>Devices</h2>
<table id="devices"><thead><tr><th>Address</th><th>Identity</th><th>First contact</th>
<th>Last contact</th><th>Jobs</th><th>Completed</th><th>Failed</th><th>Canceled</th></tr>
</thead><tbody></tbody></table>
<h2>Subscriptions</h2>
<table id="subscriptions"><thead><tr><th>Identifier</th><th>Notify to</th><th>Expires</th>
<th>Events</th></tr></thead><tbody></tbody></table>
<script src="/dom.js"></script>
<script>
"use strict";
// el, when and fill: the web console's dom.js (webconsole/dom.js), loaded above.
function size(n) {
  const units = ["B", "KB", "MB", "GB"]; let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function ago(seconds) {
  const s = Math.round(seconds);
  if (s < 120) return s + " s";
  if (s < 7200) return Math.floor(s / 60) + " min";
  return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min";
}
function filters(job, withPlaces) {
  return job.filters.map(f => f.filter + ": " + f.state +
    (f.reasons.length ? " (" + f.reasons.join(", ") + ")" : "") +
    (withPlaces && f.destinations.length ? " \\u2192 " + f.destinations.join(", ") : "")
  ).join("; ");
}
function draw(s) {
  document.getElementById("status").textContent = "dsc-server " + s.server.version +
    " \\u00b7 repository " + s.server.repository_state + " \\u00b7 updated " +
    when(s.server.now);
  const c = s.counters;
  const e = c.jobs_ended;
  // [name, value, shown as a failure when not zero]
  const cards = [["Repository", s.server.repository_state], ["Active jobs", s.active.length],
    ["Stalled", s.active.filter(j => j.stalled).length, true],
    ["Jobs created", c.jobs_created], ["Succeeded", e.succeeded],
    ["Partial", e.partial, true], ["Failed", e.failed, true], ["Aborted", e.aborted, true],
    ["Canceled", e.canceled], ["Images", c.images_received], ["Received", size(c.bytes_received)],
    ["Delivery failures", c.delivery_failures, true],
    ["Event delivery failures", c.event_delivery_failures, true],
    ["Connections", c.connections], ["Subscriptions", s.subscriptions.length]];
  const box = document.getElementById("counters"); box.replaceChildren();
  for (const [name, value, alarm] of cards) {
    const card = el("div", null, alarm && value ? "card bad" : "card");
    card.append(el("b", value, alarm && value ? "bad" : ""), el("span", name));
    box.append(card);
  }
  fill("#active", s.active.map(j => Object.assign([
    el("td", j.token, "tok"),
    el("td", j.state + (j.stalled ? " \u2014 stalled" : ""), j.stalled ? "stalled" : ""),
    el("td", when(j.created)), el("td", ago(j.elapsed_seconds), "num"),
    el("td", j.images + (j.uploading.length ? " (+" + j.uploading.length + " arriving)" : ""),
       "num"),
    el("td", size(j.bytes), "num"), el("td", ago(j.idle_seconds) + " ago", "num"),
    el("td", j.user), el("td", j.device),
    el("td", j.process), el("td", filters(j, false))],
    {id: "job-" + j.token, cls: j.stalled ? "stalled" : ""})), "no active jobs");
  document.getElementById("history-size").textContent = s.history_size > s.history.length ?
    "(latest " + s.history.length + " of " + s.history_size + "; dsc history lists all)" : "";
  fill("#history", s.history.map(j => Object.assign([
    el("td", j.token, "tok"),
    el("td", j.outcome + ": " + j.state +
       (j.reasons.length ? " (" + j.reasons.join(", ") + ")" : ""), j.outcome),
    el("td", when(j.completed)), el("td", j.seconds === null ? "" : j.seconds.toFixed(1) + " s",
    "num"), el("td", j.images, "num"), el("td", j.user), el("td", j.device),
    el("td", filters(j, true))], {id: "job-" + j.token, cls: j.outcome})), "no completed jobs");
  fill("#devices", s.devices.map(d => [
    el("td", d.address), el("td", d.identity || "-"), el("td", when(d.first_contact)),
    el("td", when(d.last_contact)), el("td", d.jobs, "num"), el("td", d.completed, "num"),
    el("td", d.failed, "num"), el("td", d.canceled, "num")]), "no devices yet");
  fill("#subscriptions", s.subscriptions.map(x => [
    el("td", x.id, "tok"), el("td", x.notify_to), el("td", when(x.expires)),
    el("td", x.events.join(", "))]), "no subscriptions");
}
async function poll() {
  try {
    const r = await fetch("status.json", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    draw(await r.json());
  } catch (e) {
    const s = document.getElementById("status");
    s.textContent = "cannot reach the server (" + e.message + "); retrying";
    s.className = "bad";
    setTimeout(poll, 2000); return;
  }
  document.getElementById("status").className = "";
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"""


def _inline_hashes(tag: str) -> str:
    """CSP source expressions for each inline ``<tag>`` element of :data:`PAGE`: the page keeps
    its script and style inline (one file, no build step) and the policy allows exactly those
    bytes (CSP Level 3, hash-source), so no injected script could run."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks
    )


#: Sent with every answer of the web endpoints (issue 14, section 1): no script but the page's
#: own, data only from this server, never framed (clickjacking), no content sniffing, and no
#: Referer leaking job tokens to links.
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "Content-Security-Policy",
        "default-src 'none'; "
        # 'self': the web console's own files (.webconsole.page); JSON answers are never run
        # as script (nosniff, a JSON type).
        f"script-src 'self' {_inline_hashes('script')}; "
        f"style-src 'self' {_inline_hashes('style')}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'",
    ),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
