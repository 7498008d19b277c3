"""The optional monitoring listener (``[server] monitor_listen``, issue 14): plain HTTP,
no client certificate, only ``GET``/``HEAD /healthz`` and ``/metrics``; anything else 404.

Both endpoints hold no user, token or address (.statuspage), so a monitoring system may read
them without a client certificate, on an address the operator chooses (loopback by default).
The listener is the same binding as the main one, serving :func:`monitor_site` of its site.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsc_bindings.http.driver import error_reply
from dsc_bindings.http.site import RequestLike, Site, WebPages
from dsc_core import Reply

__all__ = ["MONITOR_PATHS", "monitor_site"]

MONITOR_PATHS = frozenset({"/healthz", "/metrics"})
_NOT_HERE = "This listener serves only GET /healthz and /metrics."


@dataclass(frozen=True, slots=True)
class _MonitorPages:
    pages: WebPages

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return self.pages.headers

    def answer_get(self, target: str, identity: str | None) -> Reply | RequestLike | None:
        if target.split("?", 1)[0] not in MONITOR_PATHS:
            return error_reply(404, _NOT_HERE)
        # No identity: these two answer every client (R10 note in .statuspage).
        return self.pages.answer_get(target, None)


def monitor_site(site: Site) -> Site:
    """``site`` as the monitoring listener serves it: no SOAP (every other request 404), only
    the two paths of its pages, and no owner (the main listener's binding attaches it)."""
    assert site.pages is not None, "the monitoring listener needs the site's web pages"
    return Site(
        requests=None,
        pages=_MonitorPages(site.pages),
        observer=site.observer,
        own_origins=site.own_origins,
    )
